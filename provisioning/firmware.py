"""``firmware check``: compile a MicroPython app, refuse what the enclave cannot run (DESIGN §11).

An app is a folder of ``.py`` files with ``main.py`` as its entry point. The check, per file:

1. the source is UTF-8;
2. mpy-cross compiles it (MicroPython's grammar: ``match``, ``{**a}``, ``except*`` are refused);
3. CPython 3.11 parses it too (the enclave runs the source under CPython);
4. every ``import`` names a module of the enclave runtime or a file of the app. The rule is the
   *enclave runtime's* module list, not the board's: ``network`` exists on an ESP32 but an app in
   the enclave reaches the network only through ``umqtt.simple``. :data:`MODULES` is the one table.

No CLI code here (``provisioning/cli.py`` maps :class:`FirmwareCheckError` to exit 2 and prints
its diagnostics, one ``file:line: message`` per line).
"""

from __future__ import annotations

import ast
import enum
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.errors import UsageError
from provisioning.mpy import MpyCompileError, compile_source

#: The app's entry point.
ENTRY_POINT: Final = "main.py"


class Board(enum.Enum):
    """A board family an app is built for."""

    ESP32 = "esp32"
    RP2 = "rp2"


#: The mpy-cross ``-march`` of each board (only used by ``@micropython.native`` code).
BOARD_ARCH: Final = {Board.ESP32: "xtensawin", Board.RP2: "armv6m"}

_BOTH: Final = frozenset(Board)
_ESP32: Final = frozenset({Board.ESP32})
_RP2: Final = frozenset({Board.RP2})


@dataclass(frozen=True, slots=True)
class ModuleRow:
    """One module: the boards whose MicroPython has it; whether the enclave runtime provides it."""

    name: str
    boards: frozenset[Board]
    enclave: bool
    note: str = ""


