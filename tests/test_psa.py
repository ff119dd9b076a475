"""The PSA attestation token (protocol/psa.py): RFC 9783 vectors, profiles, verify negatives."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import cbor2
import cbor_diag
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor, cose, keys, psa
from protocol.errors import InvalidSignature, InvalidToken, MalformedMessage

HUK = bytes(range(32))
SECURED_IAK = keys.derive_iak(HUK, psa.lifecycle_class(psa.Lifecycle.SECURED))
DEBUG_IAK = keys.derive_iak(HUK, psa.lifecycle_class(psa.Lifecycle.NON_PSA_ROT_DEBUG))
NONCE = bytes(range(100, 132))

ClaimsMap = dict[object, object]


# --- helpers -------------------------------------------------------------------------------------


def _vector(vectors: Path, name: str) -> Path:
    return vectors / "psa-rfc9783" / name


def _diag(vectors: Path, name: str) -> bytes:
    """A claims set in diagnostic notation, as CBOR bytes."""
    encoded: bytes = cbor_diag.diag2cbor(_vector(vectors, name).read_text())
    return encoded


def _tfm_iak(vectors: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(_vector(vectors, "tfm-es-iak.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _platform() -> psa.PlatformClaims:
    return psa.PlatformClaims.create(
        {"runtime": 2, "bl2": 1, "app": 3, "offline_boots": 0},
        boot_count=7,
        secure_boot=True,
        debug_port_open=False,
        smt_enabled=False,
    )


def _claims(**changes: object) -> psa.PsaClaims:
    """A realistic edgeseal claim set (three boot stages, platform claims)."""
    components = tuple(
        psa.SoftwareComponent(
            measurement_value=hashlib.sha256(kind.encode()).digest(),
            signer_id=bytes([n]) * 32,
            measurement_type=kind,
            version=f"1.{n}.0",
            measurement_desc="sha-256",
        )
        for n, kind in enumerate(("BL2", "RT", "APP"))
    )
    claims = psa.PsaClaims(
        profile=psa.PROFILE_RFC9783,
        client_id=1,
        lifecycle=psa.Lifecycle.SECURED,
        implementation_id=bytes(32),
        boot_seed=bytes(range(32)),
        instance_id=keys.instance_id(SECURED_IAK.public_key()),
        nonce=NONCE,
        software_components=components,
        certification_reference="0604565272829-10010",
        verification_service="edgeseal-gateway",
        platform=_platform(),
    )
    return replace(claims, **changes)  # type: ignore[arg-type]


def _good_map() -> ClaimsMap:
    obj = cbor.loads(psa.encode_claims(_claims()), what="test")
    assert isinstance(obj, dict)
    return obj


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- RFC 9783 vectors ----------------------------------------------------------------------------


def test_rfc9783_sign1_example_verifies(vectors: Path) -> None:
    """The RFC 9783 COSE_Sign1 example verifies under the public part of its IAK."""
    token = _vector(vectors, "psa-sign1.cbor").read_bytes()
    claims = psa.verify_token(token, _tfm_iak(vectors).public_key())
    assert claims == psa.decode_claims(_diag(vectors, "sign1-claims.diag"))
    assert claims.profile == psa.PROFILE_RFC9783
    assert claims.client_id == 2147483647
    assert psa.lifecycle_state(claims.lifecycle) is psa.Lifecycle.SECURED
    assert claims.nonce == b"\x01" * 32
    assert claims.boot_seed == bytes(8)
    assert claims.instance_id[0] == 0x01
    assert claims.software_components == (
        psa.SoftwareComponent(b"\x03" * 32, b"\x04" * 32, "PRoT"),
    )
    assert claims.platform is None


def test_rfc9783_sign1_example_refuses_other_key(vectors: Path) -> None:
    """The RFC 9783 example does not verify under another P-256 key."""
    token = _vector(vectors, "psa-sign1.cbor").read_bytes()
    with pytest.raises(InvalidToken):
        psa.verify_token(token, SECURED_IAK.public_key())


def test_rfc9783_sign1_example_nonce_checked(vectors: Path) -> None:
    """The example passes with its own nonce as the expected one and fails with another."""
    token = _vector(vectors, "psa-sign1.cbor").read_bytes()
    public = _tfm_iak(vectors).public_key()
    assert psa.verify_token(token, public, expected_nonce=b"\x01" * 32).nonce == b"\x01" * 32
    with pytest.raises(InvalidToken, match="nonce"):
        psa.verify_token(token, public, expected_nonce=b"\x02" * 32)


def test_rfc9783_mac0_tag_is_byte_exact(vectors: Path) -> None:
    """Our HMAC 256/256 over the example's own bytes gives the example's tag; mac0_verify agrees."""
    token = _vector(vectors, "psa-mac0.cbor").read_bytes()
    key = _vector(vectors, "tfm-hs-iak.bin").read_bytes()
    body = cbor.expect_list(cbor.untag(cbor.loads(token, what="t"), 17, what="t"), what="t")
    protected, payload, tag = (cbor.expect_bytes(body[i], what="t") for i in (0, 2, 3))
    assert cose.mac0_tag_over(protected, payload, key) == tag
    assert cose.mac0_verify(token, key) == payload
    with pytest.raises(InvalidSignature):
        cose.mac0_verify(token, key[::-1])


def test_rfc9783_mac0_claims_round_trip(vectors: Path) -> None:
    """The Mac0 example's claims decode, and our canonical encoding holds the same claim set."""
    payload = cose.mac0_verify(
        _vector(vectors, "psa-mac0.cbor").read_bytes(),
        _vector(vectors, "tfm-hs-iak.bin").read_bytes(),
    )
    claims = psa.decode_claims(payload)
    encoded = psa.encode_claims(claims)
    assert psa.decode_claims(encoded) == claims
    assert cbor.loads(encoded, what="ours") == cbor.loads(payload, what="example")
    assert encoded != payload  # the example is not in canonical key order (README)


