"""The enclave's MicroPython app runtime (DESIGN §11): shims, importer, crash and hang reporting."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.enclave.mpy import (
    PRINT_TOPIC,
    SHIM_MODULES,
    AppCrash,
    AppExited,
    AppHung,
    AppRunner,
    ExitReason,
    HangReason,
    RealAppClock,
    SimulatedAppClock,
    SimulatedBoard,
)
from device.enclave.mpy.context import RunContext
from device.enclave.mpy.importer import AppImporter
from device.enclave.mpy.shims import TICKS_PERIOD, ticks_add, ticks_diff, topic_matches
from protocol.errors import UsageError

APPS = Path(__file__).resolve().parent.parent / "examples" / "apps"
CANARY = b"EDGESEAL-CANARY-7f3a9c2e-SECRET-ALGORITHM"
WAIT_S = 10.0


@dataclass
class Bench:
    """A runner on a simulated board with a fast clock, recording the telemetry it emits."""

    runner: AppRunner
    clock: SimulatedAppClock
    board: SimulatedBoard
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    seen: threading.Event = field(default_factory=threading.Event)

    def run(self, files: dict[str, bytes]) -> AppCrash | AppExited | AppHung:
        """Run ``files`` to its end and return the result."""
        self.runner.start(files)
        result = self.runner.wait(WAIT_S)
        assert result is not None, "app did not end"
        return result

    def printed(self) -> list[str]:
        """The lines the app printed."""
        return [p.decode() for t, p in self.sent if t == PRINT_TOPIC]


def make_bench(
    rng: random.Random, *, watchdog_lines: int = 5_000_000, stop_grace_s: float = 0.1
) -> Bench:
    """A bench whose sink records every message and sets ``seen`` after five of them."""
    clock = SimulatedAppClock()
    board = SimulatedBoard(clock=clock, rng=rng)
    sent: list[tuple[str, bytes]] = []
    seen = threading.Event()

    def sink(topic: str, payload: bytes) -> None:
        sent.append((topic, payload))
        if len(sent) >= 5:
            seen.set()

    runner = AppRunner(
        board=board, sink=sink, watchdog_lines=watchdog_lines, stop_grace_s=stop_grace_s
    )
    return Bench(runner, clock, board, sent, seen)


@pytest.fixture
def bench(rng: random.Random) -> Bench:
    """A bench with the default watchdog and a short stop grace."""
    return make_bench(rng)


def example(name: str, limit: int = 0) -> dict[str, bytes]:
    """The files of example app ``name``; ``limit`` replaces its iteration bound (0: forever)."""
    files = {p.name: p.read_bytes() for p in (APPS / name).glob("*.py")}
    bound = b"MAX_TICKS" if name == "thermostat" else b"MAX_PUBLISHES"
    old = bound + b" = const(0)"
    assert old in files["config.py"]
    files["config.py"] = files["config.py"].replace(old, bound + b" = const(%d)" % limit)
    return files


def app(source: str, **modules: str) -> dict[str, bytes]:
    """A bundle whose main.py is ``source`` plus other files (keyword = path without .py)."""
    files = {"main.py": source.encode()}
    files.update({f"{name}.py": text.encode() for name, text in modules.items()})
    return files


# -- the example apps ----------------------------------------------------------------------------


def test_thermostat_regulates_and_publishes_telemetry(bench: Bench) -> None:
    """The thermostat runs 600 simulated seconds in a blink and holds the room near its setpoint."""
    result = bench.run(example("thermostat", 600))
    assert result == AppExited(ExitReason.RETURNED)
    states = [json.loads(p) for t, p in bench.sent if t == "thermostat/state"]
    assert [s["tick"] for s in states] == list(range(10, 601, 10))
    assert {s["heater"] for s in states} == {0, 1}
    assert all(abs(s["temp_c"] - 21.0) < 1.5 for s in states[-20:])
    assert bench.clock.ticks_ms() == 600_000
    assert bench.printed() == ["thermostat: setpoint 21.0"]


def test_secret_filter_publishes_values_but_never_its_canary(bench: Bench) -> None:
    """The secret filter samples on a Timer, publishes filtered values and never the canary."""
    result = bench.run(example("secret_filter", 30))
    assert result == AppExited(ExitReason.RETURNED)
    values = [json.loads(p) for t, p in bench.sent if t == "filter/value"]
    assert len(values) == 30
    assert [v["n"] for v in values] == list(range(10, 301, 10))
    assert all(abs(v["filtered"] - bench.board.temperature_c()) < 2 for v in values)
    assert not any(CANARY in p or CANARY in t.encode() for t, p in bench.sent)


def test_stop_at_a_sleep_reports_stopped(bench: Bench) -> None:
    """An app that runs forever ends as STOPPED at its next sleep after stop()."""
    bench.runner.start(example("thermostat"))
    assert bench.seen.wait(WAIT_S)
    assert bench.runner.stop(WAIT_S) == AppExited(ExitReason.STOPPED)
    assert not bench.runner.running


def test_stop_wakes_a_real_clock_sleep(rng: random.Random) -> None:
    """With the real clock, stop() cuts a one-hour sleep short."""
    board = SimulatedBoard(clock=RealAppClock(), rng=rng)
    started = threading.Event()
    runner = AppRunner(board=board, sink=lambda topic, payload: started.set())
    runner.start(app("import time\nprint('sleeping')\ntime.sleep(3600)\n"))
    assert started.wait(WAIT_S)
    begin = time.monotonic()
    assert runner.stop(WAIT_S) == AppExited(ExitReason.STOPPED)
    assert time.monotonic() - begin < 2


# -- imports -------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["os", "socket", "subprocess", "network", "importlib", "pytest"])
def test_forbidden_import_raises_import_error(bench: Bench, module: str) -> None:
    """Importing a module the enclave runtime lacks raises ImportError, as on a board."""
    source = f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)\nimport {module}\n"
    result = bench.run(app(source))
    assert result == AppCrash("ImportError", 5, "main.py")
    assert bench.printed() == [f"no module named '{module}'"]


def test_host_modules_are_not_reachable_through_the_bundle(bench: Bench) -> None:
    """Host packages (tests, device) and site-packages are invisible to the app."""
    source = "for name in ('tests', 'device', 'cryptography', 'json.decoder'):\n"
    source += "    try:\n        __import__(name)\n        print('reached', name)\n"
    source += "    except ImportError:\n        print('refused', name)\n"
    assert bench.run(app(source)) == AppExited(ExitReason.RETURNED)
    assert bench.printed() == [
        "refused tests",
        "refused device",
        "refused cryptography",
        "refused json.decoder",
    ]


def test_every_shim_module_imports(bench: Bench) -> None:
    """Each module of SHIM_MODULES imports in an app."""
    source = "".join(f"import {name}\n" for name in sorted(SHIM_MODULES))
    source += "from umqtt import simple\nprint('ok' if simple is umqtt.simple else 'no')\n"
    assert bench.run(app(source)) == AppExited(ExitReason.RETURNED)
    assert bench.printed() == ["ok"]


def test_packages_and_relative_imports_load_from_the_bundle(bench: Bench) -> None:
    """Absolute, package and relative imports resolve to the bundle's files."""
    files = {
        "main.py": b"import pkg.util\nfrom pkg import helper\nprint(pkg.util.twice(helper.BASE))\n",
        "pkg/__init__.py": b"",
        "pkg/util.py": b"from .helper import BASE\ndef twice(x):\n    return 2 * x\n",
        "pkg/helper.py": b"BASE = 21\n",
    }
    assert bench.run(files) == AppExited(ExitReason.RETURNED)
    assert bench.printed() == ["42"]


