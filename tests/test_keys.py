"""Key derivation and encodings (protocol/keys.py, DESIGN §4)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import keys
from protocol.errors import MalformedMessage

HUK = bytes(range(32))
OTHER_HUK = bytes(range(1, 33))
SECURED = 0x30
DEBUG = 0x40
N = keys.P256_ORDER


def _hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256 with no salt, written out independently of `cryptography`."""
    prk = hmac.digest(bytes(32), ikm, "sha256")
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        okm += block
    return okm[:length]


def _scalar(key: ec.EllipticCurvePrivateKey) -> int:
    return key.private_numbers().private_value


# --- IAK -----------------------------------------------------------------------------------------


def test_derive_iak_known_answer() -> None:
    """The IAK scalar is (HKDF-SHA256(HUK, "edgeseal/iak/v1" ‖ class, 40) mod (n − 1)) + 1."""
    okm = _hkdf_sha256(HUK, b"edgeseal/iak/v1" + bytes([SECURED]), 40)
    expected = int.from_bytes(okm, "big") % (N - 1) + 1
    assert _scalar(keys.derive_iak(HUK, SECURED)) == expected


def test_derive_iak_deterministic() -> None:
    """The same HUK and lifecycle class give the same IAK."""
    assert _scalar(keys.derive_iak(HUK, SECURED)) == _scalar(keys.derive_iak(HUK, SECURED))
    assert isinstance(keys.derive_iak(HUK, SECURED).curve, ec.SECP256R1)


def test_derive_iak_differs_by_class_and_huk() -> None:
    """Debug unlock (another class) or another board (another HUK) gives another IAK."""
    scalars = {
        _scalar(keys.derive_iak(huk, klass))
        for huk in (HUK, OTHER_HUK)
        for klass in (0x00, 0x10, 0x20, SECURED, DEBUG, 0x50, 0x60)
    }
    assert len(scalars) == 14


@pytest.mark.parametrize(("huk", "klass"), [(bytes(31), SECURED), (bytes(33), SECURED)])
def test_derive_iak_refuses_bad_huk(huk: bytes, klass: int) -> None:
    """A HUK that is not 32 bytes is a caller error."""
    with pytest.raises(ValueError, match="HUK"):
        keys.derive_iak(huk, klass)


@pytest.mark.parametrize("klass", [-1, 256, 0x3000])
def test_derive_iak_refuses_bad_class(klass: int) -> None:
    """A lifecycle class outside 0..255 (e.g. a full lifecycle value) is a caller error."""
    with pytest.raises(ValueError, match="lifecycle class"):
        keys.derive_iak(HUK, klass)


class _FixedHKDF:
    """Stands in for HKDF and returns a chosen 40-byte output."""

    output = b""

    def __init__(self, *, algorithm: object, length: int, salt: object, info: bytes) -> None:
        assert length == 40

    def derive(self, secret: bytes) -> bytes:
        return self.output


@pytest.mark.parametrize(
    ("okm", "scalar"),
    [
        (0, 1),
        (N - 2, N - 1),
        (N - 1, 1),
        (N, 2),
        ((1 << 320) - 1, ((1 << 320) - 1) % (N - 1) + 1),
    ],
)
def test_derive_p256_scalar_boundaries(
    monkeypatch: pytest.MonkeyPatch, okm: int, scalar: int
) -> None:
    """FIPS 186-4 B.4.1: every 40-byte HKDF output maps into [1, n − 1], boundaries included."""
    monkeypatch.setattr(_FixedHKDF, "output", okm.to_bytes(40, "big"))
    monkeypatch.setattr(keys, "HKDF", _FixedHKDF)
    key = keys.derive_p256(HUK, b"info")
    assert _scalar(key) == scalar
    assert 1 <= _scalar(key) <= N - 1


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 255))
def test_derive_iak_scalar_in_range(huk: bytes, klass: int) -> None:
    """Every derived IAK scalar lies in [1, n − 1]."""
    assert 1 <= _scalar(keys.derive_iak(huk, klass)) <= N - 1


# --- identifiers ---------------------------------------------------------------------------------


