"""The device's side of an attestation session, sans-IO (h11 style; DESIGN §9).

Rules:

- One session is one exchange: hello → challenge → evidence → verdict or refusal. A device that
  retries starts a new session with a new session id; a session never goes backwards.
- Bytes in (``receive_data``), events out; bytes out come from ``start`` and ``send_evidence``. The
  session does no I/O, keeps no clock and makes no randomness: the caller passes ``now_s`` and the
  session id.
- Every legal step is one row of ``_TRANSITIONS``. Any other step raises ``ProtocolViolation`` and
  moves the session to ``ERROR`` for good: ``LocalProtocolError`` when our caller asked for it,
  ``RemoteProtocolError`` when the gateway sent it.
- A message for another session (a late reply to an earlier one) is not a violation: it is reported
  as ``Ignored`` and changes nothing.
- The session does not judge the verdict: the enclave verifies the result and opens the grant.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, NoReturn

from protocol import messages
from protocol._machine import Machine
from protocol.errors import (
    LocalProtocolError,
    MalformedMessage,
    ProtocolViolation,
    RemoteProtocolError,
)
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.ids import session_id as check_session_id
from protocol.psa import bind_nonce
from protocol.reasons import ReasonCode


class AttesterState(Enum):
    """Where an attester session stands."""

    IDLE = auto()
    AWAIT_CHALLENGE = auto()
    CHALLENGED = auto()
    AWAIT_VERDICT = auto()
    GRANTED = auto()
    REFUSED = auto()
    TIMED_OUT = auto()
    ERROR = auto()


class AttesterStep(Enum):
    """What can happen to an attester session."""

    SEND_HELLO = auto()
    RECEIVE_CHALLENGE = auto()
    SEND_EVIDENCE = auto()
    RECEIVE_VERDICT = auto()
    RECEIVE_REFUSAL = auto()
    TIMEOUT = auto()


_S = AttesterState
_E = AttesterStep
#: The one transition table: (state, step) → next state. Anything absent is a violation.
_TRANSITIONS: Final[dict[tuple[AttesterState, AttesterStep], AttesterState]] = {
    (_S.IDLE, _E.SEND_HELLO): _S.AWAIT_CHALLENGE,
    (_S.AWAIT_CHALLENGE, _E.RECEIVE_CHALLENGE): _S.CHALLENGED,
    (_S.AWAIT_CHALLENGE, _E.RECEIVE_REFUSAL): _S.REFUSED,
    (_S.AWAIT_CHALLENGE, _E.TIMEOUT): _S.TIMED_OUT,
    (_S.CHALLENGED, _E.SEND_EVIDENCE): _S.AWAIT_VERDICT,
    (_S.CHALLENGED, _E.TIMEOUT): _S.TIMED_OUT,
    (_S.AWAIT_VERDICT, _E.RECEIVE_VERDICT): _S.GRANTED,
    (_S.AWAIT_VERDICT, _E.RECEIVE_REFUSAL): _S.REFUSED,
    (_S.AWAIT_VERDICT, _E.TIMEOUT): _S.TIMED_OUT,
}
_LOCAL_STEPS: Final = frozenset({_E.SEND_HELLO, _E.SEND_EVIDENCE, _E.TIMEOUT})
TERMINAL_STATES: Final = frozenset({_S.GRANTED, _S.REFUSED, _S.TIMED_OUT, _S.ERROR})


@dataclass(frozen=True, slots=True)
class ChallengeReceived:
    """The gateway challenged us: have the enclave sign a token over ``binding_nonce``."""

    challenge: messages.Challenge
    #: What the token's nonce claim must be, once the enclave key is known: see ``binding_for``.
    gateway_nonce: bytes

    def binding_for(self, enclave_public_raw: bytes) -> bytes:
        """The token nonce binding this challenge to the enclave's ephemeral key (DESIGN §6)."""
        return bind_nonce(self.gateway_nonce, enclave_public_raw)


@dataclass(frozen=True, slots=True)
class VerdictReceived:
    """A signed result (and possibly a grant): hand it to the enclave to verify."""

    verdict: messages.Verdict


@dataclass(frozen=True, slots=True)
class Refused:
    """The gateway refused; reason codes only."""

    reasons: tuple[ReasonCode, ...]


