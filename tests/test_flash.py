"""The simulated flash: partition table, sector-wise writes, power cuts and tearing."""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.hardware.flash import (
    BLOB_HEADER_SIZE,
    FLASH_FILE,
    KIB,
    MIB,
    CorruptFlash,
    Flash,
    FlashError,
    FlashLayout,
    Partition,
    PowerLoss,
    PowerPlan,
    blob_header,
    parse_blob_header,
)
from protocol.errors import MalformedMessage, UsageError

SECTOR = 4096


def small_layout() -> FlashLayout:
    """The board's six partitions, shrunk: 4 KiB sectors, 64 KiB slots."""
    return FlashLayout.standard(bl2=2 * SECTOR, runtime=2 * SECTOR, slot=64 * KIB, nvstore=SECTOR)


@pytest.fixture
def flash(tmp_path: Path) -> Flash:
    """A freshly created small flash."""
    return Flash.create(tmp_path / FLASH_FILE, small_layout())


def test_standard_layout_fits_a_16_mib_image() -> None:
    """The default layout has the six partitions in order, slots holding 16 MiB plus a header."""
    layout = FlashLayout.standard()
    names = [p.name for p in layout.partitions]
    assert names == ["bl2", "runtime", "slot_a", "slot_b", "nvstore", "trailer"]
    assert layout.partition("slot_a").size - BLOB_HEADER_SIZE >= 16 * MIB
    assert layout.partition("trailer").size == 2 * SECTOR
    assert layout.partitions[0].offset == SECTOR
    assert layout.total_size == layout.partitions[-1].end


def test_create_and_open_round_trip_the_table(flash: Flash) -> None:
    """A created flash reopens with the same layout; it reads erased (0xFF) everywhere."""
    reopened = Flash.open(flash.path)
    assert reopened.layout == flash.layout
    assert flash.path.stat().st_size == flash.layout.total_size
    assert reopened.read("slot_b", 0, 100) == b"\xff" * 100
    assert FlashLayout.decode(flash.layout.encode()) == flash.layout


def test_table_bytes_follow_the_documented_offsets(flash: Flash) -> None:
    """Sector 0 holds magic, version, count, sector size, total size, entries and a SHA-256."""
    sector = flash.path.read_bytes()[:SECTOR]
    magic, version, count, sector_size, total, reserved = struct.unpack_from("<8sHHIII", sector)
    assert (magic, version, count, sector_size, total, reserved) == (
        b"ESFLASH\x00",
        1,
        6,
        SECTOR,
        flash.layout.total_size,
        0,
    )
    name, offset, size = struct.unpack_from("<16sII", sector, 24 + 24 * 2)
    assert (name.rstrip(b"\x00"), offset, size) == (b"slot_a", 5 * SECTOR, 64 * KIB)
    end = 24 + 24 * count
    assert sector[end : end + 32] == hashlib.sha256(sector[:end]).digest()
    assert set(sector[end + 32 :]) == {0xFF}


def test_default_size_flash_is_created(tmp_path: Path) -> None:
    """The full-size default layout creates and reopens (a 16 MiB slot image fits)."""
    flash = Flash.create(tmp_path / FLASH_FILE, FlashLayout.standard())
    assert Flash.open(flash.path).partition("slot_b").size == 16 * MIB + 4 * KIB
    assert flash.path.stat().st_size == FlashLayout.standard().total_size


def test_every_table_byte_is_protected(flash: Flash) -> None:
    """Flipping any bit of the table or its padding makes open fail with CorruptFlash."""
    data = flash.path.read_bytes()
    for index in [*range(24 + 24 * 6 + 32), 300, SECTOR - 1]:
        corrupt = bytearray(data)
        corrupt[index] ^= 0x10
        flash.path.write_bytes(bytes(corrupt))
        with pytest.raises(CorruptFlash, match=str(flash.path)):
            Flash.open(flash.path)


def test_wrong_file_size_is_corrupt(flash: Flash) -> None:
    """A flash file longer or shorter than its table says is refused."""
    with flash.path.open("ab") as out:
        out.write(b"\xff")
    with pytest.raises(CorruptFlash, match="partition table says"):
        Flash.open(flash.path)
    flash.path.write_bytes(b"ESF")
    with pytest.raises(CorruptFlash, match="too short"):
        Flash.open(flash.path)


