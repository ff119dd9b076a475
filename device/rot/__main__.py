"""The RoT process: ``python -I -m device.rot HOME FD`` (started by ``device.hardware.power``).

``FD`` is this process's end of the socket pair shared with the enclave runtime. The process reads
the fuses, runs the reset sequence, then answers the enclave until it goes away.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from device.enclave.frames import Channel, serve
from device.hardware.fuses import Fuses
from device.rot.service import RotService, classify, power_on

BOOT_SEED_BYTES = 32


def main(argv: list[str]) -> int:
    """Run the RoT for the board in ``argv[0]`` on descriptor ``argv[1]``; exit status."""
    if len(argv) != 2:
        sys.stderr.write("usage: python -m device.rot HOME FD\n")
        return 2
    home = Path(argv[0])
    channel = Channel(socket.socket(fileno=int(argv[1])))
    fuses = Fuses.in_home(home)
    # A fresh boot seed per power-on (RFC 9783 §4.3.2).
    state = power_on(fuses, os.urandom(BOOT_SEED_BYTES))
    serve(channel, RotService(home, fuses, state).handle, classify)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
