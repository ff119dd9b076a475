"""Every MQTT payload of edgeseal (DESIGN §9; normative layout in docs/protocol.md).

CBOR messages (attest, fetch, chunk, status, telemetry, command) are one canonical CBOR map with
small integer keys: key 0 is the message type (``MessageType``), key 1 the format version (1),
keys 2.. the fields of that type. Optional fields are omitted when absent; unknown keys, a wrong
type or version, oversized input and trailing bytes are refused. Correlation lives in the payload
(the session id; the release id and offset for chunks), so MQTT 3.1.1 needs no properties.

Fleet state and events are JSON for any MQTT dashboard: UTF-8, compact, sorted keys, with
``"type"`` and ``"v"`` members.

Every constructor validates its fields and raises ``MalformedMessage`` (a ``ValueError``) naming the
field; every ``decode`` raises only ``MalformedMessage``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import ClassVar, Final, Self

from protocol import cbor, ids
from protocol.errors import MalformedMessage
from protocol.grant import GRANT_BYTES
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.reasons import ReasonCode, reason_code
from protocol.reasons import Status as ResultStatus
from protocol.results import MAX_SIGNED_BYTES, check_release_id

VERSION: Final = 1
K_TYPE: Final = 0
K_VERSION: Final = 1

#: Ceilings of whole payloads, per topic (bytes).
ATTEST_MAX_BYTES: Final = 16 * 1024
FETCH_MAX_BYTES: Final = 256
CHUNK_MAX_DATA: Final = 64 * 1024
CHUNK_MAX_BYTES: Final = CHUNK_MAX_DATA + 256
STATUS_MAX_BYTES: Final = 2 * 1024
TELEMETRY_MAX_BYTES: Final = 4 * 1024
COMMAND_MAX_BYTES: Final = MAX_SIGNED_BYTES + 64
FLEET_STATE_MAX_BYTES: Final = 4 * 1024
EVENT_MAX_BYTES: Final = 8 * 1024

#: Field limits.
MAX_CERTIFICATES: Final = 2
MAX_CERTIFICATE_BYTES: Final = 4096
MAX_TOKEN_BYTES: Final = 8 * 1024
MAX_IMAGE_BYTES: Final = 64 << 20
MAX_COUNTERS: Final = 16
MAX_REASONS: Final = 64
MAX_DETAIL: Final = 256
MAX_VERSION_TEXT: Final = 64
MAX_TELEMETRY_PAYLOAD: Final = TELEMETRY_MAX_BYTES - 128
NONCE_BYTES: Final = 32
MAC_BYTES: Final = 32
X25519_BYTES: Final = 32
_U32: Final = 0xFFFFFFFF
_U63: Final = (1 << 63) - 1

#: A short lowercase identifier: device states, counter names.
_TOKEN = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: A dotted event kind, e.g. ``verdict`` or ``alert.counter_rollback``.
_KIND = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")

#: Counters as sorted (name, value) pairs, e.g. ``(("app", 3), ("bl2", 1))``.
Counters = tuple[tuple[str, int], ...]


class MessageType(IntEnum):
    """Key 0 of every CBOR message."""

    HELLO = 1
    EVIDENCE = 2
    CHALLENGE = 3
    VERDICT = 4
    REFUSAL = 5
    FETCH_REQUEST = 6
    CHUNK = 7
    STATUS = 8
    TELEMETRY = 9
    COMMAND = 10


class HelloState(StrEnum):
    """Why a device attests."""

    BOOT = "boot"
    UPDATE = "update"
    REATTEST = "reattest"


# --- validation helpers -------------------------------------------------------------------------


def _session(value: object, what: str) -> None:
    cbor.expect_bytes(value, what=what, size=ids.SESSION_ID_BYTES)


def _text(value: object, what: str, max_len: int) -> str:
    text = cbor.expect_str(value, what=what, max_len=max_len)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise MalformedMessage(f"{what}: not encodable as UTF-8") from err
    return text


def _token(value: object, what: str) -> str:
    text = cbor.expect_str(value, what=what, max_len=32)
    if not _TOKEN.fullmatch(text):
        raise MalformedMessage(f"{what}: expected [a-z][a-z0-9_]{{0,31}}, got {text!r:.40}")
    return text


def _counters(value: object, what: str) -> Counters:
    if not isinstance(value, tuple) or len(value) > MAX_COUNTERS:
        raise MalformedMessage(f"{what}: expected a tuple of at most {MAX_COUNTERS} pairs")
    pairs: dict[str, int] = {}
    for pair in value:
        name, count = cbor.expect_list(pair, what=what, length=2)
        name = _token(name, f"{what}.name")
        if name in pairs:
            raise MalformedMessage(f"{what}: duplicate counter {name!r}")
        pairs[name] = cbor.expect_int(count, what=f"{what}.{name}", lo=0, hi=_U32)
    return tuple(sorted(pairs.items()))


def _reasons(value: object, what: str, *, at_least: int = 0) -> None:
    if not isinstance(value, tuple) or not at_least <= len(value) <= MAX_REASONS:
        raise MalformedMessage(f"{what}: expected {at_least}..{MAX_REASONS} reason codes")
    for code in value:
        if not isinstance(code, ReasonCode):
            raise MalformedMessage(f"{what}: expected ReasonCode, got {type(code).__name__}")


def _read_counters(obj: object, what: str) -> Counters:
    entries = cbor.Fields(obj, what=what)
    names = entries.keys()
    if len(names) > MAX_COUNTERS:
        raise MalformedMessage(f"{what}: more than {MAX_COUNTERS} counters")
    return tuple((_token(name, f"{what}.name"), entries.get_int(str(name))) for name in names)


def _read_reasons(items: list[object], what: str) -> tuple[ReasonCode, ...]:
    return tuple(reason_code(cbor.expect_str(item, what=what, max_len=64)) for item in items)


def _set(obj: object, name: str, value: object) -> None:
    """Normalize a field of a frozen dataclass in ``__post_init__``."""
    object.__setattr__(obj, name, value)


# --- the CBOR envelope --------------------------------------------------------------------------


def _encode(mtype: MessageType, body: dict[int, object]) -> bytes:
    # Keys are small non-negative ints, whose canonical order is numeric: sorted here, the map is
    # written as it is (cbor.dumps_ordered). A message holding a map (counters, the challenge an
    # evidence echoes) lets the encoder order it.
    if any(type(value) is dict for value in body.values()):
        return cbor.dumps({K_TYPE: int(mtype), K_VERSION: VERSION, **body})
    return cbor.dumps_ordered(
        {K_TYPE: int(mtype), K_VERSION: VERSION, **dict(sorted(body.items()))}
    )


def _open(data: bytes, *, what: str, max_bytes: int) -> tuple[MessageType, cbor.Fields]:
    fields = cbor.Fields(cbor.loads(data, what=what, max_bytes=max_bytes), what=what)
    version = fields.get_int(K_VERSION)
    if version != VERSION:
        raise MalformedMessage(f"{what}.version: expected {VERSION}, got {version}")
    number = fields.get_int(K_TYPE)
    try:
        return MessageType(number), fields
    except ValueError as err:
        raise MalformedMessage(f"{what}.type: unknown message type {number}") from err


def _open_as(data: bytes, mtype: MessageType, max_bytes: int) -> cbor.Fields:
    what = mtype.name.lower()
    got, fields = _open(data, what=what, max_bytes=max_bytes)
    if got is not mtype:
        raise MalformedMessage(f"{what}.type: expected {mtype.name}, got {got.name}")
    return fields


def _only(fields: cbor.Fields, last_key: int) -> cbor.Fields:
    return fields.only(frozenset(range(last_key + 1)))


# --- the message classes' shared encode and decode ----------------------------------------------


class _CborMessage:
    """A CBOR message: ``_body`` gives its fields by key, ``_from_fields`` reads them back."""

    __slots__ = ()
    TYPE: ClassVar[MessageType]
    MAX_BYTES: ClassVar[int]

    def _body(self) -> dict[int, object]:
        raise NotImplementedError

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        raise NotImplementedError

    def encode(self) -> bytes:
        """The CBOR payload."""
        return _encode(self.TYPE, self._body())

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode one message of this class (``TYPE``, at most ``MAX_BYTES``).

        Raises:
            MalformedMessage: ``data`` is not a well-formed message of this type.
        """
        return cls._from_fields(_open_as(data, cls.TYPE, cls.MAX_BYTES))


