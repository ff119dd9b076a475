"""The state one app run shares between its shim modules and the runner.

Control flow out of the app uses ``BaseException`` subclasses, so an app's ``except Exception``
does not swallow a stop; the runner's line trace re-raises a stop on the next line anyway.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final

from device.enclave.mpy.board import SimulatedBoard
from device.enclave.mpy.clock import AppClock

#: Where the app's output goes: ``(topic_suffix, payload)``; the enclave forwards it to the NW.
TelemetrySink = Callable[[str, bytes], None]

#: The topic suffix of ``print`` output (one payload per line).
PRINT_TOPIC: Final = "stdout"
#: The largest payload an app may publish or print in one line (the door's frames are bounded).
MAX_PAYLOAD_BYTES: Final = 16 * 1024
#: The longest topic suffix an app may publish to.
MAX_TOPIC_CHARS: Final = 128
#: Inbound messages kept for the app before the oldest is dropped.
MAX_INBOX: Final = 64


class StopRequested(BaseException):
    """Raised inside the app at a yield point (a sleep) after the runner was asked to stop."""


class HangDetected(BaseException):
    """Raised inside the app by the line trace (or injected): the app is not yielding."""

    #: A :class:`~device.enclave.mpy.runner.HangReason` value.
    reason: ClassVar[str] = ""


class StopIgnored(HangDetected):
    """A stop was requested and the app did not reach a yield point within the grace period."""

    reason = "stop-ignored"


class WatchdogExpired(HangDetected):
    """The app ran more lines than the watchdog allows without yielding (sleeping)."""

    reason = "watchdog"


class ResetRequested(BaseException):
    """Raised by ``machine.reset()`` / ``machine.soft_reset()``: the app ends, the board resets."""


@dataclass(order=True)
class Timer:
    """A scheduled ``machine.Timer`` callback (ordered by deadline)."""

    deadline_ms: int
    seq: int
    period_ms: int = field(compare=False)
    periodic: bool = field(compare=False)
    callback: Callable[[object], object] = field(compare=False)
    owner: object = field(compare=False)
    active: bool = field(default=True, compare=False)


class RunContext:
    """One app run: the board, the clock, the stop event, timers, output and the MQTT inbox."""

    def __init__(self, *, board: SimulatedBoard, clock: AppClock, sink: TelemetrySink) -> None:
        """Bind the run to its board, clock and telemetry sink."""
        self.board = board
        self.clock = clock
        self.sink = sink
        self.stop_event = threading.Event()
        self.lines_since_yield = 0
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._print_buffer = ""
        self._inbox: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=MAX_INBOX)
        self._inbox_lock = threading.Lock()

    # -- time ------------------------------------------------------------------------------------

    def sleep_ms(self, ms: int) -> None:
        """The app's sleep: a yield point that runs due timers and honours a stop request.

        Raises:
            StopRequested: a stop was requested (before or during the sleep).
        """
        self.check_stop()
        deadline = self.clock.ticks_ms() + max(int(ms), 0)
        while True:
            self.lines_since_yield = 0
            now = self.clock.ticks_ms()
            due = self._timers[0].deadline_ms if self._timers else None
            if due is not None and due <= deadline:
                self.clock.sleep_ms(due - now, self.stop_event)
                self.check_stop()
                self._fire_due_timers()
                continue
            self.clock.sleep_ms(deadline - now, self.stop_event)
            self.check_stop()
            return

    def check_stop(self) -> None:
        """Raise :class:`StopRequested` when the runner asked the app to stop."""
        if self.stop_event.is_set():
            raise StopRequested

    def has_timers(self) -> bool:
        """Whether any timer is still armed (then the run loop keeps going after main returns)."""
        return bool(self._timers)

    def add_timer(
        self, owner: object, period_ms: int, periodic: bool, callback: Callable[[object], object]
    ) -> None:
        """Arm a timer for ``owner`` (replacing any it had)."""
        self.cancel_timers(owner)
        period = max(int(period_ms), 1)
        timer = Timer(
            self.clock.ticks_ms() + period, next(self._seq), period, periodic, callback, owner
        )
        heapq.heappush(self._timers, timer)

    def cancel_timers(self, owner: object) -> None:
        """Disarm every timer of ``owner``."""
        self._timers = [t for t in self._timers if t.owner is not owner]
        heapq.heapify(self._timers)

    def _fire_due_timers(self) -> None:
        """Run the callbacks whose deadline has passed, re-arming periodic ones."""
        now = self.clock.ticks_ms()
        while self._timers and self._timers[0].deadline_ms <= now:
            timer = heapq.heappop(self._timers)
            if timer.periodic:
                timer.deadline_ms += timer.period_ms
                timer.seq = next(self._seq)
                heapq.heappush(self._timers, timer)
            timer.callback(timer.owner)

    # -- output ----------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes) -> None:
        """Send ``payload`` to the telemetry sink under ``topic``.

        Raises:
            ValueError: an empty or long topic, an MQTT wildcard in it, or a payload too big.
        """
        if not topic or len(topic) > MAX_TOPIC_CHARS or any(c in topic for c in "+#\x00"):
            raise ValueError("invalid topic")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError("payload too large")
        self.sink(topic, bytes(payload))

    def write_text(self, text: str) -> None:
        """Collect ``print`` output; each complete line goes to the sink on :data:`PRINT_TOPIC`."""
        self._print_buffer += text
        while "\n" in self._print_buffer:
            line, self._print_buffer = self._print_buffer.split("\n", 1)
            self.sink(PRINT_TOPIC, line.encode("utf-8", "replace")[:MAX_PAYLOAD_BYTES])
        if len(self._print_buffer) > MAX_PAYLOAD_BYTES:
            self.flush_text()

    def flush_text(self) -> None:
        """Send a pending partial line, if any."""
        if self._print_buffer:
            line, self._print_buffer = self._print_buffer, ""
            self.sink(PRINT_TOPIC, line.encode("utf-8", "replace")[:MAX_PAYLOAD_BYTES])

    # -- inbound MQTT ----------------------------------------------------------------------------

    def deliver(self, topic: str, payload: bytes) -> None:
        """Queue a downlink message for the app's ``MQTTClient.check_msg`` (any thread)."""
        with self._inbox_lock:
            self._inbox.append((topic, bytes(payload)))

    def next_message(self) -> tuple[str, bytes] | None:
        """The oldest queued downlink message, or None."""
        with self._inbox_lock:
            return self._inbox.popleft() if self._inbox else None
