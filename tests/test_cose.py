"""COSE_Sign1 and COSE_Mac0 (protocol/cose.py): COSE WG vectors, negatives, pycose interop."""

from __future__ import annotations

import base64
import json
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys.curves import P256
from pycose.keys.ec2 import EC2Key
from pycose.messages.sign1message import Sign1Message

from protocol import cbor, cose
from protocol.errors import InvalidSignature, MalformedMessage

KEY = ec.derive_private_key(0xC05E, ec.SECP256R1())
OTHER = ec.derive_private_key(0xBAD, ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
MAC_KEY = bytes(range(32))
PAYLOAD = b"This is the content."

MUST_VERIFY = ["ecdsa-sig-01", "ecdsa-sig-02", "eddsa-sig-01", "sign-pass-02", "sign-pass-03"]
MUST_FAIL = ["sign-fail-02", "sign-fail-06"]
_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}


# --- COSE WG examples ----------------------------------------------------------------------------


def _example(vectors: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((vectors / "cose-sign1" / f"{name}.json").read_text())
    return data


def _b64url(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def _public_key(jwk: dict[str, str]) -> cose.PublicKey:
    if jwk["kty"] == "OKP":
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(jwk["x_hex"]))
    numbers = ec.EllipticCurvePublicNumbers(
        _b64url(jwk["x"]), _b64url(jwk["y"]), _CURVES[jwk["crv"]]
    )
    return numbers.public_key()


def _parts(example: dict[str, Any]) -> tuple[bytes, cose.PublicKey, bytes]:
    sign0 = example["input"]["sign0"]
    message = bytes.fromhex(example["output"]["cbor"])
    return message, _public_key(sign0["key"]), bytes.fromhex(sign0.get("external", ""))


@pytest.mark.parametrize("name", MUST_VERIFY)
def test_cose_wg_example_verifies(vectors: Path, name: str) -> None:
    """Each passing COSE WG example verifies and yields its plaintext."""
    example = _example(vectors, name)
    message, key, aad = _parts(example)
    assert cose.sign1_verify(message, key, external_aad=aad) == PAYLOAD
    parsed = cose.sign1_parse_unverified(message)
    assert parsed.alg.name.replace("EDDSA", "EdDSA") == example["input"]["sign0"]["alg"]
    assert parsed.kid == example["input"]["sign0"]["unprotected"]["kid"].encode()


@pytest.mark.parametrize("name", MUST_VERIFY)
def test_cose_wg_to_be_signed_is_byte_exact(vectors: Path, name: str) -> None:
    """Our Sig_structure over the example's bytes equals the example's ToBeSign."""
    example = _example(vectors, name)
    message, _, aad = _parts(example)
    parsed = cose.sign1_parse_unverified(message)
    expected = bytes.fromhex(example["intermediates"]["ToBeSign_hex"])
    assert cose._sig_structure(parsed.protected_bytes, aad, parsed.payload) == expected


@pytest.mark.parametrize("name", MUST_FAIL)
def test_cose_wg_failing_example_rejected(vectors: Path, name: str) -> None:
    """The failing COSE WG examples (changed payload, added protected header) do not verify."""
    example = _example(vectors, name)
    assert example["fail"] is True
    message, key, aad = _parts(example)
    with pytest.raises(InvalidSignature):
        cose.sign1_verify(message, key, external_aad=aad)


def test_cose_wg_external_aad_is_bound(vectors: Path) -> None:
    """sign-pass-02 fails without its external AAD, and sign-pass-03 with one."""
    message, key, aad = _parts(_example(vectors, "sign-pass-02"))
    with pytest.raises(InvalidSignature):
        cose.sign1_verify(message, key)
    message, key, _ = _parts(_example(vectors, "sign-pass-03"))
    with pytest.raises(InvalidSignature):
        cose.sign1_verify(message, key, external_aad=aad)


def test_hash_follows_algorithm(vectors: Path) -> None:
    """ES384 over P-384 (ecdsa-sig-02) fails if its signature is re-labelled ES256."""
    message, key, _ = _parts(_example(vectors, "ecdsa-sig-02"))
    body = _body(message)
    body[0] = cbor.dumps({cose.HEADER_ALG: int(cose.Algorithm.ES256)})
    # A 96-byte ES384 signature is the wrong size for ES256: refused before any curve math.
    with pytest.raises(MalformedMessage, match="expected 64 bytes"):
        cose.sign1_verify(_encode(body), key)


# --- our Sign1 -----------------------------------------------------------------------------------


def _body(message: bytes) -> list[object]:
    return cbor.expect_list(
        cbor.untag(cbor.loads(message, what="t"), 18, what="t", required=False), what="t"
    )


def _encode(body: list[object], tag: int | None = 18) -> bytes:
    return cbor.dumps(body if tag is None else cbor.tagged(tag, body))


def test_sign1_round_trip() -> None:
    """A Sign1 we create is tagged, carries {1: -7} and its kid, and verifies."""
    message = cose.sign1_create(PAYLOAD, KEY, kid=b"iak-1")
    assert message[:4] == bytes.fromhex("d28443a1")
    parsed = cose.sign1_parse_unverified(message)
    assert parsed.protected_bytes == bytes.fromhex("a10126")
    assert parsed.alg is cose.Algorithm.ES256
    assert parsed.kid == b"iak-1"
    assert len(parsed.signature) == 64
    assert cose.sign1_verify(message, KEY.public_key()) == PAYLOAD


def test_sign1_untagged_and_external_aad() -> None:
    """An untagged Sign1 verifies; external AAD must match."""
    message = cose.sign1_create(PAYLOAD, KEY, external_aad=b"ctx", tagged=False)
    assert message[0] == 0x84
    assert cose.sign1_verify(message, KEY.public_key(), external_aad=b"ctx") == PAYLOAD
    with pytest.raises(InvalidSignature):
        cose.sign1_verify(message, KEY.public_key(), external_aad=b"other")


def test_sign1_callable_signer() -> None:
    """A callable signer (a KMS) is given the exact Sig_structure and its output verifies."""
    seen: list[bytes] = []
    inner = cose.es256_signer(KEY)

    def signer(data: bytes) -> bytes:
        seen.append(data)
        return inner(data)

    message = cose.sign1_create(PAYLOAD, signer)
    parsed = cose.sign1_parse_unverified(message)
    assert seen == [cose._sig_structure(parsed.protected_bytes, b"", PAYLOAD)]
    assert cose.sign1_verify(message, KEY.public_key()) == PAYLOAD


def test_sign1_signer_misuse() -> None:
    """A non-P-256 key is a TypeError; a signer returning DER instead of r‖s is a ValueError."""
    with pytest.raises(TypeError, match="P-256"):
        cose.es256_signer(ec.derive_private_key(5, ec.SECP384R1()))
    with pytest.raises(TypeError, match="P-256"):
        cose.sign1_create(PAYLOAD, ec.derive_private_key(5, ec.SECP384R1()))
    with pytest.raises(ValueError, match="64"):
        cose.sign1_create(PAYLOAD, lambda data: b"\x30" * 70)


def _resign(body: list[object]) -> list[object]:
    """Replace the signature with a valid one over the (possibly changed) protected header."""
    protected = cbor.expect_bytes(body[0], what="t")
    payload = cbor.expect_bytes(body[2], what="t")
    body[3] = cose.es256_signer(KEY)(cose._sig_structure(protected, b"", payload))
    return body


GOOD = cose.sign1_create(PAYLOAD, KEY)


def _with(index: int, value: object, *, resign: bool = False) -> bytes:
    body = _body(GOOD)
    body[index] = value
    return _encode(_resign(body) if resign else body)


MALFORMED_SIGN1: dict[str, bytes] = {
    "unknown alg": _with(0, cbor.dumps({1: -999}), resign=True),
    "alg as text": _with(0, cbor.dumps({1: "ES256"}), resign=True),
    "no alg": _with(0, cbor.dumps({3: 0}), resign=True),
    "empty protected": _with(0, b"", resign=True),
    "protected not a map": _with(0, cbor.dumps([1, -7]), resign=True),
    "protected not bytes": _with(0, {1: -7}),
    "protected trailing bytes": _with(0, cbor.dumps({1: -7}) + b"\x00", resign=True),
    "alg in unprotected": _with(1, {1: -7}),
    "unprotected not a map": _with(1, []),
    "kid not bytes": _with(1, {4: "kid"}),
    "HMAC alg in Sign1": _with(0, cbor.dumps({1: 5}), resign=True),
    "detached payload": _with(2, None),
    "payload text": _with(2, "text"),
    "signature text": _with(3, "sig"),
    "signature too long": _with(3, bytes(513)),
    "wrong tag": _encode(_body(GOOD), tag=17),
    "tag 98 (COSE_Sign)": _encode(_body(GOOD), tag=98),
    "trailing bytes": GOOD + b"\x00",
    "truncated": GOOD[:-1],
    "three elements": _encode(_body(GOOD)[:3]),
    "five elements": _encode([*_body(GOOD), b""]),
    "not an array": cbor.dumps(cbor.tagged(18, {1: 2})),
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SIGN1))
def test_malformed_sign1_rejected(case: str) -> None:
    """Structural faults are MalformedMessage from both parse and verify."""
    message = MALFORMED_SIGN1[case]
    with pytest.raises(MalformedMessage):
        cose.sign1_parse_unverified(message)
    with pytest.raises(MalformedMessage):
        cose.sign1_verify(message, KEY.public_key())