# --- attest, up ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(_CborMessage):
    """First message of a session: who the device says it is and what it wants."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    MAX_BYTES: ClassVar[int] = ATTEST_MAX_BYTES

    session_id: SessionId
    #: DER device certificates (SECURED-class and debug-class), at most two.
    certificates: tuple[bytes, ...]
    requested_release: ReleaseId | None
    state: HelloState
    counters: Counters = ()

    def __post_init__(self) -> None:
        _session(self.session_id, "hello.session_id")
        if not isinstance(self.certificates, tuple) or len(self.certificates) > MAX_CERTIFICATES:
            raise MalformedMessage(f"hello.certificates: expected at most {MAX_CERTIFICATES}")
        for cert in self.certificates:
            cbor.expect_bytes(cert, what="hello.certificates", max_size=MAX_CERTIFICATE_BYTES)
        if self.requested_release is not None:
            check_release_id(self.requested_release, what="hello.requested_release")
        if not isinstance(self.state, HelloState):
            raise MalformedMessage("hello.state: expected a HelloState")
        _set(self, "counters", _counters(self.counters, "hello.counters"))

    def _body(self) -> dict[int, object]:
        body: dict[int, object] = {
            2: self.session_id,
            3: list(self.certificates),
            5: self.state.value,
            6: dict(self.counters),
        }
        if self.requested_release is not None:
            body[4] = self.requested_release
        return body

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 6)
        state = f.get_str(5, max_len=16)
        try:
            hello_state = HelloState(state)
        except ValueError as err:
            raise MalformedMessage(f"hello.state: unknown state {state!r}") from err
        release = f.opt_raw(4)
        return cls(
            session_id=SessionId(f.get_bytes(2)),
            certificates=tuple(
                cbor.expect_bytes(c, what="hello.certificates") for c in f.get_list(3, max_len=2)
            ),
            requested_release=None
            if release is None
            else ReleaseId(cbor.expect_str(release, what="hello.requested_release")),
            state=hello_state,
            counters=_read_counters(f.raw(6), "hello.counters"),
        )


@dataclass(frozen=True, slots=True)
class Challenge(_CborMessage):
    """The gateway's stateless challenge (DESIGN §9): randomness plus a MAC computed elsewhere."""

    TYPE: ClassVar[MessageType] = MessageType.CHALLENGE
    MAX_BYTES: ClassVar[int] = ATTEST_MAX_BYTES

    session_id: SessionId
    device_id: DeviceId
    #: 32 bytes of gateway randomness, the challenge of the evidence binding (DESIGN §6).
    nonce: bytes
    expires_s: int
    mac: bytes

    def __post_init__(self) -> None:
        _session(self.session_id, "challenge.session_id")
        ids.device_id(self.device_id)
        cbor.expect_bytes(self.nonce, what="challenge.nonce", size=NONCE_BYTES)
        cbor.expect_int(self.expires_s, what="challenge.expires_s", lo=0, hi=_U63)
        cbor.expect_bytes(self.mac, what="challenge.mac", size=MAC_BYTES)

    def mac_input(self) -> bytes:
        """The bytes the gateway MACs: canonical CBOR [device, session, expires_s, nonce]."""
        return self.mac_input_of(self.device_id, self.session_id, self.expires_s, self.nonce)

    @staticmethod
    def mac_input_of(
        device_id: DeviceId, session_id: SessionId, expires_s: int, nonce: bytes
    ) -> bytes:
        """``mac_input`` of a challenge not built yet (its MAC comes first)."""
        return cbor.dumps_ordered([device_id, session_id, expires_s, nonce])

    def _body(self) -> dict[int, object]:
        return {
            2: self.session_id,
            3: self.device_id,
            4: self.nonce,
            5: self.expires_s,
            6: self.mac,
        }

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 6)
        return cls(
            session_id=SessionId(f.get_bytes(2)),
            device_id=ids.device_id(f.get_str(3)),
            nonce=f.get_bytes(4),
            expires_s=f.get_int(5),
            mac=f.get_bytes(6),
        )


