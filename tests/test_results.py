"""Signed results, commands and receipts (DESIGN §8, §10) and the reason-code table."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor, cose
from protocol.errors import InvalidSignedMessage, MalformedMessage
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.reasons import (
    REASONS,
    Claim,
    ReasonCode,
    Severity,
    Status,
    info,
    reason_code,
    status_of,
    worst,
)
from protocol.results import (
    PROFILE_RESULT,
    Ar4si,
    AttestationResult,
    Command,
    CommandKind,
    Key,
    Lease,
    Receipt,
    TrustVector,
    check_release_id,
    command_claims,
    result_claims,
    sign_command,
    sign_receipt,
    sign_result,
    tier_of,
    verify_command,
    verify_receipt,
    verify_result,
)

NOW = 1_800_000_000
DEVICE = DeviceId("dev-0001")
SESSION = SessionId(bytes(range(16)))
DIGEST = hashlib.sha256(b"manifest").digest()
RELEASE = ReleaseId(DIGEST.hex())


def _p256(seed: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(seed, ec.SECP256R1())


KEY = _p256(0x1234_5678)
OTHER_KEY = _p256(0x8765_4321)


def _result(**changes: object) -> AttestationResult:
    base = AttestationResult(
        device_id=DEVICE,
        session_id=SESSION,
        status=Status.AFFIRMING,
        trust_vector=TrustVector.baseline(),
        reasons=(),
        policy_version=3,
        issued_s=NOW,
        expires_s=NOW + 300,
        manifest_digest=DIGEST,
        lease=Lease(offline_boots=5, expires_s=NOW + 86_400),
        verifier_id="gw-1",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _command(**changes: object) -> Command:
    base = Command(
        device_id=DEVICE,
        seq=7,
        kind=CommandKind.UPDATE,
        issued_s=NOW,
        expires_s=NOW + 600,
        release_id=RELEASE,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _verify(data: bytes, **changes: object) -> AttestationResult:
    args: dict[str, object] = {"device_id": DEVICE, "session_id": SESSION, "now_s": NOW}
    args.update(changes)
    return verify_result(data, KEY.public_key(), **args)  # type: ignore[arg-type]


def _flip(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position // 8] ^= 1 << (position % 8)
    return bytes(out)


# --- results -------------------------------------------------------------------------------------


def test_result_round_trip() -> None:
    """A signed result verifies and decodes to the same result."""
    result = _result()
    signed = sign_result(result, KEY)
    assert _verify(signed) == result
    _assert_canonical_claims(signed)
    assert result.release_id == RELEASE


def _assert_canonical_claims(signed: bytes) -> None:
    """The signed claims and the COSE_Sign1 around them are canonical CBOR (written with their
    keys put in order by hand, not by the encoder)."""
    assert cbor.dumps(cbor.loads(signed, what="COSE_Sign1")) == signed
    claims = cose.sign1_parse_unverified(signed).payload
    assert cbor.dumps(cbor.loads(claims, what="claims")) == claims


def test_result_signed_by_hsm_signer() -> None:
    """An Es256Signer callable (a KMS or HSM) signs results the same way."""
    result = _result()
    assert _verify(sign_result(result, cose.es256_signer(KEY))) == result


def test_result_minimal_round_trip() -> None:
    """A contraindicated result without image or lease round-trips with its reasons."""
    reasons = (ReasonCode.LIFECYCLE_DEBUG, ReasonCode.BOOT_BL2_MISMATCH)
    result = _result(
        status=Status.CONTRAINDICATED,
        trust_vector=TrustVector.from_reasons(reasons),
        reasons=reasons,
        manifest_digest=None,
        lease=None,
    )
    decoded = _verify(sign_result(result, KEY))
    assert decoded == result
    assert decoded.release_id is None


def test_result_payload_is_ear_shaped() -> None:
    """The claims map uses the EAT/EAR keys and the AR4SI tier numbers."""
    claims = result_claims(_result(status=Status.WARNING))
    assert claims[265] == PROFILE_RESULT
    assert claims[1000] == 32
    assert claims[2] == DEVICE
    assert claims[10] == SESSION
    assert claims[1001] == {0: 2, 1: 2, 2: 2, 4: 2, 6: 2}
    assert claims[1004] == {0: "edgeseal", 1: "gw-1"}


@settings(max_examples=60, deadline=None)
@given(position=st.integers(0, 8 * 200))
def test_result_refuses_flipped_bit(position: int) -> None:
    """Any flipped bit makes verification fail with InvalidSignedMessage only."""
    data = sign_result(_result(), KEY)
    position %= len(data) * 8
    with pytest.raises(InvalidSignedMessage):
        _verify(_flip(data, position))


def test_result_refuses_wrong_key() -> None:
    """A result signed by another key does not verify."""
    with pytest.raises(InvalidSignedMessage, match="signature"):
        _verify(sign_result(_result(), OTHER_KEY))


def test_result_refuses_wrong_device_session_and_expiry() -> None:
    """Another device, another session, or a clock at expiry are refused."""
    data = sign_result(_result(), KEY)
    with pytest.raises(InvalidSignedMessage, match="wrong device"):
        _verify(data, device_id=DeviceId("dev-0002"))
    with pytest.raises(InvalidSignedMessage, match="wrong session"):
        _verify(data, session_id=SessionId(bytes(16)))
    with pytest.raises(InvalidSignedMessage, match="expired"):
        _verify(data, now_s=NOW + 300)
    assert _verify(data, now_s=NOW + 299).expires_s == NOW + 300


def test_result_refuses_truncated_trailing_and_oversize() -> None:
    """Truncated, extended and oversized inputs fail as InvalidSignedMessage."""
    data = sign_result(_result(), KEY)
    for candidate in (data[:-1], data + b"\x00", b"", bytes(5000)):
        with pytest.raises(InvalidSignedMessage):
            _verify(candidate)
    with pytest.raises(InvalidSignedMessage):
        _verify(bytearray(data))  # type: ignore[arg-type]


def test_result_refuses_command_and_receipt() -> None:
    """A validly signed command or receipt never verifies as a result (profile separation)."""
    receipt = Receipt(device_id=DEVICE, session_id=SESSION, manifest_digest=DIGEST, issued_s=NOW)
    for data in (sign_command(_command(), KEY), sign_receipt(receipt, KEY)):
        with pytest.raises(InvalidSignedMessage, match="malformed"):
            _verify(data)


def _signed_claims(claims: dict[int, object]) -> bytes:
    return cose.sign1_create(cbor.dumps(claims), KEY)


@pytest.mark.parametrize(
    "edit",
    [
        {Key.EAR_STATUS: 5},
        {Key.EAR_STATUS: 2, Key.EAR_TRUST_VECTOR: {2: 96}},
        {Key.EAR_TRUST_VECTOR: {9: 2}},
        {Key.EAR_TRUST_VECTOR: {0: 300}},
        {Key.REASONS: ["no.such.code"]},
        {Key.REASONS: [1]},
        {Key.LEASE: [1]},
        {Key.LEASE: [-1, 5]},
        {Key.EAR_VERIFIER_ID: {0: 1, 1: "x"}},
        {Key.EAR_VERIFIER_ID: {1: "x", 2: "y"}},
        {Key.MANIFEST_DIGEST: b"short"},
        {-99999: 1},
        {Key.SUB: "bad/device"},
    ],
)
def test_result_refuses_malformed_signed_claims(edit: dict[int, object]) -> None:
    """A correctly signed but malformed claims map is refused as InvalidSignedMessage."""
    claims: dict[int, object] = dict(result_claims(_result()))
    claims.update(edit)
    with pytest.raises(InvalidSignedMessage, match="malformed"):
        _verify(_signed_claims(claims))


def test_result_refuses_other_algorithm() -> None:
    """A COSE_Sign1 with another algorithm than ES256 is refused."""
    payload = cbor.dumps(result_claims(_result()))
    body = [cbor.dumps({1: -35}), {}, payload, bytes(96)]
    with pytest.raises(InvalidSignedMessage):
        _verify(cbor.dumps(cbor.tagged(18, body)))


def test_verify_refuses_wrong_key_type() -> None:
    """Verifying with a non-P-256 key is a caller bug (TypeError)."""
    data = sign_result(_result(), KEY)
    p384 = ec.derive_private_key(5, ec.SECP384R1()).public_key()
    with pytest.raises(TypeError):
        verify_result(data, p384, device_id=DEVICE, session_id=SESSION, now_s=NOW)


def test_result_invariants() -> None:
    """A result claiming more trust than its vector, or an image while contraindicated, fails."""
    with pytest.raises(MalformedMessage, match="better than"):
        _result(trust_vector=TrustVector(executables=96))
    with pytest.raises(MalformedMessage, match="contraindicated"):
        _result(status=Status.CONTRAINDICATED)
    with pytest.raises(MalformedMessage, match="expires_s"):
        _result(expires_s=NOW - 1)
    with pytest.raises(MalformedMessage, match="status"):
        _result(status="affirming")
    with pytest.raises(MalformedMessage, match="trust_vector"):
        _result(trust_vector={})
    with pytest.raises(MalformedMessage, match="lease"):
        _result(lease=(1, 2))
    with pytest.raises(MalformedMessage, match="reasons"):
        _result(reasons=["device.revoked"])
    with pytest.raises(MalformedMessage, match="reasons"):
        _result(reasons=("device.revoked",))
    with pytest.raises(MalformedMessage, match="verifier_id"):
        _result(verifier_id="x" * 200)
    with pytest.raises(MalformedMessage, match="manifest_digest"):
        _result(manifest_digest=bytes(31))


_statuses = st.sampled_from(list(Status))
_codes = st.lists(st.sampled_from(list(ReasonCode)), max_size=6).map(tuple)


@settings(max_examples=100, deadline=None)
@given(
    reasons=_codes,
    policy=st.integers(0, 2**40),
    ttl=st.integers(1, 10**6),
    with_image=st.booleans(),
    boots=st.integers(0, 2**32 - 1),
    verifier=st.text(max_size=20),
)
def test_result_round_trip_property(
    reasons: tuple[ReasonCode, ...],
    policy: int,
    ttl: int,
    with_image: bool,
    boots: int,
    verifier: str,
) -> None:
    """Any consistent result round-trips through sign and verify."""
    status = status_of(reasons)
    vector = TrustVector.from_reasons(reasons)
    status = worst((status, vector.worst_status()))
    keep = with_image and status is not Status.CONTRAINDICATED
    result = _result(
        status=status,
        trust_vector=vector,
        reasons=reasons,
        policy_version=policy,
        expires_s=NOW + ttl,
        manifest_digest=DIGEST if keep else None,
        lease=Lease(offline_boots=boots, expires_s=NOW + ttl) if keep else None,
        verifier_id=verifier,
    )
    signed = sign_result(result, KEY)
    assert _verify(signed) == result
    _assert_canonical_claims(signed)


# --- trust vector and reasons ------------------------------------------------------------------


def test_ar4si_tiers() -> None:
    """AR4SI values fall in the draft's tiers: none, affirming, warning, contraindicated."""
    assert [tier_of(v) for v in (-128, -1, 0, 1)] == [None] * 4
    assert tier_of(2) is tier_of(31) is Status.AFFIRMING
    assert tier_of(32) is tier_of(95) is Status.WARNING
    assert tier_of(96) is tier_of(Ar4si.CRYPTO_VALIDATION_FAILED) is Status.CONTRAINDICATED
    for bad in (-129, 128):
        with pytest.raises(ValueError, match="AR4SI"):
            tier_of(bad)