def test_protected_header_extra_parameter_accepted() -> None:
    """Unknown protected parameters are covered by the signature and tolerated."""
    message = _with(0, cbor.dumps({1: -7, 3: 0}), resign=True)
    assert cose.sign1_verify(message, KEY.public_key()) == PAYLOAD


@pytest.mark.parametrize("size", [0, 63, 65, 96])
def test_wrong_signature_size_refused(size: int) -> None:
    """An ES256 signature that is not 64 bytes never verifies."""
    message = _with(3, bytes(size))
    with pytest.raises((MalformedMessage, InvalidSignature)):
        cose.sign1_verify(message, KEY.public_key())


def test_wrong_signature_size_is_malformed() -> None:
    """A wrong signature size is a structural fault (MalformedMessage), as cose.py documents."""
    with pytest.raises(MalformedMessage):
        cose.sign1_parse_unverified(_with(3, bytes(63)))


@pytest.mark.parametrize(("index", "name"), [(2, "payload"), (3, "signature"), (0, "protected")])
def test_flipped_bit_rejected(index: int, name: str) -> None:
    """A flipped bit in the payload, signature or protected header fails verification."""
    body = _body(GOOD)
    field = bytearray(cbor.expect_bytes(body[index], what=name))
    field[-1] ^= 0x01
    body[index] = bytes(field)
    message = _encode(body)
    with pytest.raises((InvalidSignature, MalformedMessage)):
        cose.sign1_verify(message, KEY.public_key())
    if index != 0:
        with pytest.raises(InvalidSignature):
            cose.sign1_verify(message, KEY.public_key())


