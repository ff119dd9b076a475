"""Slot A/B test/confirm/revert over the simulated flash, including every power-cut point."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.hardware.flash import (
    BLOB_HEADER_SIZE,
    FLASH_FILE,
    KIB,
    Flash,
    FlashError,
    FlashLayout,
    PowerLoss,
    PowerPlan,
    blob_header,
)
from device.hardware.slots import (
    BLANK,
    RECORD_SIZE,
    BootChoice,
    CorruptSlot,
    SlotError,
    SlotInfo,
    SlotStatus,
    SlotStore,
    Swap,
    TrailerState,
)
from protocol.errors import InvalidImage, MalformedMessage

SECTOR = 4096
CHUNK = 1000


def small_layout() -> FlashLayout:
    """4 KiB sectors and 64 KiB slots: small enough to try every cut point quickly."""
    return FlashLayout.standard(bl2=SECTOR, runtime=SECTOR, slot=64 * KIB, nvstore=SECTOR)


@pytest.fixture
def flash(tmp_path: Path) -> Flash:
    """A blank small flash."""
    return Flash.create(tmp_path / FLASH_FILE, small_layout())


@pytest.fixture
def old(rng: random.Random) -> bytes:
    """The image the board runs before the update (about 2.5 sectors)."""
    return rng.randbytes(10_000)


@pytest.fixture
def new(rng: random.Random) -> bytes:
    """The update (about 3.5 sectors plus the blob header)."""
    return rng.randbytes(14_500)


@pytest.fixture
def store(flash: Flash, old: bytes) -> SlotStore:
    """A board with ``old`` installed and confirmed (in slot_b, the first install's target)."""
    slots = SlotStore(flash)
    assert slots.install(old) == "slot_b"
    return slots


def download(store: SlotStore, image: bytes) -> str:
    """Begin an update and write ``image`` in 1000-byte chunks; returns the target slot."""
    target = store.begin_update(len(image))
    for offset in range(0, len(image), CHUNK):
        store.write_chunk(offset, image[offset : offset + CHUNK])
    return target


def test_blank_board_has_nothing_to_boot(flash: Flash) -> None:
    """A blank trailer is the BLANK state: slot_a primary, nothing bootable."""
    slots = SlotStore(flash)
    assert slots.state() == BLANK
    assert (slots.active(), slots.inactive()) == ("slot_a", "slot_b")
    assert slots.boot_select() is None
    with pytest.raises(SlotError, match="no complete image"):
        slots.read_image("slot_a")


def test_install_boots_the_image_without_trial(store: SlotStore, old: bytes) -> None:
    """The factory install is confirmed at once and boots as the primary."""
    assert store.active() == "slot_b"
    assert store.boot_select() == BootChoice("slot_b", trial=False)
    assert store.read_image("slot_b") == old
    assert store.state().slots[1] == SlotInfo(
        SlotStatus.CONFIRMED, len(old), hashlib.sha256(old).digest()
    )


def test_full_update_then_confirm(store: SlotStore, old: bytes, new: bytes) -> None:
    """Download, mark pending, trial boot, confirm: the new image boots for good."""
    assert download(store, new) == "slot_a"
    assert store.boot_select() == BootChoice("slot_b", trial=False)  # not pending yet
    assert store.mark_pending(hashlib.sha256(new).digest()) == "slot_a"
    assert store.boot_select() == BootChoice("slot_a", trial=True)
    assert store.read_image("slot_a") == new
    assert store.confirm() == "slot_a"
    for _ in range(3):
        assert store.boot_select() == BootChoice("slot_a", trial=False)
    assert store.active() == "slot_a"
    assert store.read_image("slot_b") == old  # the previous image stays as a fallback


def test_unconfirmed_trial_reverts(store: SlotStore, new: bytes) -> None:
    """A trial that is not confirmed before the next boot reverts to the old slot for good."""
    download(store, new)
    store.mark_pending()
    assert store.boot_select() == BootChoice("slot_a", trial=True)
    assert store.boot_select() == BootChoice("slot_b", trial=False)
    assert store.state().slots[0].status is SlotStatus.REJECTED
    assert store.boot_select() == BootChoice("slot_b", trial=False)
    with pytest.raises(SlotError, match="no trial"):
        store.confirm()


def test_confirm_needs_a_running_trial(store: SlotStore, new: bytes) -> None:
    """confirm with nothing pending, or pending but not yet booted, raises SlotError."""
    with pytest.raises(SlotError, match="NONE"):
        store.confirm()
    download(store, new)
    store.mark_pending()
    with pytest.raises(SlotError, match="PENDING"):
        store.confirm()


def test_steps_out_of_order_are_refused(store: SlotStore) -> None:
    """Chunks or mark_pending without begin_update, and bad sizes, raise SlotError."""
    with pytest.raises(SlotError, match="before begin_update"):
        store.write_chunk(0, b"x")
    with pytest.raises(SlotError, match="before begin_update"):
        store.mark_pending()
    for size in (0, store.max_image_size() + 1):
        with pytest.raises(SlotError, match="image size"):
            store.begin_update(size)
    store.begin_update(10)
    with pytest.raises(SlotError, match="past size"):
        store.write_chunk(5, b"x" * 6)
    with pytest.raises(SlotError, match="past size"):
        store.write_chunk(-1, b"x")


def test_largest_image_fits(store: SlotStore, rng: random.Random) -> None:
    """An image of exactly max_image_size round-trips through a confirmed update."""
    image = rng.randbytes(store.max_image_size())
    assert store.max_image_size() == 64 * KIB - BLOB_HEADER_SIZE
    download(store, image)
    store.mark_pending()
    store.boot_select()
    store.confirm()
    assert store.read_image(store.active()) == image


def test_wrong_expected_hash_keeps_the_update_open(store: SlotStore, new: bytes) -> None:
    """mark_pending with a mismatching expected hash raises CorruptSlot and marks nothing."""
    download(store, new)
    with pytest.raises(CorruptSlot, match="does not hash") as info:
        store.mark_pending(hashlib.sha256(b"other").digest())
    assert isinstance(info.value, InvalidImage)
    assert store.state().slots[0].status is SlotStatus.WRITING
    store.write_chunk(0, new[:CHUNK])
    assert store.mark_pending(hashlib.sha256(new).digest()) == "slot_a"


def test_tampered_pending_image_is_never_tried(store: SlotStore, flash: Flash, new: bytes) -> None:
    """An image changed after mark_pending fails its hash: no trial, it is rejected."""
    download(store, new)
    store.mark_pending()
    flash.write("slot_a", BLOB_HEADER_SIZE + 5, b"\x00\x01\x02")
    assert store.boot_select() == BootChoice("slot_b", trial=False)
    assert store.state().slots[0].status is SlotStatus.REJECTED


def test_tampered_primary_falls_back_to_the_other_confirmed(
    store: SlotStore, flash: Flash, old: bytes, new: bytes
) -> None:
    """With the primary corrupt, the previous confirmed image boots; with both corrupt, none."""
    download(store, new)
    store.mark_pending()
    store.boot_select()
    store.confirm()
    flash.write("slot_a", BLOB_HEADER_SIZE, b"\xff")
    with pytest.raises(CorruptSlot, match="trailer hash"):
        store.read_image("slot_a")
    assert store.boot_select() == BootChoice("slot_b", trial=False)
    assert store.read_image("slot_b") == old
    flash.write("slot_b", 0, blob_header(3))
    with pytest.raises(CorruptSlot, match="trailer says"):
        store.read_image("slot_b")
    flash.erase("slot_b", 0, SECTOR)
    with pytest.raises(CorruptSlot, match="bad magic"):
        store.read_image("slot_b")
    assert store.boot_select() is None


def test_begin_update_cancels_a_trial(store: SlotStore, new: bytes) -> None:
    """Starting a new download during a trial cancels it: the next boot is the old primary."""
    download(store, new)
    store.mark_pending()
    assert store.boot_select() == BootChoice("slot_a", trial=True)
    store.begin_update(100)
    assert store.boot_select() == BootChoice("slot_b", trial=False)


def test_unknown_slot_name_is_refused(store: SlotStore) -> None:
    """read_image of a slot that does not exist raises SlotError."""
    with pytest.raises(SlotError, match="no slot named"):
        store.read_image("slot_c")


def test_trailer_copies_alternate_and_fall_back(store: SlotStore, flash: Flash) -> None:
    """Each state goes to the other copy; destroying the newest copy restores the previous state."""
    before = store.state()
    store.begin_update(100)
    after = store.state()
    assert after.seq == before.seq + 1
    copy = (after.seq - 1) % 2  # seq 1 went to copy 0, seq 2 to copy 1, and so on
    record = flash.read("trailer", copy * SECTOR, RECORD_SIZE)
    assert TrailerState.decode(record) == after
    seq_byte = flash.read("trailer", copy * SECTOR + 8, 1)[0]
    flash.write("trailer", copy * SECTOR + 8, bytes([seq_byte ^ 0xFF]))
    assert store.state() == before


def test_flash_without_room_for_two_trailer_copies_is_refused(tmp_path: Path) -> None:
    """A trailer partition of one sector, or no slot partitions, cannot hold slots."""
    one = FlashLayout.standard(
        bl2=SECTOR, runtime=SECTOR, slot=SECTOR, nvstore=SECTOR, trailer_sectors=1
    )
    with pytest.raises(SlotError, match="two sectors"):
        SlotStore(Flash.create(tmp_path / "one.bin", one))
    bare = FlashLayout.build([("nvstore", SECTOR)])
    with pytest.raises(FlashError, match="no partition"):
        SlotStore(Flash.create(tmp_path / "bare.bin", bare))


def _state(rng: random.Random) -> TrailerState:
    """A consistent, non-blank trailer state."""
    ready = SlotInfo(SlotStatus.READY, 1234, rng.randbytes(32))
    confirmed = SlotInfo(SlotStatus.CONFIRMED, 99, rng.randbytes(32))
    return TrailerState(7, 1, Swap.PENDING, (ready, confirmed))


def test_trailer_round_trip_and_layout(rng: random.Random) -> None:
    """A trailer copy encodes to the documented 132 bytes and decodes to itself."""
    state = _state(rng)
    raw = state.encode()
    assert len(raw) == RECORD_SIZE == 132
    assert raw[:4] == b"ESTR"
    assert raw[8:16] == (7).to_bytes(8, "little")
    assert (raw[16], raw[17]) == (1, 1)
    assert raw[20] == SlotStatus.READY
    assert raw[24:28] == (1234).to_bytes(4, "little")
    assert raw[100:] == hashlib.sha256(raw[:100]).digest()
    assert TrailerState.decode(raw) == state


def _rehash(body: bytes) -> bytes:
    """A trailer copy with a valid digest over ``body``."""
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (0, 0x00, "magic"),
        (4, 0x02, "version"),
        (6, 0x01, "version"),
        (16, 0x02, "out of range"),
        (17, 0x03, "out of range"),
        (15, 0x80, "out of range"),
        (60, 0x09, "status"),
        (21, 0x01, "status"),
        (20, int(SlotStatus.CONFIRMED), "not READY"),
    ],
)
def test_hashed_but_invalid_trailer_is_malformed(
    rng: random.Random, index: int, value: int, match: str
) -> None:
    """A correctly hashed copy with a bad magic, version, enum or inconsistent swap is refused."""
    body = bytearray(_state(rng).encode()[:-32])
    body[index] = value
    with pytest.raises(MalformedMessage, match=match):
        TrailerState.decode(_rehash(bytes(body)))


