"""The gateway's side of an attestation session, sans-IO (h11 style; DESIGN §9–§10).

Rules:

- Challenges are stateless: 32 bytes of gateway randomness and an HMAC-SHA256, under a secret
  the gateway instances share, over canonical CBOR [device, session, expiry, randomness]. Any
  instance can rebuild the session from evidence whose echoed challenge it can verify.
- A session takes a hello (→ challenge) and then evidence (→ verdict or refusal), or evidence alone
  when rebuilt. Every legal step is one row of ``_TRANSITIONS``; anything else raises
  ``ProtocolViolation`` and moves the session to ERROR for good.
- Evidence is checked in a fixed order, the first failure refusing with its reason code: challenge
  MAC, session and device → ``challenge.invalid``; expiry → ``challenge.expired``; enrolled device →
  ``device.unknown``; token signature under the SECURED-class IAK, else the debug-class IAK →
  ``evidence.signature.invalid``; claims → ``evidence.malformed``; binding of the nonce to the
  challenge and enclave key → ``evidence.binding.mismatch``. The appraisal (policy, reference
  values, epochs; supplied by the gateway) then marks the challenge used and decides the status,
  as one atomic step: a challenge used before → ``nonce.replayed``, and nothing the appraisal
  records is kept without its challenge marked used (nor the reverse).
- A key is released only for an affirming result, or for a warning whose only finding is
  ``counter.below_epoch`` (DESIGN §5) — checked here at run time whatever the appraiser says.
- The device gets reason codes only; the appraisal with its explanation stays with the caller.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum, auto
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from protocol import cose, messages, psa
from protocol._machine import Machine
from protocol.errors import (
    InvalidChallenge,
    InvalidSignature,
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
)
from protocol.grant import CEK_BYTES, seal_grant
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.keys import x25519_from_raw
from protocol.reasons import ReasonCode, Status
from protocol.results import AttestationResult, Lease, Signer, TrustVector, sign_result

CHALLENGE_RANDOM_BYTES: Final = 32
MIN_SECRET_BYTES: Final = 32
#: The one warning that still releases a key, for an image at or above the epoch (DESIGN §5).
RELEASABLE_WARNINGS: Final = frozenset({ReasonCode.COUNTER_BELOW_EPOCH})


class KeyClass(StrEnum):
    """Which of a device's two IAKs signed the token (DESIGN §4)."""

    SECURED = "secured"
    DEBUG = "debug"


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """The IAK public keys enrolled for a device, by lifecycle class."""

    secured: ec.EllipticCurvePublicKey
    debug: ec.EllipticCurvePublicKey | None = None


@dataclass(frozen=True, slots=True)
class AppraisalRequest:
    """Verified evidence, handed to the gateway's appraiser."""

    device_id: DeviceId
    session_id: SessionId
    claims: psa.PsaClaims
    key_class: KeyClass
    now_s: int
    #: The challenge the evidence answers (MAC, device, session, expiry and binding checked):
    #: the appraiser marks it used (``VerifierHooks.appraise``).
    challenge: messages.Challenge


@dataclass(frozen=True, slots=True)
class KeyRelease:
    """The image key the appraiser proposes to release, and the release it opens."""

    cek: bytes = field(repr=False)
    manifest_digest: bytes
    release_id: ReleaseId
    image_size: int


@dataclass(frozen=True, slots=True)
class Appraisal:
    """The appraiser's decision: an EAR status, its findings, and what to release."""

    status: Status
    reasons: tuple[ReasonCode, ...]
    trust_vector: TrustVector
    policy_version: int
    release: KeyRelease | None = None
    lease: Lease | None = None


