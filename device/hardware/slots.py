"""Application image slots A and B with MCUboot-like test/confirm/revert (DESIGN §5).

An image sits in its slot as a blob (``flash.py``: 12-byte header with its length, then the bytes).
The "trailer" partition holds the slot state in two copies, one per sector (copy 0 at sector 0,
copy 1 at sector 1 of the partition). Each copy carries a sequence number and its own SHA-256; the
state is the valid copy with the highest sequence number, and a new state is always written over
the *other* copy, so a torn or cut trailer write leaves the previous state in force. Every state
change is one trailer write; images are written only into the non-primary slot, whose trailer
entry is invalidated first, so the slot that boots is never being written.

Trailer copy (version 1, little-endian), at offset 0 of its sector; the rest of the sector is
ignored::

    offset  size  field
    0       4     magic b"ESTR"
    4       2     format version (1)
    6       2     reserved, zero
    8       8     sequence number (the highest valid copy wins)
    16      1     primary slot: 0 = slot_a, 1 = slot_b (the confirmed slot; slot_a when blank)
    17      1     swap state of the other slot: 0 NONE, 1 PENDING (boot it once as a trial),
                  2 TRIAL (its trial boot started; not confirmed yet)
    18      2     reserved, zero
    20      40    slot_a entry:  +0 status (u8: 0 EMPTY, 1 WRITING, 2 READY, 3 CONFIRMED,
                                 4 REJECTED), +1 3 reserved zero, +4 image size (u32),
                                 +8 SHA-256 of the image (32; zero unless READY/CONFIRMED/REJECTED)
    60      40    slot_b entry, same layout
    100     32    SHA-256 of bytes [0, 100)

Boot rule (``boot_select``): PENDING → write TRIAL, boot the other slot as a trial; TRIAL at the
next boot (no confirm came) → write NONE and mark it REJECTED, revert; otherwise boot the primary
if CONFIRMED and intact, else the other slot if CONFIRMED and intact, else nothing. A slot is
intact when its blob length equals the trailer's size and its bytes hash to the trailer's SHA-256.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Final

from device.hardware.flash import BLOB_HEADER_SIZE, Flash, blob_header, parse_blob_header
from protocol.errors import InvalidImage, MalformedMessage, UsageError

TRAILER_MAGIC: Final = b"ESTR"
TRAILER_VERSION: Final = 1
SLOT_NAMES: Final = ("slot_a", "slot_b")
TRAILER_PARTITION: Final = "trailer"

_HEAD = struct.Struct("<4sHHQBBH")
_ENTRY = struct.Struct("<B3sI32s")
RECORD_SIZE: Final = _HEAD.size + 2 * _ENTRY.size + 32
_ZERO_HASH: Final = bytes(32)
#: Sequence numbers stop well short of the u64 limit, so ``seq + 1`` always encodes.
_MAX_SEQ: Final = 1 << 63


class SlotError(UsageError):
    """A slot operation asked out of order or out of range; raised by ``SlotStore``.

    A chunk with no update begun, confirm with no trial running, an image too large for a slot,
    a flash without room for the trailer: fix the caller.
    """


class CorruptSlot(InvalidImage):
    """A slot's bytes do not match its trailer entry; raised by ``read_image``/``mark_pending``.

    The size or SHA-256 differs: a torn or tampered image. Never boot it; download it again.
    """


class SlotStatus(IntEnum):
    """What a slot holds, as its trailer entry records."""

    EMPTY = 0
    WRITING = 1
    READY = 2
    CONFIRMED = 3
    REJECTED = 4


class Swap(IntEnum):
    """Where an update of the non-primary slot stands."""

    NONE = 0
    PENDING = 1
    TRIAL = 2


_HASHED: Final = frozenset({SlotStatus.READY, SlotStatus.CONFIRMED, SlotStatus.REJECTED})


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """One slot's trailer entry."""

    status: SlotStatus
    size: int = 0
    sha256: bytes = _ZERO_HASH