# fmt: off
#: The one table: every module the enclave runtime provides (``enclave=True``, the shims of
#: ``device/enclave/mpy/shims.py``; a test keeps the two in step) and the board modules it refuses.
MODULES: Final = (
    ModuleRow("machine", _BOTH, True, "Pin, ADC, I2C, SoftI2C, Timer on the simulated board"),
    ModuleRow("time", _BOTH, True, "sleep_ms/sleep/sleep_us, ticks_*, time; sleeps yield"),
    ModuleRow("utime", _BOTH, True, "alias of time"),
    ModuleRow("binascii", _BOTH, True),
    ModuleRow("ubinascii", _BOTH, True),
    ModuleRow("json", _BOTH, True, "dumps, loads"),
    ModuleRow("ujson", _BOTH, True),
    ModuleRow("struct", _BOTH, True),
    ModuleRow("ustruct", _BOTH, True),
    ModuleRow("hashlib", _BOTH, True, "sha256, sha1 (update, digest)"),
    ModuleRow("uhashlib", _BOTH, True),
    ModuleRow("math", _BOTH, True),
    ModuleRow("micropython", _BOTH, True, "const, native/viper (no-ops), schedule"),
    ModuleRow("gc", _BOTH, True),
    ModuleRow("sys", _BOTH, True, "minimal: implementation, platform, exit, print_exception"),
    ModuleRow("usys", _BOTH, True),
    ModuleRow("umqtt", _BOTH, True, "package of umqtt.simple"),
    ModuleRow("umqtt.simple", _BOTH, True, "MQTTClient: publishes leave as telemetry"),
    ModuleRow("network", _BOTH, False, "the enclave has no network stack: use umqtt.simple"),
    ModuleRow("socket", _BOTH, False, "no sockets in the enclave: use umqtt.simple"),
    ModuleRow("usocket", _BOTH, False, "no sockets in the enclave: use umqtt.simple"),
    ModuleRow("ssl", _BOTH, False, "the normal world's MQTT link carries TLS"),
    ModuleRow("tls", _BOTH, False, "the normal world's MQTT link carries TLS"),
    ModuleRow("requests", _BOTH, False, "no network"),
    ModuleRow("urequests", _BOTH, False, "no network"),
    ModuleRow("ntptime", _BOTH, False, "no network; time comes from the runtime"),
    ModuleRow("webrepl", _BOTH, False, "no REPL"),
    ModuleRow("os", _BOTH, False, "no file system in the enclave"),
    ModuleRow("uos", _BOTH, False, "no file system in the enclave"),
    ModuleRow("vfs", _BOTH, False, "no file system in the enclave"),
    ModuleRow("io", _BOTH, False, "no streams in the enclave"),
    ModuleRow("uio", _BOTH, False, "no streams in the enclave"),
    ModuleRow("select", _BOTH, False, "no sockets"),
    ModuleRow("uselect", _BOTH, False, "no sockets"),
    ModuleRow("_thread", _BOTH, False, "one app thread; use machine.Timer"),
    ModuleRow("asyncio", _BOTH, False, "not provided yet"),
    ModuleRow("uasyncio", _BOTH, False, "not provided yet"),
    ModuleRow("random", _BOTH, False, "not provided yet"),
    ModuleRow("urandom", _BOTH, False, "not provided yet"),
    ModuleRow("re", _BOTH, False, "not provided yet"),
    ModuleRow("ure", _BOTH, False, "not provided yet"),
    ModuleRow("errno", _BOTH, False, "not provided yet"),
    ModuleRow("collections", _BOTH, False, "not provided yet"),
    ModuleRow("array", _BOTH, False, "not provided yet"),
    ModuleRow("heapq", _BOTH, False, "not provided yet"),
    ModuleRow("cryptolib", _BOTH, False, "keys stay with the enclave runtime"),
    ModuleRow("deflate", _BOTH, False, "not provided yet"),
    ModuleRow("framebuf", _BOTH, False, "no display on the simulated board"),
    ModuleRow("bluetooth", _BOTH, False, "no radio on the simulated board"),
    ModuleRow("neopixel", _BOTH, False, "not on the simulated board"),
    ModuleRow("dht", _BOTH, False, "not on the simulated board"),
    ModuleRow("onewire", _BOTH, False, "not on the simulated board"),
    ModuleRow("ds18x20", _BOTH, False, "not on the simulated board"),
    ModuleRow("esp", _ESP32, False, "port-specific"),
    ModuleRow("esp32", _ESP32, False, "port-specific"),
    ModuleRow("espnow", _ESP32, False, "no radio on the simulated board"),
    ModuleRow("rp2", _RP2, False, "port-specific (PIO)"),
)
# fmt: on

#: The modules the enclave runtime provides.
ENCLAVE_MODULES: Final = frozenset(row.name for row in MODULES if row.enclave)
_BY_NAME: Final = {row.name: row for row in MODULES}