def test_truncated_or_flipped_trailer_is_malformed(rng: random.Random) -> None:
    """A truncated copy, trailing bytes, or any flipped bit fails the trailer decoder."""
    raw = _state(rng).encode()
    for bad in (raw[:-1], raw + b"\x00"):
        with pytest.raises(MalformedMessage, match="expected 132 bytes"):
            TrailerState.decode(bad)
    for index in range(len(raw)):
        flipped = bytearray(raw)
        flipped[index] ^= 0x04
        with pytest.raises(MalformedMessage):
            TrailerState.decode(bytes(flipped))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=RECORD_SIZE - 32, max_size=RECORD_SIZE - 32), st.booleans())
def test_trailer_decoder_raises_only_malformed(body: bytes, hashed: bool) -> None:
    """Arbitrary bodies, correctly hashed or not, decode or raise only MalformedMessage."""
    raw = _rehash(body) if hashed else body + bytes(32)
    with contextlib.suppress(MalformedMessage):
        assert TrailerState.decode(raw).encode() == raw


# The key property (DESIGN §5): a power cut at any sector write, torn or not, leaves a bootable
# image that is exactly the old or the new one, and a confirmed update survives.

Step = tuple[str, Callable[[SlotStore], object]]

TEARS: tuple[Callable[[int], PowerPlan], ...] = (
    lambda n: PowerPlan(n),
    lambda n: PowerPlan(n, torn=True),
    lambda n: PowerPlan(n, torn=True, tear_at=1),
    lambda n: PowerPlan(n, torn=True, tear_at=70),
    lambda n: PowerPlan(n, torn=True, tear_at=0, garbage=True),
    lambda n: PowerPlan(n, torn=True, tear_at=131, garbage=True),
)