@dataclass(frozen=True, slots=True)
class Evidence(_CborMessage):
    """Second message up: the token, the enclave's ephemeral key, and the echoed challenge."""

    TYPE: ClassVar[MessageType] = MessageType.EVIDENCE
    MAX_BYTES: ClassVar[int] = ATTEST_MAX_BYTES

    session_id: SessionId
    #: The PSA attestation token (opaque here; see docs/token.md).
    token: bytes
    #: The enclave's ephemeral X25519 public key, raw 32 bytes.
    enclave_key: bytes
    challenge: Challenge

    def __post_init__(self) -> None:
        _session(self.session_id, "evidence.session_id")
        cbor.expect_bytes(self.token, what="evidence.token", max_size=MAX_TOKEN_BYTES)
        if not self.token:
            raise MalformedMessage("evidence.token: empty")
        cbor.expect_bytes(self.enclave_key, what="evidence.enclave_key", size=X25519_BYTES)
        if not isinstance(self.challenge, Challenge):
            raise MalformedMessage("evidence.challenge: expected a Challenge")

    def _body(self) -> dict[int, object]:
        return {
            2: self.session_id,
            3: self.token,
            4: self.enclave_key,
            5: self.challenge._body(),
        }

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 5)
        return cls(
            session_id=SessionId(f.get_bytes(2)),
            token=f.get_bytes(3),
            enclave_key=f.get_bytes(4),
            challenge=Challenge._from_fields(f.get_map(5).only(frozenset(range(2, 7)))),
        )