def test_good_full_accepted(vectors: Path) -> None:
    """GOOD_full.diag decodes with every optional claim."""
    claims = psa.decode_claims(_diag(vectors, "GOOD_full.diag"))
    assert claims.client_id == -1
    assert claims.certification_reference == "0123456789012-12345"
    assert claims.verification_service == "psa_verifier"
    assert [c.measurement_type for c in claims.software_components] == [
        "BL",
        "PRoT",
        "ARoT",
        "App",
    ]
    assert claims.software_components[0].version == "3.1.4"
    assert psa.find_component(claims, "ARoT") == claims.software_components[2]
    assert psa.find_component(claims, "NSPE") is None
    assert psa.decode_claims(psa.encode_claims(claims)) == claims


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("FAIL_InstanceID_missing.diag", "instance id"),
        ("FAIL_BootSeed_too_small.diag", "boot seed"),
    ],
)
def test_fail_vectors_rejected(vectors: Path, name: str, field: str) -> None:
    """The RFC's FAIL claim sets are refused, naming the faulty claim."""
    with pytest.raises(MalformedMessage, match=field):
        psa.decode_claims(_diag(vectors, name))


def test_rfc9783_boot_seed_is_optional(vectors: Path) -> None:
    """RFC 9783 §4.3.2: a claim set without boot seed decodes to an empty one and re-encodes."""
    claims_map = cbor.loads(_diag(vectors, "GOOD_full.diag"), what="t")
    assert isinstance(claims_map, dict)
    del claims_map[psa.CLAIM_BOOT_SEED]
    claims = psa.decode_claims(cbor.dumps(claims_map))
    assert claims.boot_seed == b""
    reencoded = cbor.loads(psa.encode_claims(claims), what="t")
    assert isinstance(reencoded, dict)
    assert psa.CLAIM_BOOT_SEED not in reencoded


# --- profiles ------------------------------------------------------------------------------------


def test_psa_2_0_0_token_round_trips() -> None:
    """A TF-M 2.0.0 token (boot seed at 2397, 48-byte nonce) signs, verifies and round-trips."""
    claims = _claims(profile=psa.PROFILE_PSA_2_0_0, nonce=b"\x07" * 48, platform=None)
    token = psa.sign_token(claims, SECURED_IAK)
    assert psa.verify_token(token, SECURED_IAK.public_key(), expected_nonce=b"\x07" * 48) == claims
    claims_map = cbor.loads(cose.sign1_parse_unverified(token).payload, what="t")
    assert isinstance(claims_map, dict)
    assert claims_map[psa.CLAIM_BOOT_SEED_PSA_2_0_0] == claims.boot_seed
    assert psa.CLAIM_BOOT_SEED not in claims_map


def test_psa_2_0_0_needs_32_byte_boot_seed_at_2397() -> None:
    """In the 2.0.0 profile the boot seed is mandatory, 32 bytes, and 268 does not stand in."""
    claims_map = _good_map()
    claims_map[psa.CLAIM_PROFILE] = psa.PROFILE_PSA_2_0_0
    with pytest.raises(MalformedMessage, match="boot seed: missing"):
        psa.decode_claims(cbor.dumps(claims_map))
    claims_map[psa.CLAIM_BOOT_SEED_PSA_2_0_0] = bytes(16)
    with pytest.raises(MalformedMessage, match="boot seed"):
        psa.decode_claims(cbor.dumps(claims_map))
    claims_map[psa.CLAIM_BOOT_SEED_PSA_2_0_0] = bytes(32)
    assert psa.decode_claims(cbor.dumps(claims_map)).profile == psa.PROFILE_PSA_2_0_0


def test_psa_2_0_0_accepts_plain_ean13() -> None:
    """TF-M 2.0.0 tokens may carry a bare EAN-13 hardware version; RFC 9783 needs EAN-13+5."""
    claims = _claims(profile=psa.PROFILE_PSA_2_0_0, certification_reference="0604565272829")
    assert psa.decode_claims(psa.encode_claims(claims)) == claims
    with pytest.raises(MalformedMessage, match="certification reference"):
        psa.encode_claims(replace(claims, profile=psa.PROFILE_RFC9783))


