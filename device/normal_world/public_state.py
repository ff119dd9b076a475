"""What anyone holding the board can read: flash contents and the NW's status file (DESIGN §1).

``inspect_flash`` reports the partition table, the boot stages' unverified headers (kind,
version, counter, signer id, measurement — never their code), the slot trailer, the sealed
images' unverified manifests, the device certificates' subjects and the size of the sealed
nvstore blob; no secret and no plaintext can be in it, because flash holds none.
``read_status_file`` reads ``nw-status.cbor``, the status the agent last published. Both back
``edgeseal-device inspect-flash`` and ``status``.

Status file (version 1), the whole file one canonical CBOR map::

    "format"     1
    "device_id"  tstr or null     the device id the enclave reported at boot
    "status"     bstr             the encoded ``messages.Status`` last published (retained)
    "pid"        uint             the agent process that wrote it
    "updated_s"  uint             host time of the write
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

from device.hardware.flash import (
    BLOB_HEADER_SIZE,
    FLASH_FILE,
    Flash,
    FlashError,
    parse_blob_header,
)
from device.hardware.slots import SLOT_NAMES, SlotStore
from protocol import cbor, image, messages, stage
from protocol.errors import MalformedMessage, UsageError

STATUS_FILE: Final = "nw-status.cbor"
STATUS_FILE_VERSION: Final = 1
_STATUS_FILE_MAX: Final = 4096
_STAGE_PARTITIONS: Final = ("bl2", "runtime")
CERTS_PARTITION: Final = "certs"
_STATUS_KEYS: Final = frozenset({"format", "device_id", "status", "pid", "updated_s"})


class HomeError(UsageError):
    """Raised by ``inspect_flash``/``read_status_file``: the home is missing or corrupt.

    The message names the file; point ``--home`` at a manufactured board.
    """


@dataclass(frozen=True, slots=True)
class PartitionView:
    """One partition table entry."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class StageView:
    """A boot stage's unverified header; ``error`` when the partition holds no readable stage."""

    partition: str
    kind: str | None = None
    version: str | None = None
    security_counter: int | None = None
    signed: bool = False
    signer_id: str | None = None
    measurement: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ImageView:
    """A slot's sealed image header as its bytes say (unverified); ``error`` when unreadable."""

    slot: str
    trailer_status: str
    trailer_size: int
    release_id: str | None = None
    version: str | None = None
    security_counter: int | None = None
    class_id: str | None = None
    vendor_id: str | None = None
    payload_size: int | None = None
    ciphertext_sha256: str | None = None
    created_s: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TrailerView:
    """The slot trailer in force."""

    seq: int
    primary: str
    swap: str


@dataclass(frozen=True, slots=True)
class CertificateView:
    """A device certificate in the "certs" partition: public by design."""

    role: str
    subject: str
    sha256: str


@dataclass(frozen=True, slots=True)
class FlashView:
    """Everything ``inspect-flash`` shows."""

    path: str
    sector_size: int
    total_size: int
    partitions: tuple[PartitionView, ...]
    stages: tuple[StageView, ...]
    trailer: TrailerView | None
    images: tuple[ImageView, ...]
    certificates: tuple[CertificateView, ...]
    nvstore_blob_bytes: int | None


@dataclass(frozen=True, slots=True)
class StatusView:
    """The status file: what the agent last published."""

    device_id: str | None
    status: messages.Status
    pid: int
    updated_s: int


def open_flash(home: Path) -> Flash:
    """Open ``home/flash.bin``.

    Raises:
        HomeError: ``home`` is not a directory, or the flash is missing or corrupt.
    """
    if not home.is_dir():
        raise HomeError(f"{home}: no such board home (a directory made by the factory)")
    try:
        return Flash.open(home / FLASH_FILE)
    except FlashError as err:
        raise HomeError(str(err)) from err


def inspect_flash(home: Path) -> FlashView:
    """Read the public contents of the board's flash.

    Raises:
        HomeError: the home or its flash is missing or corrupt.
    """
    flash = open_flash(home)
    names = {p.name for p in flash.layout.partitions}
    return FlashView(
        path=str(flash.path),
        sector_size=flash.sector_size,
        total_size=flash.layout.total_size,
        partitions=tuple(PartitionView(p.name, p.offset, p.size) for p in flash.layout.partitions),
        stages=tuple(_stage_view(flash, name) for name in _STAGE_PARTITIONS if name in names),
        trailer=_trailer_view(flash),
        images=_image_views(flash),
        certificates=_certificate_views(flash) if CERTS_PARTITION in names else (),
        nvstore_blob_bytes=_blob_size(flash, "nvstore") if "nvstore" in names else None,
    )