# --- attest, down -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict(_CborMessage):
    """The signed result, and with it the grant and the release it opens, when one is released."""

    TYPE: ClassVar[MessageType] = MessageType.VERDICT
    MAX_BYTES: ClassVar[int] = ATTEST_MAX_BYTES

    session_id: SessionId
    #: The signed result (COSE_Sign1; ``protocol.results.verify_result``).
    result: bytes
    grant: bytes | None = None
    release_id: ReleaseId | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        _session(self.session_id, "verdict.session_id")
        cbor.expect_bytes(self.result, what="verdict.result", max_size=MAX_SIGNED_BYTES)
        if self.grant is not None:
            cbor.expect_bytes(self.grant, what="verdict.grant", size=GRANT_BYTES)
            if self.release_id is None:
                raise MalformedMessage("verdict.release_id: required with a grant")
        if (self.release_id is None) != (self.image_size is None):
            raise MalformedMessage("verdict: release_id and image_size go together")
        if self.release_id is not None:
            check_release_id(self.release_id, what="verdict.release_id")
            cbor.expect_int(self.image_size, what="verdict.image_size", lo=1, hi=MAX_IMAGE_BYTES)

    def _body(self) -> dict[int, object]:
        body: dict[int, object] = {2: self.session_id, 3: self.result}
        optional = {4: self.grant, 5: self.release_id, 6: self.image_size}
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 6)
        release = f.opt_raw(5)
        return cls(
            session_id=SessionId(f.get_bytes(2)),
            result=f.get_bytes(3),
            grant=f.opt_bytes(4),
            release_id=None if release is None else check_release_id(release, what="verdict.5"),
            image_size=f.opt_int(6),
        )


@dataclass(frozen=True, slots=True)
class Refusal(_CborMessage):
    """No result: reason codes only, never the explanation (DESIGN §10)."""

    TYPE: ClassVar[MessageType] = MessageType.REFUSAL
    MAX_BYTES: ClassVar[int] = ATTEST_MAX_BYTES

    session_id: SessionId
    reasons: tuple[ReasonCode, ...]

    def __post_init__(self) -> None:
        _session(self.session_id, "refusal.session_id")
        _reasons(self.reasons, "refusal.reasons", at_least=1)

    def _body(self) -> dict[int, object]:
        return {2: self.session_id, 3: [code.value for code in self.reasons]}

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 3)
        return cls(
            session_id=SessionId(f.get_bytes(2)),
            reasons=_read_reasons(f.get_list(3, max_len=MAX_REASONS), "refusal.reasons"),
        )


AttestUp = Hello | Evidence
AttestDown = Challenge | Verdict | Refusal


def decode_attest_up(data: bytes) -> AttestUp:
    """Decode a payload of ``…/up/attest``: a hello or an evidence message.

    Raises:
        MalformedMessage: ``data`` is neither.
    """
    mtype, fields = _open(data, what="attest up", max_bytes=ATTEST_MAX_BYTES)
    if mtype is MessageType.HELLO:
        return Hello._from_fields(fields)
    if mtype is MessageType.EVIDENCE:
        return Evidence._from_fields(fields)
    raise MalformedMessage(f"attest up.type: expected HELLO or EVIDENCE, got {mtype.name}")