@pytest.mark.parametrize(
    "profile", ["PSA_IOT_PROFILE_1", "tag:psacertified.org,2019:psa#legacy", "", "x" * 300]
)
def test_unknown_profile_rejected(profile: str) -> None:
    """Only the two accepted profiles decode."""
    claims_map = _good_map()
    claims_map[psa.CLAIM_PROFILE] = profile
    with pytest.raises(MalformedMessage, match="profile"):
        psa.decode_claims(cbor.dumps(claims_map))


# --- claims: every check -------------------------------------------------------------------------


def test_edgeseal_claims_round_trip() -> None:
    """Our claim set, platform claims included, survives encode and decode unchanged."""
    claims = _claims()
    encoded = psa.encode_claims(claims)
    assert psa.decode_claims(encoded) == claims
    assert cbor.dumps(cbor.loads(encoded, what="t")) == encoded  # canonical
    platform = psa.decode_claims(encoded).platform
    assert platform is not None
    assert platform.fuse_counters == (("app", 3), ("bl2", 1), ("offline_boots", 0), ("runtime", 2))
    assert platform.counter("runtime") == 2
    assert platform.counter("missing") is None


def test_private_claim_keys_are_private_use() -> None:
    """edgeseal's own claims sit in the CWT private-use range (below -65536)."""
    claims_map = _good_map()
    assert all(key < -65536 for key in psa.PLATFORM_CLAIMS)
    assert {key for key in claims_map if isinstance(key, int) and key < 0} == set(
        psa.PLATFORM_CLAIMS
    )
    assert claims_map[psa.CLAIM_FUSE_COUNTERS] == {
        "app": 3,
        "bl2": 1,
        "offline_boots": 0,
        "runtime": 2,
    }


def test_unknown_claims_ignored() -> None:
    """Claims the profile does not define are ignored (RFC 9783 §5.1)."""
    claims_map = _good_map()
    claims_map[99999] = [1, 2, {"x": b""}]
    claims_map[-75000] = "PSA_IOT_PROFILE_1"
    claims_map["text key"] = None
    claims_map[psa.CLAIM_BOOT_SEED_PSA_2_0_0] = b"short"
    component = claims_map[psa.CLAIM_SOFTWARE_COMPONENTS]
    assert isinstance(component, list)
    assert isinstance(component[0], dict)
    component[0][3] = 7  # the old "epoch" attribute
    assert psa.decode_claims(cbor.dumps(claims_map)) == _claims()


def test_non_canonical_order_accepted() -> None:
    """A verifier is variation tolerant: key order does not matter (RFC 9783 §5.1)."""
    claims_map = _good_map()
    reordered = dict(reversed(list(claims_map.items())))
    payload = cbor2.dumps(reordered)
    assert payload != cbor.dumps(claims_map)
    assert psa.decode_claims(payload) == _claims()


def _set(key: object, value: object) -> Callable[[ClaimsMap], None]:
    def mutate(claims_map: ClaimsMap) -> None:
        claims_map[key] = value

    return mutate


def _drop(key: object) -> Callable[[ClaimsMap], None]:
    def mutate(claims_map: ClaimsMap) -> None:
        del claims_map[key]

    return mutate


def _component(key: int, value: object | None) -> Callable[[ClaimsMap], None]:
    def mutate(claims_map: ClaimsMap) -> None:
        components = claims_map[psa.CLAIM_SOFTWARE_COMPONENTS]
        assert isinstance(components, list)
        assert isinstance(components[1], dict)
        if value is None:
            del components[1][key]
        else:
            components[1][key] = value

    return mutate


