"""The attester and verifier sessions: a full exchange in memory, refusals, and the state tables."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import keys, messages, psa
from protocol.attester import (
    AttesterSession,
    AttesterState,
    ChallengeReceived,
    Ignored,
    Refused,
    VerdictReceived,
)
from protocol.errors import (
    InvalidChallenge,
    LocalProtocolError,
    ProtocolViolation,
    RemoteProtocolError,
)
from protocol.grant import open_grant
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.reasons import ReasonCode, Status
from protocol.results import Lease, TrustVector, verify_result
from protocol.verifier import (
    Accepted,
    Appraisal,
    AppraisalRequest,
    ChallengeIssued,
    DeviceKeys,
    KeyClass,
    KeyRelease,
    Rejected,
    VerifierConfig,
    VerifierSession,
    VerifierState,
    may_release,
)

DEVICE = DeviceId("dev-0001")
NOW = 1_800_000_000
CEK = bytes(range(32))
DIGEST = hashlib.sha256(b"manifest").digest()
RELEASE = ReleaseId(DIGEST.hex())
HUK = bytes(range(100, 132))
SECURED_IAK = keys.derive_iak(HUK, psa.Lifecycle.SECURED >> 8)
DEBUG_IAK = keys.derive_iak(HUK, psa.Lifecycle.NON_PSA_ROT_DEBUG >> 8)
RESULT_KEY = ec.generate_private_key(ec.SECP256R1())
AFFIRMING = Appraisal(
    status=Status.AFFIRMING,
    reasons=(),
    trust_vector=TrustVector(instance_identity=2, executables=2, hardware=2),
    policy_version=1,
    release=KeyRelease(cek=CEK, manifest_digest=DIGEST, release_id=RELEASE, image_size=1000),
    lease=Lease(offline_boots=3, expires_s=NOW + 86_400),
)


@dataclass
class Hooks:
    """In-memory gateway hooks: enrolled keys, used challenges and a canned appraisal."""

    appraisal: Appraisal = AFFIRMING
    enrolled: dict[DeviceId, DeviceKeys] = field(
        default_factory=lambda: {
            DEVICE: DeviceKeys(SECURED_IAK.public_key(), DEBUG_IAK.public_key())
        }
    )
    used: set[bytes] = field(default_factory=set)
    requests: list[AppraisalRequest] = field(default_factory=list)

    def device_keys(self, device_id: DeviceId) -> DeviceKeys | None:
        """The enrolled keys."""
        return self.enrolled.get(device_id)

    def appraise(self, request: AppraisalRequest) -> Appraisal:
        """Single use by nonce, then the canned appraisal, recording the request."""
        if request.challenge.nonce in self.used:
            raise InvalidChallenge("challenge already used")
        self.used.add(request.challenge.nonce)
        self.requests.append(request)
        return self.appraisal


def config() -> VerifierConfig:
    """A verifier configuration with a fixed secret."""
    return VerifierConfig(secret=b"s" * 32, result_signer=RESULT_KEY)


def claims_for(nonce: bytes, iak: ec.EllipticCurvePrivateKey) -> psa.PsaClaims:
    """Plausible claims for a token over ``nonce``."""
    return psa.PsaClaims(
        profile=psa.PROFILE_RFC9783,
        client_id=1,
        lifecycle=psa.Lifecycle.SECURED,
        implementation_id=bytes(32),
        boot_seed=bytes(32),
        instance_id=keys.instance_id(iak.public_key()),
        nonce=nonce,
        software_components=(
            psa.SoftwareComponent(measurement_value=bytes(32), signer_id=bytes(32)),
        ),
    )


@dataclass
class Device:
    """The device end: an attester session plus an 'enclave' holding the ephemeral key."""

    session: AttesterSession
    enclave: x25519.X25519PrivateKey = field(default_factory=x25519.X25519PrivateKey.generate)
    iak: ec.EllipticCurvePrivateKey = SECURED_IAK

    @classmethod
    def new(cls, rng: random.Random, iak: ec.EllipticCurvePrivateKey = SECURED_IAK) -> Device:
        """A device with a fresh session id."""
        return cls(AttesterSession(DEVICE, SessionId(rng.randbytes(16)), timeout_s=5), iak=iak)

    def hello(self) -> bytes:
        """The hello payload."""
        return self.session.start(now_s=NOW, certificates=(b"cert",))

    def evidence(self, event: ChallengeReceived, *, nonce: bytes | None = None) -> bytes:
        """Evidence for ``event``, with the binding (or a forced token nonce)."""
        raw = keys.x25519_raw(self.enclave.public_key())
        token_nonce = event.binding_for(raw) if nonce is None else nonce
        token = psa.sign_token(claims_for(token_nonce, self.iak), self.iak)
        return self.session.send_evidence(token=token, enclave_key=raw, now_s=NOW)


def challenge_of(
    device: Device, verifier: VerifierSession, rng: random.Random
) -> ChallengeReceived:
    """Run hello → challenge and return the device's event."""
    issued = verifier.receive_data(device.hello(), now_s=NOW, randomness=rng.randbytes)
    assert isinstance(issued, ChallengeIssued)
    event = device.session.receive_data(issued.payload)
    assert isinstance(event, ChallengeReceived)
    return event


