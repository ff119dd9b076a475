"""Clocks for the app runtime (DESIGN §11): real time by default, a fast simulated clock for tests.

The app's ``time.sleep_ms`` calls :meth:`AppClock.sleep_ms` with the runner's stop event, so a real
sleep ends early when a stop is requested and a simulated one just moves time forward.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class AppClock(Protocol):
    """The time source of one app run."""

    def ticks_ms(self) -> int:
        """Monotonic milliseconds since an arbitrary start (never goes back)."""
        ...

    def epoch_s(self) -> int:
        """Wall-clock seconds since 1970 (the board's clock: the attacker's, never trusted)."""
        ...

    def sleep_ms(self, ms: int, wake: threading.Event) -> None:
        """Let ``ms`` milliseconds pass, or less if ``wake`` is set meanwhile."""
        ...


class RealAppClock:
    """Real time: ``time.monotonic`` and ``time.time``; sleeps wait on the stop event."""

    def ticks_ms(self) -> int:
        """Milliseconds of ``time.monotonic``."""
        return int(time.monotonic() * 1000)

    def epoch_s(self) -> int:
        """Seconds of ``time.time``."""
        return int(time.time())

    def sleep_ms(self, ms: int, wake: threading.Event) -> None:
        """Wait ``ms`` milliseconds or until ``wake`` is set."""
        wake.wait(max(ms, 0) / 1000)


class SimulatedAppClock:
    """Simulated time: a sleep moves the clock forward at once, so an hour of app time takes
    milliseconds. Thread-safe; one app thread advances it, others may read it.
    """

    def __init__(self, *, start_ms: int = 0, epoch_s: int = 1_800_000_000) -> None:
        """Start at ``start_ms`` monotonic milliseconds and ``epoch_s`` wall-clock seconds."""
        self._lock = threading.Lock()
        self._now_ms = start_ms
        self._epoch_ms = epoch_s * 1000 - start_ms

    def ticks_ms(self) -> int:
        """The simulated monotonic milliseconds."""
        with self._lock:
            return self._now_ms

    def epoch_s(self) -> int:
        """The simulated wall-clock seconds."""
        with self._lock:
            return (self._epoch_ms + self._now_ms) // 1000

    def advance_ms(self, ms: int) -> None:
        """Move the clock forward by ``ms`` (negative values are ignored)."""
        with self._lock:
            self._now_ms += max(ms, 0)

    def sleep_ms(self, ms: int, wake: threading.Event) -> None:
        """Advance by ``ms`` at once (unless a stop is already requested)."""
        if not wake.is_set():
            self.advance_ms(ms)
