"""The board's power switch: starts the RoT and the enclave runtime as processes (DESIGN §3).

``Board(home).power_on()`` starts ``python -I -m device.rot HOME FD`` and ``python -I -m
device.enclave HOME ROT_FD DOOR_FD`` with a scrubbed environment, wired by two socket pairs passed
with ``pass_fds`` (RoT ↔ enclave, enclave ↔ NW), and returns the NW's end of the door as an
``EnclaveDoor``. The RoT applies a pending debug unlock first thing (``debug.apply_at_reset``),
as the reset sequence of the silicon. ``power_off`` closes the door and ends both processes;
``reset`` is off then on. Only this module starts or ends the device's processes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from device.enclave.api import EnclaveDoor
from device.hardware.fuses import FUSES_FILE
from protocol.errors import UsageError

#: The environment of the device's processes: nothing inherited (no PYTHON*, no secrets).
SCRUBBED_ENV: Final = {"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}
STOP_TIMEOUT_S: Final = 3.0


class BoardError(UsageError):
    """The board cannot power on: no fuses in its home (manufacture it first)."""


@dataclass(frozen=True, slots=True)
class BoardPids:
    """Process ids of a powered board (for tests and the attack bench)."""

    rot: int
    enclave: int


class Board:
    """One simulated board: its home directory and, while powered, its two processes."""

    __slots__ = ("_door", "_enclave", "_rot", "door_timeout_s", "home", "simulated_app_clock")

    def __init__(
        self,
        home: Path,
        *,
        simulated_app_clock: bool = False,
        door_timeout_s: float | None = 30.0,
    ) -> None:
        """A board in ``home``.

        Args:
            simulated_app_clock: run apps on a simulated clock (sleeps return at once).
            door_timeout_s: how long the NW waits for one door reply.
        """
        self.home = Path(home)
        self.simulated_app_clock = simulated_app_clock
        self.door_timeout_s = door_timeout_s
        self._rot: subprocess.Popen[bytes] | None = None
        self._enclave: subprocess.Popen[bytes] | None = None
        self._door: EnclaveDoor | None = None

    def power_on(self) -> EnclaveDoor:
        """Start the RoT and the enclave runtime; return the NW's door.

        Raises:
            BoardError: the board is already on, or has no fuses.
        """
        if self._rot is not None:
            raise BoardError(f"{self.home}: the board is already powered on")
        if not (self.home / FUSES_FILE).exists():
            raise BoardError(f"{self.home}: no {FUSES_FILE}; manufacture the board first")
        rot_end, enclave_rot_end = socket.socketpair()
        enclave_door_end, nw_end = socket.socketpair()
        try:
            self._rot = self._spawn(["device.rot", str(self.home), str(rot_end.fileno())], rot_end)
            args = [str(enclave_rot_end.fileno()), str(enclave_door_end.fileno())]
            if self.simulated_app_clock:
                args.append("--simulated-clock")
            self._enclave = self._spawn(
                ["device.enclave", str(self.home), *args], enclave_rot_end, enclave_door_end
            )
        except BaseException:
            nw_end.close()
            self._terminate()
            raise
        finally:
            for end in (rot_end, enclave_rot_end, enclave_door_end):
                end.close()
        self._door = EnclaveDoor(nw_end, timeout_s=self.door_timeout_s)
        return self._door

    def power_off(self) -> None:
        """Close the door and end both processes (idempotent)."""
        if self._door is not None:
            self._door.close()
            self._door = None
        self._terminate()

    def reset(self) -> EnclaveDoor:
        """Power off, then on; the new door."""
        self.power_off()
        return self.power_on()

    def pids(self) -> BoardPids | None:
        """The process ids while powered, else None."""
        if self._rot is None or self._enclave is None:
            return None
        return BoardPids(rot=self._rot.pid, enclave=self._enclave.pid)

    def alive(self) -> bool:
        """Whether both processes are running."""
        procs = (self._rot, self._enclave)
        return all(p is not None and p.poll() is None for p in procs)

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.power_off()

    def _spawn(self, argv: list[str], *fds: socket.socket) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-I", "-m", *argv],
            env=SCRUBBED_ENV,
            pass_fds=tuple(s.fileno() for s in fds),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )

    def _terminate(self) -> None:
        for proc in (self._enclave, self._rot):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._rot = None
        self._enclave = None