def test_trust_vector_from_reasons_takes_worst() -> None:
    """Findings replace the baseline claim; the worst finding on one claim wins."""
    vector = TrustVector.from_reasons(
        [ReasonCode.EVIDENCE_MALFORMED, ReasonCode.DEVICE_REVOKED, ReasonCode.NONCE_REPLAYED]
    )
    assert vector.instance_identity == 96
    assert vector.configuration == 2
    assert vector.worst_status() is Status.CONTRAINDICATED
    smt = TrustVector.from_reasons([ReasonCode.PLATFORM_SMT_ENABLED])
    assert smt.runtime_opaque == 32
    assert smt.worst_status() is Status.WARNING
    only_none = TrustVector.from_reasons(
        [ReasonCode.EVIDENCE_MALFORMED, ReasonCode.EVIDENCE_PROFILE_UNSUPPORTED],
        base=TrustVector(),
    )
    assert only_none.instance_identity == 1
    assert only_none.worst_status() is Status.AFFIRMING


def test_trust_vector_cbor_round_trip_and_limits() -> None:
    """The vector's CBOR form omits no-claims and refuses out-of-range values."""
    vector = TrustVector(instance_identity=2, sourced_data=-1)
    assert vector.to_cbor() == {0: 2, 7: -1}
    assert TrustVector.from_cbor(vector.to_cbor()) == vector
    with pytest.raises(MalformedMessage):
        TrustVector(hardware=200)
    with pytest.raises(MalformedMessage):
        TrustVector.from_cbor([1, 2])


