"""Vendor public keys from signed manifests, checked against the trust anchors (DESIGN §4).

The runtime stage's trust anchors carry vendor *signer ids* (SHA-256 of the SEC1 point), not the
keys, and nothing else on the device holds the vendor's public key. An ECDSA signature determines
its public key up to a few candidates (SEC 1 v2 §4.1.6, public key recovery), so the enclave
recovers the candidates from the manifest's own signature and keeps the one whose signer id is
anchored; ``protocol.image.verify_manifest`` then verifies the signature under it as usual. A
forged signature recovers to some key, never to an anchored one (that would be a forgery under
the vendor's key), so the check loses nothing. Pure integer arithmetic on public data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from protocol import cbor, cose, keys
from protocol.errors import InvalidImage, MalformedMessage

# P-256 domain parameters (SEC 2 v2 §2.4.2).
_P: Final = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_A: Final = _P - 3
_B: Final = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_N: Final = keys.P256_ORDER
_G: Final = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)

_Point = tuple[int, int] | None


def _add(p1: _Point, p2: _Point) -> _Point:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    (x1, y1), (x2, y2) = p1, p2
    if x1 == x2:
        if (y1 + y2) % _P == 0:
            return None
        slope = (3 * x1 * x1 + _A) * pow(2 * y1, -1, _P) % _P
    else:
        slope = (y2 - y1) * pow(x2 - x1, -1, _P) % _P
    x3 = (slope * slope - x1 - x2) % _P
    return x3, (slope * (x1 - x3) - y1) % _P


def _mul(k: int, point: _Point) -> _Point:
    result: _Point = None
    addend = point
    while k:
        if k & 1:
            result = _add(result, addend)
        addend = _add(addend, addend)
        k >>= 1
    return result


def recover_candidates(message_digest: bytes, signature: bytes) -> list[ec.EllipticCurvePublicKey]:
    """The P-256 public keys under which ``signature`` (raw r‖s) verifies for the digest.

    Raises:
        MalformedMessage: the signature is not 64 bytes with r and s in [1, n − 1].
    """
    if len(signature) != 64:
        raise MalformedMessage("signature: expected 64 bytes (r‖s)")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not (0 < r < _N and 0 < s < _N):
        raise MalformedMessage("signature: r or s out of range")
    e = int.from_bytes(message_digest, "big") % _N
    rhs = (pow(r, 3, _P) + _A * r + _B) % _P
    y = pow(rhs, (_P + 1) // 4, _P)  # p ≡ 3 (mod 4)
    if y * y % _P != rhs:
        return []
    r_inv = pow(r, -1, _N)
    u1, u2 = (-e * r_inv) % _N, (s * r_inv) % _N
    base = _mul(u1, _G)
    found = []
    for candidate_y in (y, _P - y):
        point = _add(base, _mul(u2, (r, candidate_y)))
        if point is not None:
            numbers = ec.EllipticCurvePublicNumbers(point[0], point[1], ec.SECP256R1())
            found.append(numbers.public_key())
    return found


def anchored_vendor_key(
    manifest_bytes: bytes, anchored_ids: Collection[bytes]
) -> dict[bytes, ec.EllipticCurvePublicKey]:
    """The anchored vendor key that signed ``manifest_bytes``, as ``{signer id: key}``.

    The result feeds ``protocol.image.verify_manifest``/``open_image`` as ``trusted_vendors``,
    which verify the signature.

    Raises:
        InvalidImage: the manifest does not parse, or no anchored key recovers from it.
    """
    try:
        parsed = cose.sign1_parse_unverified(manifest_bytes)
        digest = hashlib.sha256(
            cbor.dumps(["Signature1", parsed.protected_bytes, b"", parsed.payload])
        ).digest()
        candidates = recover_candidates(digest, parsed.signature)
    except MalformedMessage as err:
        raise InvalidImage("sealed image: manifest signature is malformed") from err
    for key in candidates:
        signer = keys.signer_id(key)
        if signer in anchored_ids:
            return {signer: key}
    raise InvalidImage("sealed image: manifest signer is not trusted")