def decode_attest_down(data: bytes) -> AttestDown:
    """Decode a payload of ``…/down/attest``: a challenge, a verdict or a refusal.

    Raises:
        MalformedMessage: ``data`` is none of them.
    """
    mtype, fields = _open(data, what="attest down", max_bytes=ATTEST_MAX_BYTES)
    if mtype is MessageType.CHALLENGE:
        return Challenge._from_fields(fields)
    if mtype is MessageType.VERDICT:
        return Verdict._from_fields(fields)
    if mtype is MessageType.REFUSAL:
        return Refusal._from_fields(fields)
    raise MalformedMessage(
        f"attest down.type: expected CHALLENGE, VERDICT or REFUSAL, got {mtype.name}"
    )


# --- image download -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchRequest(_CborMessage):
    """Ask for ``length`` bytes of a release's sealed image from ``offset``."""

    TYPE: ClassVar[MessageType] = MessageType.FETCH_REQUEST
    MAX_BYTES: ClassVar[int] = FETCH_MAX_BYTES

    release_id: ReleaseId
    offset: int
    length: int
    #: The session that released the grant, for correlation and rate limiting (optional).
    session_id: SessionId | None = None

    def __post_init__(self) -> None:
        check_release_id(self.release_id, what="fetch.release_id")
        cbor.expect_int(self.offset, what="fetch.offset", lo=0, hi=MAX_IMAGE_BYTES)
        cbor.expect_int(self.length, what="fetch.length", lo=1, hi=CHUNK_MAX_DATA)
        if self.session_id is not None:
            _session(self.session_id, "fetch.session_id")

    def _body(self) -> dict[int, object]:
        body: dict[int, object] = {2: self.release_id, 3: self.offset, 4: self.length}
        if self.session_id is not None:
            body[5] = self.session_id
        return body

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 5)
        session = f.opt_bytes(5)
        return cls(
            release_id=check_release_id(f.raw(2), what="fetch.release_id"),
            offset=f.get_int(3),
            length=f.get_int(4),
            session_id=None if session is None else SessionId(session),
        )


@dataclass(frozen=True, slots=True)
class Chunk(_CborMessage):
    """A piece of a sealed image; ``offset`` and ``release_id`` correlate it with its request."""

    TYPE: ClassVar[MessageType] = MessageType.CHUNK
    MAX_BYTES: ClassVar[int] = CHUNK_MAX_BYTES

    release_id: ReleaseId
    offset: int
    data: bytes
    total_size: int
    session_id: SessionId | None = None

    def __post_init__(self) -> None:
        check_release_id(self.release_id, what="chunk.release_id")
        cbor.expect_int(self.total_size, what="chunk.total_size", lo=1, hi=MAX_IMAGE_BYTES)
        cbor.expect_int(self.offset, what="chunk.offset", lo=0, hi=self.total_size)
        cbor.expect_bytes(self.data, what="chunk.data", max_size=CHUNK_MAX_DATA)
        if self.offset + len(self.data) > self.total_size:
            raise MalformedMessage("chunk.data: runs past total_size")
        if self.session_id is not None:
            _session(self.session_id, "chunk.session_id")

    def _body(self) -> dict[int, object]:
        body: dict[int, object] = {
            2: self.release_id,
            3: self.offset,
            4: self.data,
            5: self.total_size,
        }
        if self.session_id is not None:
            body[6] = self.session_id
        return body

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 6)
        session = f.opt_bytes(6)
        return cls(
            release_id=check_release_id(f.raw(2), what="chunk.release_id"),
            offset=f.get_int(3),
            data=f.get_bytes(4),
            total_size=f.get_int(5),
            session_id=None if session is None else SessionId(session),
        )


# --- status, telemetry, commands ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status(_CborMessage):
    """The device's retained status: boot state, what runs, its counters."""

    TYPE: ClassVar[MessageType] = MessageType.STATUS
    MAX_BYTES: ClassVar[int] = STATUS_MAX_BYTES

    #: A short lowercase state name owned by the device, e.g. ``booting``, ``running``.
    state: str
    #: The running application's version, if any.
    version: str | None
    counters: Counters
    boot_count: int
    running: bool
    detail: str = ""

    def __post_init__(self) -> None:
        _token(self.state, "status.state")
        if self.version is not None:
            _text(self.version, "status.version", MAX_VERSION_TEXT)
        _set(self, "counters", _counters(self.counters, "status.counters"))
        cbor.expect_int(self.boot_count, what="status.boot_count", lo=0, hi=_U32)
        cbor.expect_bool(self.running, what="status.running")
        _text(self.detail, "status.detail", MAX_DETAIL)

    def _body(self) -> dict[int, object]:
        body: dict[int, object] = {
            2: self.state,
            4: dict(self.counters),
            5: self.boot_count,
            6: self.running,
            7: self.detail,
        }
        if self.version is not None:
            body[3] = self.version
        return body

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 7)
        return cls(
            state=f.get_str(2, max_len=32),
            version=f.opt_str(3, max_len=MAX_VERSION_TEXT),
            counters=_read_counters(f.raw(4), "status.counters"),
            boot_count=f.get_int(5),
            running=f.get_bool(6),
            detail=f.get_str(7, max_len=MAX_DETAIL),
        )