def _stage_view(flash: Flash, partition: str) -> StageView:
    try:
        parsed = stage.parse_unverified_stage(flash.read_blob(partition))
    except (MalformedMessage, UsageError) as err:
        return StageView(partition, error=_short(err))
    return StageView(
        partition=partition,
        kind=str(parsed.stage.kind),
        version=parsed.stage.version,
        security_counter=parsed.stage.security_counter,
        signed=parsed.signature is not None,
        signer_id=stage.stage_signer_id(parsed).hex(),
        measurement=stage.stage_measurement(parsed).hex(),
    )


def _slots(flash: Flash) -> SlotStore | None:
    try:
        return SlotStore(flash)
    except UsageError:
        return None


def _trailer_view(flash: Flash) -> TrailerView | None:
    slots = _slots(flash)
    if slots is None:
        return None
    state = slots.state()
    return TrailerView(state.seq, SLOT_NAMES[state.primary], state.swap.name.lower())


def _image_views(flash: Flash) -> tuple[ImageView, ...]:
    slots = _slots(flash)
    if slots is None:
        return ()
    state = slots.state()
    return tuple(
        _image_view(flash, name, info.status.name.lower(), info.size)
        for name, info in zip(SLOT_NAMES, state.slots, strict=True)
    )


def _image_view(flash: Flash, slot: str, status: str, size: int) -> ImageView:
    view = ImageView(slot, status, size)
    try:
        length = _blob_size(flash, slot)
        if length is None:
            return view
        prefix = flash.read(slot, BLOB_HEADER_SIZE, min(length, image.MAX_HEADER_BYTES))
        header = image.parse_unverified_header(prefix)
    except (MalformedMessage, UsageError) as err:
        return ImageView(slot, status, size, error=_short(err))
    manifest = header.manifest
    return ImageView(
        slot=slot,
        trailer_status=status,
        trailer_size=size,
        release_id=hashlib.sha256(header.manifest_bytes).hexdigest(),
        version=manifest.version,
        security_counter=manifest.security_counter,
        class_id=manifest.class_id.hex(),
        vendor_id=manifest.vendor_id.hex(),
        payload_size=manifest.payload_size,
        ciphertext_sha256=manifest.ciphertext_sha256.hex(),
        created_s=manifest.created_s,
    )


def _certificate_views(flash: Flash) -> tuple[CertificateView, ...]:
    """The certificates the factory wrote (``{"v": 1, "secured": der, "debug": der}``)."""
    try:
        blob = flash.read_blob(CERTS_PARTITION)
        fields = cbor.Fields(cbor.loads(blob, what="certs", max_bytes=1 << 16), what="certs")
        ders = [(role, fields.get_bytes(role, max_size=8192)) for role in ("secured", "debug")]
    except (MalformedMessage, UsageError):
        return ()
    views = []
    for role, der in ders:
        try:
            subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        except ValueError:
            subject = "(not a certificate)"
        views.append(CertificateView(role, subject, hashlib.sha256(der).hexdigest()))
    return tuple(views)


def _blob_size(flash: Flash, partition: str) -> int | None:
    """The length of the blob at the start of ``partition``; None when it holds none."""
    try:
        return parse_blob_header(flash.read(partition, 0, BLOB_HEADER_SIZE))
    except MalformedMessage:
        return None


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:160] if str(err) else type(err).__name__


# --- the status file ----------------------------------------------------------------------------


def write_status_file(home: Path, device_id: str | None, status: messages.Status) -> None:
    """Replace ``nw-status.cbor`` in ``home`` atomically (temp file, then rename)."""
    body = cbor.dumps(
        {
            "format": STATUS_FILE_VERSION,
            "device_id": device_id,
            "status": status.encode(),
            "pid": os.getpid(),
            "updated_s": int(time.time()),
        }
    )
    path = home / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(body)
    os.replace(tmp, path)


def read_status_file(home: Path) -> StatusView | None:
    """The status the agent last wrote, or None when it never ran on this home.

    Raises:
        HomeError: ``home`` is missing, or the file is corrupt.
    """
    if not home.is_dir():
        raise HomeError(f"{home}: no such board home (a directory made by the factory)")
    path = home / STATUS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        fields = cbor.Fields(
            cbor.loads(data, what="status file", max_bytes=_STATUS_FILE_MAX), what="status file"
        ).only(_STATUS_KEYS)
        fields.get_int("format", lo=STATUS_FILE_VERSION, hi=STATUS_FILE_VERSION)
        device = fields.opt_raw("device_id")
        return StatusView(
            device_id=None if device is None else cbor.expect_str(device, what="device_id"),
            status=messages.Status.decode(fields.get_bytes("status")),
            pid=fields.get_int("pid", lo=0),
            updated_s=fields.get_int("updated_s", lo=0),
        )
    except MalformedMessage as err:
        raise HomeError(f"{path}: corrupt status file ({err})") from err