def test_wrong_keys_rejected() -> None:
    """Another P-256 key, a P-384 key or an Ed25519 key do not verify an ES256 message."""
    keys: list[cose.PublicKey] = [
        OTHER.public_key(),
        ec.derive_private_key(5, ec.SECP384R1()).public_key(),
        ED_KEY.public_key(),
    ]
    for key in keys:
        with pytest.raises(InvalidSignature):
            cose.sign1_verify(GOOD, key)


def test_eddsa_needs_ed25519_key(vectors: Path) -> None:
    """An EdDSA message does not verify under an EC key."""
    message, _, _ = _parts(_example(vectors, "eddsa-sig-01"))
    with pytest.raises(InvalidSignature, match="Ed25519"):
        cose.sign1_verify(message, KEY.public_key())


def test_eddsa_signature_verifies_and_tamper_fails() -> None:
    """A hand-built EdDSA Sign1 verifies; a flipped payload bit does not."""
    protected = cbor.dumps({cose.HEADER_ALG: int(cose.Algorithm.EDDSA)})
    signature = ED_KEY.sign(cose._sig_structure(protected, b"", PAYLOAD))
    message = _encode([protected, {}, PAYLOAD, signature])
    assert cose.sign1_verify(message, ED_KEY.public_key()) == PAYLOAD
    with pytest.raises(InvalidSignature):
        cose.sign1_verify(_encode([protected, {}, PAYLOAD + b"!", signature]), ED_KEY.public_key())