BAD_CLAIMS: dict[str, tuple[Callable[[ClaimsMap], None], str]] = {
    "no profile": (_drop(psa.CLAIM_PROFILE), "profile"),
    "profile not text": (_set(psa.CLAIM_PROFILE, 1), "profile"),
    "no client id": (_drop(psa.CLAIM_CLIENT_ID), "client id"),
    "client id too big": (_set(psa.CLAIM_CLIENT_ID, 1 << 31), "client id"),
    "client id too small": (_set(psa.CLAIM_CLIENT_ID, -(1 << 31) - 1), "client id"),
    "client id bool": (_set(psa.CLAIM_CLIENT_ID, True), "client id"),
    "no lifecycle": (_drop(psa.CLAIM_LIFECYCLE), "lifecycle"),
    "lifecycle 0x7000": (_set(psa.CLAIM_LIFECYCLE, 0x7000), "lifecycle"),
    "lifecycle 0x3100": (_set(psa.CLAIM_LIFECYCLE, 0x3100), "lifecycle"),
    "lifecycle negative": (_set(psa.CLAIM_LIFECYCLE, -1), "lifecycle"),
    "lifecycle text": (_set(psa.CLAIM_LIFECYCLE, "secured"), "lifecycle"),
    "no implementation id": (_drop(psa.CLAIM_IMPLEMENTATION_ID), "implementation id"),
    "implementation id 31": (_set(psa.CLAIM_IMPLEMENTATION_ID, bytes(31)), "implementation id"),
    "implementation id text": (_set(psa.CLAIM_IMPLEMENTATION_ID, "00" * 32), "implementation id"),
    "no instance id": (_drop(psa.CLAIM_INSTANCE_ID), "instance id"),
    "instance id 32": (_set(psa.CLAIM_INSTANCE_ID, b"\x01" * 32), "instance id"),
    "instance id type 2": (_set(psa.CLAIM_INSTANCE_ID, b"\x02" * 33), "instance id"),
    "no nonce": (_drop(psa.CLAIM_NONCE), "nonce"),
    "nonce 33": (_set(psa.CLAIM_NONCE, bytes(33)), "nonce"),
    "nonce array": (_set(psa.CLAIM_NONCE, [bytes(32)]), "nonce"),
    "boot seed 7": (_set(psa.CLAIM_BOOT_SEED, bytes(7)), "boot seed"),
    "boot seed 33": (_set(psa.CLAIM_BOOT_SEED, bytes(33)), "boot seed"),
    "no components": (_drop(psa.CLAIM_SOFTWARE_COMPONENTS), "software components"),
    "empty components": (_set(psa.CLAIM_SOFTWARE_COMPONENTS, []), "software components"),
    "components a map": (_set(psa.CLAIM_SOFTWARE_COMPONENTS, {}), "software components"),
    "65 components": (
        _set(psa.CLAIM_SOFTWARE_COMPONENTS, [{2: bytes(32), 5: bytes(32)}] * 65),
        "software components",
    ),
    "component not a map": (_set(psa.CLAIM_SOFTWARE_COMPONENTS, [b""]), "components\\[0\\]"),
    "no measurement": (_component(psa.COMPONENT_VALUE, None), "components\\[1\\].measurement"),
    "no signer id": (_component(psa.COMPONENT_SIGNER_ID, None), "components\\[1\\].signer id"),
    "measurement 20": (_component(psa.COMPONENT_VALUE, bytes(20)), "measurement value"),
    "signer id 16": (_component(psa.COMPONENT_SIGNER_ID, bytes(16)), "signer id"),
    "type not text": (_component(psa.COMPONENT_TYPE, 1), "measurement type"),
    "version too long": (_component(psa.COMPONENT_VERSION, "1" * 257), "version"),
    "desc bytes": (_component(psa.COMPONENT_DESC, b"sha-256"), "measurement desc"),
    "certification reference bad": (
        _set(psa.CLAIM_CERTIFICATION_REFERENCE, "0604565272829"),
        "certification reference",
    ),
    "verification service int": (_set(psa.CLAIM_VERIFICATION_SERVICE, 5), "verification"),
    "partial platform claims": (_drop(psa.CLAIM_SMT_ENABLED), "smt enabled: missing"),
    "secure boot int": (_set(psa.CLAIM_SECURE_BOOT, 1), "secure boot"),
    "debug port null": (_set(psa.CLAIM_DEBUG_PORT_OPEN, None), "debug port"),
    "boot count negative": (_set(psa.CLAIM_BOOT_COUNT, -1), "boot count"),
    "boot count huge": (_set(psa.CLAIM_BOOT_COUNT, 1 << 64), "boot count"),
    "fuse counters array": (_set(psa.CLAIM_FUSE_COUNTERS, [1]), "fuse counters"),
    "too many fuse counters": (
        _set(psa.CLAIM_FUSE_COUNTERS, {f"c{i}": 0 for i in range(17)}),
        "fuse counters",
    ),
    "fuse counter name int": (_set(psa.CLAIM_FUSE_COUNTERS, {1: 1}), "fuse counters"),
    "fuse counter name empty": (_set(psa.CLAIM_FUSE_COUNTERS, {"": 1}), "fuse counters"),
    "fuse counter negative": (_set(psa.CLAIM_FUSE_COUNTERS, {"bl2": -1}), "fuse counters.bl2"),
    "fuse counter 2**32": (_set(psa.CLAIM_FUSE_COUNTERS, {"bl2": 1 << 32}), "fuse counters.bl2"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLAIMS))
def test_bad_claims_rejected(case: str) -> None:
    """Each broken claim is refused with MalformedMessage naming the claim."""
    mutate, field = BAD_CLAIMS[case]
    claims_map = _good_map()
    mutate(claims_map)
    with pytest.raises(MalformedMessage, match=field):
        psa.decode_claims(cbor.dumps(claims_map))


@pytest.mark.parametrize("payload", [b"", b"\xa0", b"\x80", b"\x01", cbor.dumps(bytes(40))])
def test_not_a_claims_map_rejected(payload: bytes) -> None:
    """Empty, non-map or incomplete payloads are MalformedMessage."""
    with pytest.raises(MalformedMessage):
        psa.decode_claims(payload)


def test_oversized_claims_rejected() -> None:
    """A payload beyond MAX_TOKEN_BYTES is refused before it is decoded."""
    claims_map = _good_map()
    claims_map[12345] = bytes(psa.MAX_TOKEN_BYTES)
    with pytest.raises(MalformedMessage, match="exceeds"):
        psa.decode_claims(cbor.dumps(claims_map))


