"""Boot-stage images signed by the ROTPK (protocol/stage.py, docs/image-format.md §4)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor, cose, keys, stage
from protocol.errors import InvalidImage, MalformedMessage
from protocol.stage import (
    BootStage,
    ParsedStage,
    StageKind,
    TrustAnchors,
    build_stage,
    parse_unverified_stage,
    stage_measurement,
    stage_signer_id,
    verify_stage,
)

ROTPK = keys.derive_p256(b"test rotpk secret", b"rotpk")
OTHER = keys.derive_p256(b"test other secret", b"other")
ROTPK_HASH = keys.signer_id(ROTPK.public_key())
RESULT_KEY = keys.p256_point(keys.derive_p256(b"test gateway", b"result").public_key())
ANCHORS = TrustAnchors(
    vendor_signer_ids=(b"\x01" * 32, b"\x02" * 32), gateway_result_key=RESULT_KEY
)
BL2 = BootStage(StageKind.BL2, "1.0.0", 1, b"def bl2():\n    pass\n")
RT = BootStage(StageKind.RUNTIME, "2.1.0", 4, b"def runtime():\n    pass\n", ANCHORS)
SETTINGS = settings(max_examples=150, deadline=None)


def flip(data: bytes, index: int) -> bytes:
    """``data`` with the low bit of one byte flipped."""
    out = bytearray(data)
    out[index] ^= 1
    return bytes(out)


def test_signed_stages_round_trip_and_verify() -> None:
    """BL2 and the runtime stage build, parse to themselves and verify under the ROTPK hash."""
    for boot_stage in (BL2, RT):
        parsed = parse_unverified_stage(build_stage(boot_stage, ROTPK))
        assert parsed.stage == boot_stage
        assert parsed.signature is not None
        key = verify_stage(parsed, ROTPK_HASH)
        assert keys.p256_point(key) == keys.p256_point(ROTPK.public_key())
        assert stage_signer_id(parsed) == ROTPK_HASH


def test_measurement_is_the_payload_digest_signed_or_not() -> None:
    """The measurement is SHA-256 of the payload bytes and does not depend on the signature."""
    signed = parse_unverified_stage(build_stage(RT, ROTPK))
    unsigned = parse_unverified_stage(build_stage(RT, None))
    assert stage_measurement(signed) == stage_measurement(unsigned)
    assert stage_measurement(signed) == hashlib.sha256(RT.encode()).digest()
    assert signed.payload == unsigned.payload == RT.encode()


def test_stage_image_starts_with_the_documented_prefix() -> None:
    """Every stage image starts with tag 55799, array(3) and the format id "ESS" 1."""
    data = build_stage(BL2, None)
    assert data[:9] == bytes.fromhex("d9d9f7831a45535301")
    assert data.endswith(b"\xf6")  # unsigned: null signature


def test_unsigned_stage_is_refused_by_secure_boot() -> None:
    """An unsigned stage parses (development boards run it) but never verifies."""
    parsed = parse_unverified_stage(build_stage(BL2, None))
    assert parsed.signature is None
    assert stage_signer_id(parsed) == bytes(32)
    with pytest.raises(InvalidImage, match="unsigned"):
        verify_stage(parsed, ROTPK_HASH)


def test_stage_signed_by_another_key_is_refused() -> None:
    """A stage signed by a key whose hash is not in the fuses is refused."""
    parsed = parse_unverified_stage(build_stage(RT, OTHER))
    assert stage_signer_id(parsed) == keys.signer_id(OTHER.public_key())
    with pytest.raises(InvalidImage, match="other than the ROTPK"):
        verify_stage(parsed, ROTPK_HASH)


def test_changed_code_is_refused() -> None:
    """A flipped bit in the signed code changes the measurement and fails the statement."""
    data = build_stage(BL2, ROTPK)
    index = data.index(b"bl2")
    parsed = parse_unverified_stage(flip(data, index))
    with pytest.raises(InvalidImage, match="another stage"):
        verify_stage(parsed, ROTPK_HASH)


def test_flipped_bit_in_signature_is_refused() -> None:
    """A changed signature byte is InvalidImage (or malformed when it breaks the structure)."""
    data = build_stage(BL2, ROTPK)
    for index in (len(data) - 1, len(data) - 33):
        with pytest.raises(InvalidImage, match="signature"):
            verify_stage(parse_unverified_stage(flip(data, index)), ROTPK_HASH)


def test_every_bit_flip_fails_parse_or_verify() -> None:
    """No single-byte flip of a signed stage both parses and verifies."""
    data = build_stage(BL2, ROTPK)
    for index in range(len(data)):
        with pytest.raises((MalformedMessage, InvalidImage)):
            verify_stage(parse_unverified_stage(flip(data, index)), ROTPK_HASH)


def test_signature_moved_to_another_stage_is_refused() -> None:
    """The BL2 signature attached to the runtime payload does not verify it."""
    bl2 = parse_unverified_stage(build_stage(BL2, ROTPK))
    rt = parse_unverified_stage(build_stage(RT, None))
    moved = ParsedStage(payload=rt.payload, stage=rt.stage, signature=bl2.signature)
    with pytest.raises(InvalidImage, match="another stage"):
        verify_stage(moved, ROTPK_HASH)


def test_statement_for_another_kind_is_refused() -> None:
    """A ROTPK statement over the right digest but for another kind of stage is refused."""
    parsed = parse_unverified_stage(build_stage(BL2, None))
    statement = cbor.dumps(["edgeseal/stage/v1", "RT", stage_measurement(parsed)])
    point = keys.p256_point(ROTPK.public_key())
    signature = cose.sign1_create(statement, ROTPK, kid=point)
    with pytest.raises(InvalidImage, match="another stage"):
        verify_stage(dataclasses.replace(parsed, signature=signature), ROTPK_HASH)


def test_invalid_point_with_matching_hash_is_refused() -> None:
    """A kid that hashes to the fuse value but is not a curve point is InvalidImage."""
    parsed = parse_unverified_stage(build_stage(BL2, None))
    bogus = b"\x04" + bytes(64)
    statement = cbor.dumps(["edgeseal/stage/v1", "BL2", stage_measurement(parsed)])
    signature = cose.sign1_create(statement, ROTPK, kid=bogus)
    with pytest.raises(InvalidImage, match="signature"):
        verify_stage(
            dataclasses.replace(parsed, signature=signature), hashlib.sha256(bogus).digest()
        )


def test_truncated_trailing_and_wrong_magic_are_malformed() -> None:
    """Cut, extended or re-labelled stage images do not parse."""
    data = build_stage(RT, ROTPK)
    for cut in (0, 8, 9, 30, len(data) - 1):
        with pytest.raises(MalformedMessage):
            parse_unverified_stage(data[:cut])
    with pytest.raises(MalformedMessage, match="trailing"):
        parse_unverified_stage(data + b"\x00")
    with pytest.raises(MalformedMessage, match="magic"):
        parse_unverified_stage(flip(data, 8))


def test_build_with_a_signer_callable_needs_its_public_key() -> None:
    """An Es256Signer (an HSM) builds a verifiable stage only with its public key beside it."""
    signer = cose.es256_signer(ROTPK)
    data = build_stage(BL2, signer, rotpk_public=ROTPK.public_key())
    verify_stage(parse_unverified_stage(data), ROTPK_HASH)
    with pytest.raises(TypeError):
        build_stage(BL2, signer)


def test_trust_anchors_rules() -> None:
    """Only the runtime stage carries anchors, and they must be well formed."""
    with pytest.raises(MalformedMessage, match="trust_anchors"):
        BootStage(StageKind.BL2, "1", 0, b"", ANCHORS)
    with pytest.raises(MalformedMessage, match="trust_anchors"):
        BootStage(StageKind.RUNTIME, "1", 0, b"")
    with pytest.raises(MalformedMessage, match="vendor_signer_ids"):
        TrustAnchors((b"short",), RESULT_KEY)
    with pytest.raises(MalformedMessage, match="vendor_signer_ids"):
        TrustAnchors(tuple(bytes([i]) * 32 for i in range(65)), RESULT_KEY)
    with pytest.raises(MalformedMessage, match="gateway_result_key"):
        TrustAnchors((), RESULT_KEY[:64])
    with pytest.raises(MalformedMessage, match="SEC1"):
        TrustAnchors((), b"\x04" + bytes(64))
    assert keys.p256_point(ANCHORS.result_key()) == RESULT_KEY


@pytest.mark.parametrize(
    ("kind", "version", "counter", "code", "message"),
    [
        ("BL2", "1", 0, b"", "kind"),
        (StageKind.BL2, "", 0, b"", "version"),
        (StageKind.BL2, "1", -1, b"", "security_counter"),
        (StageKind.BL2, "1", 2**32, b"", "security_counter"),
        (StageKind.BL2, "1", True, b"", "security_counter"),
        (StageKind.BL2, "1", 0, "code", "code"),
    ],
)
def test_boot_stage_refuses_bad_fields(
    kind: object, version: str, counter: object, code: object, message: str
) -> None:
    """Each stage field is checked on construction."""
    with pytest.raises(MalformedMessage, match=message):
        BootStage(kind, version, counter, code)  # type: ignore[arg-type]


def test_boot_stage_refuses_oversized_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code over the size limit is refused."""
    monkeypatch.setattr(stage, "MAX_STAGE_CODE_BYTES", 4)
    with pytest.raises(MalformedMessage, match="code"):
        BootStage(StageKind.BL2, "1", 0, b"12345")