@dataclass(frozen=True, slots=True)
class TrailerState:
    """The decoded trailer: which slot is primary, the swap state, both slot entries."""

    seq: int
    primary: int
    swap: Swap
    slots: tuple[SlotInfo, SlotInfo]

    @property
    def other(self) -> int:
        """The index of the non-primary slot (the update target)."""
        return 1 - self.primary

    def with_slot(self, index: int, info: SlotInfo) -> TrailerState:
        """A copy with slot ``index``'s entry replaced."""
        slots = (info, self.slots[1]) if index == 0 else (self.slots[0], info)
        return replace(self, slots=slots)

    def encode(self) -> bytes:
        """The trailer copy's bytes (``RECORD_SIZE``)."""
        body = _HEAD.pack(TRAILER_MAGIC, TRAILER_VERSION, 0, self.seq, self.primary, self.swap, 0)
        for info in self.slots:
            body += _ENTRY.pack(info.status, bytes(3), info.size, info.sha256)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, data: bytes) -> TrailerState:
        """Decode one trailer copy (``RECORD_SIZE`` bytes).

        Raises:
            MalformedMessage: wrong size, magic, version or digest; a bad enum; an inconsistent
                state (a swap whose target is not READY).
        """
        if len(data) != RECORD_SIZE:
            raise MalformedMessage(f"trailer: expected {RECORD_SIZE} bytes, got {len(data)}")
        body = data[:-32]
        if hashlib.sha256(body).digest() != data[-32:]:
            raise MalformedMessage("trailer: digest mismatch (erased or torn copy)")
        magic, version, reserved, seq, primary, swap, reserved2 = _HEAD.unpack_from(body)
        if magic != TRAILER_MAGIC or version != TRAILER_VERSION or reserved or reserved2:
            raise MalformedMessage(f"trailer: bad magic or version (got version {version})")
        if primary not in (0, 1) or swap not in tuple(Swap) or seq >= _MAX_SEQ:
            raise MalformedMessage("trailer.primary/swap/seq: out of range")
        slots = (_decode_entry(body, _HEAD.size), _decode_entry(body, _HEAD.size + _ENTRY.size))
        state = cls(seq, primary, Swap(swap), slots)
        if state.swap is not Swap.NONE and slots[state.other].status is not SlotStatus.READY:
            raise MalformedMessage("trailer.swap: the update target is not READY")
        return state


def _decode_entry(body: bytes, offset: int) -> SlotInfo:
    status, reserved, size, sha = _ENTRY.unpack_from(body, offset)
    if status not in tuple(SlotStatus) or reserved != bytes(3):
        raise MalformedMessage("trailer.slot.status: out of range")
    return SlotInfo(SlotStatus(status), size, sha)


BLANK: Final = TrailerState(
    0, 0, Swap.NONE, (SlotInfo(SlotStatus.EMPTY), SlotInfo(SlotStatus.EMPTY))
)


@dataclass(frozen=True, slots=True)
class BootChoice:
    """The slot to boot; ``trial`` when it boots once and must be confirmed before the next boot."""

    slot: str
    trial: bool