# --- Mac0 ----------------------------------------------------------------------------------------


def test_mac0_round_trip() -> None:
    """A Mac0 we create verifies, tagged or not, and its tag is mac0_tag_over its bytes."""
    for tagged in (True, False):
        message = cose.mac0_create(PAYLOAD, MAC_KEY, external_aad=b"a", tagged=tagged)
        assert cose.mac0_verify(message, MAC_KEY, external_aad=b"a") == PAYLOAD
    body = cbor.expect_list(
        cbor.untag(cbor.loads(message, what="t"), 17, what="t", required=False), what="t"
    )
    protected, tag = cbor.expect_bytes(body[0], what="t"), cbor.expect_bytes(body[3], what="t")
    assert cose.mac0_tag_over(protected, PAYLOAD, MAC_KEY, b"a") == tag


def test_mac0_negatives() -> None:
    """Mac0: wrong key, wrong AAD, flipped tag bit are InvalidSignature; a signature alg is not."""
    message = cose.mac0_create(PAYLOAD, MAC_KEY)
    with pytest.raises(InvalidSignature):
        cose.mac0_verify(message, MAC_KEY[::-1])
    with pytest.raises(InvalidSignature):
        cose.mac0_verify(message, MAC_KEY, external_aad=b"x")
    with pytest.raises(InvalidSignature):
        cose.mac0_verify(message[:-1] + bytes([message[-1] ^ 1]), MAC_KEY)
    with pytest.raises(MalformedMessage):
        cose.mac0_verify(GOOD, MAC_KEY)  # tag 18
    es256_mac0 = cbor.dumps(cbor.tagged(17, _body(GOOD)))
    with pytest.raises(MalformedMessage, match="algorithm"):
        cose.mac0_verify(es256_mac0, MAC_KEY)
    with pytest.raises(MalformedMessage):
        cose.mac0_verify(message + b"\x00", MAC_KEY)


# --- pycose interop ------------------------------------------------------------------------------


def _pycose_key(private: ec.EllipticCurvePrivateKey, *, with_d: bool) -> EC2Key:
    numbers = private.public_key().public_numbers()
    d = private.private_numbers().private_value.to_bytes(32, "big") if with_d else b""
    return EC2Key(crv=P256, x=numbers.x.to_bytes(32, "big"), y=numbers.y.to_bytes(32, "big"), d=d)


def test_our_sign1_verifies_in_pycose() -> None:
    """pycose verifies the exact bytes of a Sign1 we produced (and refuses a changed payload)."""
    message = cose.sign1_create(PAYLOAD, KEY, kid=b"k1")
    # pycose 1.1 cannot decode tagged messages from cbor2 >= 6 (tag contents come back as a tuple
    # and a frozendict), so hand it the four decoded elements of our exact bytes instead.
    protected, _, payload, signature = _body(message)
    theirs = Sign1Message.from_cose_obj([protected, {4: b"k1"}, payload, signature], True)
    theirs.key = _pycose_key(KEY, with_d=False)
    assert theirs.verify_signature()
    assert theirs.payload == PAYLOAD
    theirs.payload = PAYLOAD + b"!"
    assert not theirs.verify_signature()


def test_pycose_sign1_verifies_in_ours() -> None:
    """A Sign1 produced by pycose (ES256) verifies with our code."""
    theirs = Sign1Message(phdr={Algorithm: Es256}, uhdr={KID: b"k2"}, payload=PAYLOAD)
    theirs.key = _pycose_key(KEY, with_d=True)
    message = theirs.encode()
    assert cose.sign1_verify(message, KEY.public_key()) == PAYLOAD
    assert cose.sign1_parse_unverified(message).kid == b"k2"
    with pytest.raises(InvalidSignature):
        cose.sign1_verify(message, OTHER.public_key())


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    """Arbitrary bytes make parse and verify fail only with MalformedMessage (or a bad MAC)."""
    with pytest.raises(MalformedMessage):
        cose.sign1_parse_unverified(data)
    with pytest.raises((MalformedMessage, InvalidSignature)):
        cose.mac0_verify(data, MAC_KEY)