class DiagnosticKind(enum.Enum):
    """What a diagnostic is about."""

    ENTRY = "entry"
    ENCODING = "encoding"
    SYNTAX = "syntax"
    IMPORT = "import"
    TYPE = "type"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding: ``file:line: message`` (line 1-based; 0 for the whole file)."""

    file: str
    line: int
    message: str
    kind: DiagnosticKind

    def __str__(self) -> str:
        """``file:line: message``."""
        return f"{self.file}:{self.line}: {self.message}"


class FirmwareCheckError(UsageError):
    """``firmware check`` found problems, listed in ``diagnostics`` (from :func:`check_app`)."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        """Summarize ``diagnostics`` (at least one) in the message."""
        self.diagnostics = tuple(diagnostics)
        shown = "; ".join(str(d) for d in self.diagnostics[:3])
        more = f" (+{len(self.diagnostics) - 3} more)" if len(self.diagnostics) > 3 else ""
        super().__init__(f"firmware check failed: {shown}{more}")


@dataclass(frozen=True, slots=True)
class AppFile:
    """One checked file: its path in the app (POSIX, relative), its source and its ``.mpy``."""

    path: str
    source: bytes
    mpy: bytes


@dataclass(frozen=True, slots=True)
class CheckReport:
    """A passed check: the files ``firmware build`` bundles, sorted by path."""

    board: Board
    files: tuple[AppFile, ...]
    typechecked: bool

    def sources(self) -> dict[str, bytes]:
        """Path → source (what the enclave runtime runs)."""
        return {f.path: f.source for f in self.files}

    def compiled(self) -> dict[str, bytes]:
        """Path of the ``.mpy`` (``a/b.mpy``) → its bytes."""
        return {f.path[:-3] + ".mpy": f.mpy for f in self.files}


def read_app(app_dir: Path) -> dict[str, bytes]:
    """Every ``.py`` file under ``app_dir`` (hidden and ``__pycache__`` folders skipped).

    Raises:
        UsageError: ``app_dir`` is not a folder.
    """
    if not app_dir.is_dir():
        raise UsageError(f"app folder not found: {app_dir}")
    files: dict[str, bytes] = {}
    for path in sorted(app_dir.rglob("*.py")):
        rel = path.relative_to(app_dir)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        files[rel.as_posix()] = path.read_bytes()
    return files


def check_app(
    app_dir: Path, *, board: Board, typecheck: bool = False, stubs_dir: Path | None = None
) -> CheckReport:
    """Check and compile the app in ``app_dir`` for ``board`` (and the enclave runtime).

    Args:
        typecheck: also run pyright with the board's MicroPython stubs (:func:`typecheck_app`).
        stubs_dir: where the stubs are installed (default: :func:`default_stubs_dir`).

    Returns:
        The compiled files, when nothing was found.

    Raises:
        FirmwareCheckError: any diagnostic (all are collected, in file order).
        UsageError: ``app_dir`` is missing; mpy-cross, or for ``typecheck`` pyright or the stubs, is
            not available.
    """
    return check_sources(
        read_app(app_dir),
        board=board,
        typecheck_dir=app_dir if typecheck else None,
        stubs_dir=stubs_dir,
    )


def check_sources(
    files: dict[str, bytes],
    *,
    board: Board,
    typecheck_dir: Path | None = None,
    stubs_dir: Path | None = None,
) -> CheckReport:
    """:func:`check_app` over path → source (``typecheck_dir``: a folder to type-check, if any)."""
    diagnostics: list[Diagnostic] = []
    if ENTRY_POINT not in files:
        diagnostics.append(
            Diagnostic(ENTRY_POINT, 0, "no entry point main.py", DiagnosticKind.ENTRY)
        )
    checked: list[AppFile] = []
    for path, source in sorted(files.items()):
        found, mpy = _check_file(path, source, files, board)
        diagnostics += found
        if not found:
            checked.append(AppFile(path, source, mpy))
    if typecheck_dir is not None and not diagnostics:
        diagnostics += typecheck_app(typecheck_dir, board=board, stubs_dir=stubs_dir)
    if diagnostics:
        raise FirmwareCheckError(diagnostics)
    return CheckReport(board, tuple(checked), typecheck_dir is not None)


def _check_file(
    path: str, source: bytes, files: dict[str, bytes], board: Board
) -> tuple[list[Diagnostic], bytes]:
    """The diagnostics of one file and its ``.mpy`` (empty when it did not compile)."""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as err:
        line = source[: err.start].count(b"\n") + 1
        return [Diagnostic(path, line, "source is not UTF-8", DiagnosticKind.ENCODING)], b""
    try:
        mpy = compile_source(path, source, arch=BOARD_ARCH[board])
    except MpyCompileError as err:
        return [Diagnostic(path, err.line, err.message, DiagnosticKind.SYNTAX)], b""
    try:
        compile(text, path, "exec", dont_inherit=True)  # parse and symbol table, nothing runs
        tree = ast.parse(text, filename=path)
    except SyntaxError as err:
        message = f"not valid Python 3.11 (the enclave runs CPython): {err.msg}"
        return [Diagnostic(path, err.lineno or 0, message, DiagnosticKind.SYNTAX)], b""
    return scan_imports(path, tree, files, board), mpy


def scan_imports(
    path: str, tree: ast.AST, files: dict[str, bytes], board: Board
) -> list[Diagnostic]:
    """Diagnostics for the imports in ``tree`` that neither the enclave nor the app provides."""
    package = _package_of(path)
    found: list[Diagnostic] = []
    for node in ast.walk(tree):
        for name in _imported_modules(node, package):
            message = _refusal(name, files, board)
            if message is not None:
                line = getattr(node, "lineno", 0)
                found.append(Diagnostic(path, line, message, DiagnosticKind.IMPORT))
    return sorted(found, key=lambda d: d.line)


def _package_of(path: str) -> str:
    """The package a bundle file lives in (``a/b.py`` → ``a``; ``a/__init__.py`` → ``a``)."""
    return path.rpartition("/")[0].replace("/", ".")


def _imported_modules(node: ast.AST, package: str) -> list[str]:
    """The absolute module names an import statement loads (None for other nodes)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        return [node.module or ""]
    parts = package.split(".") if package else []
    if node.level - 1 >= len(parts):
        return [f"{'.' * node.level}{node.module or ''}"]
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return [f"{base}.{node.module}" if node.module else base]