class SlotStore:
    """Slot A/B update logic over a ``Flash`` (see the module docstring for the rules)."""

    __slots__ = ("flash",)

    def __init__(self, flash: Flash) -> None:
        """Bind to ``flash``.

        Raises:
            FlashError: a slot or the trailer partition is missing.
            SlotError: the trailer partition has fewer than two sectors.
        """
        for name in SLOT_NAMES:
            flash.partition(name)
        if flash.partition(TRAILER_PARTITION).size < 2 * flash.sector_size:
            raise SlotError("slots: the trailer partition needs two sectors (one per copy)")
        self.flash = flash

    # Reads ------------------------------------------------------------------------------------

    def state(self) -> TrailerState:
        """The trailer state in force (``BLANK`` when neither copy is valid)."""
        return self._load()[0]

    def active(self) -> str:
        """The primary (confirmed) slot's name; ``slot_a`` on a blank board."""
        return SLOT_NAMES[self.state().primary]

    def inactive(self) -> str:
        """The slot an update writes to."""
        return SLOT_NAMES[self.state().other]

    def max_image_size(self) -> int:
        """The largest image a slot holds."""
        return min(self.flash.partition(n).size for n in SLOT_NAMES) - BLOB_HEADER_SIZE

    def read_image(self, slot: str) -> bytes:
        """The exact image bytes in ``slot``, checked against its trailer entry.

        Raises:
            SlotError: unknown slot, or the slot holds no complete image.
            CorruptSlot: the slot's bytes do not match the recorded size and SHA-256.
        """
        return self._read_checked(self.state(), _index(slot))

    # Update -----------------------------------------------------------------------------------

    def begin_update(self, size: int) -> str:
        """Start writing a ``size``-byte image into the inactive slot; returns its name.

        Cancels any pending or running trial of that slot (the trailer entry is invalidated
        before a byte of the slot changes).

        Raises:
            SlotError: ``size`` is not in 1..``max_image_size()``.
            PowerLoss: the power was cut.
        """
        if not 0 < size <= self.max_image_size():
            raise SlotError(f"slots: image size {size} not in 1..{self.max_image_size()}")
        with self.flash.transaction():
            state, copy = self._load()
            writing = replace(state, swap=Swap.NONE).with_slot(
                state.other, SlotInfo(SlotStatus.WRITING, size)
            )
            self._commit(writing, copy)
            self.flash.write(SLOT_NAMES[state.other], 0, blob_header(size))
        return SLOT_NAMES[state.other]

    def write_chunk(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the image being written.

        Raises:
            SlotError: no update begun, or the chunk goes past the announced size.
            PowerLoss: the power was cut.
        """
        state = self.state()
        info = state.slots[state.other]
        if info.status is not SlotStatus.WRITING:
            raise SlotError("slots: write_chunk before begin_update")
        if offset < 0 or offset + len(data) > info.size:
            raise SlotError(f"slots: chunk [{offset}, {offset + len(data)}) past size {info.size}")
        self.flash.write(SLOT_NAMES[state.other], BLOB_HEADER_SIZE + offset, data)

    def mark_pending(self, expected_sha256: bytes | None = None) -> str:
        """Record the written image (size, SHA-256 read back) and boot it once, as a trial, next.

        Args:
            expected_sha256: when given, the image read back must hash to it.

        Raises:
            SlotError: no update begun.
            CorruptSlot: the slot's blob header or hash does not match.
            PowerLoss: the power was cut.
        """
        with self.flash.transaction():
            state, copy = self._load()
            info = state.slots[state.other]
            if info.status is not SlotStatus.WRITING:
                raise SlotError("slots: mark_pending before begin_update")
            digest = hashlib.sha256(self._read_blob(state.other, info.size)).digest()
            if expected_sha256 is not None and digest != expected_sha256:
                raise CorruptSlot(f"slots: {SLOT_NAMES[state.other]} does not hash as expected")
            ready = SlotInfo(SlotStatus.READY, info.size, digest)
            self._commit(replace(state, swap=Swap.PENDING).with_slot(state.other, ready), copy)
        return SLOT_NAMES[state.other]

    def install(self, image: bytes) -> str:
        """Write ``image`` into the inactive slot and make it the confirmed primary (factory).

        Raises:
            SlotError: the image does not fit.
            PowerLoss: the power was cut.
        """
        with self.flash.transaction():
            target = self.begin_update(len(image))
            self.write_chunk(0, image)
            state, copy = self._load()
            info = SlotInfo(SlotStatus.CONFIRMED, len(image), hashlib.sha256(image).digest())
            self._commit(replace(state, primary=state.other).with_slot(state.other, info), copy)
        return target

    # Boot -------------------------------------------------------------------------------------

    def boot_select(self) -> BootChoice | None:
        """Choose the slot to boot now, consuming a pending trial or reverting an unconfirmed one.

        Returns:
            The slot and whether this is its trial boot; None when no slot holds a bootable
            image (a blank board, or every image failed its check).

        Raises:
            PowerLoss: the power was cut.
        """
        with self.flash.transaction():
            state, copy = self._load()
            if state.swap is Swap.PENDING and self._intact(state, state.other):
                self._commit(replace(state, swap=Swap.TRIAL), copy)
                return BootChoice(SLOT_NAMES[state.other], trial=True)
            if state.swap is not Swap.NONE:
                # A trial that was never confirmed (or a pending image that no longer checks):
                # revert to the primary, for good (DESIGN §5, MCUboot's revert).
                rejected = replace(state.slots[state.other], status=SlotStatus.REJECTED)
                state = replace(state, swap=Swap.NONE).with_slot(state.other, rejected)
                self._commit(state, copy)
            return self._stable_choice(state)

    def confirm(self) -> str:
        """Confirm the running trial: its slot becomes the primary. Returns its name.

        Raises:
            SlotError: no trial is running (nothing pending booted, or it was reverted).
            PowerLoss: the power was cut (the next boot reverts).
        """
        with self.flash.transaction():
            state, copy = self._load()
            if state.swap is not Swap.TRIAL:
                raise SlotError(f"slots: no trial to confirm (state {state.swap.name})")
            info = replace(state.slots[state.other], status=SlotStatus.CONFIRMED)
            confirmed = replace(state, primary=state.other, swap=Swap.NONE)
            self._commit(confirmed.with_slot(state.other, info), copy)
        return SLOT_NAMES[state.other]

    # Internals --------------------------------------------------------------------------------

    def _stable_choice(self, state: TrailerState) -> BootChoice | None:
        for index in (state.primary, state.other):
            if state.slots[index].status is SlotStatus.CONFIRMED and self._intact(state, index):
                return BootChoice(SLOT_NAMES[index], trial=False)
        return None

    def _intact(self, state: TrailerState, index: int) -> bool:
        try:
            self._read_checked(state, index)
        except CorruptSlot:
            return False
        return True

    def _read_checked(self, state: TrailerState, index: int) -> bytes:
        info = state.slots[index]
        if info.status not in _HASHED:
            raise SlotError(f"slots: {SLOT_NAMES[index]} holds no complete image")
        image = self._read_blob(index, info.size)
        if hashlib.sha256(image).digest() != info.sha256:
            raise CorruptSlot(f"slots: {SLOT_NAMES[index]} does not match its trailer hash")
        return image

    def _read_blob(self, index: int, size: int) -> bytes:
        name = SLOT_NAMES[index]
        try:
            length = parse_blob_header(self.flash.read(name, 0, BLOB_HEADER_SIZE))
        except MalformedMessage as err:
            raise CorruptSlot(f"slots: {name}: {err}") from err
        if length != size or size > self.max_image_size():
            raise CorruptSlot(f"slots: {name} holds {length} bytes, the trailer says {size}")
        return self.flash.read(name, BLOB_HEADER_SIZE, size)

    def _load(self) -> tuple[TrailerState, int | None]:
        """The state in force and the copy (0 or 1) holding it; None for a blank trailer."""
        best: tuple[TrailerState, int | None] = (BLANK, None)
        for copy in (0, 1):
            raw = self.flash.read(TRAILER_PARTITION, copy * self.flash.sector_size, RECORD_SIZE)
            try:
                state = TrailerState.decode(raw)
            except MalformedMessage:
                continue  # erased, torn or tampered: the other copy decides
            if best[1] is None or state.seq > best[0].seq:
                best = (state, copy)
        return best

    def _commit(self, state: TrailerState, copy: int | None) -> None:
        """Write ``state`` with the next sequence number over the copy not in force."""
        target = 0 if copy is None else 1 - copy
        record = replace(state, seq=state.seq + 1).encode()
        self.flash.write(TRAILER_PARTITION, target * self.flash.sector_size, record)


def _index(slot: str) -> int:
    if slot not in SLOT_NAMES:
        raise SlotError(f"slots: no slot named {slot!r}; expected one of {SLOT_NAMES}")
    return SLOT_NAMES.index(slot)