_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.binary(max_size=40)
    | st.text(max_size=10)
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.integers(-8, 8), inner, max_size=3)
    ),
    max_leaves=8,
)
_header = st.dictionaries(st.integers(-8, 8), _value, max_size=3).map(cbor.dumps) | _value


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_header | _value, min_size=0, max_size=5),
    st.sampled_from([None, 16, 17, 18, 98]),
)
def test_structured_junk_raises_only_malformed(body: list[object], tag: int | None) -> None:
    """COSE-shaped arrays of arbitrary CBOR items fail parse only with MalformedMessage."""
    message = _encode(body, tag)
    try:
        parsed = cose.sign1_parse_unverified(message)
    except MalformedMessage:
        return
    with pytest.raises(InvalidSignature):
        cose.verify_parsed(parsed, KEY.public_key())


# --- the hand-written fast paths equal the generic ones -------------------------------------------

_KEY = ec.derive_private_key(7, ec.SECP256R1())


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_sig_structure_is_deterministic_cbor(size: int) -> None:
    """The hand-written Sig_structure equals the CBOR encoder's at every length boundary."""
    payload, aad = bytes(range(256)) * (size // 256) + bytes(size % 256), b"\x01" * (size % 40)
    expected = cbor.dumps(["Signature1", b"\xa1\x01\x26", aad, payload])
    assert cose._sig_structure(b"\xa1\x01\x26", aad, payload) == expected


@given(payload=st.binary(max_size=65_535), tagged=st.booleans())
@settings(max_examples=60, deadline=None)
def test_es256_layout_fast_path_equals_the_decoder(payload: bytes, tagged: bool) -> None:
    """Every COSE_Sign1 we write with a payload under 64 KiB takes the fast path, same result."""
    message = cose.sign1_create(payload, _KEY, tagged=tagged)
    fast = cose._parse_es256_layout(message)
    assert fast is not None
    assert fast == cose._parse_decoded(message, cose.TAG_SIGN1, "COSE_Sign1")


@given(
    payload=st.binary(max_size=300),
    edits=st.lists(
        st.tuples(st.integers(0, 400), st.integers(0, 255), st.sampled_from(["set", "ins", "del"])),
        min_size=1,
        max_size=4,
    ),
    cut=st.integers(0, 8),
)
@settings(max_examples=400, deadline=None)
def test_es256_layout_fast_path_never_disagrees(
    payload: bytes, edits: list[tuple[int, int, str]], cut: int
) -> None:
    """On mutated messages the fast path either declines or gives exactly what decoding gives."""
    data = bytearray(cose.sign1_create(payload, _KEY))
    for at, value, kind in edits:
        at %= len(data) + 1
        if kind == "set" and at < len(data):
            data[at] = value
        elif kind == "ins":
            data.insert(at, value)
        elif kind == "del" and at < len(data):
            del data[at]
    message = bytes(data[: len(data) - cut])
    fast = cose._parse_es256_layout(message)
    if fast is None:
        return
    assert fast == cose._parse_decoded(message, cose.TAG_SIGN1, "COSE_Sign1")


def test_es256_layout_declines_other_shapes() -> None:
    """A kid, another algorithm, a non-bytes payload or trailing bytes go to the decoder."""
    with_kid = cose.sign1_create(b"x", _KEY, kid=b"k")
    assert cose._parse_es256_layout(with_kid) is None
    assert cose.sign1_parse_unverified(with_kid).kid == b"k"
    plain = cose.sign1_create(b"payload", _KEY)
    assert cose._parse_es256_layout(plain + b"\x00") is None
    with pytest.raises(MalformedMessage, match="trailing"):
        cose.sign1_parse_unverified(plain + b"\x00")
    assert cose._parse_es256_layout(plain[:-1]) is None
    assert cose._parse_es256_layout(b"") is None and cose._parse_es256_layout(b"\xd2") is None
    big = cose.sign1_create(bytes(65_536), _KEY)  # a 4-byte length: the decoder's business
    assert cose._parse_es256_layout(big) is None
    assert cose.sign1_verify(big, _KEY.public_key()) == bytes(65_536)


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_es256_sig_structure_without_aad_is_deterministic_cbor(size: int) -> None:
    """The ES256 Sig_structure without AAD (tokens, results) equals the encoder's at each length."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = cbor.dumps(["Signature1", b"\xa1\x01\x26", b"", payload])
    assert cose._sig_structure(b"\xa1\x01\x26", b"", payload) == expected


def test_es256_layout_builds_a_frozen_message() -> None:
    """The fast path's message, written through its slots, is the constructor's, and as frozen."""
    message = cose.sign1_create(PAYLOAD, _KEY)
    fast = cose._parse_es256_layout(message)
    assert fast is not None
    built = cose.CoseMessage(b"\xa1\x01\x26", cose.Algorithm.ES256, None, PAYLOAD, fast.signature)
    assert type(fast) is cose.CoseMessage
    assert fast == built and hash(fast) == hash(built) and repr(fast) == repr(built)
    with pytest.raises(FrozenInstanceError):
        fast.payload = b"other"  # type: ignore[misc]


# --- DER from raw r‖s -----------------------------------------------------------------------------


def _raw_values(size: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * size)) - 1
    edges = [0, 1, 0x7F, 0x80, 0xFF, 0x100, top >> 1, (top >> 1) + 1, top - 1, top]
    return st.integers(0, top) | st.sampled_from(edges) | st.integers(0, 1 << 64)


@st.composite
def _signature_halves(draw: st.DrawFn) -> tuple[int, int, int]:
    size = draw(st.sampled_from([32, 48, 66]))
    return size, draw(_raw_values(size)), draw(_raw_values(size))


@given(_signature_halves())
@settings(max_examples=400)
def test_der_signature_equals_encode_dss_signature(halves: tuple[int, int, int]) -> None:
    """The byte-level DER writer gives exactly what encode_dss_signature gives, for any r and s."""
    size, r, s = halves
    raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert cose._der_signature(raw, size) == encode_dss_signature(r, s)


@given(
    st.sampled_from([32, 48, 66]).flatmap(
        lambda n: st.tuples(st.just(n), st.binary(min_size=2 * n, max_size=2 * n))
    )
)
@settings(max_examples=300)
def test_der_signature_equals_encode_dss_signature_on_raw_bytes(case: tuple[int, bytes]) -> None:
    """The same on raw bytes as they come: runs of zero bytes, high bits, anything."""
    size, raw = case
    r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
    assert cose._der_signature(raw, size) == encode_dss_signature(r, s)


@pytest.mark.parametrize(
    ("r", "s"),
    [(0, 0), (1, 1), (0x7F, 0x80), ((1 << 255), (1 << 248) - 1), ((1 << 256) - 1, 0x1234)],
)
def test_der_signature_edges(r: int, s: int) -> None:
    """Zero, leading zeros, the top bit set and all 0xff encode as encode_dss_signature does."""
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert cose._der_signature(raw, 32) == encode_dss_signature(r, s)


def _deterministic_signer(data: bytes) -> bytes:
    """ES256 with RFC 6979 nonces: the same signature for the same bytes, run after run."""
    der = _KEY.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_signatures_with_a_leading_zero_byte_verify() -> None:
    """r or s below 2**248 (a leading 0x00 in the raw form: 1 in 128 signatures) verifies."""
    seen = 0
    for n in range(2000):
        payload = n.to_bytes(2, "big")
        message = cose.sign1_create(payload, _deterministic_signer)
        signature = cose.sign1_parse_unverified(message).signature
        if 0 in (signature[0], signature[32]):
            seen += 1
            assert cose.sign1_verify(message, _KEY.public_key()) == payload
            if seen == 3:
                return
    pytest.fail("no three signatures with a leading zero byte in 2000")