def _provides(name: str, files: dict[str, bytes]) -> bool:
    """Whether the app's own files hold module ``name``."""
    base = name.replace(".", "/")
    return f"{base}.py" in files or f"{base}/__init__.py" in files


def _refusal(name: str, files: dict[str, bytes], board: Board) -> str | None:
    """Why importing ``name`` is refused, or None when it is fine."""
    if name in ENCLAVE_MODULES or _provides(name, files):
        return None
    if name.startswith("."):
        return f"relative import '{name}' reaches beyond the app's top level"
    top = name.partition(".")[0]
    row = _BY_NAME.get(name) or _BY_NAME.get(top)
    if row is not None and board in row.boards:
        return (
            f"module '{name}' exists on {board.value} but not in the enclave runtime ({row.note})"
        )
    if row is not None:
        return f"module '{name}' is not available on {board.value} nor in the enclave runtime"
    return f"no module named '{name}' (neither an enclave runtime module nor a file of the app)"


# -- optional type check ------------------------------------------------------------------------


def default_stubs_dir(board: Board) -> Path:
    """Where the stubs of ``board`` are looked for: ``$EDGESEAL_MPY_STUBS/<board>``, else
    ``<venv>/mpy-stubs/<board>`` (install with ``pip install --target <that dir>
    micropython-<board>-stubs``: a target folder per board, as the stub packages collide).
    """
    root = os.environ.get("EDGESEAL_MPY_STUBS")
    base = Path(root) if root else Path(sys.prefix) / "mpy-stubs"
    return base / board.value


