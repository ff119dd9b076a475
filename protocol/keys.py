"""Key encodings and identifiers shared by every role (DESIGN §4).

- signer id = SHA-256(SEC1 uncompressed point) of a P-256 public key;
- instance id = 0x01 ‖ SHA-256(SEC1 uncompressed IAK point) (RFC 9783 §4.2.1, EUID type RAND);
- the IAK is derived from the HUK by HKDF-SHA256 and FIPS 186-4 B.4.1;
- raw X25519 public keys are 32 bytes.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import MalformedMessage

#: Order of the P-256 group (SEC 2 §2.4.2).
P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
IAK_INFO: Final = b"edgeseal/iak/v1"
SEAL_INFO: Final = b"edgeseal/seal/v1"
INSTANCE_ID_TYPE_RAND: Final = 0x01
HUK_BYTES: Final = 32


def p256_point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The 65-byte SEC1 uncompressed encoding of a P-256 public key."""
    _require_p256(public_key)
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def p256_from_point(point: bytes) -> ec.EllipticCurvePublicKey:
    """Load a P-256 public key from its SEC1 encoding.

    Raises:
        MalformedMessage: ``point`` is not a valid P-256 point.
    """
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as err:
        raise MalformedMessage("P-256 public key: not a valid SEC1 point") from err


def signer_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the SEC1 uncompressed point: the id of a signer of manifests and bundles."""
    return hashlib.sha256(p256_point(public_key)).digest()


def instance_id(iak_public: ec.EllipticCurvePublicKey) -> bytes:
    """The PSA instance id of an IAK: 0x01 ‖ SHA-256(SEC1 uncompressed point), 33 bytes."""
    return bytes([INSTANCE_ID_TYPE_RAND]) + signer_id(iak_public)


def derive_p256(secret: bytes, info: bytes) -> ec.EllipticCurvePrivateKey:
    """Derive a P-256 private key from ``secret`` (FIPS 186-4 B.4.1, extra random bits).

    c = HKDF-SHA256(secret, info) of 40 bytes; d = (c mod (n − 1)) + 1.
    """
    okm = HKDF(algorithm=hashes.SHA256(), length=40, salt=None, info=info).derive(secret)
    scalar = int.from_bytes(okm, "big") % (P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def derive_iak(huk: bytes, lifecycle_class: int) -> ec.EllipticCurvePrivateKey:
    """The IAK of a device in lifecycle class ``lifecycle_class`` (lifecycle value >> 8)."""
    if len(huk) != HUK_BYTES:
        raise ValueError(f"HUK must be {HUK_BYTES} bytes, got {len(huk)}")
    if not 0 <= lifecycle_class <= 0xFF:
        raise ValueError(f"lifecycle class must be 0..255, got {lifecycle_class}")
    return derive_p256(huk, IAK_INFO + bytes([lifecycle_class]))


def derive_sealing_key(huk: bytes, lifecycle_class: int, measurement: bytes) -> bytes:
    """A 32-byte sealing key bound to the lifecycle class and the caller's measurement."""
    if len(huk) != HUK_BYTES:
        raise ValueError(f"HUK must be {HUK_BYTES} bytes, got {len(huk)}")
    info = SEAL_INFO + bytes([lifecycle_class]) + measurement
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(huk)


def x25519_raw(public_key: x25519.X25519PublicKey) -> bytes:
    """The 32 raw bytes of an X25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_from_raw(raw: bytes) -> x25519.X25519PublicKey:
    """Load an X25519 public key from 32 raw bytes.

    Raises:
        MalformedMessage: ``raw`` is not 32 bytes.
    """
    if len(raw) != 32:
        raise MalformedMessage(f"X25519 public key: expected 32 bytes, got {len(raw)}")
    return x25519.X25519PublicKey.from_public_bytes(raw)


def _require_p256(public_key: ec.EllipticCurvePublicKey) -> None:
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise TypeError(f"expected a P-256 key, got curve {public_key.curve.name}")