def test_reason_table_is_complete() -> None:
    """Every reason code has a table entry with a dotted name and a description."""
    assert set(REASONS) == set(ReasonCode)
    for code, entry in REASONS.items():
        assert entry.code is code
        assert code.value == code.value.lower()
        assert "." in code.value
        assert entry.description.endswith(".")
        assert entry.claim is None or isinstance(entry.claim, Claim)
        assert (entry.claim is None) == (entry.value == 0)
        tier = tier_of(entry.value)
        if entry.severity is Severity.WARNING and tier is not None:
            assert tier is Status.WARNING


def test_reason_statuses() -> None:
    """Severities map to statuses and status_of takes the worst finding."""
    assert status_of([]) is Status.AFFIRMING
    assert status_of([ReasonCode.COUNTER_BELOW_EPOCH]) is Status.WARNING
    assert status_of([ReasonCode.COUNTER_BELOW_EPOCH, ReasonCode.DEVICE_REVOKED]) is (
        Status.CONTRAINDICATED
    )
    assert info(ReasonCode.LIFECYCLE_DEBUG).status is Status.CONTRAINDICATED
    assert Severity.INFO.status is Status.AFFIRMING
    assert [s.tier for s in Status] == [2, 32, 96]
    assert Status.from_tier(32) is Status.WARNING
    with pytest.raises(ValueError, match="tier"):
        Status.from_tier(0)