def find_pyright() -> Path:
    """The ``pyright`` command (PyPI's ``pyright`` wrapper; it fetches node's pyright once).

    Raises:
        UsageError: pyright is not available.
    """
    found = shutil.which("pyright") or shutil.which(
        "pyright", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise UsageError("pyright not available: pip install pyright (needed for --typecheck)")
    return Path(found)


def typecheck_app(
    app_dir: Path, *, board: Board, stubs_dir: Path | None = None, timeout_s: float = 300.0
) -> list[Diagnostic]:
    """Type-check the app with pyright against ``board``'s MicroPython stubs; the errors found.

    Raises:
        UsageError: pyright or the stubs are not available, or pyright failed to run.
    """
    pyright = find_pyright()
    stubs = stubs_dir or default_stubs_dir(board)
    if not (stubs / "machine.pyi").is_file() or not (stubs / "stdlib").is_dir():
        raise UsageError(
            f"MicroPython stubs for {board.value} not found in {stubs}: "
            f"pip install --target {stubs} micropython-{board.value}-stubs"
        )
    app = app_dir.resolve()
    with tempfile.TemporaryDirectory(prefix="edgeseal-pyright-") as tmp:
        config = Path(tmp) / "pyrightconfig.json"
        settings = _pyright_config(app, stubs.resolve(), Path(tmp))
        config.write_text(json.dumps(settings), encoding="utf-8")
        args = [str(pyright), "--outputjson", "-p", str(config)]
        try:
            done = subprocess.run(args, capture_output=True, timeout=timeout_s, cwd=tmp)
        except (OSError, subprocess.SubprocessError) as err:
            raise UsageError(f"pyright failed to run: {err}") from err
    return _pyright_diagnostics(done.stdout, done.returncode, app)


#: A stub of the enclave's ``umqtt.simple``, for boards whose stub package lacks it (rp2): the
#: enclave provides it whatever the board. The board's own stubs win where they have one.
UMQTT_SIMPLE_STUB: Final = """\
from collections.abc import Callable

class MQTTException(Exception): ...

class MQTTClient:
    def __init__(
        self,
        client_id: bytes | str,
        server: bytes | str,
        port: int = 0,
        user: bytes | str | None = None,
        password: bytes | str | None = None,
        keepalive: int = 0,
        ssl: object = None,
        ssl_params: dict[str, object] = ...,
    ) -> None: ...
    def set_callback(self, f: Callable[[bytes, bytes], object]) -> None: ...
    def set_last_will(
        self, topic: bytes | str, msg: bytes | str, retain: bool = False, qos: int = 0
    ) -> None: ...
    def connect(self, clean_session: bool = True) -> int: ...
    def disconnect(self) -> None: ...
    def ping(self) -> None: ...
    def publish(
        self, topic: bytes | str, msg: bytes | str, retain: bool = False, qos: int = 0
    ) -> None: ...
    def subscribe(self, topic: bytes | str, qos: int = 0) -> None: ...
    def wait_msg(self) -> None: ...
    def check_msg(self) -> None: ...
"""


def _write_enclave_stubs(root: Path) -> Path:
    """Write the enclave-provided stubs (``umqtt.simple``) under ``root``; return ``root``."""
    package = root / "umqtt"
    package.mkdir(parents=True)
    (package / "__init__.pyi").write_text("", encoding="utf-8")
    (package / "simple.pyi").write_text(UMQTT_SIMPLE_STUB, encoding="utf-8")
    return root


def _pyright_config(app: Path, stubs: Path, config_dir: Path) -> dict[str, object]:
    """A pyright configuration: the stubs replace typeshed's stdlib; app modules resolve.

    pyright ignores absolute ``include`` entries, so the app is named relative to ``config_dir``.
    """
    return {
        "include": [os.path.relpath(app, config_dir)],
        "exclude": ["**/__pycache__", "**/.*"],
        "typeshedPath": str(stubs),
        "stubPath": str(stubs),
        "extraPaths": [str(app), str(_write_enclave_stubs(config_dir / "enclave-stubs"))],
        "pythonVersion": "3.11",
        "typeCheckingMode": "basic",
        "reportMissingModuleSource": "none",
    }


def _pyright_diagnostics(stdout: bytes, returncode: int, app: Path) -> list[Diagnostic]:
    """The error diagnostics of pyright's ``--outputjson`` report (exit 0: none; 1: some)."""
    if returncode not in (0, 1):
        raise UsageError(f"pyright failed (exit {returncode}): {stdout[:200]!r}")
    try:
        report = json.loads(stdout)
        entries = report["generalDiagnostics"]
        analyzed = int(report["summary"]["filesAnalyzed"])
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError("pyright returned no readable report") from err
    if analyzed == 0:
        raise UsageError(f"pyright analyzed no file of {app}")
    found: list[Diagnostic] = []
    for entry in entries:
        if entry.get("severity") != "error":
            continue
        file = Path(str(entry.get("file", "")))
        rel = file.relative_to(app).as_posix() if file.is_relative_to(app) else file.name
        line = int(entry.get("range", {}).get("start", {}).get("line", -1)) + 1
        message = str(entry.get("message", "")).splitlines()[0] if entry.get("message") else ""
        found.append(Diagnostic(rel, line, f"type: {message}", DiagnosticKind.TYPE))
    return found