def _envelope(payload: object, signature: object) -> bytes:
    return cbor.dumps(cbor.tagged(55799, [stage.STAGE_FORMAT_ID, payload, signature]))


def _signature(statement: object, *, kid: bytes | None, tag: bool = True) -> bytes:
    return cose.sign1_create(cbor.dumps(statement), ROTPK, kid=kid, tagged=tag)


def test_parser_refuses_crafted_signatures() -> None:
    """Untagged, kid-less, short-kid and wrong-statement signatures are malformed."""
    payload = BL2.encode()
    digest = hashlib.sha256(payload).digest()
    point = keys.p256_point(ROTPK.public_key())
    good = ["edgeseal/stage/v1", "BL2", digest]
    cases = [
        (_signature(good, kid=point, tag=False), "tag 18"),
        (_signature(good, kid=None), "kid"),
        (_signature(good, kid=point[:33]), "kid"),
        (_signature(["edgeseal/other/v1", "BL2", digest], kid=point), "context"),
        (_signature(["edgeseal/stage/v1", "BL3", digest], kid=point), "kind"),
        (_signature(["edgeseal/stage/v1", "BL2", digest[:31]], kid=point), "measurement"),
        (_signature(good[:2], kid=point), "elements"),
        (
            cbor.dumps(cbor.tagged(18, [cbor.dumps({1: -8}), {4: point}, b"", bytes(64)])),
            "ES256",
        ),
    ]
    for signature, message in cases:
        with pytest.raises(MalformedMessage, match=message):
            parse_unverified_stage(_envelope(payload, signature))
    assert parse_unverified_stage(_envelope(payload, _signature(good, kid=point))).stage == BL2


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({1: 2, 2: "BL2", 3: "1", 4: 0, 5: b""}, "stage.1"),
        ({1: 1, 2: "BL3", 3: "1", 4: 0, 5: b""}, "kind"),
        ({1: 1, 2: "BL2", 3: "1", 4: 0, 5: b"", 7: 0}, "unexpected"),
        ({1: 1, 2: "RT", 3: "1", 4: 0, 5: b"", 6: {1: [b"x"], 2: RESULT_KEY}}, "6.1"),
        ({1: 1, 2: "RT", 3: "1", 4: 0, 5: b"", 6: {1: [], 2: RESULT_KEY, 3: 0}}, "unexpected"),
        ({1: 1, 2: "RT", 3: "1", 4: 0, 5: b""}, "trust_anchors"),
    ],
)
def test_payload_decoder_refuses_malformed_maps(payload: dict[int, object], message: str) -> None:
    """Other versions, kinds, unknown keys and bad anchors are malformed."""
    with pytest.raises(MalformedMessage, match=message):
        parse_unverified_stage(_envelope(cbor.dumps(payload), None))