def test_error_messages_carry_no_claim_bytes() -> None:
    """A size error reports the size, never the bytes."""
    claims_map = _good_map()
    claims_map[psa.CLAIM_NONCE] = b"\xab" * 31
    with pytest.raises(MalformedMessage) as err:
        psa.decode_claims(cbor.dumps(claims_map))
    assert "31 bytes" in str(err.value)
    assert "abab" not in str(err.value).lower()
    assert "\\xab" not in str(err.value)


def test_encode_refuses_invalid_claims() -> None:
    """encode_claims and sign_token refuse a claim set our own decoder would refuse."""
    with pytest.raises(ValueError, match="nonce"):
        psa.encode_claims(_claims(nonce=bytes(16)))
    with pytest.raises(ValueError, match="boot seed"):
        psa.encode_claims(_claims(profile=psa.PROFILE_PSA_2_0_0, boot_seed=b""))
    with pytest.raises(ValueError, match="profile"):
        psa.sign_token(_claims(profile="http://arm.com/psa/1.0.0"), SECURED_IAK)


def test_lifecycle_classes() -> None:
    """Lifecycle values compare by class (value >> 8); the low byte is implementation defined."""
    assert psa.lifecycle_class(0x3000) == psa.lifecycle_class(0x30FF) == 0x30
    assert psa.lifecycle_class(psa.Lifecycle.NON_PSA_ROT_DEBUG) == 0x40
    for state in psa.Lifecycle:
        assert psa.lifecycle_state(state | 0xA5) is state
        claims = _claims(lifecycle=state | 0xA5)
        assert psa.decode_claims(psa.encode_claims(claims)).lifecycle == state | 0xA5
    for bad in (0x0100, 0x3100, 0x7000, 0xFFFF, -1):
        with pytest.raises(ValueError, match="lifecycle"):
            psa.lifecycle_state(bad)


def test_platform_claims_normalised() -> None:
    """Fuse counters are kept sorted; duplicate names are a caller error."""
    a = psa.PlatformClaims((("z", 1), ("a", 2)), 0, True, False, False)
    assert a.fuse_counters == (("a", 2), ("z", 1))
    assert a == psa.PlatformClaims.create(
        {"z": 1, "a": 2}, boot_count=0, secure_boot=True, debug_port_open=False, smt_enabled=False
    )
    assert hash(a) == hash(psa.PlatformClaims((("a", 2), ("z", 1)), 0, True, False, False))
    with pytest.raises(ValueError, match="unique"):
        psa.PlatformClaims((("a", 1), ("a", 2)), 0, True, False, False)


def test_platform_claims_tolerate_a_mapping_and_refuse_junk() -> None:
    """A mapping given for the counters is turned into pairs; anything else is a TypeError."""
    counters: object = {"b": 2, "a": 1}
    claims = psa.PlatformClaims(counters, 0, True, False, False)  # type: ignore[arg-type]
    assert claims.fuse_counters == (("a", 1), ("b", 2))
    for junk in (5, ["ab", "cd"], [("a", 1, 2)]):
        with pytest.raises(TypeError, match="pairs"):
            psa.PlatformClaims(junk, 0, True, False, False)  # type: ignore[arg-type]


# --- tokens --------------------------------------------------------------------------------------


def test_token_signs_and_verifies() -> None:
    """A signed token verifies under the IAK public key and returns the same claims."""
    claims = _claims()
    token = psa.sign_token(claims, SECURED_IAK)
    assert token[0] == 0xD2  # tag 18
    assert psa.verify_token(token, SECURED_IAK.public_key(), expected_nonce=NONCE) == claims
    assert psa.verify_token(token, SECURED_IAK.public_key()) == claims
    assert psa.parse_unverified_token(token) == claims
    assert cose.sign1_parse_unverified(token).alg is cose.Algorithm.ES256


def test_token_signs_with_callable_signer() -> None:
    """A KMS-style Es256Signer produces a token that verifies."""
    signed: list[bytes] = []
    inner = cose.es256_signer(SECURED_IAK)

    def signer(data: bytes) -> bytes:
        signed.append(data)
        return inner(data)

    token = psa.sign_token(_claims(), signer)
    assert len(signed) == 1
    assert psa.verify_token(token, SECURED_IAK.public_key()) == _claims()


def _untagged(token: bytes) -> bytes:
    return cbor.dumps(cbor.untag(cbor.loads(token, what="t"), 18, what="t"))


def _retagged(token: bytes) -> bytes:
    return cbor.dumps(cbor.tagged(17, cbor.untag(cbor.loads(token, what="t"), 18, what="t")))


TOKEN = psa.sign_token(_claims(), SECURED_IAK)
PAYLOAD_AT = TOKEN.index(cose.sign1_parse_unverified(TOKEN).payload)