def _chunk_step(offset: int, piece: bytes) -> Callable[[SlotStore], object]:
    """A step writing ``piece`` at ``offset``."""
    return lambda slots: slots.write_chunk(offset, piece)


def update_steps(image: bytes, *, confirm: bool) -> list[Step]:
    """The update as steps: begin, chunks, mark_pending, trial boot, then confirm or a revert."""
    steps: list[Step] = [("begin", lambda s: s.begin_update(len(image)))]
    for offset in range(0, len(image), CHUNK):
        piece = image[offset : offset + CHUNK]
        steps.append(("chunk", _chunk_step(offset, piece)))
    steps.append(("mark_pending", lambda s: s.mark_pending()))
    steps.append(("trial_boot", lambda s: s.boot_select()))
    steps.append(
        ("confirm", lambda s: s.confirm()) if confirm else ("revert_boot", SlotStore.boot_select)
    )
    steps.append(("final_boot", lambda s: s.boot_select()))
    return steps


@dataclass(frozen=True, slots=True)
class Cut:
    """What a run under a power plan got through: steps finished, and the step that was cut."""

    done: frozenset[str]
    cut_in: str | None
    sector_writes: int


def run_until_cut(path: Path, plan: PowerPlan | None, steps: list[Step]) -> Cut:
    """Run ``steps`` on the flash at ``path`` until the plan cuts the power."""
    flash = Flash.open(path, power=plan)
    slots = SlotStore(flash)
    done: set[str] = set()
    for name, step in steps:
        try:
            step(slots)
        except PowerLoss:
            return Cut(frozenset(done), name, flash.sector_writes)
        done.add(name)
    return Cut(frozenset(done), None, flash.sector_writes)