def test_reason_code_parse() -> None:
    """Wire names parse to codes; unknown names are MalformedMessage."""
    assert reason_code("nonce.replayed") is ReasonCode.NONCE_REPLAYED
    with pytest.raises(MalformedMessage, match="reason code"):
        reason_code("nonce.reused")


# --- commands ------------------------------------------------------------------------------------


def _verify_command(data: bytes, **changes: object) -> Command:
    args: dict[str, object] = {"device_id": DEVICE, "now_s": NOW, "last_seq": 6}
    args.update(changes)
    return verify_command(data, KEY.public_key(), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(CommandKind))
def test_command_round_trip(kind: CommandKind) -> None:
    """Every command kind signs and verifies to itself."""
    release = RELEASE if kind is CommandKind.UPDATE else None
    command = _command(kind=kind, release_id=release)
    signed = sign_command(command, KEY)
    assert _verify_command(signed) == command
    _assert_canonical_claims(signed)


def test_command_refuses_replayed_sequence() -> None:
    """A sequence number at or below the last seen one is refused."""
    data = sign_command(_command(seq=7), KEY)
    for last in (7, 8, 100):
        with pytest.raises(InvalidSignedMessage, match="replayed sequence number"):
            _verify_command(data, last_seq=last)
    assert _verify_command(data, last_seq=0).seq == 7


def test_command_refuses_wrong_device_key_expiry_and_bits() -> None:
    """Wrong device, wrong key, expiry, flipped bits and truncation all fail."""
    data = sign_command(_command(), KEY)
    with pytest.raises(InvalidSignedMessage, match="wrong device"):
        _verify_command(data, device_id=DeviceId("dev-0002"))
    with pytest.raises(InvalidSignedMessage, match="expired"):
        _verify_command(data, now_s=NOW + 600)
    with pytest.raises(InvalidSignedMessage, match="signature"):
        _verify_command(sign_command(_command(), OTHER_KEY))
    for candidate in (_flip(data, len(data) * 8 - 3), data[:-2], data + b"\x01"):
        with pytest.raises(InvalidSignedMessage):
            _verify_command(candidate)