TAMPERED: dict[str, tuple[bytes, type[Exception]]] = {
    "payload bit": (_flip(TOKEN, PAYLOAD_AT + 40), InvalidToken),
    "payload first byte": (_flip(TOKEN, PAYLOAD_AT), InvalidToken),
    "signature bit": (_flip(TOKEN, len(TOKEN) - 1), InvalidToken),
    "signature first byte": (_flip(TOKEN, len(TOKEN) - 64), InvalidToken),
    "truncated": (TOKEN[:-1], MalformedMessage),
    "half": (TOKEN[: len(TOKEN) // 2], MalformedMessage),
    "empty": (b"", MalformedMessage),
    "trailing bytes": (TOKEN + b"\x00", MalformedMessage),
    "wrong tag": (_retagged(TOKEN), MalformedMessage),
    "oversized": (TOKEN + bytes(psa.MAX_TOKEN_BYTES), MalformedMessage),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_token_rejected(case: str) -> None:
    """Every tampering is refused: a bad signature as InvalidToken, bad structure as Malformed."""
    token, error = TAMPERED[case]
    with pytest.raises(error):
        psa.verify_token(token, SECURED_IAK.public_key(), expected_nonce=NONCE)


def test_signature_failure_is_opaque_and_chained() -> None:
    """InvalidToken says only that the signature failed, and keeps the cause for developers."""
    with pytest.raises(InvalidToken) as err:
        psa.verify_token(TOKEN, DEBUG_IAK.public_key())
    assert str(err.value) == "PSA token: signature does not verify"
    assert isinstance(err.value.__cause__, InvalidSignature)


def test_wrong_keys_rejected() -> None:
    """The debug-class IAK, another curve or a non-EC key do not verify a SECURED token."""
    p384 = ec.derive_private_key(7, ec.SECP384R1()).public_key()
    for key in (DEBUG_IAK.public_key(), p384):
        with pytest.raises(InvalidToken):
            psa.verify_token(TOKEN, key)


def test_wrong_nonce_rejected() -> None:
    """A token whose nonce is not the expected one is InvalidToken."""
    with pytest.raises(InvalidToken, match="nonce"):
        psa.verify_token(TOKEN, SECURED_IAK.public_key(), expected_nonce=bytes(32))
    with pytest.raises(InvalidToken, match="nonce"):
        psa.verify_token(TOKEN, SECURED_IAK.public_key(), expected_nonce=NONCE + b"\x00")


def test_untagged_token_accepted() -> None:
    """An untagged COSE_Sign1 carrying a valid signature verifies."""
    untagged = _untagged(TOKEN)
    assert untagged[0] == 0x84
    assert psa.verify_token(untagged, SECURED_IAK.public_key()) == _claims()


def test_well_signed_garbage_is_malformed() -> None:
    """A valid signature over a bad claims map is MalformedMessage, not a verified token."""
    claims_map = _good_map()
    del claims_map[psa.CLAIM_NONCE]
    token = cose.sign1_create(cbor.dumps(claims_map), SECURED_IAK)
    with pytest.raises(MalformedMessage, match="nonce"):
        psa.verify_token(token, SECURED_IAK.public_key())


def test_mac0_token_not_parsed_as_sign1(vectors: Path) -> None:
    """parse_unverified_token reads COSE_Sign1 only; the Mac0 example is refused."""
    with pytest.raises(MalformedMessage):
        psa.parse_unverified_token(_vector(vectors, "psa-mac0.cbor").read_bytes())


# --- binding -------------------------------------------------------------------------------------


def test_bind_nonce_known_structure() -> None:
    """bind_nonce is SHA-256 of the CBOR array [label, challenge, key], spelled out byte by byte."""
    challenge, public = bytes(range(32)), bytes(range(32, 64))
    label = b"edgeseal/bind/v1"
    encoded = b"\x83" + bytes([0x60 + len(label)]) + label
    encoded += b"\x58\x20" + challenge + b"\x58\x20" + public
    assert psa.bind_nonce(challenge, public) == hashlib.sha256(encoded).digest()
    assert len(psa.bind_nonce(challenge, public)) == 32
    assert psa.bind_nonce(challenge, public) != psa.bind_nonce(public, challenge)


@pytest.mark.parametrize(
    ("challenge", "public"),
    [(bytes(31), bytes(32)), (bytes(32), bytes(33)), (bytes(0), bytes(0)), ("x" * 32, bytes(32))],
)
def test_bind_nonce_refuses_wrong_sizes(challenge: bytes, public: bytes) -> None:
    """A challenge or key that is not 32 bytes is a caller error (ValueError)."""
    with pytest.raises(ValueError, match="expected 32 bytes"):
        psa.bind_nonce(challenge, public)


# --- properties ----------------------------------------------------------------------------------

_hash = st.sampled_from([32, 48, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
_text = st.none() | st.text(max_size=20)
_component_st = st.builds(psa.SoftwareComponent, _hash, _hash, _text, _text, _text)
_platform_st = st.builds(
    psa.PlatformClaims.create,
    st.dictionaries(st.text(min_size=1, max_size=32), st.integers(0, 2**32 - 1), max_size=16),
    boot_count=st.integers(0, 2**64 - 1),
    secure_boot=st.booleans(),
    debug_port_open=st.booleans(),
    smt_enabled=st.booleans(),
)


@st.composite
def _claims_st(draw: st.DrawFn) -> psa.PsaClaims:
    rfc = draw(st.booleans())
    if rfc:
        boot_seed = draw(st.just(b"") | st.binary(min_size=8, max_size=32))
        reference = draw(st.none() | st.from_regex(r"[0-9]{13}-[0-9]{5}", fullmatch=True))
    else:
        boot_seed = draw(st.binary(min_size=32, max_size=32))
        reference = draw(st.none() | st.from_regex(r"[0-9]{13}(-[0-9]{5})?", fullmatch=True))
    return psa.PsaClaims(
        profile=psa.PROFILE_RFC9783 if rfc else psa.PROFILE_PSA_2_0_0,
        client_id=draw(st.integers(-(2**31), 2**31 - 1)),
        lifecycle=draw(st.integers(0, 6)) << 12 | draw(st.integers(0, 255)),
        implementation_id=draw(st.binary(min_size=32, max_size=32)),
        boot_seed=boot_seed,
        instance_id=b"\x01" + draw(st.binary(min_size=32, max_size=32)),
        nonce=draw(_hash),
        software_components=tuple(draw(st.lists(_component_st, min_size=1, max_size=5))),
        certification_reference=reference,
        verification_service=draw(_text),
        platform=draw(st.none() | _platform_st),
    )


@settings(max_examples=150, deadline=None)
@given(_claims_st())
def test_claims_round_trip(claims: psa.PsaClaims) -> None:
    """Any valid claim set encodes canonically and decodes to itself."""
    encoded = psa.encode_claims(claims)
    assert psa.decode_claims(encoded) == claims
    assert cbor.dumps(cbor.loads(encoded, what="t")) == encoded


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    """decode_claims, parse_unverified_token and verify_token fail only in the documented ways."""
    with pytest.raises(MalformedMessage):
        psa.decode_claims(data)
    with pytest.raises(MalformedMessage):
        psa.parse_unverified_token(data)
    with pytest.raises((MalformedMessage, InvalidToken)):
        psa.verify_token(data, SECURED_IAK.public_key())


_cbor_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.binary(max_size=70)
    | st.text(max_size=40)
    | st.floats(allow_nan=False)
)
_cbor_value = st.recursive(
    _cbor_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.integers(-3, 7), inner, max_size=4)
    ),
    max_leaves=10,
)
_claim_keys = st.sampled_from(
    [*sorted(_good_map(), key=repr), psa.CLAIM_BOOT_SEED_PSA_2_0_0, 0, -1]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_claim_keys, _cbor_value | st.just(_drop)), min_size=1, max_size=3))