def check_after_reboot(
    path: Path, cut: Cut, old: bytes, new: bytes, *, confirm: bool, superseded: bytes | None
) -> None:
    """Reboot a few times: every boot is exactly old or new, and the outcome fits the cut."""
    slots = SlotStore(Flash.open(path))
    order = ["begin", "chunk", "mark_pending", "trial_boot", "confirm", "revert_boot"]
    started = cut.done | ({cut.cut_in} if cut.cut_in else set())
    reached = max(order.index(name) for name in started if name in order)
    images: list[bytes] = []
    choices: list[BootChoice] = []
    for _ in range(3):
        choice = slots.boot_select()
        assert choice is not None, cut
        choices.append(choice)
        images.append(slots.read_image(choice.slot))
        if choice.trial and images[-1] == superseded:
            assert cut.cut_in == "begin", cut  # its trailer write did not land
            continue
        assert images[-1] in (old, new), cut
    if reached < order.index("mark_pending"):
        # Cut before the new image was recorded: it is never tried.
        stable = [i for i, c in zip(images, choices, strict=True) if not c.trial]
        assert stable in ([old] * 2, [old] * 3), cut
        assert new not in images, cut
    if confirm and "confirm" in cut.done:
        assert images == [new] * 3, cut
        assert not any(c.trial for c in choices), cut
    if "revert_boot" in cut.done:
        assert images == [old] * 3, cut
    # After at most one trial boot the choice is stable and not a trial.
    assert choices[1] == choices[2], cut
    assert not choices[2].trial, cut


