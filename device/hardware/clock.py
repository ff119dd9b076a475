"""The board's clock (DESIGN §1, §8): the attacker's to set, so nothing trusts it for expiry.

Board time = host time + an offset kept in ``clock.bin`` in the board's home directory; a missing
file means offset 0. ``set_board_time`` rewrites the file atomically.

On-disk format (version 1): the whole file, from offset 0 to EOF, is one canonical CBOR map::

    {"format": 1, "offset_s": int}     offset_s = board seconds - host seconds
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from device.hardware._files import atomic_write
from protocol import cbor
from protocol.errors import MalformedMessage, UsageError

CLOCK_FILE: Final = "clock.bin"
FORMAT_VERSION: Final = 1
_MAX_FILE: Final = 256
#: About ±292 billion years: any i64 of seconds.
_MAX_OFFSET: Final = (1 << 63) - 1


class ClockError(UsageError):
    """Raised by ``BoardClock`` when ``clock.bin`` is corrupt; the message names the file.

    Delete the file to reset the board's clock to host time.
    """


class BoardClock:
    """Wall time as the board sees it: host time plus the offset stored in ``clock.bin``."""

    __slots__ = ("host_time", "path")

    def __init__(self, home: Path, host_time: Callable[[], float] = time.time) -> None:
        """Bind to the board in ``home``; ``host_time`` is the host's clock (a seam for tests)."""
        self.path = home / CLOCK_FILE
        self.host_time = host_time

    def offset_s(self) -> int:
        """The stored offset in seconds (0 when the file is absent).

        Raises:
            ClockError: the file is corrupt.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        try:
            fields = cbor.Fields(cbor.loads(data, what="clock", max_bytes=_MAX_FILE), what="clock")
            fields.only({"format", "offset_s"})
            if fields.get_int("format") != FORMAT_VERSION:
                raise MalformedMessage(f"clock.format: expected {FORMAT_VERSION}")
            return fields.get_int("offset_s", lo=-_MAX_OFFSET, hi=_MAX_OFFSET)
        except MalformedMessage as err:
            raise ClockError(f"{self.path}: clock file corrupt ({err})") from err

    def now_s(self) -> int:
        """The board's current time, seconds since the epoch."""
        return int(self.host_time()) + self.offset_s()

    def set_board_time(self, board_s: int) -> None:
        """Set the board's clock to ``board_s`` now (anyone with the board can)."""
        offset = board_s - int(self.host_time())
        if not -_MAX_OFFSET <= offset <= _MAX_OFFSET:
            raise ClockError(f"{self.path}: board time {board_s} out of range")
        atomic_write(self.path, cbor.dumps({"format": FORMAT_VERSION, "offset_s": offset}))