def test_shim_modules_are_fresh_for_each_run(bench: Bench) -> None:
    """A class an app patches is pristine for the next app."""
    bench.run(
        app("import machine\nmachine.Pin.patched = 1\nprint(hasattr(machine.Pin, 'patched'))\n")
    )
    bench.run(app("import machine\nprint(hasattr(machine.Pin, 'patched'))\n"))
    assert bench.printed() == ["True", "False"]


# -- crashes -------------------------------------------------------------------------------------


def test_crash_reports_type_and_line_without_source(bench: Bench) -> None:
    """An uncaught exception gives its type, file and line; never its message or source."""
    source = (
        "x = 1\n\ndef boom():\n    raise ValueError('SECRET-MESSAGE')  # SECRET-SOURCE\n\nboom()\n"
    )
    result = bench.run(app(source))
    assert result == AppCrash("ValueError", 4, "main.py")
    assert "SECRET" not in repr(result)
    assert bench.sent == []


def test_crash_in_an_imported_module_names_that_module(bench: Bench) -> None:
    """The innermost app frame is reported: the module file and its line."""
    result = bench.run(
        app("import helper\nhelper.divide()\n", helper="def divide():\n    return 1 / 0\n")
    )
    assert result == AppCrash("ZeroDivisionError", 2, "helper.py")


