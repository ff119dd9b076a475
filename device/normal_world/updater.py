"""Chunked download of a sealed image into the inactive slot (DESIGN §5, §9).

The normal world is untrusted, and so is what it downloads: this module only moves ciphertext
from ``…/down/chunk`` into flash, in order, and checks what it can without a key — every chunk's
release, offset, length and total size against what was asked, and at the end the image header
(``parse_unverified_header``), that the manifest digest is the release id, and the ciphertext's
SHA-256 against the (unverified) manifest. The enclave verifies the signature and decrypts.

One chunk is in flight at a time; a chunk that is not the one asked for (a duplicate after a
reconnect, a late reply) is ignored, so a resumed download simply asks again from where it
stopped. ``SlotStore.begin_update`` invalidates the slot's trailer entry before the first byte is
written, and ``mark_pending`` records the image only once it has been read back and checked.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from device.hardware.flash import BLOB_HEADER_SIZE
from device.hardware.slots import SLOT_NAMES, CorruptSlot, SlotError, SlotStatus, SlotStore
from protocol import image, messages
from protocol.errors import InvalidImage, MalformedMessage
from protocol.ids import ReleaseId, SessionId

DEFAULT_CHUNK_BYTES: Final = 16 * 1024


class DownloadError(InvalidImage):
    """Raised by ``Download`` when the gateway's chunks or the assembled image do not check out.

    A chunk of another size than asked, a changing total size, an image whose header does not
    parse, whose manifest is not the release asked for, or whose ciphertext does not match the
    manifest's digest. The slot is left WRITING (never booted); start the download again.
    """


class ChunkVerdict(Enum):
    """What ``Download.on_chunk`` made of a chunk."""

    IGNORED = auto()
    WRITTEN = auto()
    COMPLETE = auto()


@dataclass(frozen=True, slots=True)
class SlotRelease:
    """A complete image found in a slot, by release id (its manifest digest, unverified)."""

    slot: str
    release_id: ReleaseId
    version: str
    status: SlotStatus


def slot_release(slots: SlotStore, slot: str) -> SlotRelease | None:
    """The release a slot holds, when its image is complete and matches its trailer entry."""
    info = slots.state().slots[SLOT_NAMES.index(slot)]
    if info.status not in (SlotStatus.READY, SlotStatus.CONFIRMED):
        return None
    try:
        header = image.parse_unverified_header(slots.read_image(slot)[: image.MAX_HEADER_BYTES])
    except (SlotError, CorruptSlot, MalformedMessage):
        return None
    digest = hashlib.sha256(header.manifest_bytes).digest()
    return SlotRelease(slot, ReleaseId(digest.hex()), header.manifest.version, info.status)


def find_release(slots: SlotStore, release_id: ReleaseId) -> SlotRelease | None:
    """The slot holding ``release_id`` complete and intact, if any."""
    for slot in SLOT_NAMES:
        found = slot_release(slots, slot)
        if found is not None and found.release_id == release_id:
            return found
    return None


class Download:
    """One release's download into the inactive slot; the agent feeds it chunks."""

    def __init__(
        self,
        slots: SlotStore,
        release_id: ReleaseId,
        *,
        total_size: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        session_id: SessionId | None = None,
    ) -> None:
        """Prepare a download; with ``total_size`` unknown, the first chunk announces it.

        Raises:
            SlotError: ``total_size`` does not fit a slot.
        """
        if not 0 < chunk_bytes <= messages.CHUNK_MAX_DATA:
            raise ValueError(f"chunk_bytes must be in 1..{messages.CHUNK_MAX_DATA}")
        self.slots = slots
        self.release_id = release_id
        self.chunk_bytes = chunk_bytes
        self.session_id = session_id
        self.total_size = total_size
        self.offset = 0
        self.slot: str | None = None
        if total_size is not None:
            self.slot = slots.begin_update(total_size)

    def is_complete(self) -> bool:
        """Whether every byte has been written (``on_chunk`` returned COMPLETE)."""
        return self.total_size is not None and self.offset == self.total_size

    def next_request(self) -> messages.FetchRequest | None:
        """The request for the next missing bytes; None once complete."""
        if self.is_complete():
            return None
        length = self.chunk_bytes
        if self.total_size is not None:
            length = min(length, self.total_size - self.offset)
        return messages.FetchRequest(self.release_id, self.offset, length, self.session_id)

    def on_chunk(self, chunk: messages.Chunk) -> ChunkVerdict:
        """Write a chunk if it is the one asked for; check the image once it is whole.

        Raises:
            DownloadError: the chunk's size or total does not match, or the finished image
                fails its checks.
            SlotError: the announced total size does not fit a slot.
            PowerLoss: the power was cut during a flash write.
        """
        if chunk.release_id != self.release_id or chunk.offset != self.offset or self.is_complete():
            return ChunkVerdict.IGNORED
        self._check_size(chunk)
        if self.slot is None:
            self.slot = self.slots.begin_update(chunk.total_size)
            self.total_size = chunk.total_size
        self.slots.write_chunk(chunk.offset, chunk.data)
        self.offset += len(chunk.data)
        if not self.is_complete():
            return ChunkVerdict.WRITTEN
        self._finish()
        return ChunkVerdict.COMPLETE

    def _check_size(self, chunk: messages.Chunk) -> None:
        if self.total_size is not None and chunk.total_size != self.total_size:
            raise DownloadError(
                f"download: total size changed from {self.total_size} to {chunk.total_size}"
            )
        expected = min(self.chunk_bytes, chunk.total_size - self.offset)
        if len(chunk.data) != expected:
            raise DownloadError(
                f"download: chunk at {chunk.offset}: expected {expected} bytes, "
                f"got {len(chunk.data)}"
            )

    def _finish(self) -> None:
        """Read the image back, check what can be checked without a key, mark it pending."""
        slot, size = self.slot, self.total_size
        if slot is None or size is None:
            raise SlotError("download: finished before it began")
        data = self.slots.flash.read(slot, BLOB_HEADER_SIZE, size)
        try:
            header = image.parse_unverified_header(data[: image.MAX_HEADER_BYTES])
        except MalformedMessage as err:
            raise DownloadError(f"download: not a sealed image ({err})") from err
        digest = hashlib.sha256(header.manifest_bytes).hexdigest()
        if not hmac.compare_digest(digest, self.release_id):
            raise DownloadError("download: the image is not the release asked for")
        end = header.ciphertext_offset + header.ciphertext_size
        ciphertext = data[header.ciphertext_offset : end]
        if end != len(data) or (
            hashlib.sha256(ciphertext).digest() != header.manifest.ciphertext_sha256
        ):
            raise DownloadError("download: the ciphertext does not match its manifest")
        self.slots.mark_pending(hashlib.sha256(data).digest())
