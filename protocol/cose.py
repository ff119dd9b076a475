"""COSE_Sign1 and COSE_Mac0 (RFC 9052 §4.2, §6.2; algorithms RFC 9053), written on `cryptography`.

Signing: ES256 (P-256, SHA-256, raw r‖s). Verifying: ES256, ES384, ES512 and EdDSA (Ed25519). MAC:
HMAC 256/256. The algorithm is read from the protected header only, and the hash follows the
algorithm, not the curve. Messages may be tagged (18, 17) or untagged; trailing bytes, an unknown
algorithm, a wrong tag or a wrong signature size are ``MalformedMessage``; a signature or tag that
does not verify is ``InvalidSignature``, whatever the reason.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Final

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from protocol import cbor
from protocol.errors import InvalidSignature, MalformedMessage

TAG_SIGN1: Final = 18
TAG_MAC0: Final = 17
HEADER_ALG: Final = 1
HEADER_KID: Final = 4
MAX_MESSAGE_BYTES: Final = 64 << 20

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class Algorithm(IntEnum):
    """COSE algorithm identifiers this module knows (IANA COSE Algorithms)."""

    ES256 = -7
    ES384 = -35
    ES512 = -36
    EDDSA = -8
    HMAC_256_256 = 5


#: The members the hot path compares with, as module constants: on Python 3.11 reading a member
#: off its enum class costs about 70 ns, a module global a few.
_ALG_ES256: Final = Algorithm.ES256
_ALG_EDDSA: Final = Algorithm.EDDSA
_ALG_HMAC: Final = Algorithm.HMAC_256_256

_PROTECTED_ES256: Final = cbor.dumps({HEADER_ALG: int(Algorithm.ES256)})
#: The protected headers we write, recognised without decoding them again (the hot path).
_KNOWN_PROTECTED: Final = {
    _PROTECTED_ES256: Algorithm.ES256,
    cbor.dumps({HEADER_ALG: int(Algorithm.HMAC_256_256)}): Algorithm.HMAC_256_256,
}

_ECDSA: Final = {
    Algorithm.ES256: (hashes.SHA256, 32),
    Algorithm.ES384: (hashes.SHA384, 48),
    Algorithm.ES512: (hashes.SHA512, 66),
}
#: Algorithm objects are immutable: made once, not per signature (this is the hot path).
_ES256: Final = ec.ECDSA(hashes.SHA256())
_ECDSA_VERIFY: Final = {
    alg: (ec.ECDSA(hash_cls()), size) for alg, (hash_cls, size) in _ECDSA.items()
}
#: The concrete class of OpenSSL-backed EC public keys: an exact type check skips the ABC machinery.
_EC_PUBLIC_TYPE: Final = type(ec.derive_private_key(1, ec.SECP256R1()).public_key())
#: Signature or tag size per algorithm (RFC 9053 §2.1: ECDSA r‖s, each the curve's size).
_SIGNATURE_BYTES: Final = {
    Algorithm.ES256: 64,
    Algorithm.ES384: 96,
    Algorithm.ES512: 132,
    Algorithm.EDDSA: 64,
    Algorithm.HMAC_256_256: 32,
}


@dataclass(frozen=True, slots=True)
class CoseMessage:
    """A parsed, *unverified* COSE_Sign1 or COSE_Mac0: what the bytes say, not what is true."""

    protected_bytes: bytes
    alg: Algorithm
    kid: bytes | None
    payload: bytes
    signature: bytes


_new: Final = object.__new__
_MESSAGE_SLOTS: Final = tuple(getattr(CoseMessage, f.name).__set__ for f in fields(CoseMessage))

#: Signs the exact bytes given with ES256 and returns the raw 64-byte r‖s (for HSM-held keys).
Es256Signer = Callable[[bytes], bytes]


def es256_signer(key: ec.EllipticCurvePrivateKey) -> Es256Signer:
    """An ``Es256Signer`` over a P-256 private key held in memory.

    Raises:
        TypeError: ``key`` is not a P-256 private key.
    """
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TypeError("ES256 needs a P-256 private key")

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, _ES256))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def sign1_create(
    payload: bytes,
    key: ec.EllipticCurvePrivateKey | Es256Signer,
    *,
    external_aad: bytes = b"",
    kid: bytes | None = None,
    tagged: bool = True,
) -> bytes:
    """Sign ``payload`` as a COSE_Sign1 with ES256 (protected header ``{1: -7}``).

    ``key`` is a P-256 private key or an ``Es256Signer`` (a KMS or HSM).

    Raises:
        TypeError: ``key`` is neither a P-256 private key nor a callable signer.
    """
    signer = key if callable(key) else es256_signer(key)
    protected = _PROTECTED_ES256
    signature = signer(_sig_structure(protected, external_aad, payload))
    if len(signature) != 64:
        raise ValueError(f"ES256 signer returned {len(signature)} bytes, expected 64 (raw r‖s)")
    unprotected: dict[int, object] = {} if kid is None else {HEADER_KID: kid}
    body = [protected, unprotected, payload, signature]
    # At most one header in the one map: nothing to sort (cbor.dumps_ordered).
    return cbor.dumps_ordered(cbor.tagged(TAG_SIGN1, body) if tagged else body)


def sign1_parse_unverified(message: bytes) -> CoseMessage:
    """Parse a COSE_Sign1 (tagged or not) without verifying it.

    Raises:
        MalformedMessage: not a well-formed COSE_Sign1 with a known signature algorithm.
    """
    parsed = _parse(message, TAG_SIGN1, "COSE_Sign1")
    if parsed.alg is _ALG_HMAC:
        raise MalformedMessage("COSE_Sign1: algorithm 5 (HMAC 256/256) is a MAC, not a signature")
    return parsed


def sign1_verify(message: bytes, key: PublicKey, *, external_aad: bytes = b"") -> bytes:
    """Verify a COSE_Sign1 under ``key`` and return its payload.

    Raises:
        MalformedMessage: the message is not a well-formed COSE_Sign1.
        InvalidSignature: the signature does not verify under ``key`` with this algorithm.
    """
    parsed = sign1_parse_unverified(message)
    verify_parsed(parsed, key, external_aad=external_aad)
    return parsed.payload


def verify_parsed(parsed: CoseMessage, key: PublicKey, *, external_aad: bytes = b"") -> None:
    """Verify the signature of an already parsed COSE_Sign1.

    Raises:
        InvalidSignature: the key does not fit the algorithm, or the signature does not verify.
    """
    to_be_signed = _sig_structure(parsed.protected_bytes, external_aad, parsed.payload)
    try:
        if parsed.alg is _ALG_EDDSA:
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise InvalidSignature("COSE_Sign1: EdDSA needs an Ed25519 key")
            key.verify(parsed.signature, to_be_signed)
            return
        algorithm, size = _ECDSA_VERIFY[parsed.alg]
        if type(key) is not _EC_PUBLIC_TYPE and not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidSignature("COSE_Sign1: the key does not fit the algorithm")
        if len(parsed.signature) != 2 * size:
            raise InvalidSignature("COSE_Sign1: signature size does not fit the algorithm")
        key.verify(_der_signature(parsed.signature, size), to_be_signed, algorithm)
    except _CryptoInvalidSignature as err:
        raise InvalidSignature("COSE_Sign1: signature does not verify") from err


def _der_signature(raw: bytes, size: int) -> bytes:
    """The DER ``ECDSA-Sig-Value`` (RFC 3279 §2.2.3) of a raw r‖s of two ``size``-byte halves.

    Byte-identical to ``encode_dss_signature`` of the two big-endian integers (a property test
    holds it) without converting them: a DER INTEGER is the big-endian bytes without leading
    zeros, with one 0x00 put back when the top bit is set (or the value is zero). ``size`` is at
    most 66 (P-521): each INTEGER is then under 128 bytes and the SEQUENCE under 256.
    """
    r = raw[:size].lstrip(b"\x00")
    s = raw[size:].lstrip(b"\x00")
    if not r or r[0] & 0x80:
        r = b"\x00" + r
    if not s or s[0] & 0x80:
        s = b"\x00" + s
    body = len(r) + len(s) + 4
    if body < 0x80:
        return b"\x30%c\x02%c%s\x02%c%s" % (body, len(r), r, len(s), s)
    return b"\x30\x81%c\x02%c%s\x02%c%s" % (body, len(r), r, len(s), s)


def mac0_create(
    payload: bytes, key: bytes, *, external_aad: bytes = b"", tagged: bool = True
) -> bytes:
    """MAC ``payload`` as a COSE_Mac0 with HMAC 256/256 (protected header ``{1: 5}``)."""
    protected = cbor.dumps({HEADER_ALG: int(Algorithm.HMAC_256_256)})
    tag = _hmac(key, protected, external_aad, payload)
    body = [protected, {}, payload, tag]
    return cbor.dumps(cbor.tagged(TAG_MAC0, body) if tagged else body)


def mac0_verify(message: bytes, key: bytes, *, external_aad: bytes = b"") -> bytes:
    """Verify a COSE_Mac0 with HMAC 256/256 and return its payload.

    Raises:
        MalformedMessage: not a well-formed COSE_Mac0 with algorithm HMAC 256/256.
        InvalidSignature: the tag does not verify under ``key``.
    """
    parsed = _parse(message, TAG_MAC0, "COSE_Mac0")
    if parsed.alg is not Algorithm.HMAC_256_256:
        raise MalformedMessage(f"COSE_Mac0: expected algorithm 5, got {int(parsed.alg)}")
    expected = _hmac(key, parsed.protected_bytes, external_aad, parsed.payload)
    if not hmac.compare_digest(expected, parsed.signature):
        raise InvalidSignature("COSE_Mac0: tag does not verify")
    return parsed.payload


def mac0_tag_over(
    protected_bytes: bytes, payload: bytes, key: bytes, external_aad: bytes = b""
) -> bytes:
    """The HMAC 256/256 tag over exact protected and payload bytes (for byte-exact vectors)."""
    return _hmac(key, protected_bytes, external_aad, payload)


def _hmac(key: bytes, protected: bytes, external_aad: bytes, payload: bytes) -> bytes:
    mac_structure = cbor.dumps(["MAC0", protected, external_aad, payload])
    return hmac.digest(key, mac_structure, "sha256")


#: ``["Signature1", …`` in deterministic CBOR: a 4-array and the 10-character context string.
_SIG1_CONTEXT: Final = b"\x84\x6aSignature1"
#: ``["Signature1", h'a10126', h'', …``: the start of every ES256 Sig_structure without AAD.
_SIG1_ES256_NO_AAD: Final = _SIG1_CONTEXT + b"\x43" + _PROTECTED_ES256 + b"\x40"


def _sig_structure(protected: bytes, external_aad: bytes, payload: bytes) -> bytes:
    # Sig_structure (RFC 9052 §4.4) in deterministic CBOR, written directly: byte-identical to
    # cbor.dumps(["Signature1", protected, external_aad, payload]) (a property test holds it).
    if protected == _PROTECTED_ES256 and not external_aad:  # tokens, results: the hot path
        return b"".join((_SIG1_ES256_NO_AAD, cbor.head(2, len(payload)), payload))
    return b"".join(
        (
            _SIG1_CONTEXT,
            cbor.bstr_head(len(protected)),
            protected,
            cbor.bstr_head(len(external_aad)),
            external_aad,
            cbor.bstr_head(len(payload)),
            payload,
        )
    )


#: How our COSE_Sign1 starts: tag 18, a 4-array, protected ``{1: -7}``, empty unprotected.
_ES256_HEAD_TAGGED: Final = b"\xd2\x84\x43\xa1\x01\x26\xa0"
_ES256_SIGNATURE_HEAD: Final = b"\x58\x40"


def _parse_es256_layout(message: bytes) -> CoseMessage | None:
    """The fixed layout of an ES256 COSE_Sign1 with no unprotected header, without a decoder.

    ``[tag 18] [h'a10126', {}, bstr payload, bstr .size 64]``: exactly the bytes a generic decode
    would accept for that structure (the length must match to the byte, so nothing trails), and
    the same ``CoseMessage``. Anything else returns None and takes the generic path.
    """
    start = 0 if message.startswith(_ES256_HEAD_TAGGED) else 1
    if start and not message.startswith(_ES256_HEAD_TAGGED[1:]):
        return None
    at = len(_ES256_HEAD_TAGGED) - start
    if at >= len(message):
        return None
    head = message[at]
    if 0x40 <= head <= 0x57:
        size, at = head - 0x40, at + 1
    elif head == 0x58 and at + 2 <= len(message):
        size, at = message[at + 1], at + 2
    elif head == 0x59 and at + 3 <= len(message):
        size, at = message[at + 1] << 8 | message[at + 2], at + 3
    else:
        return None
    end = at + size
    if len(message) != end + 66 or not message.startswith(_ES256_SIGNATURE_HEAD, end):
        return None
    # CoseMessage(_PROTECTED_ES256, Algorithm.ES256, None, payload, signature), written through
    # its slots: a frozen dataclass's __init__ costs twice as much (as in protocol/psa.py).
    parsed: CoseMessage = _new(CoseMessage)
    set_protected, set_alg, set_kid, set_payload, set_signature = _MESSAGE_SLOTS
    set_protected(parsed, _PROTECTED_ES256)
    set_alg(parsed, _ALG_ES256)
    set_kid(parsed, None)
    set_payload(parsed, message[at:end])
    set_signature(parsed, message[end + 2 :])
    return parsed


def _parse(message: bytes, tag: int, what: str) -> CoseMessage:
    if tag == TAG_SIGN1 and type(message) is bytes and len(message) <= MAX_MESSAGE_BYTES:
        fast = _parse_es256_layout(message)
        if fast is not None:
            return fast
    return _parse_decoded(message, tag, what)


def _parse_decoded(message: bytes, tag: int, what: str) -> CoseMessage:
    obj = cbor.untag(
        cbor.loads(message, what=what, max_bytes=MAX_MESSAGE_BYTES), tag, what=what, required=False
    )
    protected_bytes, unprotected, payload, signature = cbor.expect_list(obj, what=what, length=4)
    protected_bytes = cbor.expect_bytes(protected_bytes, what=f"{what}.protected")
    unprotected_fields = cbor.Fields(unprotected, what=f"{what}.unprotected")
    if HEADER_ALG in unprotected_fields:
        raise MalformedMessage(f"{what}: the algorithm must be in the protected header")
    alg = _KNOWN_PROTECTED.get(protected_bytes) or _protected_alg(protected_bytes, what)
    kid = unprotected_fields.opt_bytes(HEADER_KID, max_size=256)
    if payload is None:
        raise MalformedMessage(f"{what}: detached payloads are not supported")
    return CoseMessage(
        protected_bytes=protected_bytes,
        alg=alg,
        kid=kid,
        payload=cbor.expect_bytes(payload, what=f"{what}.payload"),
        signature=cbor.expect_bytes(
            signature, what=f"{what}.signature", size=_SIGNATURE_BYTES[alg]
        ),
    )


def _protected_alg(protected_bytes: bytes, what: str) -> Algorithm:
    headers = cbor.Fields(
        cbor.loads(protected_bytes, what=f"{what}.protected") if protected_bytes else {},
        what=f"{what}.protected",
    )
    alg_id = headers.get_int(HEADER_ALG)
    try:
        return Algorithm(alg_id)
    except ValueError as err:
        raise MalformedMessage(f"{what}: unsupported algorithm {alg_id}") from err