def test_mutated_claims_decode_or_raise_malformed(changes: list[tuple[object, object]]) -> None:
    """A good map with claims replaced by arbitrary CBOR decodes or raises MalformedMessage."""
    claims_map = _good_map()
    for key, value in changes:
        if value is _drop:
            claims_map.pop(key, None)
        else:
            claims_map[key] = value
    signed = cose.sign1_create(cbor.dumps(claims_map), SECURED_IAK)
    try:
        claims = psa.verify_token(signed, SECURED_IAK.public_key())
    except MalformedMessage:
        return
    assert psa.decode_claims(psa.encode_claims(claims)) == claims


# --- the fast decoder equals the checked one ------------------------------------------------------


def _checked(claims_map: object) -> psa.PsaClaims | MalformedMessage:
    try:
        return psa._claims_checked(claims_map)
    except MalformedMessage as err:
        return err


def _assert_same(fast: psa.PsaClaims, checked: psa.PsaClaims) -> None:
    """Equal to the bit: the same classes and the same values, all the way down."""
    assert type(fast) is psa.PsaClaims
    assert all(type(c) is psa.SoftwareComponent for c in fast.software_components)
    assert fast.platform is None or type(fast.platform) is psa.PlatformClaims
    assert fast == checked
    assert hash(fast) == hash(checked)
    assert repr(fast) == repr(checked)  # tells True from 1 and bytes from bytearray


@settings(max_examples=150, deadline=None)
@given(_claims_st())
def test_fast_decoder_equals_the_checked_one(claims: psa.PsaClaims) -> None:
    """On any valid claim set the fast decoder builds exactly what the constructors build."""
    claims_map = cbor.loads(psa.encode_claims(claims), what="t")
    assert type(claims_map) is dict
    fast = psa._claims_fast(claims_map)
    assert fast is not None
    _assert_same(fast, psa._claims_checked(claims_map))
    assert fast == claims


_edge_value: st.SearchStrategy[object] = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        1 << 31,
        -(1 << 31) - 1,
        0x3000,
        0x30FF,
        0x3100,
        0x60FF,
        0x7000,
        1 << 64,
        0.0,
        b"",
        bytes(7),
        bytes(8),
        bytes(31),
        bytes(32),
        bytes(33),
        b"\x01" + bytes(32),
        b"\x02" + bytes(32),
        bytes(48),
        bytes(64),
        "",
        "x" * 256,
        "x" * 257,
        [],
        [{}],
        {},
        psa.PROFILE_RFC9783,
        psa.PROFILE_PSA_2_0_0,
        "PSA_IOT_PROFILE_1",
        "0604565272829-10010",
        "0604565272829",
    ]
)
_mutation = _cbor_value | _edge_value | st.just(_drop)
_component_keys = st.sampled_from(
    [
        psa.COMPONENT_TYPE,
        psa.COMPONENT_VALUE,
        3,
        psa.COMPONENT_VERSION,
        psa.COMPONENT_SIGNER_ID,
        psa.COMPONENT_DESC,
    ]
)
_counter_names = st.sampled_from(["bl2", "runtime", "", "x" * 32, "x" * 33, 1, b"bl2"])
_counter_values = st.sampled_from([0, 1, 0xFFFF_FFFF, 1 << 32, -1, True, None, "1"])