def test_missing_or_existing_file_is_a_usage_error(tmp_path: Path, flash: Flash) -> None:
    """Opening a missing flash or creating over an existing one raises FlashError."""
    with pytest.raises(FlashError, match="missing"):
        Flash.open(tmp_path / "none.bin")
    with pytest.raises(FlashError, match="exists already"):
        Flash.create(flash.path, small_layout())
    flash.path.unlink()
    with pytest.raises(FlashError, match="missing") as info:
        flash.read("bl2", 0, 1)
    assert isinstance(info.value, UsageError)


@pytest.mark.parametrize(
    ("sizes", "sector", "match"),
    [
        ([("a", 4096), ("a", 4096)], 4096, "duplicate"),
        ([("a", 4000)], 4096, "misaligned"),
        ([("a", 0)], 4096, "misaligned"),
        ([("Bad", 4096)], 4096, "bad partition name"),
        ([("x" * 17, 4096)], 4096, "bad partition name"),
        ([], 4096, "partitions"),
        ([(f"p{i}", 4096) for i in range(17)], 4096, "partitions"),
        ([("a", 4096)], 3000, "sector size"),
        ([("a", 256)], 256, "sector size"),
    ],
)
def test_layout_build_refuses_bad_layouts(
    sizes: list[tuple[str, int]], sector: int, match: str
) -> None:
    """Duplicate or bad names, unaligned sizes and bad sector sizes are refused at build."""
    with pytest.raises(FlashError, match=match):
        FlashLayout.build(sizes, sector_size=sector)


def test_unknown_partition_is_refused(flash: Flash) -> None:
    """Asking for a partition that is not in the table raises FlashError."""
    with pytest.raises(FlashError, match="no partition"):
        flash.read("slot_c", 0, 1)


def _sign_table(body: bytes, sector: int = 512) -> bytes:
    """A table sector with a valid digest over ``body``, padded with 0xFF."""
    table = body + hashlib.sha256(body).digest()
    return table + b"\xff" * (sector - len(table))


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([(b"a", 512, 512), (b"b", 512, 512)], "misplaced"),
        ([(b"a", 0, 512)], "misplaced"),
        ([(b"a", 512, 512), (b"a", 1024, 512)], "duplicate"),
        ([(b"a\x00b", 512, 512)], "name"),
        ([(b"", 512, 512)], "name"),
        ([(b"a", 512, 2048)], "total size"),
    ],
)
def test_overlapping_or_inconsistent_entries_are_malformed(
    entries: list[tuple[bytes, int, int]], match: str
) -> None:
    """A correctly hashed table whose entries overlap, repeat or overflow is refused."""
    body = struct.pack("<8sHHIII", b"ESFLASH\x00", 1, len(entries), 512, 2048, 0)
    body += b"".join(struct.pack("<16sII", *entry) for entry in entries)
    with pytest.raises(MalformedMessage, match=match):
        FlashLayout.decode(_sign_table(body))


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ((b"ESFLASH\x00", 2, 1, 512, 1024, 0), "version"),
        ((b"ESFLASH\x00", 1, 0, 512, 1024, 0), "count"),
        ((b"ESFLASH\x00", 1, 1, 1000, 1024, 0), "sector_size"),
        ((b"ESFLASH\x00", 1, 1, 512, 1024, 7), "reserved"),
        ((b"ESFLASH\x00", 1, 1, 1024, 2048, 0), "expected 1024 bytes"),
    ],
)
def test_bad_table_header_is_malformed(header: tuple[object, ...], match: str) -> None:
    """A wrong version, count, sector size, reserved field or length is MalformedMessage."""
    body = struct.pack("<8sHHIII", *header) + struct.pack("<16sII", b"a", 512, 512)
    with pytest.raises(MalformedMessage, match=match):
        FlashLayout.decode(_sign_table(body))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_table_decoder_raises_only_malformed_on_bytes(data: bytes) -> None:
    """Arbitrary bytes given to the partition-table decoder raise only MalformedMessage."""
    with contextlib.suppress(MalformedMessage):
        FlashLayout.decode(data)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 3),
    st.integers(0, 18),
    st.sampled_from([256, 512, 1000, 1024, 65536, 1 << 17]),
    st.integers(0, 1 << 32 - 1),
    st.lists(st.tuples(st.binary(max_size=16), st.integers(0, 1 << 32 - 1), st.integers(0, 4096))),
)
def test_table_decoder_raises_only_malformed_on_hashed_tables(
    version: int, count: int, sector: int, total: int, entries: list[tuple[bytes, int, int]]
) -> None:
    """Hashed tables with arbitrary fields decode consistently or raise MalformedMessage."""
    body = struct.pack("<8sHHIII", b"ESFLASH\x00", version, count, sector, total, 0)
    body += b"".join(struct.pack("<16sII", *entry) for entry in entries[:count])
    raw = body + hashlib.sha256(body).digest()
    raw += b"\xff" * max(0, min(sector, 1 << 16) - len(raw))
    try:
        layout = FlashLayout.decode(raw)
    except MalformedMessage:
        return
    assert layout.encode() == raw