def test_full_exchange_grants_a_key_only_the_enclave_opens(rng: random.Random) -> None:
    """Hello, challenge, evidence and verdict: the result verifies and the grant opens the CEK."""
    hooks = Hooks()
    device, verifier = Device.new(rng), VerifierSession(config(), hooks, DEVICE)
    outcome = verifier.receive_data(
        device.evidence(challenge_of(device, verifier, rng)),
        now_s=NOW + 1,
        randomness=rng.randbytes,
    )
    assert isinstance(outcome, Accepted)
    assert verifier.state is VerifierState.DONE
    event = device.session.receive_data(outcome.payload)
    assert isinstance(event, VerdictReceived) and device.session.state is AttesterState.GRANTED
    verdict = event.verdict
    result = verify_result(
        verdict.result,
        RESULT_KEY.public_key(),
        device_id=DEVICE,
        session_id=device.session.session_id,
        now_s=NOW + 2,
    )
    assert result.status is Status.AFFIRMING and result.manifest_digest == DIGEST
    assert result.lease == AFFIRMING.lease
    assert verdict.grant is not None and verdict.release_id == RELEASE
    opened = open_grant(
        verdict.grant,
        device.enclave,
        device_id=DEVICE,
        session_id=device.session.session_id,
        manifest_digest=DIGEST,
    )
    assert opened == CEK
    assert hooks.requests[0].key_class is KeyClass.SECURED


def test_second_verifier_instance_rebuilds_the_session(rng: random.Random) -> None:
    """Evidence for a challenge issued by instance A is accepted by instance B with the secret."""
    hooks = Hooks()
    device = Device.new(rng)
    event = challenge_of(device, VerifierSession(config(), hooks, DEVICE), rng)
    other = VerifierSession(config(), hooks, DEVICE)
    outcome = other.receive_data(device.evidence(event), now_s=NOW, randomness=rng.randbytes)
    assert isinstance(outcome, Accepted)


def test_instance_with_another_secret_refuses_the_challenge(rng: random.Random) -> None:
    """A challenge MAC'd under another secret is refused as invalid."""
    device = Device.new(rng)
    event = challenge_of(device, VerifierSession(config(), Hooks(), DEVICE), rng)
    stranger = VerifierSession(
        VerifierConfig(secret=b"t" * 32, result_signer=RESULT_KEY), Hooks(), DEVICE
    )
    outcome = stranger.receive_data(device.evidence(event), now_s=NOW, randomness=rng.randbytes)
    assert isinstance(outcome, Rejected) and outcome.reasons == (ReasonCode.CHALLENGE_INVALID,)


def run_refused(
    rng: random.Random, *, hooks: Hooks | None = None, now_s: int = NOW, **kwargs: object
) -> Rejected:
    """An exchange expected to end in a refusal; the device sees the same reasons."""
    hooks = hooks or Hooks()
    device = Device.new(rng, **kwargs)  # type: ignore[arg-type]
    verifier = VerifierSession(config(), hooks, DEVICE)
    evidence = device.evidence(challenge_of(device, verifier, rng))
    outcome = verifier.receive_data(evidence, now_s=now_s, randomness=rng.randbytes)
    assert isinstance(outcome, Rejected)
    event = device.session.receive_data(outcome.payload)
    assert isinstance(event, Refused) and event.reasons == outcome.reasons
    assert device.session.state is AttesterState.REFUSED
    return outcome