#: The device status message under a name that does not clash with ``reasons.Status``.
DeviceStatus = Status


@dataclass(frozen=True, slots=True)
class Telemetry(_CborMessage):
    """Application output, relayed by the enclave through the normal world."""

    TYPE: ClassVar[MessageType] = MessageType.TELEMETRY
    MAX_BYTES: ClassVar[int] = TELEMETRY_MAX_BYTES

    seq: int
    payload: bytes
    ts_ms: int

    def __post_init__(self) -> None:
        cbor.expect_int(self.seq, what="telemetry.seq", lo=0, hi=_U63)
        cbor.expect_bytes(self.payload, what="telemetry.payload", max_size=MAX_TELEMETRY_PAYLOAD)
        cbor.expect_int(self.ts_ms, what="telemetry.ts_ms", lo=0, hi=_U63)

    def _body(self) -> dict[int, object]:
        return {2: self.seq, 3: self.payload, 4: self.ts_ms}

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 4)
        return cls(seq=f.get_int(2), payload=f.get_bytes(3), ts_ms=f.get_int(4))


@dataclass(frozen=True, slots=True)
class CommandEnvelope(_CborMessage):
    """Carries one signed command (``protocol.results.verify_command``) down to a device."""

    TYPE: ClassVar[MessageType] = MessageType.COMMAND
    MAX_BYTES: ClassVar[int] = COMMAND_MAX_BYTES

    command: bytes

    def __post_init__(self) -> None:
        cbor.expect_bytes(self.command, what="command.command", max_size=MAX_SIGNED_BYTES)
        if not self.command:
            raise MalformedMessage("command.command: empty")

    def _body(self) -> dict[int, object]:
        return {2: self.command}

    @classmethod
    def _from_fields(cls, f: cbor.Fields) -> Self:
        f = _only(f, 2)
        return cls(command=f.get_bytes(2))


# --- JSON for dashboards ------------------------------------------------------------------------