def test_write_and_read_across_sector_boundaries(flash: Flash, rng: random.Random) -> None:
    """An unaligned write spanning three sectors reads back exactly; its neighbours stay erased."""
    data = rng.randbytes(2 * SECTOR - 100)
    flash.write("slot_a", SECTOR - 50, data)
    assert flash.sector_writes == 3
    assert flash.read("slot_a", SECTOR - 50, len(data)) == data
    assert flash.read("slot_a", 0, SECTOR - 50) == b"\xff" * (SECTOR - 50)
    tail = SECTOR - 50 + len(data)
    assert flash.read("slot_a", tail, 4 * SECTOR - tail) == b"\xff" * (4 * SECTOR - tail)
    assert flash.read("slot_b", 0, 10) == b"\xff" * 10
    assert flash.read("runtime", 2 * SECTOR - 10, 10) == b"\xff" * 10


def test_read_goes_to_the_file(flash: Flash) -> None:
    """A change made to flash.bin by someone else (the attacker) is seen by the next read."""
    flash.write("nvstore", 0, b"mine")
    offset = flash.partition("nvstore").offset
    with flash.path.open("r+b") as out:
        out.seek(offset)
        out.write(b"evil")
    assert flash.read("nvstore", 0, 4) == b"evil"


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, 2 * SECTOR + 1), (2 * SECTOR, 1)])
def test_out_of_partition_access_is_refused(flash: Flash, offset: int, length: int) -> None:
    """Reads and writes outside a partition raise FlashError and write nothing."""
    before = flash.path.read_bytes()
    with pytest.raises(FlashError, match="outside"):
        flash.read("bl2", offset, length)
    with pytest.raises(FlashError, match="outside"):
        flash.write("bl2", offset, b"x" * max(length, 0))
    assert flash.path.read_bytes() == before


def test_erase_sets_whole_sectors(flash: Flash, rng: random.Random) -> None:
    """erase sets aligned sectors to 0xFF; an unaligned erase is refused."""
    flash.write("bl2", 0, rng.randbytes(2 * SECTOR))
    flash.erase("bl2", SECTOR, SECTOR)
    assert flash.read("bl2", SECTOR, SECTOR) == b"\xff" * SECTOR
    assert flash.read("bl2", 0, 1) != b"\xff"
    with pytest.raises(FlashError, match="sector-aligned"):
        flash.erase("bl2", 1, SECTOR)
    flash.erase("bl2")
    assert flash.read("bl2", 0, 2 * SECTOR) == b"\xff" * 2 * SECTOR


def test_power_cut_stops_before_the_next_sector(flash: Flash, rng: random.Random) -> None:
    """Without tearing, a cut after one sector write leaves sector 1 new and sectors 2-3 old."""
    old = rng.randbytes(3 * SECTOR)
    flash.write("slot_a", 0, old)
    new = rng.randbytes(3 * SECTOR)
    cut = Flash.open(flash.path, power=PowerPlan(cut_after_sector_writes=1))
    with pytest.raises(PowerLoss):
        cut.write("slot_a", 0, new)
    assert cut.sector_writes == 1
    after = flash.read("slot_a", 0, 3 * SECTOR)
    assert after == new[:SECTOR] + old[SECTOR:]
    with pytest.raises(PowerLoss, match="power is off"):
        cut.read("slot_a", 0, 1)


def test_torn_sector_is_half_new_half_old(flash: Flash, rng: random.Random) -> None:
    """A torn cut leaves the sector being written with its first half new and second half old."""
    old = rng.randbytes(2 * SECTOR)
    flash.write("slot_a", 0, old)
    new = rng.randbytes(2 * SECTOR)
    cut = Flash.open(flash.path, power=PowerPlan(cut_after_sector_writes=1, torn=True))
    with pytest.raises(PowerLoss):
        cut.write("slot_a", 0, new)
    second = flash.read("slot_a", SECTOR, SECTOR)
    half = SECTOR // 2
    assert second == new[SECTOR : SECTOR + half] + old[SECTOR + half :]
    assert second not in (new[SECTOR:], old[SECTOR:])