def test_command_refuses_result() -> None:
    """A signed result never verifies as a command."""
    with pytest.raises(InvalidSignedMessage, match="malformed"):
        _verify_command(sign_result(_result(), KEY))


@pytest.mark.parametrize(
    "edit",
    [
        {Key.KIND: "explode"},
        {Key.SEQ: 0},
        {Key.RELEASE_ID: "ABC"},
        {Key.RELEASE_ID: None},
    ],
)
def test_command_refuses_malformed_claims(edit: dict[int, object]) -> None:
    """Signed but malformed command claims are refused."""
    claims = dict(command_claims(_command()))
    claims.update(edit)
    claims = {k: v for k, v in claims.items() if v is not None}
    with pytest.raises(InvalidSignedMessage, match="malformed"):
        _verify_command(_signed_claims(claims))


def test_command_invariants() -> None:
    """Update needs a release id, other kinds refuse one; seq starts at 1."""
    with pytest.raises(MalformedMessage, match="release_id"):
        _command(release_id=None)
    with pytest.raises(MalformedMessage, match="release_id"):
        _command(kind=CommandKind.REVOKE)
    with pytest.raises(MalformedMessage, match="seq"):
        _command(seq=0)
    with pytest.raises(MalformedMessage, match="kind"):
        _command(kind="update")
    with pytest.raises(MalformedMessage, match="release_id"):
        _command(release_id=ReleaseId("A" * 64))


# --- receipts ------------------------------------------------------------------------------------


def test_receipt_round_trip_and_negatives(rng: random.Random) -> None:
    """A receipt verifies under the result key only, and its release id is the digest's hex."""
    receipt = Receipt(
        device_id=DEVICE, session_id=SESSION, manifest_digest=rng.randbytes(32), issued_s=NOW
    )
    data = sign_receipt(receipt, KEY)
    assert verify_receipt(data, KEY.public_key()) == receipt
    _assert_canonical_claims(data)
    assert receipt.release_id == receipt.manifest_digest.hex()
    with pytest.raises(InvalidSignedMessage):
        verify_receipt(data, OTHER_KEY.public_key())
    with pytest.raises(InvalidSignedMessage):
        verify_receipt(data[:-1], KEY.public_key())
    with pytest.raises(InvalidSignedMessage):
        verify_receipt(sign_command(_command(), KEY), KEY.public_key())
    with pytest.raises(MalformedMessage):
        Receipt(device_id=DEVICE, session_id=SESSION, manifest_digest=b"", issued_s=NOW)


def test_check_release_id() -> None:
    """Release ids are exactly 64 lowercase hex digits."""
    assert check_release_id(RELEASE, what="x") == RELEASE
    for bad in ("", "a" * 63, "A" * 64, "g" * 64, 5):
        with pytest.raises(MalformedMessage):
            check_release_id(bad, what="x")


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300))
def test_verifiers_given_arbitrary_bytes_raise_only_invalid_signed_message(data: bytes) -> None:
    """Arbitrary bytes make every verifier raise InvalidSignedMessage and nothing else."""
    with pytest.raises(InvalidSignedMessage):
        _verify(data)
    with pytest.raises(InvalidSignedMessage):
        _verify_command(data)
    with pytest.raises(InvalidSignedMessage):
        verify_receipt(data, KEY.public_key())


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.integers(-128, 127), min_size=8, max_size=8))
def test_worst_status_is_the_worst_tier_of_the_claims_made(values: list[int]) -> None:
    """The highest value's tier is the worst tier among the claims (tier_of), affirming when
    no claim is made."""
    vector = TrustVector(*values)
    tiers = [tier for tier in map(tier_of, values) if tier is not None]
    assert vector.worst_status() is worst(tiers)