def test_syntax_error_in_a_module_names_file_and_line(bench: Bench) -> None:
    """A module that does not compile crashes the app with its own file and line."""
    result = bench.run(app("import broken\n", broken="x = 1\ny = (\n"))
    assert isinstance(result, AppCrash)
    assert (result.exc_type, result.file) == ("SyntaxError", "broken.py")
    assert result.line >= 2


def test_app_cannot_open_host_files(bench: Bench) -> None:
    """open, exec, eval and compile are not builtins of the app."""
    source = "for name in ('open', 'exec', 'eval', 'compile', 'input'):\n"
    source += (
        "    print(name, name in dir(__builtins__) if isinstance(__builtins__, type(__builtins__)) "
    )
    source += "else name in __builtins__)\nopen('/etc/hostname')\n"
    result = bench.run(app(source))
    assert result == AppCrash("NameError", 3, "main.py")
    assert bench.printed() == [f"{n} False" for n in ("open", "exec", "eval", "compile", "input")]


def test_hashlib_objects_have_only_the_board_api(bench: Bench) -> None:
    """hashlib objects offer digest (as on a board) and no hexdigest."""
    source = "import hashlib, ubinascii\nh = hashlib.sha256(b'a')\nh.update(b'bc')\n"
    source += "print(ubinascii.hexlify(h.digest()).decode())\nh.hexdigest()\n"
    result = bench.run(app(source))
    assert result == AppCrash("AttributeError", 5, "main.py")
    assert bench.printed() == ["ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"]


# -- hangs ---------------------------------------------------------------------------------------


def stop_hung_with(
    bench: Bench, source: str, *, timeout_s: float
) -> tuple[AppCrash | AppExited | AppHung | None, float]:
    """Start ``source`` (which prints once, then spins), stop it; the result and the time taken."""
    bench.runner.start(app(source))
    deadline = time.monotonic() + WAIT_S
    while not bench.sent and time.monotonic() < deadline:
        bench.runner.wait(0.01)
    begin = time.monotonic()
    result = bench.runner.stop(timeout_s)
    return result, time.monotonic() - begin


def stop_hung(bench: Bench, source: str) -> tuple[AppCrash | AppExited | AppHung | None, float]:
    """:func:`stop_hung_with` and a generous timeout."""
    return stop_hung_with(bench, source, timeout_s=WAIT_S)


def test_busy_loop_is_stopped_as_hung_and_runner_runs_another_app(bench: Bench) -> None:
    """A loop that never sleeps is ended as hung within a bound; the next app runs fine."""
    result, took_s = stop_hung(bench, "print('spin')\nn = 0\nwhile True:\n    n += 1\n")
    assert result == AppHung(HangReason.STOP_IGNORED, "main.py", 4) or result == AppHung(
        HangReason.STOP_IGNORED, "main.py", 3
    )
    assert took_s < 2
    assert not bench.runner.running
    assert bench.run(example("thermostat", 20)) == AppExited(ExitReason.RETURNED)


def test_one_line_busy_loop_is_stopped(bench: Bench) -> None:
    """A loop on one line (which emits no line events) is ended by an injected stop."""
    result, took_s = stop_hung(bench, "print('spin')\nwhile True: pass\n")
    assert isinstance(result, AppHung)
    assert result.reason is HangReason.STOP_IGNORED
    assert took_s < 2


def test_busy_loop_swallowing_exceptions_is_still_stopped(bench: Bench) -> None:
    """A bare except around the loop body does not keep a stopped app alive."""
    source = "print('spin')\nwhile True:\n    try:\n        x = 1\n    except:\n        x = 2\n"
    result, took_s = stop_hung(bench, source)
    assert isinstance(result, AppHung)
    assert result.file == "main.py"
    assert took_s < 2


