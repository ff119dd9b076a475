"""The embedded fallback broker: amqtt on a loopback port, in its own process (DESIGN §12).

``scripts/demo`` uses it when mosquitto is not installed. It serves MQTT 3.1.1 to anonymous
clients on ``127.0.0.1:PORT`` until SIGTERM or SIGINT; amqtt comes from the optional extra
``embedded-broker``. It is slow and has no shared subscriptions: fine for a handful of devices.

Run as ``python -m scripts.embedded_broker --port PORT``. Exit status: 0 stopped by a signal,
2 amqtt is not installed or the port is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2


def broker_config(port: int) -> dict[str, Any]:
    """amqtt's configuration: one loopback TCP listener, anonymous clients, no $SYS, no logs."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve(port: int) -> None:
    """Run the broker until SIGTERM or SIGINT."""
    from amqtt.broker import Broker  # type: ignore[import-untyped]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    broker = Broker(broker_config(port))
    await broker.start()
    print(f"amqtt listening at mqtt://127.0.0.1:{port}", flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):  # amqtt's shutdown may race closing clients
        await broker.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--port`` and serve."""
    parser = argparse.ArgumentParser(prog="embedded_broker", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    try:
        import amqtt  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        print(
            "error: amqtt is not installed (pip install edgeseal[embedded-broker])", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        asyncio.run(serve(args.port))
    except OSError as err:
        print(f"error: amqtt could not listen on port {args.port}: {err.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