def test_expired_challenge_is_refused(rng: random.Random) -> None:
    """Evidence after the challenge expiry is refused with challenge.expired."""
    outcome = run_refused(rng, now_s=NOW + config().challenge_ttl_s + 1)
    assert outcome.reasons == (ReasonCode.CHALLENGE_EXPIRED,)


def test_token_from_an_unenrolled_key_is_refused(rng: random.Random) -> None:
    """A token signed by a key that is not the device's IAK fails the signature check."""
    outcome = run_refused(rng, iak=ec.generate_private_key(ec.SECP256R1()))
    assert outcome.reasons == (ReasonCode.EVIDENCE_SIGNATURE_INVALID,)


def test_debug_class_key_reaches_the_appraiser_marked_debug(rng: random.Random) -> None:
    """A token under the debug-class IAK verifies, but the appraiser learns its class."""
    hooks = Hooks(
        appraisal=replace(
            AFFIRMING, status=Status.CONTRAINDICATED, reasons=(ReasonCode.CERTIFICATE_DEBUG_CLASS,)
        )
    )
    outcome = run_refused(rng, hooks=hooks, iak=DEBUG_IAK)
    assert outcome.reasons == (ReasonCode.CERTIFICATE_DEBUG_CLASS,)
    assert hooks.requests[0].key_class is KeyClass.DEBUG


def test_wrong_binding_is_refused(rng: random.Random) -> None:
    """A token whose nonce is not bound to this challenge and enclave key is refused."""
    hooks = Hooks()
    device = Device.new(rng)
    verifier = VerifierSession(config(), hooks, DEVICE)
    evidence = device.evidence(challenge_of(device, verifier, rng), nonce=bytes(32))
    outcome = verifier.receive_data(evidence, now_s=NOW, randomness=rng.randbytes)
    assert isinstance(outcome, Rejected)
    assert outcome.reasons == (ReasonCode.EVIDENCE_BINDING_MISMATCH,)
    assert hooks.requests == []


def test_substituted_enclave_key_breaks_the_binding(rng: random.Random) -> None:
    """A man in the middle swapping the enclave key in the evidence is refused."""
    device = Device.new(rng)
    verifier = VerifierSession(config(), Hooks(), DEVICE)
    evidence = messages.Evidence.decode(device.evidence(challenge_of(device, verifier, rng)))
    attacker = keys.x25519_raw(x25519.X25519PrivateKey.generate().public_key())
    forged = replace(evidence, enclave_key=attacker).encode()
    outcome = verifier.receive_data(forged, now_s=NOW, randomness=rng.randbytes)
    assert isinstance(outcome, Rejected)
    assert outcome.reasons == (ReasonCode.EVIDENCE_BINDING_MISMATCH,)


def test_replayed_evidence_is_refused(rng: random.Random) -> None:
    """The same evidence a second time, even at another instance, is a replay."""
    hooks = Hooks()
    device = Device.new(rng)
    evidence = device.evidence(challenge_of(device, VerifierSession(config(), hooks, DEVICE), rng))
    first = VerifierSession(config(), hooks, DEVICE).receive_data(
        evidence, now_s=NOW, randomness=rng.randbytes
    )
    again = VerifierSession(config(), hooks, DEVICE).receive_data(
        evidence, now_s=NOW, randomness=rng.randbytes
    )
    assert isinstance(first, Accepted)
    assert isinstance(again, Rejected) and again.reasons == (ReasonCode.NONCE_REPLAYED,)


def test_unknown_device_is_refused_at_hello(rng: random.Random) -> None:
    """A hello from a device that is not enrolled gets device.unknown, no challenge."""
    device = Device.new(rng)
    verifier = VerifierSession(config(), Hooks(enrolled={}), DEVICE)
    outcome = verifier.receive_data(device.hello(), now_s=NOW, randomness=rng.randbytes)
    assert isinstance(outcome, Rejected) and outcome.reasons == (ReasonCode.DEVICE_UNKNOWN,)
    assert isinstance(device.session.receive_data(outcome.payload), Refused)