class VerifierHooks(Protocol):
    """What the gateway supplies: enrollment lookup, and single use with the appraisal."""

    def device_keys(self, device_id: DeviceId) -> DeviceKeys | None:
        """The enrolled IAKs of ``device_id``, or None when it is not enrolled."""
        ...

    def appraise(self, request: AppraisalRequest) -> Appraisal:
        """Mark ``request.challenge`` used and appraise the evidence against policy and
        reference values, as one atomic step: a challenge is used at most once across every
        verifier instance, and what the appraisal records is kept only with it.

        Raises:
            InvalidChallenge: the challenge was used before (or has expired by the appraiser's
                clock); nothing was appraised or kept. The session refuses ``nonce.replayed``.
        """
        ...


@dataclass(frozen=True, slots=True)
class VerifierConfig:
    """A gateway instance's verifier settings; ``secret`` is shared by all instances."""

    secret: bytes = field(repr=False)
    result_signer: Signer = field(repr=False)
    verifier_id: str = "edgeseal-gateway"
    challenge_ttl_s: int = 30
    result_ttl_s: int = 300

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"challenge secret must be at least {MIN_SECRET_BYTES} bytes")
        if not callable(self.result_signer):
            # Checked and wrapped once, not on every result signed.
            object.__setattr__(self, "result_signer", cose.es256_signer(self.result_signer))


class VerifierState(Enum):
    """Where a verifier session stands."""

    IDLE = auto()
    CHALLENGED = auto()
    DONE = auto()
    ERROR = auto()


class VerifierStep(Enum):
    """What can happen to a verifier session."""

    RECEIVE_HELLO = auto()
    REFUSE_HELLO = auto()
    RECEIVE_EVIDENCE = auto()


_S = VerifierState
_E = VerifierStep
_TRANSITIONS: Final[dict[tuple[VerifierState, VerifierStep], VerifierState]] = {
    (_S.IDLE, _E.RECEIVE_HELLO): _S.CHALLENGED,
    (_S.IDLE, _E.REFUSE_HELLO): _S.DONE,
    (_S.IDLE, _E.RECEIVE_EVIDENCE): _S.DONE,
    (_S.CHALLENGED, _E.RECEIVE_EVIDENCE): _S.DONE,
}


@dataclass(frozen=True, slots=True)
class ChallengeIssued:
    """Publish ``payload`` (a challenge) on the device's ``…/down/attest``."""

    payload: bytes
    challenge: messages.Challenge


@dataclass(frozen=True, slots=True)
class Accepted:
    """Publish ``payload`` (a verdict); ``result`` is what was signed."""

    payload: bytes
    result: AttestationResult
    appraisal: Appraisal
    claims: psa.PsaClaims


@dataclass(frozen=True, slots=True)
class Rejected:
    """Publish ``payload`` (a refusal); no ``appraisal`` when evidence failed before it."""

    payload: bytes
    reasons: tuple[ReasonCode, ...]
    appraisal: Appraisal | None
    claims: psa.PsaClaims | None


VerifierEvent = ChallengeIssued | Accepted | Rejected


def challenge_mac(secret: bytes, challenge: messages.Challenge) -> bytes:
    """HMAC-SHA256 over the challenge's MAC input under the shared secret."""
    return _mac(secret, challenge.mac_input())


def _mac(secret: bytes, mac_input: bytes) -> bytes:
    return hmac.digest(secret, mac_input, "sha256")


def may_release(appraisal: Appraisal) -> bool:
    """True for an affirming appraisal, or a warning whose only findings are releasable."""
    if appraisal.status is Status.AFFIRMING:
        return True
    return appraisal.status is Status.WARNING and set(appraisal.reasons) <= RELEASABLE_WARNINGS