def test_app_blocked_in_a_host_call_is_unresponsive_until_it_returns(rng: random.Random) -> None:
    """An app blocked inside a host call (here the sink) cannot be interrupted, and nothing is
    injected into the host code: stop() reports UNRESPONSIVE, start() refuses, and once the call
    returns the app ends as hung at its next line."""
    entered, release = threading.Event(), threading.Event()

    def sink(topic: str, payload: bytes) -> None:
        entered.set()
        release.wait()

    board = SimulatedBoard(clock=SimulatedAppClock(), rng=rng)
    runner = AppRunner(board=board, sink=sink, stop_grace_s=0.05)
    runner.start(app("x = 1\nprint('blocks')\nx = 2\n"))
    assert entered.wait(WAIT_S)
    assert runner.stop(0.2) == AppHung(HangReason.UNRESPONSIVE, "", 0)
    with pytest.raises(UsageError, match="already running"):
        runner.start(app("x = 1\n"))
    release.set()
    assert runner.wait(WAIT_S) == AppHung(HangReason.STOP_IGNORED, "main.py", 3)
    runner.start(app("x = 1\n"))
    assert runner.wait(WAIT_S) == AppExited(ExitReason.RETURNED)


def test_watchdog_ends_an_app_that_never_sleeps(rng: random.Random) -> None:
    """Past the line budget without a sleep, the watchdog ends the app as hung."""
    bench = make_bench(rng, watchdog_lines=20_000)
    result = bench.run(app("n = 0\nwhile True:\n    n += 1\n"))
    assert isinstance(result, AppHung)
    assert (result.reason, result.file) == (HangReason.WATCHDOG, "main.py")


def test_sleeping_resets_the_watchdog(rng: random.Random) -> None:
    """An app that sleeps between bursts is not hung, however long it runs."""
    bench = make_bench(rng, watchdog_lines=2_000)
    source = "import time\nfor i in range(50):\n    for j in range(300):\n        pass\n"
    source += "    time.sleep_ms(10)\n"
    assert bench.run(app(source)) == AppExited(ExitReason.RETURNED)


# -- board, timers, MQTT, exits ------------------------------------------------------------------


def test_timer_keeps_running_after_main_returns_until_stopped(bench: Bench) -> None:
    """A periodic Timer armed by main.py keeps firing after main returns, until stop()."""
    source = "from machine import Timer\nt = Timer(-1)\n"
    source += "t.init(period=100, mode=Timer.PERIODIC, callback=lambda t: print('tick'))\n"
    bench.runner.start(app(source))
    assert bench.seen.wait(WAIT_S)
    assert bench.runner.stop(WAIT_S) == AppExited(ExitReason.STOPPED)
    assert set(bench.printed()) == {"tick"}


def test_i2c_scan_read_and_missing_device(bench: Bench) -> None:
    """I2C scan finds the TMP102; a read from an absent address raises OSError."""
    source = "from machine import I2C\ni2c = I2C(0)\nprint(i2c.scan())\n"
    source += "print(len(i2c.readfrom_mem(0x48, 0, 2)))\ni2c.readfrom(0x50, 1)\n"
    assert bench.run(app(source)) == AppCrash("OSError", 5, "main.py")
    assert bench.printed() == ["[72]", "2"]


def test_pin_drives_the_board(bench: Bench) -> None:
    """A Pin set by the app is the board's pin level, and unique_id is the board's."""
    source = (
        "import machine\np = machine.Pin(2, machine.Pin.OUT)\np.on()\nprint(machine.unique_id())\n"
    )
    assert bench.run(app(source)) == AppExited(ExitReason.RETURNED)
    assert bench.board.pin_value(2) == 1
    assert bench.printed() == [repr(bench.board.unique_id)]


def test_subscribed_messages_reach_the_app(bench: Bench) -> None:
    """A message delivered to the runner reaches a subscribed MQTTClient's callback."""
    source = "from umqtt.simple import MQTTClient\nc = MQTTClient('id', 'enclave')\nc.connect()\n"
    source += "c.set_callback(lambda t, m: c.publish(b'echo', t + b'=' + m))\n"
    source += "c.subscribe(b'cmd/+')\nc.wait_msg()\n"
    bench.runner.start(app(source))
    bench.runner.deliver("other/x", b"ignored")
    bench.runner.deliver("cmd/set", b"22")
    assert bench.runner.wait(WAIT_S) == AppExited(ExitReason.RETURNED)
    assert bench.sent == [("echo", b"cmd/set=22")]


