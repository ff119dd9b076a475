"""HPKE key grants: sealed to one enclave key and one context (DESIGN §8, RFC 9180)."""

from __future__ import annotations

import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor
from protocol.errors import InvalidGrant
from protocol.grant import GRANT_BYTES, grant_info, open_grant, seal_grant
from protocol.ids import DeviceId, SessionId

DEVICE = DeviceId("dev-0001")
SESSION = SessionId(bytes(range(16)))
DIGEST = hashlib.sha256(b"manifest").digest()


def _key(rng: random.Random) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(rng.randbytes(32))


def _seal(cek: bytes, private: x25519.X25519PrivateKey) -> bytes:
    return seal_grant(
        cek, private.public_key(), device_id=DEVICE, session_id=SESSION, manifest_digest=DIGEST
    )


def _open(
    grant: bytes,
    private: x25519.X25519PrivateKey,
    *,
    device: DeviceId = DEVICE,
    session: SessionId = SESSION,
    digest: bytes = DIGEST,
) -> bytes:
    return open_grant(grant, private, device_id=device, session_id=session, manifest_digest=digest)


def test_grant_round_trip(rng: random.Random) -> None:
    """A grant opens with the enclave key and context it was sealed to and yields the CEK."""
    private = _key(rng)
    cek = rng.randbytes(32)
    grant = _seal(cek, private)
    assert len(grant) == GRANT_BYTES == 80
    assert _open(grant, private) == cek


def test_grant_is_randomized(rng: random.Random) -> None:
    """Two grants of the same key differ (fresh HPKE ephemeral key each time)."""
    private = _key(rng)
    cek = rng.randbytes(32)
    assert _seal(cek, private) != _seal(cek, private)


def test_grant_info_layout() -> None:
    """The info is the label followed by SHA-256 of canonical CBOR [device, session, digest]."""
    expected = b"edgeseal/grant/v1" + hashlib.sha256(cbor.dumps([DEVICE, SESSION, DIGEST])).digest()
    assert grant_info(DEVICE, SESSION, DIGEST) == expected
    assert len(expected) == 17 + 32


def test_grant_refuses_wrong_key(rng: random.Random) -> None:
    """Another enclave's key (a clone's, or a sniffer's) cannot open the grant."""
    grant = _seal(rng.randbytes(32), _key(rng))
    with pytest.raises(InvalidGrant):
        _open(grant, _key(rng))


@pytest.mark.parametrize(
    ("device", "session", "digest"),
    [
        (DeviceId("dev-0002"), SESSION, DIGEST),
        (DEVICE, SessionId(bytes(16)), DIGEST),
        (DEVICE, SESSION, hashlib.sha256(b"other").digest()),
    ],
    ids=["wrong-device", "wrong-session", "wrong-digest"],
)
def test_grant_refuses_wrong_context(
    rng: random.Random, device: DeviceId, session: SessionId, digest: bytes
) -> None:
    """A grant opened under another device, session or image fails."""
    private = _key(rng)
    grant = _seal(rng.randbytes(32), private)
    with pytest.raises(InvalidGrant):
        _open(grant, private, device=device, session=session, digest=digest)


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, GRANT_BYTES * 8 - 1))
def test_grant_refuses_any_flipped_bit(position: int) -> None:
    """Flipping any single bit of the grant makes it fail to open."""
    private = x25519.X25519PrivateKey.from_private_bytes(bytes([7]) * 32)
    grant = bytearray(_seal(bytes(32), private))
    grant[position // 8] ^= 1 << (position % 8)
    with pytest.raises(InvalidGrant):
        _open(bytes(grant), private)


@pytest.mark.parametrize("size", [0, 1, 32, 79, 81, 160])
def test_grant_refuses_wrong_size(rng: random.Random, size: int) -> None:
    """A truncated, extended or empty grant fails before any decryption."""
    private = _key(rng)
    grant = _seal(rng.randbytes(32), private)
    candidate = (grant * 2)[:size]
    with pytest.raises(InvalidGrant):
        _open(candidate, private)


def test_grant_refuses_low_order_enclave_key() -> None:
    """Sealing to an all-zero (low-order) X25519 key, an attacker's choice, fails cleanly."""
    public = x25519.X25519PublicKey.from_public_bytes(bytes(32))
    with pytest.raises(InvalidGrant):
        seal_grant(bytes(32), public, device_id=DEVICE, session_id=SESSION, manifest_digest=DIGEST)


def test_grant_refuses_zeroed_enc(rng: random.Random) -> None:
    """A grant whose encapsulated key is replaced by a low-order point fails as InvalidGrant."""
    private = _key(rng)
    grant = _seal(rng.randbytes(32), private)
    with pytest.raises(InvalidGrant):
        _open(bytes(32) + grant[32:], private)


def test_seal_grant_misuse_raises(rng: random.Random) -> None:
    """Wrong key types, CEK sizes and contexts are caller bugs: TypeError or ValueError."""
    private = _key(rng)
    with pytest.raises(ValueError, match="content key"):
        _seal(bytes(16), private)
    with pytest.raises(TypeError):
        seal_grant(
            bytes(32),
            private,  # type: ignore[arg-type]
            device_id=DEVICE,
            session_id=SESSION,
            manifest_digest=DIGEST,
        )
    with pytest.raises(TypeError):
        open_grant(
            bytes(80),
            private.public_key(),  # type: ignore[arg-type]
            device_id=DEVICE,
            session_id=SESSION,
            manifest_digest=DIGEST,
        )
    with pytest.raises(ValueError, match="manifest digest"):
        grant_info(DEVICE, SESSION, bytes(31))
    with pytest.raises(ValueError, match="device id"):
        grant_info(DeviceId("a/b"), SESSION, DIGEST)
    with pytest.raises(ValueError, match="session id"):
        grant_info(DEVICE, SessionId(bytes(15)), DIGEST)


# Produced once by this implementation (cryptography 50 HPKE) with recipient private key
# bytes 0..31, CEK bytes 100..131, and the DEVICE/SESSION/DIGEST context above. It pins the wire
# format (info label, context hash, enc ‖ ct ‖ tag layout) against accidental change.
FROZEN_GRANT = bytes.fromhex(
    "6d7abfb4bd07257bdcedc5fe9c09156fee73c9e50671f408c15592bc51be2f2b"
    "0ba255e2f27036674c87de01e37f65e16c0b7ddba4ae317730de78df1b993af0"
    "bfc2c1b2826fc75d9ab9e0be758d9bff"
)


def test_frozen_grant_still_opens() -> None:
    """A grant sealed by an earlier build opens to the same CEK (the format has not drifted)."""
    private = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32)))
    assert _open(FROZEN_GRANT, private) == bytes(range(100, 132))
