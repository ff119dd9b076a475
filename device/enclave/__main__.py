"""The enclave runtime process: ``python -I -m device.enclave HOME ROT_FD DOOR_FD [FLAG]``.

``FLAG`` is ``--simulated-clock`` to run apps on a simulated clock.

Started by ``device.hardware.power``. Runs BL2 from the bytes the RoT measured; BL2 runs the
runtime stage, which serves the door until the NW closes it. If the RoT refuses a stage (or a
stage fails), the process still answers the door, with ``boot_failed`` to every request, so the
NW can report why the board does not boot.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from device.enclave.boot import StageLoader
from device.enclave.frames import Channel, Client, PeerClosed, serve
from device.enclave.mpy import AppClock, SimulatedAppClock
from device.enclave.rot_client import RotClient
from protocol.cbor import Fields

SIMULATED_CLOCK_FLAG = "--simulated-clock"


class _BootFailed(Exception):
    """Every door request after a failed boot."""


def serve_boot_failure(door: Channel, reason: str) -> None:
    """Answer every door request with ``boot_failed`` and ``reason`` until the NW goes away."""

    def handle(_op: str, _args: Fields) -> dict[str, object]:
        raise _BootFailed(reason)

    serve(door, handle, lambda err: ("boot_failed", str(err)))


def main(argv: list[str]) -> int:
    """Boot the enclave runtime of the board in ``argv[0]``; the exit status."""
    if len(argv) not in (3, 4) or (len(argv) == 4 and argv[3] != SIMULATED_CLOCK_FLAG):
        sys.stderr.write(
            "usage: python -m device.enclave HOME ROT_FD DOOR_FD [--simulated-clock]\n"
        )
        return 2
    home = Path(argv[0])
    rot = RotClient(Client(Channel(socket.socket(fileno=int(argv[1])))))
    door = Channel(socket.socket(fileno=int(argv[2])))
    clock: AppClock | None = SimulatedAppClock() if len(argv) == 4 else None
    try:
        StageLoader(home, rot, door, clock).execute("BL2")
    except PeerClosed:
        return 1
    except Exception as err:  # a refused or failing stage: report it on the door
        serve_boot_failure(door, f"boot stage refused or failed: {type(err).__name__}: {err}"[:200])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