@settings(max_examples=500, deadline=None)
@given(
    claims=st.lists(st.tuples(_claim_keys, _mutation), max_size=3),
    components=st.lists(st.tuples(st.integers(0, 3), _component_keys, _mutation), max_size=3),
    counters=st.lists(st.tuples(_counter_names, _counter_values | st.just(_drop)), max_size=2),
)
def test_fast_decoder_never_disagrees(
    claims: list[tuple[object, object]],
    components: list[tuple[int, int, object]],
    counters: list[tuple[object, object]],
) -> None:
    """On mutated maps the fast decoder declines exactly when the checked one raises, else agrees.

    Mutations reach every level: the claims, the software components and the fuse counters.
    """
    claims_map = _good_map()
    items = claims_map[psa.CLAIM_SOFTWARE_COMPONENTS]
    fuses = claims_map[psa.CLAIM_FUSE_COUNTERS]
    assert isinstance(items, list) and isinstance(fuses, dict)
    for index, component_key, component_value in components:
        component = items[index % len(items)]
        assert isinstance(component, dict)
        if component_value is _drop:
            component.pop(component_key, None)
        else:
            component[component_key] = component_value
    for name, value in counters:
        if value is _drop:
            fuses.pop(name, None)
        else:
            fuses[name] = value
    for key, value in claims:
        if value is _drop:
            claims_map.pop(key, None)
        else:
            claims_map[key] = value
    fast = psa._claims_fast(claims_map)
    checked = _checked(claims_map)
    if fast is None:
        assert isinstance(checked, MalformedMessage)
    else:
        assert isinstance(checked, psa.PsaClaims)
        _assert_same(fast, checked)


@pytest.mark.parametrize("case", sorted(BAD_CLAIMS))
def test_fast_decoder_declines_every_bad_claim(case: str) -> None:
    """Each broken claim makes the fast decoder decline, so the checked one names it."""
    mutate, _ = BAD_CLAIMS[case]
    claims_map = _good_map()
    mutate(claims_map)
    assert psa._claims_fast(claims_map) is None


def _null_in_component(key: int) -> Callable[[ClaimsMap], None]:
    def mutate(claims_map: ClaimsMap) -> None:
        components = claims_map[psa.CLAIM_SOFTWARE_COMPONENTS]
        assert isinstance(components, list) and isinstance(components[1], dict)
        components[1][key] = None

    return mutate


_OPTIONAL_CLAIMS: dict[str, tuple[Callable[[ClaimsMap], None], Callable[[ClaimsMap], None]]] = {
    "certification reference": (
        _drop(psa.CLAIM_CERTIFICATION_REFERENCE),
        _set(psa.CLAIM_CERTIFICATION_REFERENCE, None),
    ),
    "verification service": (
        _drop(psa.CLAIM_VERIFICATION_SERVICE),
        _set(psa.CLAIM_VERIFICATION_SERVICE, None),
    ),
    "boot seed": (_drop(psa.CLAIM_BOOT_SEED), _set(psa.CLAIM_BOOT_SEED, None)),
    "measurement type": (
        _component(psa.COMPONENT_TYPE, None),
        _null_in_component(psa.COMPONENT_TYPE),
    ),
    "version": (_component(psa.COMPONENT_VERSION, None), _null_in_component(psa.COMPONENT_VERSION)),
    "measurement desc": (
        _component(psa.COMPONENT_DESC, None),
        _null_in_component(psa.COMPONENT_DESC),
    ),
}


@pytest.mark.parametrize("name", sorted(_OPTIONAL_CLAIMS))
def test_optional_claims_may_be_absent_but_not_null(name: str) -> None:
    """An absent optional claim decodes (as None, or b""); a CBOR null in its place is refused."""
    absent, null = _OPTIONAL_CLAIMS[name]
    claims_map = _good_map()
    absent(claims_map)
    fast = psa._claims_fast(claims_map)
    assert fast is not None
    _assert_same(fast, psa._claims_checked(claims_map))
    claims_map = _good_map()
    null(claims_map)
    assert psa._claims_fast(claims_map) is None
    with pytest.raises(MalformedMessage, match=f"{name}: expected text|{name}: expected 8-32"):
        psa._claims_checked(claims_map)


def test_fast_decoder_builds_frozen_objects() -> None:
    """What the fast decoder builds by writing slots is as frozen as what the constructors build."""
    claims = psa._claims_fast(_good_map())
    assert claims is not None and claims.platform is not None
    with pytest.raises(FrozenInstanceError):
        claims.nonce = bytes(32)  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        claims.software_components[0].version = "2"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        claims.platform.boot_count = 0  # type: ignore[misc]
    assert claims == _claims()