def test_instance_id_and_signer_id() -> None:
    """instance id = 0x01 ‖ SHA-256(SEC1 point) (33 bytes); signer id = SHA-256(SEC1 point)."""
    public = keys.derive_iak(HUK, SECURED).public_key()
    point = keys.p256_point(public)
    assert len(point) == 65
    assert point[0] == 0x04
    assert keys.signer_id(public) == hashlib.sha256(point).digest()
    instance = keys.instance_id(public)
    assert len(instance) == 33
    assert instance[0] == 0x01
    assert instance[1:] == keys.signer_id(public)
    assert keys.instance_id(keys.derive_iak(HUK, DEBUG).public_key()) != instance


def test_p256_point_round_trip() -> None:
    """A SEC1 point loads back to the same key; a compressed point loads too."""
    public = keys.derive_iak(HUK, SECURED).public_key()
    point = keys.p256_point(public)
    assert keys.p256_point(keys.p256_from_point(point)) == point
    compressed = bytes([0x02 + (point[-1] & 1)]) + point[1:33]
    assert keys.p256_point(keys.p256_from_point(compressed)) == point


@pytest.mark.parametrize(
    "point", [b"", bytes(65), b"\x04" + bytes(64), b"\x04" + b"\xff" * 64, b"\x05" + bytes(32)]
)
def test_p256_from_point_refuses_invalid(point: bytes) -> None:
    """Bytes that are not a P-256 point are MalformedMessage."""
    with pytest.raises(MalformedMessage, match="P-256"):
        keys.p256_from_point(point)


def test_p256_point_refuses_other_curves() -> None:
    """A P-384 key is not an IAK or a signer: TypeError."""
    p384 = ec.derive_private_key(3, ec.SECP384R1()).public_key()
    with pytest.raises(TypeError, match="P-256"):
        keys.p256_point(p384)
    with pytest.raises(TypeError, match="P-256"):
        keys.signer_id(p384)


# --- X25519 --------------------------------------------------------------------------------------


def test_x25519_raw_round_trip() -> None:
    """An X25519 public key survives its 32 raw bytes."""
    public = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    raw = keys.x25519_raw(public)
    assert len(raw) == 32
    assert keys.x25519_raw(keys.x25519_from_raw(raw)) == raw


@pytest.mark.parametrize("size", [0, 31, 33, 65])
def test_x25519_from_raw_refuses_sizes(size: int) -> None:
    """A raw X25519 key that is not 32 bytes is MalformedMessage naming the size."""
    with pytest.raises(MalformedMessage, match=f"got {size}"):
        keys.x25519_from_raw(bytes(size))


# --- sealing keys --------------------------------------------------------------------------------


def test_derive_sealing_key_known_answer() -> None:
    """The sealing key is HKDF-SHA256(HUK, "edgeseal/seal/v1" ‖ class ‖ measurement, 32)."""
    measurement = hashlib.sha256(b"runtime").digest()
    expected = _hkdf_sha256(HUK, b"edgeseal/seal/v1" + bytes([SECURED]) + measurement, 32)
    assert keys.derive_sealing_key(HUK, SECURED, measurement) == expected


def test_derive_sealing_key_binds_measurement_class_and_huk() -> None:
    """Another measurement, lifecycle class or HUK gives another sealing key."""
    m1, m2 = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    key = keys.derive_sealing_key(HUK, SECURED, m1)
    assert len(key) == 32
    assert key == keys.derive_sealing_key(HUK, SECURED, m1)
    assert key != keys.derive_sealing_key(HUK, SECURED, m2)
    assert key != keys.derive_sealing_key(HUK, DEBUG, m1)
    assert key != keys.derive_sealing_key(OTHER_HUK, SECURED, m1)
    assert key != keys.derive_iak(HUK, SECURED).private_numbers().private_value.to_bytes(32, "big")


def test_derive_sealing_key_refuses_bad_input() -> None:
    """A HUK that is not 32 bytes, or a class beyond a byte, is a caller error."""
    with pytest.raises(ValueError, match="HUK"):
        keys.derive_sealing_key(bytes(16), SECURED, bytes(32))
    with pytest.raises(ValueError, match=r"range\(0, 256\)"):
        keys.derive_sealing_key(HUK, 0x3000, bytes(32))