def _json_encode(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedMessage("JSON: duplicate member")
    return result


def _no_constants(name: str) -> object:
    raise MalformedMessage(f"JSON: {name} is not allowed")


def _json_open(data: bytes, *, kind: str, max_bytes: int, members: frozenset[str]) -> cbor.Fields:
    if not isinstance(data, bytes):
        raise MalformedMessage(f"{kind}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MalformedMessage(f"{kind}: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        if isinstance(err, MalformedMessage):
            raise
        raise MalformedMessage(f"{kind}: not valid UTF-8 JSON ({type(err).__name__})") from err
    fields = cbor.Fields(obj, what=kind)
    if fields.raw("type") != kind:
        raise MalformedMessage(f"{kind}.type: expected {kind!r}")
    version = fields.get_int("v")
    if version != VERSION:
        raise MalformedMessage(f"{kind}.v: expected {VERSION}, got {version}")
    missing = members - fields.keys()
    if missing:
        raise MalformedMessage(f"{kind}: missing member {sorted(missing)[0]!r}")
    return fields.only(set(members))


def _verdict_status(value: object) -> ResultStatus:
    text = cbor.expect_str(value, what="fleet_state.verdict", max_len=32)
    try:
        return ResultStatus(text)
    except ValueError as err:
        raise MalformedMessage(f"fleet_state.verdict: unknown status {text!r}") from err


def _json_reasons(fields: cbor.Fields, key: str) -> tuple[ReasonCode, ...]:
    return _read_reasons(fields.get_list(key, max_len=MAX_REASONS), f"{fields.what}.{key}")


@dataclass(frozen=True, slots=True)
class FleetState:
    """The retained per-device state on ``…/fleet/{device}/state``, for dashboards."""

    KIND: ClassVar[str] = "fleet_state"
    MAX_BYTES: ClassVar[int] = FLEET_STATE_MAX_BYTES
    _MEMBERS: ClassVar[frozenset[str]] = frozenset(
        {"type", "v", "device", "verdict", "status", "firmware", "last_seen_s", "reasons"}
    )

    device: DeviceId
    #: The last verdict's status, or None before the first appraisal.
    verdict: ResultStatus | None
    #: The device's reported state (``Status.state``), or None before its first status.
    status: str | None
    firmware: str | None
    last_seen_s: int
    reasons: tuple[ReasonCode, ...] = ()

    def __post_init__(self) -> None:
        ids.device_id(self.device)
        if self.verdict is not None and not isinstance(self.verdict, ResultStatus):
            raise MalformedMessage("fleet_state.verdict: expected a Status")
        if self.status is not None:
            _token(self.status, "fleet_state.status")
        if self.firmware is not None:
            _text(self.firmware, "fleet_state.firmware", MAX_VERSION_TEXT)
        cbor.expect_int(self.last_seen_s, what="fleet_state.last_seen_s", lo=0, hi=_U63)
        _reasons(self.reasons, "fleet_state.reasons")

    def encode(self) -> bytes:
        """The JSON payload."""
        return _json_encode(
            {
                "type": self.KIND,
                "v": VERSION,
                "device": self.device,
                "verdict": None if self.verdict is None else self.verdict.value,
                "status": self.status,
                "firmware": self.firmware,
                "last_seen_s": self.last_seen_s,
                "reasons": [code.value for code in self.reasons],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode a fleet state.

        Raises:
            MalformedMessage: ``data`` is not a well-formed fleet state.
        """
        f = _json_open(data, kind=cls.KIND, max_bytes=cls.MAX_BYTES, members=cls._MEMBERS)
        verdict = f.opt_raw("verdict")
        return cls(
            device=ids.device_id(f.get_str("device")),
            verdict=None if verdict is None else _verdict_status(verdict),
            status=None if f.opt_raw("status") is None else f.get_str("status", max_len=32),
            firmware=(None if f.opt_raw("firmware") is None else f.get_str("firmware", max_len=64)),
            last_seen_s=f.get_int("last_seen_s"),
            reasons=_json_reasons(f, "reasons"),
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the fleet's event stream on ``…/events`` (verdicts, releases, alerts)."""

    KIND: ClassVar[str] = "event"
    MAX_BYTES: ClassVar[int] = EVENT_MAX_BYTES
    _MEMBERS: ClassVar[frozenset[str]] = frozenset(
        {"type", "v", "kind", "device", "reasons", "detail", "at_s"}
    )

    #: A dotted event kind, e.g. ``verdict``, ``release.published``, ``alert.counter_rollback``.
    kind: str
    device: DeviceId | None
    reasons: tuple[ReasonCode, ...]
    detail: str
    at_s: int

    def __post_init__(self) -> None:
        kind = cbor.expect_str(self.kind, what="event.kind", max_len=64)
        if not _KIND.fullmatch(kind):
            raise MalformedMessage(f"event.kind: expected a dotted lowercase name, got {kind!r}")
        if self.device is not None:
            ids.device_id(self.device)
        _reasons(self.reasons, "event.reasons")
        _text(self.detail, "event.detail", 2 * 1024)
        cbor.expect_int(self.at_s, what="event.at_s", lo=0, hi=_U63)

    def encode(self) -> bytes:
        """The JSON payload."""
        return _json_encode(
            {
                "type": self.KIND,
                "v": VERSION,
                "kind": self.kind,
                "device": self.device,
                "reasons": [code.value for code in self.reasons],
                "detail": self.detail,
                "at_s": self.at_s,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode an event.

        Raises:
            MalformedMessage: ``data`` is not a well-formed event.
        """
        f = _json_open(data, kind=cls.KIND, max_bytes=cls.MAX_BYTES, members=cls._MEMBERS)
        device = f.opt_raw("device")
        return cls(
            kind=f.get_str("kind", max_len=64),
            device=None
            if device is None
            else ids.device_id(cbor.expect_str(device, what="event.device")),
            reasons=_json_reasons(f, "reasons"),
            detail=f.get_str("detail", max_len=2 * 1024),
            at_s=f.get_int("at_s"),
        )
