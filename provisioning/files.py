"""Atomic output for the provisioning tools: whole files and whole directories, or nothing.

Every output is written beside its target under a hidden temporary name, fsynced, then renamed
into place, and the directory is fsynced; a failure at any point removes what was staged, so a
reader (or a user after a crash) sees the old state or the new one, never half of it. Secrets get
mode 0600, everything else 0644; directories 0700. An existing output is refused unless the caller
passes ``force``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.errors import UsageError

SECRET_MODE: Final = 0o600
PUBLIC_MODE: Final = 0o644
DIRECTORY_MODE: Final = 0o700


class OutputExists(UsageError):
    """An output file or directory already exists and ``force`` was not given; ``path`` names it."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists (pass --force to replace it)")
        self.path = path


class OutputError(UsageError):
    """An output cannot be written where it was asked for (no such directory, not a directory)."""


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One file to write: its path, its bytes, and whether it holds a secret (mode 0600)."""

    path: Path
    data: bytes
    secret: bool = False

    @property
    def mode(self) -> int:
        """The file mode: 0600 for secrets, 0644 otherwise."""
        return SECRET_MODE if self.secret else PUBLIC_MODE


def check_output_file(path: Path, *, force: bool) -> None:
    """Check ``path`` can be written: its directory exists, and it does not unless ``force``.

    Raises:
        OutputError: the parent is missing or not a directory, or ``path`` is a directory.
        OutputExists: ``path`` exists and ``force`` is false.
    """
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: no such directory")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file")
    if path.exists() and not force:
        raise OutputExists(path)


def write_file(path: Path, data: bytes, *, secret: bool = False, force: bool = False) -> None:
    """Write one file atomically (temporary file in the same directory, fsync, rename).

    Raises:
        OutputError, OutputExists: as :func:`check_output_file`.
        OSError: the file system refused the write; nothing is left behind.
    """
    write_files([OutputFile(path, data, secret)], force=force)


def write_files(files: Sequence[OutputFile], *, force: bool = False) -> None:
    """Write several files all or nothing: every one is staged before any is renamed into place.

    When a rename fails, the files already placed by this call are removed again (a file that
    ``force`` replaced cannot be brought back; the check before staging makes that rare).

    Raises:
        OutputError, OutputExists: as :func:`check_output_file`, for any of ``files``, before
            anything is written.
        OSError: the file system refused a write; nothing written by this call is left behind.
    """
    if len({f.path.resolve() for f in files}) != len(files):
        raise OutputError("the same output path is named twice")
    for output in files:
        check_output_file(output.path, force=force)
    staged: list[tuple[Path, OutputFile]] = []
    placed: list[Path] = []
    try:
        for output in files:
            staged.append((_stage(output), output))
        for tmp, output in staged:
            _place(tmp, output.path, force=force)
            placed.append(output.path)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for parent in {f.path.parent for f in files}:
        fsync_directory(parent)


def _temporary_name(path: Path, label: str) -> Path:
    return path.with_name(f".{path.name}.{label}-{os.getpid()}-{os.urandom(4).hex()}")


def _stage(output: OutputFile) -> Path:
    """Write ``output`` to a new temporary file beside its target; return the temporary path."""
    tmp = _temporary_name(output.path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, output.mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(output.data)
            stream.flush()
            os.fchmod(stream.fileno(), output.mode)  # the umask applied to os.open
            os.fsync(stream.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _place(tmp: Path, path: Path, *, force: bool) -> None:
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path appeared since the check: no check-then-write race
    except FileExistsError as err:
        raise OutputExists(path) from err


def fsync_directory(directory: Path) -> None:
    """fsync a directory, so the renames in it survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_directory(target: Path, *, force: bool) -> None:
    """Check a directory output can be made: its parent exists; ``target`` is new, empty or forced.

    Raises:
        OutputError: the parent is missing, or ``target`` exists and is not a directory.
        OutputExists: ``target`` is a non-empty directory and ``force`` is false.
    """
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: no such directory")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise OutputExists(target)


@contextlib.contextmanager
def staged_directory(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``target``; rename it into place on success.

    The body fills the yielded directory. On an exception the staged directory is removed and
    ``target`` is untouched. On success an empty or absent ``target`` is replaced at once; with
    ``force`` a non-empty one is moved aside, replaced, then deleted.

    Raises:
        OutputError, OutputExists: as :func:`check_output_directory`, before the body runs.
    """
    check_output_directory(target, force=force)
    staging = _temporary_name(target, "staging")
    staging.mkdir(mode=DIRECTORY_MODE)
    try:
        yield staging
        fsync_directory(staging)
        _swap_in(staging, target, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(target.parent)


def _swap_in(staging: Path, target: Path, *, force: bool) -> None:
    """Rename ``staging`` onto ``target`` (rename(2) replaces an empty directory atomically)."""
    check_output_directory(target, force=force)
    if not target.exists() or not any(target.iterdir()):
        os.replace(staging, target)
        return
    old = _temporary_name(target, "old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
