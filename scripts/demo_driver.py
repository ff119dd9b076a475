"""The end-to-end demo behind ``scripts/demo`` (DESIGN §12, §13).

Runs the whole story through the three console scripts as subprocesses: a broker (the one given
with ``--broker``, else a private mosquitto, else the embedded amqtt fallback), a vendor and a
gateway workspace, a batch of devices and one throwaway device, two sealed releases of an example
app, the gateway and the devices; waits until every device is attested and running; updates the
fleet to the second release; then attacks the throwaway device twice (a rollback to the older
signed image, a debug unlock) and shows the gateway's refusal with its
explanation. The update is ``edgeseal-gateway assign DEVICE RELEASE --broker URL`` (a signed
update command); only the attacker's hands on the throwaway board's files (copying flash and
fuses, ``DebugPort``) use edgeseal's libraries in process.
Everything is stopped in order (devices, gateway, broker) at the end, on Ctrl-C
(exit 130) or on SIGTERM, unless ``--keep-running``.

Run as ``.venv/bin/python -m scripts.demo_driver [--devices N] [--keep-running] [--broker URL]
[--db URL] [--home DIR] [--embedded-broker auto|mosquitto|amqtt]``. Exit status: 0 the story
ran, 1 a step failed (its command and the last line of its output are printed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final, TextIO

from rich.console import Console
from rich.table import Table

from device.hardware.flash import FLASH_FILE
from device.hardware.fuses import FUSES_FILE
from gateway.broker import config_text, find_mosquitto, free_port
from gateway.mqtt import MqttClient, parse_broker_url
from protocol import topics

ROOT: Final = Path(__file__).resolve().parent.parent
BIN: Final = Path(sys.executable).parent
APP: Final = ROOT / "examples" / "apps" / "thermostat"
PRODUCT: Final = "thermostat"
VICTIM_PREFIX: Final = "throwaway"
V1: Final = ("1.0.0", 1)
V2: Final = ("1.1.0", 2)
EXIT_FAILED: Final = 1
EXIT_INTERRUPTED: Final = 130
STOP_TIMEOUT_S: Final = 10.0
WAIT_TIMEOUT_S: Final = 120.0
POLL_S: Final = 0.2
MARKER: Final = ".edgeseal-demo"


class DemoError(Exception):
    """A step of the demo failed; the message says which and why, in one line."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop everything and exit 130."""


# --- console scripts --------------------------------------------------------------------------


