"""Serving sealed-image chunks to devices (DESIGN §5, §9; docs/protocol.md ``FetchRequest``).

A device may fetch only the release assigned to it; a request for any other release, past the end
of the image, or from a device that is not enrolled or is revoked is refused (nothing is sent:
there is no refusal message for chunks, and chunks are ciphertext anyway). Images are read from the
registry once and kept in a small LRU cache bounded in bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from gateway.registry import Registry, UnknownRelease
from protocol import messages
from protocol.ids import DeviceId, ReleaseId

#: Total bytes of sealed images kept in memory.
CACHE_BYTES: Final = 128 << 20


class FetchRefusal(StrEnum):
    """Why a fetch request was not served (also the service's counter names)."""

    UNKNOWN_DEVICE = "fetch.unknown_device"
    REVOKED = "fetch.revoked"
    NOT_ASSIGNED = "fetch.not_assigned"
    UNKNOWN_RELEASE = "fetch.unknown_release"
    OUT_OF_RANGE = "fetch.out_of_range"


@dataclass(frozen=True, slots=True)
class Served:
    """A chunk to publish on the device's ``…/down/chunk``."""

    chunk: messages.Chunk


class ChunkServer:
    """Answers ``FetchRequest``s from the registry, for assigned releases only."""

    def __init__(self, registry: Registry, *, cache_bytes: int = CACHE_BYTES) -> None:
        """Serve from ``registry`` keeping at most ``cache_bytes`` of images in memory."""
        self._registry = registry
        self._cache: OrderedDict[ReleaseId, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes

    def serve(self, device: DeviceId, request: messages.FetchRequest) -> Served | FetchRefusal:
        """The chunk for ``request`` from ``device``, or why it is refused."""
        record = self._registry.find_device(device)
        if record is None:
            return FetchRefusal.UNKNOWN_DEVICE
        if record.revoked:
            return FetchRefusal.REVOKED
        if self._registry.assignment(device) != request.release_id:
            return FetchRefusal.NOT_ASSIGNED
        image = self._image(request.release_id)
        if image is None:
            return FetchRefusal.UNKNOWN_RELEASE
        if request.offset >= len(image):
            return FetchRefusal.OUT_OF_RANGE
        length = min(request.length, messages.CHUNK_MAX_DATA)
        chunk = messages.Chunk(
            release_id=request.release_id,
            offset=request.offset,
            data=image[request.offset : request.offset + length],
            total_size=len(image),
            session_id=request.session_id,
        )
        return Served(chunk)

    def _image(self, release: ReleaseId) -> bytes | None:
        cached = self._cache.get(release)
        if cached is not None:
            self._cache.move_to_end(release)
            return cached
        try:
            image = self._registry.release_image(release)
        except UnknownRelease:
            return None
        self._cache[release] = image
        while sum(len(v) for v in self._cache.values()) > self._cache_bytes and self._cache:
            self._cache.popitem(last=False)
        return image
