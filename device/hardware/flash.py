"""The board's external flash (DESIGN §3, §5): one file, ``flash.bin``, written sector by sector.

The attacker reads and writes this file freely; nothing in it is secret. Every read goes to the
file (no cache could hide a torn sector). ``write`` is a read-modify-write of each sector it
touches, one ``pwrite`` of a whole sector at a time; ``erase`` sets whole sectors to 0xFF. A
``PowerPlan`` cuts the power after N sector writes, optionally tearing the sector being written.

Layout: sector 0 holds the partition table; partitions follow, each a whole number of sectors.
Erased flash reads 0xFF. Partition table (version 1, little-endian)::

    offset       size  field
    0            8     magic b"ESFLASH\\x00"
    8            2     format version (1)
    10           2     partition count N (1..16)
    12           4     sector size in bytes (a power of two, 512..65536)
    16           4     total flash size in bytes (a multiple of the sector size)
    20           4     reserved, zero
    24 + 24*i    16    partition i name, ASCII [a-z0-9_], NUL-padded
    40 + 24*i    4     partition i offset in bytes (sector-aligned, past sector 0)
    44 + 24*i    4     partition i size in bytes (a non-zero multiple of the sector size)
    24 + 24*N    32    SHA-256 of bytes [0, 24 + 24*N)
    56 + 24*N    ...   0xFF to the end of sector 0

Blob (``write_blob``/``read_blob``, how a boot stage or slot image sits in a partition)::

    offset  size  field
    0       4     magic b"ESBL"
    4       2     format version (1)
    6       2     reserved, zero
    8       4     length L in bytes
    12      L     the bytes
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from device.hardware._files import locked
from protocol.errors import EdgesealError, MalformedMessage, UsageError

FLASH_FILE: Final = "flash.bin"
ERASED: Final = 0xFF
TABLE_VERSION: Final = 1
TABLE_MAGIC: Final = b"ESFLASH\x00"
MAX_PARTITIONS: Final = 16
BLOB_MAGIC: Final = b"ESBL"
BLOB_VERSION: Final = 1
DEFAULT_SECTOR: Final = 4096
KIB: Final = 1024
MIB: Final = 1024 * KIB

_HEADER = struct.Struct("<8sHHIII")
_ENTRY = struct.Struct("<16sII")
_BLOB = struct.Struct("<4sHHI")
BLOB_HEADER_SIZE: Final = _BLOB.size
_NAME = re.compile(r"[a-z0-9_]{1,16}")


class FlashError(UsageError):
    """A request the flash cannot serve; raised by ``Flash`` and ``FlashLayout``.

    An unknown partition, a range out of bounds, an unaligned erase, a bad layout, a missing
    file: fix the caller.
    """


class CorruptFlash(FlashError):
    """The flash's contents do not decode; raised by ``Flash.open`` and ``Flash.read_blob``.

    The partition table, the file size or a blob header is wrong; the message names the file and
    partition. Re-flash the board (the attacker may have written it).
    """


class PowerLoss(EdgesealError):
    """Raised by ``Flash`` when a ``PowerPlan`` cuts the power: the board is off.

    Not a bug: the simulation's power cut. The handle is dead afterwards (every call raises
    this again); "reboot" by opening the flash anew.
    """


@dataclass(frozen=True, slots=True)
class Partition:
    """A named, sector-aligned range of the flash."""

    name: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        """The first byte after the partition."""
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class FlashLayout:
    """The partition table: sector size, total size and the partitions in address order."""

    sector_size: int
    total_size: int
    partitions: tuple[Partition, ...]

    @classmethod
    def build(
        cls, sizes: Sequence[tuple[str, int]], *, sector_size: int = DEFAULT_SECTOR
    ) -> FlashLayout:
        """Place partitions of the given sizes one after the other, after the table sector.

        Raises:
            FlashError: a bad name, a size that is not a non-zero multiple of the sector size.
        """
        offset = sector_size
        parts = []
        for name, size in sizes:
            parts.append(Partition(name, offset, size))
            offset += size
        layout = cls(sector_size, offset, tuple(parts))
        try:
            _check_layout(layout)
        except MalformedMessage as err:
            raise FlashError(str(err)) from err
        return layout

    @classmethod
    def standard(
        cls,
        *,
        sector_size: int = DEFAULT_SECTOR,
        bl2: int = 256 * KIB,
        runtime: int = 1 * MIB,
        slot: int = 16 * MIB + 4 * KIB,
        nvstore: int = 64 * KIB,
        trailer_sectors: int = 2,
    ) -> FlashLayout:
        """The board's layout: bl2, runtime, slot_a, slot_b, nvstore, trailer (DESIGN §5).

        The default slot holds a 16 MiB image plus its blob header. Tests pass small sizes.
        """
        return cls.build(
            [
                ("bl2", bl2),
                ("runtime", runtime),
                ("slot_a", slot),
                ("slot_b", slot),
                ("nvstore", nvstore),
                ("trailer", trailer_sectors * sector_size),
            ],
            sector_size=sector_size,
        )

    def partition(self, name: str) -> Partition:
        """The partition called ``name``.

        Raises:
            FlashError: no such partition.
        """
        for part in self.partitions:
            if part.name == name:
                return part
        raise FlashError(f"flash: no partition named {name!r}")

    def encode(self) -> bytes:
        """Sector 0: the partition table, padded with 0xFF."""
        head = _HEADER.pack(
            TABLE_MAGIC,
            TABLE_VERSION,
            len(self.partitions),
            self.sector_size,
            self.total_size,
            0,
        )
        entries = b"".join(
            _ENTRY.pack(p.name.encode("ascii"), p.offset, p.size) for p in self.partitions
        )
        table = head + entries
        table += hashlib.sha256(table).digest()
        return table + bytes([ERASED]) * (self.sector_size - len(table))

    @classmethod
    def decode(cls, sector: bytes) -> FlashLayout:
        """Decode sector 0 (exactly one sector of bytes).

        Raises:
            MalformedMessage: wrong magic, version, digest, padding, or an inconsistent layout.
        """
        if len(sector) < _HEADER.size:
            raise MalformedMessage(f"partition table: expected at least {_HEADER.size} bytes")
        magic, version, count, sector_size, total, reserved = _HEADER.unpack_from(sector)
        if magic != TABLE_MAGIC:
            raise MalformedMessage("partition table: bad magic")
        if version != TABLE_VERSION:
            raise MalformedMessage(f"partition table.version: expected 1, got {version}")
        _check_geometry(count, sector_size, reserved)
        if len(sector) != sector_size:
            raise MalformedMessage(
                f"partition table: expected {sector_size} bytes, got {len(sector)}"
            )
        end = _HEADER.size + count * _ENTRY.size
        if hashlib.sha256(sector[:end]).digest() != sector[end : end + 32]:
            raise MalformedMessage("partition table: digest mismatch")
        if sector[end + 32 :].count(ERASED) != sector_size - end - 32:
            raise MalformedMessage("partition table: padding is not erased")
        parts = tuple(_decode_entry(sector, _HEADER.size + i * _ENTRY.size) for i in range(count))
        layout = cls(sector_size, total, parts)
        _check_layout(layout)
        return layout


def _check_geometry(count: int, sector_size: int, reserved: int) -> None:
    if not 1 <= count <= MAX_PARTITIONS:
        raise MalformedMessage(f"partition table.count: expected 1..{MAX_PARTITIONS}, got {count}")
    if sector_size & (sector_size - 1) or not 512 <= sector_size <= 65536:
        raise MalformedMessage("partition table.sector_size: not a power of two in 512..65536")
    if reserved:
        raise MalformedMessage("partition table.reserved: expected 0")


def _decode_entry(sector: bytes, offset: int) -> Partition:
    raw, start, size = _ENTRY.unpack_from(sector, offset)
    name = raw.rstrip(b"\x00")
    if not _NAME.fullmatch(name.decode("latin-1")):
        raise MalformedMessage("partition table.name: expected 1-16 of [a-z0-9_], NUL-padded")
    return Partition(name.decode("ascii"), start, size)


def _check_layout(layout: FlashLayout) -> None:
    """Names unique, partitions sector-aligned, non-empty, in order, not overlapping, in range."""
    sector = layout.sector_size
    if sector & (sector - 1) or not 512 <= sector <= 65536:
        raise MalformedMessage("flash layout: sector size is not a power of two in 512..65536")
    if not 1 <= len(layout.partitions) <= MAX_PARTITIONS:
        raise MalformedMessage(f"flash layout: expected 1..{MAX_PARTITIONS} partitions")
    names = [p.name for p in layout.partitions]
    if len(set(names)) != len(names):
        raise MalformedMessage("flash layout: duplicate partition name")
    cursor = sector  # sector 0 is the table
    for part in layout.partitions:
        if not _NAME.fullmatch(part.name):
            raise MalformedMessage(f"flash layout: bad partition name {part.name!r:.20}")
        if part.size <= 0 or part.size % sector or part.offset % sector or part.offset < cursor:
            raise MalformedMessage(f"flash layout: partition {part.name!r} misplaced or misaligned")
        cursor = part.end
    if layout.total_size % sector or layout.total_size < cursor or layout.total_size >= 1 << 32:
        raise MalformedMessage("flash layout: total size too small or not sector-aligned")


@dataclass(frozen=True, slots=True)
class PowerPlan:
    """When to cut the power: after ``cut_after_sector_writes`` whole sector writes.

    With ``torn``, the next sector write is started and cut: its first ``tear_at`` bytes (default:
    half the sector) are new, the rest is the old content, or garbage when ``garbage`` is set.
    Without ``torn``, the next sector write does not happen at all.
    """

    cut_after_sector_writes: int
    torn: bool = False
    tear_at: int | None = None
    garbage: bool = False


class Flash:
    """A handle on ``flash.bin``: partition-relative reads and sector-wise writes."""

    __slots__ = ("_dead", "_locked", "_sector_writes", "layout", "path", "power")

    def __init__(self, path: Path, layout: FlashLayout, power: PowerPlan | None = None) -> None:
        self.path = path
        self.layout = layout
        self.power = power
        self._sector_writes = 0
        self._dead = False
        self._locked = False

    @classmethod
    def create(cls, path: Path, layout: FlashLayout) -> Flash:
        """Create an erased flash file holding ``layout``'s partition table.

        Raises:
            FlashError: ``path`` exists already, or ``layout`` is inconsistent.
        """
        try:
            _check_layout(layout)
        except MalformedMessage as err:
            raise FlashError(str(err)) from err
        try:
            out = path.open("xb")
        except FileExistsError as err:
            raise FlashError(f"{path}: flash file exists already") from err
        with out:
            out.write(layout.encode())
            erased = bytes([ERASED]) * (1 * MIB)
            remaining = layout.total_size - layout.sector_size
            while remaining > 0:
                remaining -= out.write(erased[: min(remaining, len(erased))])
        return cls(path, layout)

    @classmethod
    def open(cls, path: Path, *, power: PowerPlan | None = None) -> Flash:
        """Open an existing flash file, reading its partition table.

        Raises:
            FlashError: the file is missing.
            CorruptFlash: the table does not decode or the file size does not match it.
        """
        try:
            with path.open("rb") as src:
                head = src.read(65536)
                size = os.fstat(src.fileno()).st_size
        except FileNotFoundError as err:
            raise FlashError(f"{path}: flash file missing") from err
        layout = _decode_table(path, head)
        if size != layout.total_size:
            raise CorruptFlash(
                f"{path}: {size} bytes, the partition table says {layout.total_size}"
            )
        return cls(path, layout, power)

    @property
    def sector_size(self) -> int:
        """The erase/program unit in bytes."""
        return self.layout.sector_size

    @property
    def sector_writes(self) -> int:
        """Sector writes (programs and erases) completed through this handle."""
        return self._sector_writes

    def partition(self, name: str) -> Partition:
        """The partition called ``name`` (see ``FlashLayout.partition``)."""
        return self.layout.partition(name)

    def read(self, partition: str, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of ``partition``, from the file.

        Raises:
            FlashError: the range is outside the partition.
            PowerLoss: the power was cut.
        """
        start = self._absolute(partition, offset, length)
        with self._file() as f:
            return _pread(f, start, length)

    def write(self, partition: str, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of ``partition``, one read-modify-write per sector.

        Raises:
            FlashError: the range is outside the partition.
            PowerLoss: the power was cut (sectors before the cut are written, one may be torn).
        """
        start = self._absolute(partition, offset, len(data))
        size = self.sector_size
        with self.transaction(), self._file() as f:
            pos = 0
            while pos < len(data):
                sector, inner = divmod(start + pos, size)
                count = min(size - inner, len(data) - pos)
                old = _pread(f, sector * size, size)
                new = old[:inner] + data[pos : pos + count] + old[inner + count :]
                self._program(f, sector, old, new)
                pos += count

    def erase(self, partition: str, offset: int = 0, length: int | None = None) -> None:
        """Erase (set to 0xFF) whole sectors of ``partition``; default: all of it.

        Raises:
            FlashError: the range is outside the partition or not sector-aligned.
            PowerLoss: the power was cut.
        """
        part = self.partition(partition)
        length = part.size - offset if length is None else length
        start = self._absolute(partition, offset, length)
        size = self.sector_size
        if start % size or length % size:
            raise FlashError(f"flash: erase of {partition!r} must be sector-aligned")
        with self.transaction(), self._file() as f:
            for sector in range(start // size, (start + length) // size):
                old = _pread(f, sector * size, size)
                self._program(f, sector, old, bytes([ERASED]) * size)

    def write_blob(self, partition: str, data: bytes) -> None:
        """Write ``data`` length-prefixed at the start of ``partition`` (header, then bytes).

        Raises:
            FlashError: ``data`` does not fit.
            PowerLoss: the power was cut.
        """
        self.write(partition, 0, blob_header(len(data)) + data)

    def read_blob(self, partition: str) -> bytes:
        """Read the length-prefixed bytes at the start of ``partition``.

        Raises:
            CorruptFlash: the blob header does not decode or claims more than the partition.
        """
        part = self.partition(partition)
        try:
            length = parse_blob_header(self.read(partition, 0, BLOB_HEADER_SIZE))
        except MalformedMessage as err:
            raise CorruptFlash(f"{self.path}: partition {partition!r}: {err}") from err
        if length > part.size - BLOB_HEADER_SIZE:
            raise CorruptFlash(
                f"{self.path}: partition {partition!r}: blob length {length} too big"
            )
        return self.read(partition, BLOB_HEADER_SIZE, length)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the flash's advisory lock (re-entrant on this handle) for a read-modify-write."""
        if self._locked:
            yield
            return
        with locked(self.path):
            self._locked = True
            try:
                yield
            finally:
                self._locked = False

    def _absolute(self, partition: str, offset: int, length: int) -> int:
        part = self.partition(partition)
        if offset < 0 or length < 0 or offset + length > part.size:
            raise FlashError(
                f"flash: {partition!r} range [{offset}, {offset + length}) outside 0..{part.size}"
            )
        return part.offset + offset

    @contextmanager
    def _file(self) -> Iterator[BinaryIO]:
        if self._dead:
            raise PowerLoss(f"{self.path}: the power is off")
        try:
            with self.path.open("r+b") as f:
                yield f
        except FileNotFoundError as err:
            raise FlashError(f"{self.path}: flash file missing") from err

    def _program(self, f: BinaryIO, sector: int, old: bytes, new: bytes) -> None:
        plan = self.power
        if plan is not None and self._sector_writes >= plan.cut_after_sector_writes:
            self._dead = True
            if plan.torn:
                _pwrite(f, sector * self.sector_size, _torn(plan, sector, old, new))
            raise PowerLoss(f"{self.path}: power cut at sector {sector}")
        _pwrite(f, sector * self.sector_size, new)
        self._sector_writes += 1


def _torn(plan: PowerPlan, sector: int, old: bytes, new: bytes) -> bytes:
    """The content a sector is left with when its write is cut: new prefix, then old or garbage."""
    cut = len(new) // 2 if plan.tear_at is None else max(0, min(plan.tear_at, len(new)))
    if not plan.garbage:
        return new[:cut] + old[cut:]
    noise = b""
    counter = 0
    while len(noise) < len(new) - cut:
        seed = struct.pack("<QQ", sector, counter)
        noise += hashlib.sha256(b"edgeseal/flash/tear" + seed).digest()
        counter += 1
    return new[:cut] + noise[: len(new) - cut]


def blob_header(length: int) -> bytes:
    """The 12-byte blob header for ``length`` bytes."""
    return _BLOB.pack(BLOB_MAGIC, BLOB_VERSION, 0, length)


def parse_blob_header(header: bytes) -> int:
    """The length a blob header announces.

    Raises:
        MalformedMessage: wrong size, magic, version or reserved field.
    """
    if len(header) != _BLOB.size:
        raise MalformedMessage(f"blob header: expected {_BLOB.size} bytes, got {len(header)}")
    magic, version, reserved, length = _BLOB.unpack(header)
    if magic != BLOB_MAGIC:
        raise MalformedMessage("blob header: bad magic (erased or not a blob)")
    if version != BLOB_VERSION or reserved:
        raise MalformedMessage(f"blob header.version: expected {BLOB_VERSION}, got {version}")
    return int(length)


def _decode_table(path: Path, head: bytes) -> FlashLayout:
    try:
        if len(head) < _HEADER.size:
            raise MalformedMessage("partition table: file too short")
        sector_size = _HEADER.unpack_from(head)[3]
        return FlashLayout.decode(head[:sector_size])
    except MalformedMessage as err:
        raise CorruptFlash(f"{path}: {err}") from err


def _pread(f: BinaryIO, offset: int, length: int) -> bytes:
    data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise FlashError(f"flash: short read at {offset} ({len(data)} of {length} bytes)")
    return data


def _pwrite(f: BinaryIO, offset: int, data: bytes) -> None:
    written = os.pwrite(f.fileno(), data, offset)
    if written != len(data):
        raise FlashError(f"flash: short write at {offset} ({written} of {len(data)} bytes)")