@dataclass(frozen=True, slots=True)
class Ignored:
    """A well-formed message that belongs to another session; nothing changed."""

    reason: str


AttesterEvent = ChallengeReceived | VerdictReceived | Refused | Ignored


class AttesterSession:
    """One attestation exchange seen from the device."""

    def __init__(self, device_id: DeviceId, session_id: SessionId, *, timeout_s: int) -> None:
        """Prepare a session; ``session_id`` is 16 random bytes chosen by the caller."""
        self.device_id = device_id
        self.session_id = check_session_id(session_id)
        self.timeout_s = timeout_s
        self._machine = Machine(
            "attester session",
            _TRANSITIONS,
            initial=AttesterState.IDLE,
            error=AttesterState.ERROR,
            local_steps=_LOCAL_STEPS,
        )
        self.deadline_s: int | None = None
        self._challenge: messages.Challenge | None = None

    @property
    def state(self) -> AttesterState:
        """The session's current state."""
        return self._machine.state

    def start(
        self,
        *,
        now_s: int,
        certificates: tuple[bytes, ...],
        requested_release: ReleaseId | None = None,
        state: messages.HelloState = messages.HelloState.BOOT,
        counters: messages.Counters = (),
    ) -> bytes:
        """Begin the session: the hello payload to publish on ``…/up/attest``."""
        hello = messages.Hello(
            session_id=self.session_id,
            certificates=certificates,
            requested_release=requested_release,
            state=state,
            counters=counters,
        )
        self._step(AttesterStep.SEND_HELLO)
        self.deadline_s = now_s + self.timeout_s
        return hello.encode()

    def send_evidence(self, *, token: bytes, enclave_key: bytes, now_s: int) -> bytes:
        """The evidence payload for the challenge received, with the enclave's token and key."""
        if self.state is not AttesterState.CHALLENGED or self._challenge is None:
            self._violate(LocalProtocolError, f"send evidence in state {self.state.name}")
        evidence = messages.Evidence(
            session_id=self.session_id,
            token=token,
            enclave_key=enclave_key,
            challenge=self._challenge,
        )
        self._step(AttesterStep.SEND_EVIDENCE)
        self.deadline_s = now_s + self.timeout_s
        return evidence.encode()

    def receive_data(self, data: bytes) -> AttesterEvent:
        """Feed one payload received on ``…/down/attest``; returns what happened.

        Raises:
            RemoteProtocolError: the payload is malformed, or not legal in this state (the
                session is then in ERROR).
        """
        if self.state in TERMINAL_STATES:
            return Ignored(f"session already {self.state.name}")
        try:
            message = messages.decode_attest_down(data)
        except MalformedMessage as err:
            self._violate(RemoteProtocolError, f"malformed message: {err}", err)
        if message.session_id != self.session_id:
            return Ignored("message for another session")
        if isinstance(message, messages.Challenge):
            return self._on_challenge(message)
        if isinstance(message, messages.Verdict):
            self._step(AttesterStep.RECEIVE_VERDICT)
            return VerdictReceived(message)
        self._step(AttesterStep.RECEIVE_REFUSAL)
        return Refused(message.reasons)

    def check_timeout(self, now_s: int) -> bool:
        """Move to TIMED_OUT when the reply is overdue; True when the session is now timed out."""
        if self.state in TERMINAL_STATES or self.deadline_s is None or now_s < self.deadline_s:
            return self.state is AttesterState.TIMED_OUT
        self._step(AttesterStep.TIMEOUT)
        return True

    def _on_challenge(self, challenge: messages.Challenge) -> ChallengeReceived:
        if challenge.device_id != self.device_id:
            self._violate(RemoteProtocolError, "challenge addressed to another device")
        self._step(AttesterStep.RECEIVE_CHALLENGE)
        self._challenge = challenge
        return ChallengeReceived(challenge=challenge, gateway_nonce=challenge.nonce)

    def _step(self, step: AttesterStep) -> None:
        self._machine.step(step)

    def _violate(
        self, kind: type[ProtocolViolation], detail: str, cause: Exception | None = None
    ) -> NoReturn:
        self._machine.violate(kind, detail, cause)


def transitions() -> dict[tuple[AttesterState, AttesterStep], AttesterState]:
    """A copy of the transition table (for docs and tests)."""
    return dict(_TRANSITIONS)