_anchors = st.builds(
    TrustAnchors,
    vendor_signer_ids=st.lists(st.binary(min_size=32, max_size=32), max_size=4).map(tuple),
    gateway_result_key=st.just(RESULT_KEY),
)
_stages = st.one_of(
    st.builds(
        BootStage,
        kind=st.just(StageKind.BL2),
        version=st.from_regex(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,31}", fullmatch=True),
        security_counter=st.integers(0, 2**32 - 1),
        code=st.binary(max_size=200),
    ),
    st.builds(
        BootStage,
        kind=st.just(StageKind.RUNTIME),
        version=st.from_regex(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,31}", fullmatch=True),
        security_counter=st.integers(0, 2**32 - 1),
        code=st.binary(max_size=200),
        trust_anchors=_anchors,
    ),
)


@SETTINGS
@given(boot_stage=_stages)
def test_stages_round_trip(boot_stage: BootStage) -> None:
    """Any valid stage survives build and parse, unsigned; its payload decodes to itself."""
    assert BootStage.decode(boot_stage.encode()) == boot_stage
    parsed = parse_unverified_stage(build_stage(boot_stage, None))
    assert parsed.stage == boot_stage


@SETTINGS
@given(data=st.binary(max_size=400))
def test_decoders_on_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    """Random bytes, with or without the magic, are refused as malformed only."""
    for candidate in (data, stage.STAGE_PREFIX + data):
        with contextlib.suppress(MalformedMessage):
            parse_unverified_stage(candidate)
        with contextlib.suppress(MalformedMessage):
            BootStage.decode(candidate)


SIGNED_RT = build_stage(RT, ROTPK)


@SETTINGS
@given(index=st.integers(0, len(SIGNED_RT) - 1), value=st.integers(0, 255))
def test_mutated_stages_raise_only_malformed_or_invalid(index: int, value: int) -> None:
    """A mutated signed stage is malformed or fails verification, never accepted."""
    mutated = SIGNED_RT[:index] + bytes([value]) + SIGNED_RT[index + 1 :]
    if mutated != SIGNED_RT:
        with pytest.raises((MalformedMessage, InvalidImage)):
            verify_stage(parse_unverified_stage(mutated), ROTPK_HASH)