def test_challenge_for_another_device_is_refused(rng: random.Random) -> None:
    """Evidence echoing a challenge issued to another device is refused as invalid."""
    device = Device.new(rng)
    event = challenge_of(device, VerifierSession(config(), Hooks(), DEVICE), rng)
    other_device = DeviceId("dev-0002")
    hooks = Hooks(enrolled={other_device: DeviceKeys(SECURED_IAK.public_key())})
    verifier = VerifierSession(config(), hooks, other_device)
    outcome = verifier.receive_data(device.evidence(event), now_s=NOW, randomness=rng.randbytes)
    assert isinstance(outcome, Rejected) and outcome.reasons == (ReasonCode.CHALLENGE_INVALID,)


def test_malformed_token_is_refused(rng: random.Random) -> None:
    """Evidence whose token is not a COSE_Sign1 is refused as malformed."""
    device = Device.new(rng)
    verifier = VerifierSession(config(), Hooks(), DEVICE)
    event = challenge_of(device, verifier, rng)
    raw = keys.x25519_raw(device.enclave.public_key())
    payload = device.session.send_evidence(token=b"\x01", enclave_key=raw, now_s=NOW)
    outcome = verifier.receive_data(payload, now_s=NOW, randomness=rng.randbytes)
    assert isinstance(outcome, Rejected) and outcome.reasons == (ReasonCode.EVIDENCE_MALFORMED,)
    assert event.challenge.device_id == DEVICE


def test_below_epoch_warning_still_releases(rng: random.Random) -> None:
    """A warning whose only finding is counter.below_epoch releases the image key."""
    warning = replace(AFFIRMING, status=Status.WARNING, reasons=(ReasonCode.COUNTER_BELOW_EPOCH,))
    device = Device.new(rng)
    verifier = VerifierSession(config(), Hooks(appraisal=warning), DEVICE)
    outcome = verifier.receive_data(
        device.evidence(challenge_of(device, verifier, rng)), now_s=NOW, randomness=rng.randbytes
    )
    assert isinstance(outcome, Accepted)
    assert messages.Verdict.decode(outcome.payload).grant is not None


def test_other_warnings_never_release_even_if_the_appraiser_offers(rng: random.Random) -> None:
    """A warning with any other finding gets a signed result but no grant and no lease."""
    warning = replace(
        AFFIRMING,
        status=Status.WARNING,
        reasons=(ReasonCode.COUNTER_BELOW_EPOCH, ReasonCode.PLATFORM_SMT_ENABLED),
    )
    assert not may_release(warning)
    device = Device.new(rng)
    verifier = VerifierSession(config(), Hooks(appraisal=warning), DEVICE)
    outcome = verifier.receive_data(
        device.evidence(challenge_of(device, verifier, rng)), now_s=NOW, randomness=rng.randbytes
    )
    assert isinstance(outcome, Accepted)
    verdict = messages.Verdict.decode(outcome.payload)
    assert verdict.grant is None and verdict.release_id is None
    assert outcome.result.lease is None and outcome.result.manifest_digest is None


def test_contraindicated_is_a_refusal_with_reason_codes_only(rng: random.Random) -> None:
    """A contraindicated appraisal reaches the device as reason codes, no result, no grant."""
    bad = replace(
        AFFIRMING, status=Status.CONTRAINDICATED, reasons=(ReasonCode.BOOT_RUNTIME_MISMATCH,)
    )
    outcome = run_refused(rng, hooks=Hooks(appraisal=bad))
    assert outcome.reasons == (ReasonCode.BOOT_RUNTIME_MISMATCH,)
    assert outcome.appraisal == bad


def test_message_for_another_session_is_ignored(rng: random.Random) -> None:
    """A late reply addressed to an earlier session id changes nothing."""
    device = Device.new(rng)
    device.hello()
    stale = messages.Refusal(SessionId(bytes(16)), (ReasonCode.RATE_LIMITED,)).encode()
    assert isinstance(device.session.receive_data(stale), Ignored)
    assert device.session.state is AttesterState.AWAIT_CHALLENGE


def test_attester_times_out(rng: random.Random) -> None:
    """No reply by the deadline moves the session to TIMED_OUT; later replies are ignored."""
    device = Device.new(rng)
    device.hello()
    assert not device.session.check_timeout(NOW + 4)
    assert device.session.check_timeout(NOW + 5)
    assert device.session.state is AttesterState.TIMED_OUT
    assert isinstance(device.session.receive_data(b"\x00"), Ignored)