def recover(path: Path, image: bytes) -> None:
    """After any cut, a fresh complete update still goes through and is confirmed."""
    slots = SlotStore(Flash.open(path))
    download(slots, image)
    slots.mark_pending()
    choice = slots.boot_select()
    assert choice is not None
    assert choice.trial
    slots.confirm()
    assert slots.read_image(slots.active()) == image


def prepare(path: Path, base: str, old: bytes, rng: random.Random) -> bytes | None:
    """A board running ``old``; its inactive slot empty, a confirmed fallback, or a pending update.

    Returns the pending (superseded) image, which may still boot as a trial, or None.
    """
    slots = SlotStore(Flash.create(path, small_layout()))
    if base == "fallback":
        slots.install(rng.randbytes(7_000))
    slots.install(old)
    if base != "superseded":
        return None
    pending = rng.randbytes(9_000)
    download(slots, pending)
    slots.mark_pending()
    return pending


@pytest.mark.parametrize("base", ["empty", "fallback", "superseded"])
@pytest.mark.parametrize("confirm", [True, False], ids=["confirm", "revert"])
def test_power_cut_at_every_sector_write_boots_old_or_new(
    tmp_path: Path, rng: random.Random, old: bytes, new: bytes, confirm: bool, base: str
) -> None:
    """At every cut point, torn or not, the board boots exactly the old or the new image.

    With a superseded pending update in the target slot, a cut before the new update's first
    trailer write may still try that (complete, recorded) image once: never a torn one.
    """
    path = tmp_path / FLASH_FILE
    superseded = prepare(path, base, old, rng)
    base_bytes = path.read_bytes()
    steps = update_steps(new, confirm=confirm)
    total = run_until_cut(path, None, steps).sector_writes
    chunks = sum(1 for name, _ in steps if name == "chunk")
    # begin (trailer + header), the chunks' sectors, and one trailer write per other step.
    assert total >= 2 + chunks + 4
    third = rng.randbytes(5_000)
    for cut_after in range(total + 1):
        for tear in TEARS:
            path.write_bytes(base_bytes)
            cut = run_until_cut(path, tear(cut_after), steps)
            assert (cut.cut_in is None) == (cut_after == total)
            check_after_reboot(path, cut, old, new, confirm=confirm, superseded=superseded)
            if cut_after % 5 == 0:
                recover(path, third)


def test_torn_cut_during_confirm_boots_old_or_new_never_garbage(
    tmp_path: Path, old: bytes, new: bytes
) -> None:
    """Cutting exactly the confirm's trailer write either keeps the trial (revert) or confirms."""
    path = tmp_path / FLASH_FILE
    slots = SlotStore(Flash.create(path, small_layout()))
    slots.install(old)
    download(slots, new)
    slots.mark_pending()
    assert slots.boot_select() == BootChoice("slot_a", trial=True)
    base = path.read_bytes()
    outcomes = set()
    for tear in TEARS:
        path.write_bytes(base)
        with pytest.raises(PowerLoss):
            SlotStore(Flash.open(path, power=tear(0))).confirm()
        choice = SlotStore(Flash.open(path)).boot_select()
        assert choice is not None
        assert not choice.trial
        outcomes.add(SlotStore(Flash.open(path)).read_image(choice.slot))
    assert outcomes == {old, new}  # some tears land the record, others do not