@pytest.mark.parametrize("topic", ["a/#", "a/+/b", "", "x" * 200])
def test_publish_to_an_invalid_topic_raises_in_the_app(bench: Bench, topic: str) -> None:
    """Wildcard, empty or long topics are refused with ValueError inside the app."""
    source = "from umqtt.simple import MQTTClient\nc = MQTTClient('id', 'e')\nc.connect()\n"
    source += f"c.publish({topic!r}, b'x')\n"
    assert bench.run(app(source)) == AppCrash("ValueError", 4, "main.py")
    assert bench.sent == []


def test_publish_before_connect_raises_oserror(bench: Bench) -> None:
    """Publishing on an unconnected client fails as on a board."""
    source = "from umqtt.simple import MQTTClient\nMQTTClient('id', 'e').publish(b't', b'x')\n"
    assert bench.run(app(source)) == AppCrash("OSError", 2, "main.py")


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("import machine\nmachine.reset()\n", ExitReason.RESET),
        ("import sys\nsys.exit(3)\n", ExitReason.SYS_EXIT),
        ("x = 1\n", ExitReason.RETURNED),
    ],
)
def test_exit_reasons(bench: Bench, source: str, reason: ExitReason) -> None:
    """reset(), sys.exit() and returning are told apart."""
    assert bench.run(app(source)) == AppExited(reason)


def test_print_output_goes_to_the_sink_line_by_line(bench: Bench) -> None:
    """print() output reaches the sink one line per message, partial lines flushed at the end."""
    source = "import sys\nprint('a', 1, sep='-')\nprint('b', end='')\nprint('c\\nd', end='')\n"
    source += "sys.stdout.write('e\\n')\nsys.print_exception(ValueError('f'))\n"
    assert bench.run(app(source)) == AppExited(ExitReason.RETURNED)
    assert bench.printed() == ["a-1", "bc", "de", "ValueError: f"]


def test_start_refuses_a_second_app_and_a_missing_entry(bench: Bench) -> None:
    """start() raises UsageError while an app runs or when main.py is missing."""
    with pytest.raises(UsageError, match="entry point"):
        bench.runner.start({"other.py": b""})
    bench.runner.start(example("thermostat"))
    with pytest.raises(UsageError, match="already running"):
        bench.runner.start(example("thermostat"))
    assert bench.runner.stop(WAIT_S) == AppExited(ExitReason.STOPPED)


def test_board_heater_warms_the_room(rng: random.Random) -> None:
    """With the heater on, the simulated room warms toward ambient plus the heater's gain."""
    clock = SimulatedAppClock()
    board = SimulatedBoard(clock=clock, rng=rng)
    cold = board.temperature_c()
    board.set_pin(board.heater_pin, 1)
    clock.advance_ms(600_000)
    assert board.temperature_c() > cold + 20
    assert board.read_adc_u16(board.temp_adc_pin) > board.read_adc_u16(99)


# -- pure helpers --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=TICKS_PERIOD - 1),
    st.integers(min_value=-(TICKS_PERIOD // 2), max_value=TICKS_PERIOD // 2 - 1),
)
def test_ticks_add_and_diff_round_trip(start: int, delta: int) -> None:
    """ticks_diff(ticks_add(t, d), t) == d for any d within half the tick period."""
    later = ticks_add(start, delta)
    assert 0 <= later < TICKS_PERIOD
    assert ticks_diff(later, start) == delta


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[a-z_][a-z0-9_]{0,10}(\.[a-z_][a-z0-9_]{0,6}){0,2}", fullmatch=True))
def test_importer_serves_only_shims_and_bundle_files(name: str) -> None:
    """Any module name outside the shims and the bundle raises ImportError, never a host module."""
    clock = SimulatedAppClock()
    ctx = RunContext(
        board=SimulatedBoard(clock=clock, rng=random.Random(0)), clock=clock, sink=lambda t, p: None
    )
    importer = AppImporter({"mine.py": b"X = 1\n"}, ctx)
    if name in SHIM_MODULES or name == "mine":
        assert importer.import_module(name).__name__ == name.partition(".")[0]
    else:
        with pytest.raises(ImportError, match="no module named"):
            importer.import_module(name)


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("cmd/+", "cmd/set", True),
        ("cmd/+", "cmd/set/x", False),
        ("cmd/#", "cmd/set/x", True),
        ("cmd", "cmd/x", False),
        ("a/b", "a/b", True),
    ],
)
def test_topic_filters(pattern: str, topic: str, matches: bool) -> None:
    """MQTT filters match with + for one level and # for the rest."""
    assert topic_matches(pattern, topic) is matches