def test_malformed_reply_closes_the_attester_session(rng: random.Random) -> None:
    """Garbage on the down topic is a remote protocol error and the session goes to ERROR."""
    device = Device.new(rng)
    device.hello()
    with pytest.raises(RemoteProtocolError):
        device.session.receive_data(b"\xff\x00")
    assert device.session.state is AttesterState.ERROR


def test_evidence_before_challenge_is_a_local_error(rng: random.Random) -> None:
    """Asking to send evidence without a challenge is our own caller's bug."""
    device = Device.new(rng)
    with pytest.raises(LocalProtocolError):
        device.session.send_evidence(token=b"t", enclave_key=bytes(32), now_s=NOW)
    assert device.session.state is AttesterState.ERROR


def test_hello_after_challenge_is_a_remote_error(rng: random.Random) -> None:
    """A second hello in one verifier session is illegal: the device must start a new session."""
    device = Device.new(rng)
    verifier = VerifierSession(config(), Hooks(), DEVICE)
    hello = device.hello()
    verifier.receive_data(hello, now_s=NOW, randomness=rng.randbytes)
    with pytest.raises(RemoteProtocolError):
        verifier.receive_data(hello, now_s=NOW, randomness=rng.randbytes)
    assert verifier.state is VerifierState.ERROR


def test_short_secret_is_refused() -> None:
    """A challenge secret under 32 bytes is a configuration mistake."""
    with pytest.raises(ValueError, match="at least 32"):
        VerifierConfig(secret=b"short", result_signer=RESULT_KEY)


ATTESTER_STEPS = ("hello", "challenge", "evidence", "verdict", "refusal", "timeout", "garbage")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(ATTESTER_STEPS), max_size=8), st.randoms(use_true_random=False))
def test_any_attester_step_sequence_is_legal_or_closes(
    steps: list[str], rnd: random.Random
) -> None:
    """Every (state, step) follows the table or raises ProtocolViolation and ends in ERROR."""
    device = Device.new(rnd)
    sid = device.session.session_id
    verdict = messages.Verdict(sid, b"r").encode()
    challenge = messages.Challenge(sid, DEVICE, bytes(32), NOW + 9, bytes(32)).encode()
    payloads = {
        "challenge": challenge,
        "verdict": verdict,
        "refusal": messages.Refusal(sid, (ReasonCode.RATE_LIMITED,)).encode(),
        "garbage": b"\x80",
    }
    for step in steps:
        before = device.session.state
        try:
            if step == "hello":
                device.hello()
            elif step == "evidence":
                device.session.send_evidence(token=b"t", enclave_key=bytes(32), now_s=NOW)
            elif step == "timeout":
                device.session.check_timeout(NOW + 100)
            else:
                device.session.receive_data(payloads[step])
        except ProtocolViolation:
            assert device.session.state is AttesterState.ERROR
            return
        assert before is not AttesterState.ERROR or device.session.state is AttesterState.ERROR


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(("hello", "evidence", "garbage")), max_size=5))
def test_any_verifier_step_sequence_is_legal_or_closes(steps: list[str]) -> None:
    """Every verifier (state, step) follows the table or raises ProtocolViolation into ERROR."""
    rnd = random.Random(7)
    device = Device.new(rnd)
    hello = device.hello()
    verifier = VerifierSession(config(), Hooks(), DEVICE)
    issued = verifier.receive_data(hello, now_s=NOW, randomness=rnd.randbytes)
    assert isinstance(issued, ChallengeIssued)
    event = device.session.receive_data(issued.payload)
    assert isinstance(event, ChallengeReceived)
    evidence = device.evidence(event)
    fresh = VerifierSession(config(), Hooks(), DEVICE)
    payloads = {"hello": hello, "evidence": evidence, "garbage": b"\x80"}
    for step in steps:
        try:
            fresh.receive_data(payloads[step], now_s=NOW, randomness=rnd.randbytes)
        except ProtocolViolation:
            assert fresh.state is VerifierState.ERROR
            return
        assert fresh.state is not VerifierState.ERROR
