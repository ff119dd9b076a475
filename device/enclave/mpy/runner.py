"""Run one app in a thread of the enclave process and report how it ended (DESIGN §11).

Ending an app:

- it returns from ``main.py`` with no timer armed, calls ``sys.exit`` or ``machine.reset``: exited;
- :meth:`AppRunner.stop`: the next sleep raises :class:`StopRequested` (exited, ``STOPPED``); an app
  that does not sleep within ``stop_grace_s`` is ended by its line trace, or for a loop on one line
  that emits no line events, by an exception injected into the thread: hung, ``STOP_IGNORED``;
- the watchdog: more than ``watchdog_lines`` lines without a sleep: hung, ``WATCHDOG``;
- an app blocked inside one host call that releases the GIL (a blocking sink) cannot be interrupted:
  :meth:`AppRunner.stop` reports ``UNRESPONSIVE``, nothing is injected into host code, and the app
  ends as hung at its first line after the call returns.
  One C call that holds the GIL (``sum(range(10**12))``) stalls the whole enclave process until it
  returns: only a process-level watchdog (restarting the enclave) ends that;
- an uncaught exception: :class:`AppCrash` with the exception's type name and the innermost app
  file and line, never the message, the traceback or source text (they can hold the secret code).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import sys
import threading
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from device.enclave.mpy.board import SimulatedBoard
from device.enclave.mpy.clock import AppClock
from device.enclave.mpy.context import (
    HangDetected,
    ResetRequested,
    RunContext,
    StopIgnored,
    StopRequested,
    TelemetrySink,
    WatchdogExpired,
)
from device.enclave.mpy.importer import AppImporter, bundle_path_of
from protocol.errors import UsageError

if TYPE_CHECKING:
    from _typeshed import TraceFunction

#: The entry point of every app bundle.
ENTRY_POINT: Final = "main.py"
#: Lines between two checks of the watchdog (a power of two minus one, used as a mask).
_CHECK_MASK: Final = 0xFF


class ExitReason(enum.Enum):
    """How an app that ended on its own terms ended."""

    RETURNED = "returned"
    STOPPED = "stopped"
    SYS_EXIT = "sys-exit"
    RESET = "reset"


class HangReason(enum.Enum):
    """Why an app was ended as hung."""

    STOP_IGNORED = "stop-ignored"
    WATCHDOG = "watchdog"
    #: The thread is still alive after the stop timeout (stuck in one host call); the enclave
    #: must be restarted to run another app.
    UNRESPONSIVE = "unresponsive"


@dataclass(frozen=True, slots=True)
class AppExited:
    """The app ended without an error."""

    reason: ExitReason


@dataclass(frozen=True, slots=True)
class AppCrash:
    """An uncaught exception: its type name and the innermost app file and line (0 if unknown)."""

    exc_type: str
    line: int
    file: str


@dataclass(frozen=True, slots=True)
class AppHung:
    """The app was ended for not yielding; where it was (file and line; "" and 0 if unknown)."""

    reason: HangReason
    file: str
    line: int


AppResult = AppExited | AppCrash | AppHung


def _locate(exc: BaseException) -> tuple[str, int]:
    """The innermost bundle (file, line) of ``exc``'s traceback, or of a SyntaxError's position."""
    found = ("", 0)
    tb: types.TracebackType | None = exc.__traceback__
    while tb is not None:
        path = bundle_path_of(tb.tb_frame.f_code.co_filename)
        if path is not None:
            found = (path, tb.tb_lineno or 0)
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) and exc.filename:
        path = bundle_path_of(exc.filename)
        if path is not None:
            found = (path, exc.lineno or 0)
    return found


def classify(exc: BaseException | None) -> AppResult:
    """The result of an app run that ended with ``exc`` (None: it returned)."""
    if exc is None:
        return AppExited(ExitReason.RETURNED)
    if isinstance(exc, StopRequested):
        return AppExited(ExitReason.STOPPED)
    if isinstance(exc, SystemExit):
        return AppExited(ExitReason.SYS_EXIT)
    if isinstance(exc, ResetRequested):
        return AppExited(ExitReason.RESET)
    file, line = _locate(exc)
    if isinstance(exc, HangDetected):
        return AppHung(HangReason(exc.reason), file, line)
    return AppCrash(type(exc).__name__, line, file)


class _Tracer:
    """The line trace of one run: counts lines since the last yield and ends a hung app."""

    def __init__(self, ctx: RunContext, *, watchdog_lines: int, stop_grace_s: float) -> None:
        self._ctx = ctx
        self._watchdog_lines = watchdog_lines
        self._stop_grace_s = stop_grace_s
        self.stop_requested_at: float | None = None

    def global_trace(self, frame: types.FrameType, event: str, arg: object) -> TraceFunction | None:
        """Trace only app frames (host and shim frames run untraced, at full speed)."""
        if bundle_path_of(frame.f_code.co_filename) is None:
            return None
        return self.local_trace

    def local_trace(self, frame: types.FrameType, event: str, arg: object) -> TraceFunction:
        """On each line: count it; now and then, check the watchdog and a pending stop."""
        if event == "line":
            ctx = self._ctx
            ctx.lines_since_yield += 1
            if ctx.lines_since_yield & _CHECK_MASK == 0 or ctx.stop_event.is_set():
                self._check()
        return self.local_trace

    def _check(self) -> None:
        """Raise a hang signal when the watchdog expired or a stop went unheeded too long."""
        if self._ctx.lines_since_yield > self._watchdog_lines:
            raise WatchdogExpired
        asked = self.stop_requested_at
        if asked is not None and time.monotonic() - asked >= self._stop_grace_s:
            raise StopIgnored


class AppRunner:
    """Runs one app at a time in a daemon thread, so the enclave stays responsive."""

    def __init__(
        self,
        *,
        board: SimulatedBoard,
        sink: TelemetrySink,
        clock: AppClock | None = None,
        watchdog_lines: int = 5_000_000,
        stop_grace_s: float = 0.2,
    ) -> None:
        """Run apps on ``board`` (and its clock unless ``clock`` is given), output to ``sink``.

        Args:
            watchdog_lines: app lines allowed between two sleeps before the app counts as hung.
            stop_grace_s: real seconds a stopped app has to reach a sleep before it counts as hung.
        """
        if watchdog_lines < 1 or stop_grace_s < 0:
            raise ValueError("watchdog_lines must be >= 1 and stop_grace_s >= 0")
        self._board = board
        self._clock = clock or board.clock
        self._sink = sink
        self._watchdog_lines = watchdog_lines
        self._stop_grace_s = stop_grace_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ctx: RunContext | None = None
        self._tracer: _Tracer | None = None
        self._in_app = False
        self._done = threading.Event()
        self._result: AppResult | None = None

    @property
    def running(self) -> bool:
        """Whether an app thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def result(self) -> AppResult | None:
        """How the last app ended, or None while it runs (or before any)."""
        return self._result

    def start(self, files: Mapping[str, bytes], *, entry: str = ENTRY_POINT) -> None:
        """Start the app ``files`` (bundle path → source) at ``entry``.

        Raises:
            UsageError: an app is still running, or ``entry`` is not among ``files``.
        """
        if self.running:
            raise UsageError("an app is already running: stop it first")
        if entry not in files:
            raise UsageError(f"app bundle has no entry point {entry!r}")
        ctx = RunContext(board=self._board, clock=self._clock, sink=self._sink)
        importer = AppImporter(files, ctx)
        tracer = _Tracer(ctx, watchdog_lines=self._watchdog_lines, stop_grace_s=self._stop_grace_s)
        self._ctx, self._tracer, self._result = ctx, tracer, None
        self._done.clear()
        thread = threading.Thread(
            target=self._thread_main,
            args=(ctx, importer, tracer, entry),
            name="edgeseal-app",
            daemon=True,
        )
        self._thread = thread
        thread.start()

    def deliver(self, topic: str, payload: bytes) -> None:
        """Queue a downlink MQTT message for the running app (dropped when none runs)."""
        if self._ctx is not None and self.running:
            self._ctx.deliver(topic, payload)

    def wait(self, timeout_s: float) -> AppResult | None:
        """Wait up to ``timeout_s`` for the app to end; its result, or None if it still runs."""
        self._done.wait(timeout_s)
        return self._result

    def stop(self, timeout_s: float = 2.0) -> AppResult | None:
        """Ask the app to stop and wait up to ``timeout_s``; the result (None if none ever ran).

        A thread still alive at the deadline gives ``AppHung(UNRESPONSIVE)``; the runner then
        refuses to start another app until that thread ends.
        """
        thread, ctx, tracer = self._thread, self._ctx, self._tracer
        if thread is None or ctx is None or tracer is None:
            return self._result
        deadline = time.monotonic() + timeout_s
        if tracer.stop_requested_at is None:
            tracer.stop_requested_at = time.monotonic()
        ctx.stop_event.set()
        self._done.wait(min(self._stop_grace_s * 2 + 0.05, timeout_s))
        if not self._done.is_set():
            self._inject(thread, StopIgnored)
            self._done.wait(max(deadline - time.monotonic(), 0))
        if not self._done.is_set():
            return AppHung(HangReason.UNRESPONSIVE, "", 0)
        return self._result

    def _inject(self, thread: threading.Thread, signal: type[BaseException]) -> None:
        """Raise ``signal`` asynchronously in the app thread (loops that emit no line events).

        Only while the thread runs app code: inside a host call (the sink, a board driver) the
        exception would surface in host code, in the middle of whatever it was doing (a lock
        half taken, a queue half written). There the app is left alone: its line trace raises
        ``StopIgnored`` at the first app line after the call returns.
        """
        with self._lock:
            if not self._in_app or thread.ident is None:
                return
            frame = sys._current_frames().get(thread.ident)
            if frame is None or bundle_path_of(frame.f_code.co_filename) is None:
                return
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(thread.ident), ctypes.py_object(signal)
            )

    def _thread_main(
        self, ctx: RunContext, importer: AppImporter, tracer: _Tracer, entry: str
    ) -> None:
        """The app thread: run, classify, publish the result."""
        result: AppResult = AppHung(HangReason.STOP_IGNORED, "", 0)
        try:
            result = self._run_app(ctx, importer, tracer, entry)
        except HangDetected:
            pass  # an injected stop that landed just after the app ended
        finally:
            self._result = result
            self._done.set()

    def _run_app(
        self, ctx: RunContext, importer: AppImporter, tracer: _Tracer, entry: str
    ) -> AppResult:
        """Run ``entry``, then keep its timers going until stopped; how it ended."""
        outcome: BaseException | None = None
        with self._lock:
            self._in_app = True
        sys.settrace(tracer.global_trace)
        try:
            importer.run_main(entry)
            while ctx.has_timers():
                ctx.sleep_ms(1000)
        except BaseException as exc:
            outcome = exc
        finally:
            sys.settrace(None)
            with self._lock:
                self._in_app = False
        with contextlib.suppress(Exception):  # a failing sink cannot change how the app ended
            ctx.flush_text()
        result = classify(outcome)
        if outcome is not None:
            outcome.__traceback__ = None
        return result


__all__ = [
    "ENTRY_POINT",
    "AppCrash",
    "AppExited",
    "AppHung",
    "AppResult",
    "AppRunner",
    "ExitReason",
    "HangReason",
    "classify",
]