def tool(name: str) -> str:
    """The console script ``name`` next to this interpreter, else on PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name) or name


def run_cli(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one console script to completion and return its output.

    Raises:
        DemoError: with ``check``, it exited non-zero.
    """
    try:
        proc = subprocess.run(
            [tool(argv[0]), *argv[1:]], capture_output=True, text=True, check=False, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DemoError(f"{' '.join(argv[:3])} …: {err}") from err
    if check and proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise DemoError(f"{' '.join(argv[:3])} … exited {proc.returncode}: {lines[-1]}")
    return proc


def run_json(argv: Sequence[str]) -> object:
    """Run a console script with ``--json`` output and parse it.

    Raises:
        DemoError: it failed or did not print JSON.
    """
    out = run_cli(argv).stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError as err:
        raise DemoError(f"{' '.join(argv[:3])}: not JSON: {out[:80]!r}") from err


# --- background processes ---------------------------------------------------------------------


@dataclass
class Children:
    """The background processes, stopped in reverse start order (devices, gateway, broker)."""

    logs: Path
    procs: list[tuple[str, subprocess.Popen[bytes], TextIO]] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, stdout and stderr to ``logs/NAME.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("a")  # a restarted device keeps its history
        with _signals_held():  # a Ctrl-C now would leave a child running that nobody stops
            proc = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            self.procs.append((name, proc, log))
        return proc

    def stop(self, name: str) -> None:
        """Stop one process by name (SIGTERM, then SIGKILL after a timeout)."""
        for item in [p for p in self.procs if p[0] == name]:
            _terminate(item[1])
            item[2].close()
            self.procs.remove(item)

    def stop_all(self) -> None:
        """Stop every process, the last started first."""
        for name, _, _ in reversed(list(self.procs)):
            self.stop(name)

    def check_alive(self) -> None:
        """Raise if a background process died.

        Raises:
            DemoError: naming the process and the last line of its log.
        """
        for name, proc, _ in self.procs:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").strip()
                last = tail.splitlines()[-1] if tail else "no output"
                raise DemoError(f"{name} exited {proc.returncode}: {last}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block, then act on the first one that came.

    The handlers only record (a child's exec resets them to the default, unlike SIG_IGN), so a
    child is started and put on the ``Children`` list before an interruption unwinds the demo.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in held
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        handler = previous[signal.Signals(caught[0])]
        if callable(handler):
            handler(caught[0], None)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 15.0) -> None:
    """Wait until something listens on 127.0.0.1:``port``.

    Raises:
        DemoError: the process exited or the port stayed closed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited {proc.returncode} (see logs/broker.log)")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise DemoError(f"{what} did not listen on port {port} in {timeout_s} s")


@contextlib.contextmanager
def broker(args: argparse.Namespace, children: Children, console: Console) -> Iterator[str]:
    """The broker URL: ``--broker``, a private mosquitto, or the amqtt fallback in a process."""
    if args.broker:
        console.print(f"broker: external {args.broker}")
        yield str(args.broker)
        return
    choice, binary, port = str(args.embedded_broker), find_mosquitto(), free_port()
    if choice == "mosquitto" and binary is None:
        raise DemoError("mosquitto is not installed (apt-get install mosquitto)")
    if choice != "amqtt" and binary is not None:
        conf = children.logs.parent / "mosquitto.conf"
        conf.write_text(config_text(port))
        wait_port(port, children.start("broker", [binary, "-c", str(conf)]), "mosquitto")
        console.print(f"broker: mosquitto at mqtt://127.0.0.1:{port}")
    else:
        if importlib.util.find_spec("amqtt") is None:
            raise DemoError(
                "no mosquitto and no amqtt: apt-get install mosquitto, or "
                ".venv/bin/pip install -e '.[embedded-broker]'"
            )
        argv = [sys.executable, "-m", "scripts.embedded_broker", "--port", str(port)]
        wait_port(port, children.start("broker", argv), "the embedded amqtt broker")
        why = "asked for" if choice == "amqtt" else "mosquitto not found"
        console.print(f"broker: embedded amqtt at mqtt://127.0.0.1:{port} ({why})")
    yield f"mqtt://127.0.0.1:{port}"


# --- watching the fleet -------------------------------------------------------------------------


@dataclass
class DeviceView:
    """What the demo knows of one device from the broker."""

    verdict: str | None = None
    status: str | None = None
    firmware: str | None = None
    reasons: tuple[str, ...] = ()
    telemetry: int = 0
    target: str | None = None
    started_wall_s: int | None = None
    started_at: float | None = None
    running_at: float | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A verdict event from ``{prefix}/events``."""

    device: str
    status: str
    reasons: tuple[str, ...]
    received_at: float


class Watcher:
    """Subscribes to the fleet states, the events and the telemetry; thread-safe views."""

    def __init__(self, url: str, since_s: int) -> None:
        """Watch the broker at ``url``, ignoring retained states older than ``since_s``."""
        self._lock = threading.Lock()
        self._since_s = since_s
        self.devices: dict[str, DeviceView] = {}
        self.verdicts: list[Verdict] = []
        prefix = topics.DEFAULT_PREFIX
        self.client = MqttClient(
            parse_broker_url(url),
            client_id=f"edgeseal-demo-{os.getpid()}",
            subscriptions=(
                topics.fleet_state_filter(prefix=prefix),
                topics.events(prefix=prefix),
                f"{prefix}/d/+/up/telemetry",
            ),
            on_message=self._on_message,
        )

    def view(self, device: str) -> DeviceView:
        """The (live) view of ``device``."""
        with self._lock:
            return self.devices.setdefault(device, DeviceView())

    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        with self._lock:
            if parts[-1] == "telemetry":
                self.devices.setdefault(parts[-3], DeviceView()).telemetry += 1
            elif parts[-1] == "state":
                self._on_state(json.loads(payload))
            elif parts[-1] == "events":
                event = json.loads(payload)
                if event.get("kind") == "verdict" and event.get("device"):
                    self.verdicts.append(
                        Verdict(
                            str(event["device"]),
                            str(event.get("detail")),
                            tuple(event.get("reasons", ())),
                            time.monotonic(),
                        )
                    )

    def _on_state(self, state: dict[str, object]) -> None:
        view = self.devices.setdefault(str(state["device"]), DeviceView())
        last_seen = state.get("last_seen_s")
        since = max(self._since_s, view.started_wall_s or 0)
        if view.started_wall_s is None or not isinstance(last_seen, int) or last_seen < since:
            return  # a device not started yet, or a retained state from an earlier run
        view.verdict = None if state.get("verdict") is None else str(state["verdict"])
        view.status = None if state.get("status") is None else str(state["status"])
        view.firmware = None if state.get("firmware") is None else str(state["firmware"])
        reasons = state.get("reasons")
        view.reasons = tuple(str(r) for r in reasons) if isinstance(reasons, list) else ()
        if self.is_up(view, view.target) and view.running_at is None:
            view.running_at = time.monotonic()

    @staticmethod
    def is_up(view: DeviceView, version: str | None) -> bool:
        """Attested (affirming), running, and on ``version`` when given."""
        return (
            view.verdict == "affirming"
            and view.status == "running"
            and (version is None or view.firmware == version)
        )


def wait_until(
    console: Console,
    children: Children,
    what: str,
    done: Callable[[], tuple[bool, str]],
    timeout_s: float = WAIT_TIMEOUT_S,
) -> float:
    """Show a spinner with ``done()``'s progress text until it reports done; the seconds taken.

    Raises:
        DemoError: a background process died, or ``timeout_s`` passed.
    """
    start = time.monotonic()
    with console.status(what) as status:
        while True:
            finished, progress = done()
            if finished:
                break
            children.check_alive()
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:
                raise DemoError(f"{what}: not done after {timeout_s:.0f} s ({progress})")
            status.update(f"{what} — {progress} ({elapsed:.0f} s)")
            time.sleep(POLL_S)
    return time.monotonic() - start


# --- the story --------------------------------------------------------------------------------


@dataclass
class Story:
    """The demo's state: where things are and what runs."""

    args: argparse.Namespace
    console: Console
    home: Path
    children: Children
    url: str = ""
    devices: list[str] = field(default_factory=list)
    victim: str = ""
    releases: dict[str, str] = field(default_factory=dict)
    watcher: Watcher | None = None

    @property
    def vendor(self) -> Path:
        """The vendor workspace."""
        return self.home / "vendor"

    @property
    def gw(self) -> Path:
        """The gateway workspace."""
        return self.home / "gateway"

    def gw_cli(self, *argv: str) -> list[str]:
        """An ``edgeseal-gateway`` command line on the demo's workspace and database."""
        db = ["--db", str(self.args.db)] if self.args.db else []
        return ["edgeseal-gateway", "--home", str(self.gw), *db, *argv]

    def device_home(self, device: str) -> Path:
        """The board home of ``device``."""
        batch = "victim" if device == self.victim else "fleet"
        return self.home / batch / device

    def step(self, text: str) -> None:
        """Announce a step."""
        self.console.print(f"[bold cyan]▸[/] {text}")

    def setup(self) -> None:
        """Workspaces, trust, devices, releases, imports and assignments."""
        self.step("vendor and gateway workspaces")
        run_cli(["edgeseal-provision", "vendor", "init", str(self.vendor), "--json"])
        run_cli(self.gw_cli("init", "--json"))
        run_cli(self.gw_cli("trust", "add", "manufacturer-ca", str(self.vendor / "ca-cert.pem")))
        run_cli(self.gw_cli("trust", "add", "vendor", str(self.vendor / "firmware.pem")))
        self.step(f"manufacturing {self.args.devices} devices and one throwaway device")
        self.devices = self._manufacture("fleet", PRODUCT, self.args.devices)
        self.victim = self._manufacture("victim", VICTIM_PREFIX, 1)[0]
        self.step(f"building and sealing {APP.name} {V1[0]} and {V2[0]}")
        (self.home / "releases").mkdir(exist_ok=True)
        for version, counter in (V1, V2):
            built = run_json(
                [
                    "edgeseal-provision", "firmware", "build", str(self.args.app),
                    "--vendor", str(self.vendor), "--product", PRODUCT,
                    "--version", version, "--security-counter", str(counter),
                    "--gateway-hpke-key", str(self.gw / "hpke-key.pem"),
                    "--out", str(self.home / "releases"), "--json",
                ]
            )  # fmt: skip
            assert isinstance(built, dict)
            self.releases[version] = str(built["release_id"])
        self.step("importing the enrollment and release bundles; assigning " + V1[0])
        for bundle in ("fleet/enrollment.bundle", "victim/enrollment.bundle"):
            run_cli(self.gw_cli("import", str(self.home / bundle), "--json"))
        for version in (V1[0], V2[0]):
            run_cli(self.gw_cli("import", str(self.release_file(version)), "--json"))
        for device in [*self.devices, self.victim]:
            run_cli(self.gw_cli("assign", device, self.releases[V1[0]]))

    def release_file(self, version: str) -> Path:
        """The release bundle of ``version``."""
        return self.home / "releases" / f"{PRODUCT}-{version}.release"

    def sealed_file(self, version: str) -> Path:
        """The sealed image of ``version``."""
        return self.home / "releases" / f"{PRODUCT}-{version}.sealed"

    def _manufacture(self, batch: str, prefix: str, count: int) -> list[str]:
        out = self.home / batch
        made = run_json(
            [
                "edgeseal-provision", "manufacture", "--vendor", str(self.vendor),
                "--product", PRODUCT, "--prefix", prefix, "--count", str(count),
                "--out", str(out), "--gateway-result-key", str(self.gw / "result-key.pem"),
                "--json",
            ]
        )  # fmt: skip
        assert isinstance(made, dict)
        return [str(d) for d in made["devices"]]

    def start_gateway(self) -> None:
        """Serve the gateway and wait until it is connected to the broker."""
        self.step("starting the gateway")
        argv = self.gw_cli("serve", "--broker", self.url)
        self.children.start("gateway", [tool(argv[0]), *argv[1:]])
        log = self.children.logs / "gateway.log"
        wait_until(
            self.console,
            self.children,
            "waiting for the gateway",
            lambda: ("serving on" in log.read_text(errors="replace"), "connecting"),
            timeout_s=30,
        )

    def start_device(self, device: str) -> None:
        """Run one device's normal world."""
        argv = [tool("edgeseal-device"), "run", "--home", str(self.device_home(device))]
        self.children.start(f"device-{device}", [*argv, "--broker", self.url])
        assert self.watcher is not None
        view = self.watcher.view(device)
        view.started_at, view.running_at = time.monotonic(), None
        view.started_wall_s = view.started_wall_s or int(time.time()) - 1
        view.target = view.target or V1[0]

    def wait_fleet(self, devices: Sequence[str], version: str, what: str) -> float:
        """Wait until every one of ``devices`` is attested and running ``version``."""
        watcher = self.watcher
        assert watcher is not None

        def done() -> tuple[bool, str]:
            up = sum(watcher.is_up(watcher.view(d), version) for d in devices)
            return up == len(devices), f"{up}/{len(devices)} attested and running {version}"

        return wait_until(self.console, self.children, what, done)

    def table(self, title: str, devices: Sequence[str], what: str = "running") -> None:
        """Print the fleet table."""
        watcher = self.watcher
        assert watcher is not None
        table = Table(title=title)
        for column in ("device", "verdict", "firmware", "telemetry", f"time to {what}"):
            table.add_column(column, justify="right" if column == "telemetry" else "left")
        for device in devices:
            v = watcher.view(device)
            took = (
                f"{v.running_at - v.started_at:.1f} s"
                if v.running_at is not None and v.started_at is not None
                else "-"
            )
            verdict = v.verdict or "-"
            color = "green" if verdict == "affirming" else "red"
            table.add_row(
                device, f"[{color}]{verdict}[/]", v.firmware or "-", str(v.telemetry), took
            )
        self.console.print(table)


# --- update and attacks ---------------------------------------------------------------------------


def push_update(story: Story, devices: Sequence[str], version: str) -> None:
    """Assign ``version`` to ``devices``; ``assign --broker`` publishes a signed update command."""
    release = story.releases[version]
    assert story.watcher is not None
    for device in devices:
        view = story.watcher.view(device)
        view.target, view.started_at, view.running_at = version, time.monotonic(), None
        run_cli(story.gw_cli("assign", device, release, "--broker", story.url))


def explain_refusal(story: Story, device: str, since: float, what: str) -> None:
    """Wait for a refusal of ``device`` after ``since``, then print its reasons and explanation."""
    watcher = story.watcher
    assert watcher is not None

    def refused() -> tuple[bool, str]:
        found = [
            v
            for v in watcher.verdicts
            if v.device == device and v.received_at >= since and v.status != "affirming"
        ]
        return bool(found), "waiting for the gateway's verdict"

    wait_until(story.console, story.children, f"{what}: attesting", refused, timeout_s=60)
    verdict = next(
        v for v in reversed(watcher.verdicts) if v.device == device and v.received_at >= since
    )
    story.console.print(
        f"  [bold red]refused[/] {device}: {verdict.status}, reasons {', '.join(verdict.reasons)}"
    )
    detail = run_json(story.gw_cli("device", device, "--json"))
    assert isinstance(detail, dict)
    timeline = [t for t in detail.get("timeline", []) if t.get("event") == "verdict"]
    for finding in timeline[-1].get("explanation", []) if timeline else []:
        story.console.print(
            f"    [bold]{finding.get('code')}[/]: expected {finding.get('expected')}"
        )
        story.console.print(f"      got {finding.get('got')}")
        if finding.get("cause"):
            story.console.print(f"      likely cause: {finding.get('cause')}")
        if finding.get("fix"):
            story.console.print(f"      fix: {finding.get('fix')}")


def wait_confirmed(story: Story, device: str, version: str) -> None:
    """Wait until ``device``'s active slot holds ``version`` confirmed (its counter advanced)."""
    home = str(story.device_home(device))

    def confirmed() -> tuple[bool, str]:
        status = run_json(["edgeseal-device", "status", "--home", home, "--json"])
        assert isinstance(status, dict)
        images = status["flash"]["images"]
        ok = any(i["version"] == version and i["status"] == "confirmed" for i in images)
        return ok, f"{device} confirming {version}"

    wait_until(story.console, story.children, "confirming the update", confirmed, timeout_s=60)


BOARD_FILES: Final = (FLASH_FILE, FUSES_FILE)


def save_board(story: Story, device: str, where: Path) -> None:
    """Copy ``device``'s flash and fuse files to ``where`` (an attacker's dump)."""
    where.mkdir(exist_ok=True)
    for name in BOARD_FILES:
        shutil.copy2(story.device_home(device) / name, where / name)


def restore_board(story: Story, device: str, where: Path) -> None:
    """Write the flash and fuse files saved in ``where`` back into ``device``'s board."""
    for name in BOARD_FILES:
        shutil.copy2(where / name, story.device_home(device) / name)


def restart_and_attest(story: Story, device: str) -> None:
    """Reset ``device`` and wait for an affirming verdict (the gateway learns its counters)."""
    watcher = story.watcher
    assert watcher is not None
    story.children.stop(f"device-{device}")
    since = time.monotonic()
    story.start_device(device)

    def affirmed() -> tuple[bool, str]:
        ok = any(
            v.device == device and v.received_at >= since and v.status == "affirming"
            for v in watcher.verdicts
        )
        return ok, f"{device} attesting after a reset"

    wait_until(story.console, story.children, "rebooting the throwaway device", affirmed, 60)


def attack_rollback(story: Story) -> None:
    """Restore the dump of the throwaway device taken on the old image, counters included."""
    device = story.victim
    story.step(f"attack 1 on {device}: rollback to the older signed image {V1[0]}")
    restart_and_attest(story, device)  # the gateway now knows the advanced app counter
    story.children.stop(f"device-{device}")
    save_board(story, device, story.home / "healthy")
    since = time.monotonic()
    dump = story.home / "attacker-dump"
    restore_board(story, device, dump)
    story.console.print(
        f"  reflashed the dump taken on {V1[0]} (vendor-signed, counter {V1[1]}) and glitched "
        "the anti-rollback fuses back; resetting the board"
    )
    story.start_device(device)
    explain_refusal(story, device, since, "rollback")


def attack_debug_unlock(story: Story) -> None:
    """Open the throwaway device's debug port and reset it."""
    from device.hardware.debug import DebugPort

    device = story.victim
    story.step(f"attack 2 on {device}: debug unlock and reset")
    story.children.stop(f"device-{device}")
    healthy = story.home / "healthy"
    if healthy.is_dir():  # undo the rollback: each attack starts from the updated board
        restore_board(story, device, healthy)
    since = time.monotonic()
    DebugPort(story.device_home(device)).request_unlock()
    story.console.print("  debug unlock requested; resetting the board")
    story.start_device(device)
    explain_refusal(story, device, since, "debug unlock")


def attacks(story: Story) -> None:
    """The two live attacks on the throwaway device, from the demo's own playbook.

    ``edgeseal-device attack NAME`` builds a bench of its own (workspaces, gateway, board) in an
    empty directory; on the demo's broker its gateway would answer the demo's devices too, and it
    has no rollback attack yet. So the demo attacks its throwaway device itself.
    """
    attack_rollback(story)
    attack_debug_unlock(story)


# --- main -----------------------------------------------------------------------------------------


def story_run(story: Story) -> None:
    """The whole demo, in order."""
    started = time.monotonic()
    story.setup()
    story.watcher = Watcher(story.url, since_s=int(time.time()) - 1)
    story.watcher.client.start()
    story.start_gateway()
    story.step(f"starting {len(story.devices)} devices and the throwaway device")
    everyone = [*story.devices, story.victim]
    for device in everyone:
        story.start_device(device)
    took = story.wait_fleet(everyone, V1[0], "attesting")
    story.table(f"fleet on {V1[0]} (all attested in {took:.1f} s)", everyone)
    save_board(story, story.victim, story.home / "attacker-dump")
    story.step(f"updating every device to {V2[0]}")
    push_update(story, everyone, V2[0])
    took = story.wait_fleet(everyone, V2[0], "updating")
    story.table(f"fleet on {V2[0]} (updated in {took:.1f} s)", everyone, f"running {V2[0]}")
    wait_confirmed(story, story.victim, V2[0])
    attacks(story)
    story.console.print(
        f"[bold green]demo done in {time.monotonic() - started:.1f} s[/] "
        f"(workspaces in {story.home}, logs in {story.children.logs})"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The demo's options."""
    parser = argparse.ArgumentParser(prog="scripts/demo", description="The edgeseal demo.")
    parser.add_argument("--devices", type=int, default=5, help="Fleet size (default 5).")
    parser.add_argument("--keep-running", action="store_true", help="Keep serving at the end.")
    parser.add_argument("--broker", help="An external broker, mqtt://HOST[:PORT].")
    parser.add_argument("--db", help="Registry database URL (default: SQLite in the workspace).")
    parser.add_argument("--home", type=Path, help="Working directory (default: a temp dir).")
    parser.add_argument("--app", type=Path, default=APP, help="The example app to seal.")
    parser.add_argument(
        "--embedded-broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
        help="Which broker to start when --broker is not given (default: mosquitto if found).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not 1 <= args.devices <= 50:
        parser.error("--devices: between 1 and 50")
    return args


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise Interrupted


@contextlib.contextmanager
def workdir(args: argparse.Namespace) -> Iterator[Path]:
    """The demo's home: ``--home`` (emptied), ``./.edgeseal/demo`` with --keep-running, or temp."""
    home = args.home or (Path(".edgeseal/demo") if args.keep_running else None)
    if home is None:
        with tempfile.TemporaryDirectory(prefix="edgeseal-demo-") as tmp:
            yield Path(tmp)
        return
    home = home.resolve()
    if home.exists() and any(home.iterdir()):
        if not (home / MARKER).exists():
            raise DemoError(f"{home} is not empty and not an earlier demo's home: not touching it")
        shutil.rmtree(home)  # an earlier demo's workspaces: start clean
    home.mkdir(parents=True, exist_ok=True)
    (home / MARKER).write_text("made by scripts/demo; deleted by the next run\n")
    yield home


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 done, 1 a step failed, 130 interrupted."""
    args = parse_args(argv)
    console = Console(highlight=False)
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with workdir(args) as home:
            return _run(args, console, home)
    except DemoError as err:
        console.print(f"[bold red]error:[/] {err}")
        return EXIT_FAILED
    except Interrupted:
        console.print("\n[yellow]interrupted[/]")
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, console: Console, home: Path) -> int:
    """The demo in ``home``; its exit status. Children are stopped whatever happens."""
    children = Children(home / "logs")
    story = Story(args, console, home, children)
    try:
        with broker(args, children, console) as url:
            story.url = url
            story_run(story)
            if args.keep_running:
                console.print("[bold]running; Ctrl-C stops everything[/]")
                while True:
                    children.check_alive()
                    time.sleep(1)
    except Interrupted:
        console.print("\n[yellow]interrupted: stopping everything[/]")
        _shutdown(story, console)
        return EXIT_INTERRUPTED
    except DemoError as err:
        console.print(f"[bold red]error:[/] {err} (logs in {children.logs})")
        _shutdown(story, console)
        return EXIT_FAILED
    finally:
        _shutdown(story, console)
    return 0


def _shutdown(story: Story, console: Console) -> None:
    """Stop devices, then the gateway, then any broker process; idempotent, ignores signals."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if story.children.procs:
        console.print("stopping devices, gateway and broker")
    story.children.stop_all()
    if story.watcher is not None:
        story.watcher.client.stop()
        story.watcher = None


if __name__ == "__main__":
    raise SystemExit(main())
