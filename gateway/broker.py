"""Start a private mosquitto on a free loopback port with edgeseal's configuration.

Used by ``scripts/broker`` (for people), ``scripts/demo`` and the tests. The configuration is
``config/mosquitto.conf`` plus one ``listener PORT 127.0.0.1`` line.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import TransportError, UsageError

_CONFIG = Path(__file__).resolve().parent.parent / "config" / "mosquitto.conf"
_FALLBACK_CONFIG = "set_tcp_nodelay true\nallow_anonymous true\npersistence false\n"


@dataclass(frozen=True, slots=True)
class Broker:
    """A running broker: where to reach it and the process that serves it."""

    host: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """The broker as an ``mqtt://host:port`` URL."""
        return f"mqtt://{self.host}:{self.port}"


def find_mosquitto() -> str | None:
    """The mosquitto binary on PATH or in /usr/sbin, or None."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_text(port: int) -> str:
    """edgeseal's mosquitto configuration with a loopback listener on ``port``."""
    base = _CONFIG.read_text() if _CONFIG.exists() else _FALLBACK_CONFIG
    return f"{base}\nlistener {port} 127.0.0.1\n"


@contextlib.contextmanager
def running_mosquitto(timeout_s: float = 10.0, *, port: int | None = None) -> Iterator[Broker]:
    """Run a private mosquitto for the duration of the ``with`` block.

    On a free loopback port, or on ``port`` (to bring a broker back where clients expect it).

    Raises:
        UsageError: mosquitto is not installed.
        TransportError: it did not start listening within ``timeout_s``.
    """
    binary = find_mosquitto()
    if binary is None:
        raise UsageError("mosquitto is not installed (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory(prefix="edgeseal-broker-") as tmp:
        port = free_port() if port is None else port
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(config_text(port))
        proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE)
        try:
            _wait_listening("127.0.0.1", port, proc, timeout_s)
            yield Broker("127.0.0.1", port, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise TransportError(f"mosquitto exited with {proc.returncode}: {err[-200:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TransportError(f"mosquitto did not listen on {host}:{port} within {timeout_s} s")


def main() -> int:
    """Run a broker in the foreground until Ctrl-C (``scripts/broker``)."""
    try:
        with running_mosquitto() as broker:
            print(f"mosquitto listening at {broker.url} (Ctrl-C stops it)", flush=True)
            broker.process.wait()
    except (UsageError, TransportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
