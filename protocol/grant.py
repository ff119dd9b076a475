"""Key grants: a release's content key sealed to one enclave's ephemeral key (DESIGN §8).

A grant is RFC 9180 HPKE in base mode (§5.1.1) with the single-shot API (§6.1), suite
DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM (KEM 0x0020, KDF 0x0001, AEAD 0x0002). The
recipient is the X25519 key the enclave bound into its evidence nonce, so only the enclave that
produced the token can open the grant. The HPKE ``info`` binds the grant to its context::

    info = "edgeseal/grant/v1" ‖ SHA-256(CBOR [device id, session id, manifest digest])

A grant opened under any other device, session or image fails. The wire form is exactly what
RFC 9180 §6.1 ``Seal`` returns: ``enc`` (32 bytes, the serialized ephemeral public key) followed by
the AEAD ciphertext of the 32-byte CEK and its 16-byte tag, 80 bytes in all. The version lives in
the ``info`` label: a v2 grant cannot open as v1.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from protocol import cbor, ids
from protocol.errors import InvalidGrant
from protocol.ids import DeviceId, SessionId

GRANT_INFO_LABEL: Final = b"edgeseal/grant/v1"
CEK_BYTES: Final = 32
ENC_BYTES: Final = 32
TAG_BYTES: Final = 16
#: Size of every grant on the wire: enc ‖ ciphertext ‖ tag.
GRANT_BYTES: Final = ENC_BYTES + CEK_BYTES + TAG_BYTES
MANIFEST_DIGEST_BYTES: Final = 32

_SUITE: Final = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def grant_info(device: DeviceId, session: SessionId, manifest_digest: bytes) -> bytes:
    """The HPKE ``info`` of a grant: the label ‖ SHA-256 of the canonical CBOR context.

    Raises:
        ValueError: ``device``, ``session`` or ``manifest_digest`` is not well-formed (a caller bug;
            ``MalformedMessage`` is a ``ValueError``).
    """
    device = ids.device_id(device)
    session = ids.session_id(session)
    if not isinstance(manifest_digest, bytes) or len(manifest_digest) != MANIFEST_DIGEST_BYTES:
        raise ValueError(f"manifest digest must be {MANIFEST_DIGEST_BYTES} bytes")
    context = cbor.dumps_ordered([device, session, manifest_digest])  # no map: nothing to sort
    return GRANT_INFO_LABEL + hashlib.sha256(context).digest()


def seal_grant(
    cek: bytes,
    enclave_public: x25519.X25519PublicKey,
    *,
    device_id: DeviceId,
    session_id: SessionId,
    manifest_digest: bytes,
) -> bytes:
    """Seal a release's content key to an enclave's ephemeral key (RFC 9180 §6.1 Seal).

    Args:
        cek: the 32-byte AES-256 content key of the release.
        enclave_public: the enclave's ephemeral X25519 key, taken from verified evidence.
        device_id, session_id, manifest_digest: the context the grant is bound to.

    Returns:
        The 80-byte grant.

    Raises:
        TypeError: ``enclave_public`` is not an X25519 public key.
        ValueError: ``cek`` is not 32 bytes or the context is not well-formed.
        InvalidGrant: the enclave key is unusable (a low-order point: no shared secret).
    """
    if not isinstance(enclave_public, x25519.X25519PublicKey):
        raise TypeError("a grant is sealed to an X25519 public key")
    if not isinstance(cek, bytes) or len(cek) != CEK_BYTES:
        raise ValueError(f"content key must be {CEK_BYTES} bytes")
    info = grant_info(device_id, session_id, manifest_digest)
    try:
        grant = _SUITE.encrypt(cek, enclave_public, info=info)
    except ValueError as err:
        # The key came from untrusted evidence; RFC 9180 §7.1.4 requires refusing a zero secret.
        raise InvalidGrant("enclave key: no shared secret") from err
    if len(grant) != GRANT_BYTES:  # pragma: no cover - fixed by the suite
        raise AssertionError(f"HPKE produced {len(grant)} bytes, expected {GRANT_BYTES}")
    return grant


def open_grant(
    grant: bytes,
    enclave_private: x25519.X25519PrivateKey,
    *,
    device_id: DeviceId,
    session_id: SessionId,
    manifest_digest: bytes,
) -> bytes:
    """Open a grant with the enclave's ephemeral key (RFC 9180 §6.1 Open) and return the CEK.

    Raises:
        TypeError: ``enclave_private`` is not an X25519 private key.
        ValueError: the context is not well-formed (a caller bug).
        InvalidGrant: the grant does not open for this key and context, whatever the reason.
    """
    if not isinstance(enclave_private, x25519.X25519PrivateKey):
        raise TypeError("a grant is opened with an X25519 private key")
    info = grant_info(device_id, session_id, manifest_digest)
    if not isinstance(grant, bytes) or len(grant) != GRANT_BYTES:
        raise InvalidGrant("grant does not open")
    try:
        cek = _SUITE.decrypt(grant, enclave_private, info=info)
    except (InvalidTag, ValueError) as err:
        raise InvalidGrant("grant does not open") from err
    if len(cek) != CEK_BYTES:  # pragma: no cover - implied by the fixed grant size
        raise InvalidGrant("grant does not open")
    return cek