def test_torn_sector_with_garbage_and_tear_offset(flash: Flash, rng: random.Random) -> None:
    """A garbage tear at byte 100 keeps 100 new bytes, then neither old nor new bytes."""
    old = rng.randbytes(SECTOR)
    flash.write("nvstore", 0, old)
    new = rng.randbytes(SECTOR)
    plan = PowerPlan(cut_after_sector_writes=0, torn=True, tear_at=100, garbage=True)
    with pytest.raises(PowerLoss):
        Flash.open(flash.path, power=plan).write("nvstore", 0, new)
    torn = flash.read("nvstore", 0, SECTOR)
    assert torn[:100] == new[:100]
    assert torn[100:132] not in (old[100:132], new[100:132])
    assert torn[100:] != old[100:]


def test_torn_erase_leaves_a_mixed_sector(flash: Flash, rng: random.Random) -> None:
    """An erase is a sector write too: cut torn, the sector is half erased."""
    old = rng.randbytes(SECTOR)
    flash.write("nvstore", 0, old)
    with pytest.raises(PowerLoss):
        Flash.open(flash.path, power=PowerPlan(0, torn=True)).erase("nvstore")
    assert flash.read("nvstore", 0, SECTOR) == b"\xff" * (SECTOR // 2) + old[SECTOR // 2 :]


def test_blob_round_trip(flash: Flash, rng: random.Random) -> None:
    """A blob reads back exactly, after a 12-byte header carrying its length."""
    data = rng.randbytes(SECTOR + 7)
    flash.write_blob("bl2", data)
    assert flash.read_blob("bl2") == data
    assert flash.read("bl2", 0, BLOB_HEADER_SIZE) == blob_header(len(data))
    assert parse_blob_header(blob_header(5)) == 5


def test_bad_blobs_are_corrupt(flash: Flash) -> None:
    """An erased partition or a header claiming more than the partition is CorruptFlash."""
    with pytest.raises(CorruptFlash, match="bad magic"):
        flash.read_blob("runtime")
    flash.write("runtime", 0, blob_header(2 * SECTOR))
    with pytest.raises(CorruptFlash, match="too big"):
        flash.read_blob("runtime")
    with pytest.raises(FlashError, match="outside"):
        flash.write_blob("runtime", b"x" * (2 * SECTOR))


@pytest.mark.parametrize(
    "header", [b"ESBL", blob_header(1)[:4] + b"\x02\x00\x00\x00" + b"\x01\x00\x00\x00"]
)
def test_blob_header_negatives(header: bytes) -> None:
    """A truncated header or one with a wrong version is MalformedMessage."""
    with pytest.raises(MalformedMessage, match="blob header"):
        parse_blob_header(header)


def test_transaction_is_reentrant(flash: Flash) -> None:
    """Nested transactions on one handle do not deadlock and writes inside them land."""
    with flash.transaction(), flash.transaction():
        flash.write("nvstore", 0, b"ok")
    with flash.transaction():
        pass
    assert flash.read("nvstore", 0, 2) == b"ok"


def test_partition_end() -> None:
    """A partition's end is its offset plus its size."""
    assert Partition("a", 4096, 8192).end == 12288


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([512, 1024, 4096]),
    st.lists(st.integers(1, 8), min_size=1, max_size=16),
)
def test_built_layouts_round_trip(sector: int, sectors: list[int]) -> None:
    """Any layout built from valid sizes encodes to one sector and decodes to itself."""
    layout = FlashLayout.build(
        [(f"p{i}", n * sector) for i, n in enumerate(sectors)], sector_size=sector
    )
    encoded = layout.encode()
    assert len(encoded) == sector
    assert FlashLayout.decode(encoded) == layout


def test_truncated_file_after_open_is_a_short_read(flash: Flash) -> None:
    """A flash file cut short under an open handle gives FlashError, not short data."""
    with flash.path.open("r+b") as out:
        out.truncate(flash.partition("trailer").offset)
    with pytest.raises(FlashError, match="short read"):
        flash.read("trailer", 0, 10)


def test_create_refuses_an_inconsistent_layout(tmp_path: Path) -> None:
    """A hand-made layout whose partitions overlap is refused before any file is created."""
    layout = FlashLayout(
        SECTOR, 3 * SECTOR, (Partition("a", SECTOR, 2 * SECTOR), Partition("b", SECTOR, SECTOR))
    )
    with pytest.raises(FlashError, match="misplaced"):
        Flash.create(tmp_path / FLASH_FILE, layout)
    assert not (tmp_path / FLASH_FILE).exists()