class VerifierSession:
    """One attestation exchange seen from the gateway, for the device a topic names."""

    def __init__(self, config: VerifierConfig, hooks: VerifierHooks, device_id: DeviceId) -> None:
        """Prepare a session for ``device_id`` (taken from the topic, not from the payload)."""
        self.config = config
        self.hooks = hooks
        self.device_id = device_id
        self.session_id: SessionId | None = None
        self._machine = Machine(
            "verifier session",
            _TRANSITIONS,
            initial=VerifierState.IDLE,
            error=VerifierState.ERROR,
            local_steps=frozenset(),
        )

    @property
    def state(self) -> VerifierState:
        """The session's current state."""
        return self._machine.state

    def receive_data(
        self, data: bytes, *, now_s: int, randomness: Callable[[int], bytes]
    ) -> VerifierEvent:
        """Feed one payload from ``…/up/attest``; returns what to publish and why.

        Args:
            data: the payload.
            now_s: gateway time.
            randomness: a source of random bytes (challenge randomness).

        Raises:
            RemoteProtocolError: malformed, or not legal in this state (the session is then ERROR).
        """
        try:
            message = messages.decode_attest_up(data)
        except MalformedMessage as err:
            self._machine.violate(RemoteProtocolError, f"malformed message: {err}", err)
        return self.receive_message(message, now_s=now_s, randomness=randomness)

    def receive_message(
        self, message: messages.AttestUp, *, now_s: int, randomness: Callable[[int], bytes]
    ) -> VerifierEvent:
        """``receive_data`` for a payload its caller has decoded already (decoded once).

        Raises:
            RemoteProtocolError: not legal in this state (the session is then ERROR).
        """
        if self.session_id is not None and message.session_id != self.session_id:
            self._machine.violate(RemoteProtocolError, "message for another session")
        self.session_id = message.session_id
        if isinstance(message, messages.Hello):
            return self._on_hello(message, now_s, randomness)
        self._machine.step(VerifierStep.RECEIVE_EVIDENCE)
        return self._on_evidence(message, now_s)

    def _on_hello(
        self, hello: messages.Hello, now_s: int, randomness: Callable[[int], bytes]
    ) -> VerifierEvent:
        if self.hooks.device_keys(self.device_id) is None:
            self._machine.step(VerifierStep.REFUSE_HELLO)
            return self._refuse(hello.session_id, (ReasonCode.DEVICE_UNKNOWN,))
        self._machine.step(VerifierStep.RECEIVE_HELLO)
        nonce = randomness(CHALLENGE_RANDOM_BYTES)
        if len(nonce) != CHALLENGE_RANDOM_BYTES:
            self._machine.violate(LocalProtocolError, "randomness returned the wrong size")
        expires_s = now_s + self.config.challenge_ttl_s
        mac_input = messages.Challenge.mac_input_of(
            self.device_id, hello.session_id, expires_s, nonce
        )
        challenge = messages.Challenge(
            session_id=hello.session_id,
            device_id=self.device_id,
            nonce=nonce,
            expires_s=expires_s,
            mac=_mac(self.config.secret, mac_input),
        )
        return ChallengeIssued(payload=challenge.encode(), challenge=challenge)

    def _on_evidence(self, evidence: messages.Evidence, now_s: int) -> VerifierEvent:
        failure = self._check_challenge(evidence, now_s)
        if failure is not None:
            return self._refuse(evidence.session_id, (failure,))
        keys = self.hooks.device_keys(self.device_id)
        if keys is None:
            return self._refuse(evidence.session_id, (ReasonCode.DEVICE_UNKNOWN,))
        verified = _verify_token(evidence.token, keys)
        if isinstance(verified, ReasonCode):
            return self._refuse(evidence.session_id, (verified,))
        claims, key_class = verified
        binding = psa.bind_nonce(evidence.challenge.nonce, evidence.enclave_key)
        if not hmac.compare_digest(claims.nonce, binding):
            return self._refuse(
                evidence.session_id, (ReasonCode.EVIDENCE_BINDING_MISMATCH,), claims
            )
        request = AppraisalRequest(
            self.device_id, evidence.session_id, claims, key_class, now_s, evidence.challenge
        )
        try:
            appraisal = self.hooks.appraise(request)
        except InvalidChallenge:
            return self._refuse(evidence.session_id, (ReasonCode.NONCE_REPLAYED,), claims)
        return self._conclude(evidence, claims, appraisal, now_s)

    def _check_challenge(self, evidence: messages.Evidence, now_s: int) -> ReasonCode | None:
        challenge = evidence.challenge
        expected = challenge_mac(self.config.secret, challenge)
        if (
            not hmac.compare_digest(expected, challenge.mac)
            or challenge.device_id != self.device_id
            or challenge.session_id != evidence.session_id
        ):
            return ReasonCode.CHALLENGE_INVALID
        if now_s > challenge.expires_s:
            return ReasonCode.CHALLENGE_EXPIRED
        return None

    def _conclude(
        self,
        evidence: messages.Evidence,
        claims: psa.PsaClaims,
        appraisal: Appraisal,
        now_s: int,
    ) -> VerifierEvent:
        if appraisal.status is Status.CONTRAINDICATED:
            reasons = appraisal.reasons or (ReasonCode.POLICY_VIOLATION,)
            return self._refuse(evidence.session_id, reasons, claims, appraisal)
        release = appraisal.release if may_release(appraisal) else None
        result = AttestationResult(
            device_id=self.device_id,
            session_id=evidence.session_id,
            status=appraisal.status,
            trust_vector=appraisal.trust_vector,
            reasons=appraisal.reasons,
            policy_version=appraisal.policy_version,
            issued_s=now_s,
            expires_s=now_s + self.config.result_ttl_s,
            manifest_digest=None if release is None else release.manifest_digest,
            lease=appraisal.lease if release is not None else None,
            verifier_id=self.config.verifier_id,
        )
        signed = sign_result(result, self.config.result_signer)
        verdict = messages.Verdict(
            session_id=evidence.session_id,
            result=signed,
            grant=None if release is None else self._grant(evidence, release),
            release_id=None if release is None else release.release_id,
            image_size=None if release is None else release.image_size,
        )
        return Accepted(payload=verdict.encode(), result=result, appraisal=appraisal, claims=claims)

    def _grant(self, evidence: messages.Evidence, release: KeyRelease) -> bytes:
        if len(release.cek) != CEK_BYTES:
            self._machine.violate(LocalProtocolError, "appraiser released a key of the wrong size")
        return seal_grant(
            release.cek,
            x25519_from_raw(evidence.enclave_key),
            device_id=self.device_id,
            session_id=evidence.session_id,
            manifest_digest=release.manifest_digest,
        )

    def _refuse(
        self,
        session: SessionId,
        reasons: tuple[ReasonCode, ...],
        claims: psa.PsaClaims | None = None,
        appraisal: Appraisal | None = None,
    ) -> Rejected:
        payload = messages.Refusal(session_id=session, reasons=reasons).encode()
        return Rejected(payload=payload, reasons=reasons, appraisal=appraisal, claims=claims)


def _verify_token(token: bytes, keys: DeviceKeys) -> tuple[psa.PsaClaims, KeyClass] | ReasonCode:
    """Verify under the SECURED-class IAK, then the debug-class one; a reason code on failure."""
    try:
        parsed = cose.sign1_parse_unverified(token)
    except MalformedMessage:
        return ReasonCode.EVIDENCE_MALFORMED
    candidates = [(keys.secured, KeyClass.SECURED)]
    if keys.debug is not None:
        candidates.append((keys.debug, KeyClass.DEBUG))
    for key, key_class in candidates:
        try:
            cose.verify_parsed(parsed, key)
        except InvalidSignature:
            continue
        try:
            return psa.decode_claims(parsed.payload), key_class
        except MalformedMessage:
            return ReasonCode.EVIDENCE_MALFORMED
    return ReasonCode.EVIDENCE_SIGNATURE_INVALID


def transitions() -> dict[tuple[VerifierState, VerifierStep], VerifierState]:
    """A copy of the transition table (for docs and tests)."""
    return dict(_TRANSITIONS)
