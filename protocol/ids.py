"""Identifiers that cross module and process boundaries, with their validation."""

from __future__ import annotations

import hashlib
import re
from typing import Final, NewType

from protocol.errors import MalformedMessage

#: A device's id: its certificate subject CN and its MQTT topic segment.
DeviceId = NewType("DeviceId", str)
#: One attestation session, chosen by the device: 16 random bytes.
SessionId = NewType("SessionId", bytes)
#: A product name (``--product``), e.g. ``thermostat``.
Product = NewType("Product", str)
#: The PSA class id of a product: 16 bytes derived from its name.
ClassId = NewType("ClassId", bytes)
#: A release: the lowercase hex SHA-256 of its signed manifest (the app's measurement).
ReleaseId = NewType("ReleaseId", str)

SESSION_ID_BYTES: Final = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def device_id(text: str) -> DeviceId:
    """Validate a device id: 1–64 of ``[A-Za-z0-9._-]``, starting alphanumeric (topic-safe).

    Raises:
        MalformedMessage: ``text`` is not a valid device id.
    """
    if not isinstance(text, str) or not _NAME.fullmatch(text):
        raise MalformedMessage(f"device id: expected 1-64 of [A-Za-z0-9._-], got {text!r:.80}")
    return DeviceId(text)


def product(text: str) -> Product:
    """Validate a product name (same alphabet as device ids).

    Raises:
        MalformedMessage: ``text`` is not a valid product name.
    """
    if not isinstance(text, str) or not _NAME.fullmatch(text):
        raise MalformedMessage(f"product: expected 1-64 of [A-Za-z0-9._-], got {text!r:.80}")
    return Product(text)


def session_id(raw: bytes) -> SessionId:
    """Validate a session id (16 bytes).

    Raises:
        MalformedMessage: ``raw`` is not 16 bytes.
    """
    if not isinstance(raw, bytes) or len(raw) != SESSION_ID_BYTES:
        raise MalformedMessage(f"session id: expected {SESSION_ID_BYTES} bytes")
    return SessionId(raw)


def class_id(name: Product) -> ClassId:
    """The 16-byte PSA class id of a product: SHA-256("edgeseal/class/v1" ‖ name)[:16]."""
    return ClassId(hashlib.sha256(b"edgeseal/class/v1" + name.encode()).digest()[:16])


def release_id(manifest_digest: bytes) -> ReleaseId:
    """The release id of a sealed image: the hex of its manifest digest."""
    if len(manifest_digest) != 32:
        raise ValueError(f"manifest digest must be 32 bytes, got {len(manifest_digest)}")
    return ReleaseId(manifest_digest.hex())
