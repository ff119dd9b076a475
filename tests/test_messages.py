"""MQTT payloads (DESIGN §9): round trips, strict decoding, size limits."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor
from protocol.errors import MalformedMessage
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.messages import (
    ATTEST_MAX_BYTES,
    CHUNK_MAX_BYTES,
    CHUNK_MAX_DATA,
    COMMAND_MAX_BYTES,
    FETCH_MAX_BYTES,
    MAX_CERTIFICATE_BYTES,
    MAX_COUNTERS,
    MAX_REASONS,
    MAX_TELEMETRY_PAYLOAD,
    MAX_TOKEN_BYTES,
    STATUS_MAX_BYTES,
    TELEMETRY_MAX_BYTES,
    Challenge,
    Chunk,
    CommandEnvelope,
    Event,
    Evidence,
    FetchRequest,
    FleetState,
    Hello,
    HelloState,
    MessageType,
    Refusal,
    Status,
    Telemetry,
    Verdict,
    decode_attest_down,
    decode_attest_up,
)
from protocol.reasons import ReasonCode
from protocol.reasons import Status as ResultStatus
from tests.cbor_strategies import cbor_values

SESSION = SessionId(bytes(range(16)))
DEVICE = DeviceId("dev-0001")
RELEASE = ReleaseId(hashlib.sha256(b"manifest").hexdigest())

# --- strategies ----------------------------------------------------------------------------------

sessions = st.binary(min_size=16, max_size=16).map(SessionId)
devices = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).map(DeviceId)
releases = st.binary(min_size=32, max_size=32).map(lambda d: ReleaseId(d.hex()))
tokens = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
counters = st.dictionaries(tokens, st.integers(0, 2**32 - 1), max_size=4).map(
    lambda d: tuple(d.items())
)
reason_lists = st.lists(st.sampled_from(list(ReasonCode)), max_size=5).map(tuple)
times = st.integers(0, 2**40)

challenges = st.builds(
    Challenge,
    session_id=sessions,
    device_id=devices,
    nonce=st.binary(min_size=32, max_size=32),
    expires_s=times,
    mac=st.binary(min_size=32, max_size=32),
)
hellos = st.builds(
    Hello,
    session_id=sessions,
    certificates=st.lists(st.binary(max_size=64), max_size=2).map(tuple),
    requested_release=st.none() | releases,
    state=st.sampled_from(list(HelloState)),
    counters=counters,
)
evidences = st.builds(
    Evidence,
    session_id=sessions,
    token=st.binary(min_size=1, max_size=200),
    enclave_key=st.binary(min_size=32, max_size=32),
    challenge=challenges,
)


@st.composite
def verdicts(draw: st.DrawFn) -> Verdict:
    """Verdicts with and without a release and grant."""
    release = draw(st.none() | releases)
    return Verdict(
        session_id=draw(sessions),
        result=draw(st.binary(max_size=200)),
        grant=None if release is None else draw(st.none() | st.binary(min_size=80, max_size=80)),
        release_id=release,
        image_size=None if release is None else draw(st.integers(1, 64 << 20)),
    )


refusals = st.builds(
    Refusal,
    session_id=sessions,
    reasons=st.lists(st.sampled_from(list(ReasonCode)), min_size=1, max_size=5).map(tuple),
)
fetches = st.builds(
    FetchRequest,
    release_id=releases,
    offset=st.integers(0, 64 << 20),
    length=st.integers(1, CHUNK_MAX_DATA),
    session_id=st.none() | sessions,
)


@st.composite
def chunks(draw: st.DrawFn) -> Chunk:
    """Chunks that lie inside their image."""
    data = draw(st.binary(max_size=100))
    offset = draw(st.integers(0, 10_000))
    return Chunk(
        release_id=draw(releases),
        offset=offset,
        data=data,
        total_size=offset + len(data) + draw(st.integers(1, 1000)),
        session_id=draw(st.none() | sessions),
    )


statuses = st.builds(
    Status,
    state=tokens,
    version=st.none() | st.text(max_size=20),
    counters=counters,
    boot_count=st.integers(0, 2**32 - 1),
    running=st.booleans(),
    detail=st.text(max_size=50),
)
telemetries = st.builds(
    Telemetry, seq=st.integers(0, 2**63 - 1), payload=st.binary(max_size=200), ts_ms=times
)
commands = st.builds(CommandEnvelope, command=st.binary(min_size=1, max_size=200))
fleet_states = st.builds(
    FleetState,
    device=devices,
    verdict=st.none() | st.sampled_from(list(ResultStatus)),
    status=st.none() | tokens,
    firmware=st.none() | st.text(max_size=20),
    last_seen_s=times,
    reasons=reason_lists,
)
events = st.builds(
    Event,
    kind=st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z][a-z0-9_]{0,8}){0,2}", fullmatch=True),
    device=st.none() | devices,
    reasons=reason_lists,
    detail=st.text(max_size=50),
    at_s=times,
)

ALL: list[tuple[type[Any], st.SearchStrategy[Any]]] = [
    (Hello, hellos),
    (Evidence, evidences),
    (Challenge, challenges),
    (Verdict, verdicts()),
    (Refusal, refusals),
    (FetchRequest, fetches),
    (Chunk, chunks()),
    (Status, statuses),
    (Telemetry, telemetries),
    (CommandEnvelope, commands),
    (FleetState, fleet_states),
    (Event, events),
]
DECODERS: list[Callable[[bytes], object]] = [cls.decode for cls, _ in ALL] + [
    decode_attest_up,
    decode_attest_down,
]


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "strategy"), ALL, ids=[cls.__name__ for cls, _ in ALL])
def test_message_round_trip(cls: type[Any], strategy: st.SearchStrategy[Any]) -> None:
    """Every message decodes to itself and re-encodes to the same bytes."""

    @settings(max_examples=100, deadline=None)
    @given(message=strategy)
    def check(message: Any) -> None:
        data = message.encode()
        assert isinstance(data, bytes)
        assert len(data) <= cls.MAX_BYTES
        decoded = cls.decode(data)
        assert decoded == message
        assert decoded.encode() == data
        if not isinstance(message, FleetState | Event):  # CBOR: canonical, however it was built
            assert cbor.dumps(cbor.loads(data, what="message")) == data

    check()


@settings(max_examples=100, deadline=None)
@given(message=st.one_of(hellos, evidences))
def test_decode_attest_up_dispatches(message: Hello | Evidence) -> None:
    """The up-attest decoder returns a hello or evidence as sent."""
    assert decode_attest_up(message.encode()) == message


@settings(max_examples=100, deadline=None)
@given(message=st.one_of(challenges, verdicts(), refusals))
def test_decode_attest_down_dispatches(message: Challenge | Verdict | Refusal) -> None:
    """The down-attest decoder returns a challenge, verdict or refusal as sent."""
    assert decode_attest_down(message.encode()) == message


def test_attest_decoders_refuse_other_direction() -> None:
    """A down message on the up topic, or the reverse, is malformed."""
    challenge = _challenge()
    hello = Hello(SESSION, (), None, HelloState.BOOT)
    with pytest.raises(MalformedMessage, match="HELLO or EVIDENCE"):
        decode_attest_up(challenge.encode())
    with pytest.raises(MalformedMessage, match="CHALLENGE, VERDICT or REFUSAL"):
        decode_attest_down(hello.encode())
    with pytest.raises(MalformedMessage, match="expected HELLO"):
        Hello.decode(challenge.encode())


# --- arbitrary and hostile input -----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_decoders_given_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    """Arbitrary bytes make every decoder raise MalformedMessage or succeed, nothing else."""
    for decode in DECODERS:
        with contextlib.suppress(MalformedMessage):
            decode(data)


_cbor_values = cbor_values(int_bits=64, max_binary=40, max_text=20, keys=st.integers(-2, 8))


@settings(max_examples=200, deadline=None)
@given(
    mtype=st.sampled_from(list(MessageType)),
    body=st.dictionaries(st.integers(2, 8), _cbor_values, max_size=7),
)
def test_decoders_given_structured_garbage_raise_only_malformed(
    mtype: MessageType, body: dict[int, object]
) -> None:
    """Well-formed CBOR maps with the right envelope but arbitrary fields raise only Malformed."""
    data = cbor.dumps({0: int(mtype), 1: 1, **body})
    for decode in DECODERS:
        with contextlib.suppress(MalformedMessage):
            decode(data)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["fleet_state", "event"]),
    body=st.dictionaries(
        st.sampled_from(["device", "verdict", "status", "firmware", "last_seen_s", "reasons",
                         "kind", "detail", "at_s", "x"]),
        _json_values,
    ),
)  # fmt: skip
def test_json_decoders_given_structured_garbage_raise_only_malformed(
    kind: str, body: dict[str, object]
) -> None:
    """JSON objects with the right envelope but arbitrary members raise only MalformedMessage."""
    data = json.dumps({"type": kind, "v": 1, **body}).encode()
    for decode in (FleetState.decode, Event.decode):
        with contextlib.suppress(MalformedMessage):
            decode(data)


def _challenge() -> Challenge:
    return Challenge(SESSION, DEVICE, bytes(32), 1_800_000_000, bytes(range(32)))


def test_envelope_checks() -> None:
    """A wrong version, unknown type, trailing bytes, extra keys or non-bytes are refused."""
    good = cbor.loads(_challenge().encode(), what="t")
    assert isinstance(good, dict)
    cases: list[object] = [
        cbor.dumps({**good, 1: 2}),
        cbor.dumps({**good, 0: 99}),
        cbor.dumps({**good, 9: 0}),
        _challenge().encode() + b"\x00",
        _challenge().encode()[:-1],
        cbor.dumps([1, 1]),
        "not bytes",
    ]
    for data in cases:
        with pytest.raises(MalformedMessage):
            Challenge.decode(data)  # type: ignore[arg-type]


def test_challenge_mac_input() -> None:
    """The MAC input is canonical CBOR of [device, session, expires_s, nonce]."""
    challenge = _challenge()
    assert challenge.mac_input() == cbor.dumps([DEVICE, SESSION, 1_800_000_000, bytes(32)])


def test_evidence_embeds_challenge_fields() -> None:
    """The evidence carries the challenge's fields, which decode back to the same challenge."""
    evidence = Evidence(SESSION, b"token", bytes(32), _challenge())
    decoded = Evidence.decode(evidence.encode())
    assert decoded.challenge == _challenge()
    assert decoded.challenge.mac_input() == _challenge().mac_input()


def test_evidence_refuses_envelope_keys_in_echoed_challenge() -> None:
    """The echoed challenge carries keys 2-6 only; type and version keys inside it are refused."""
    evidence = cbor.loads(Evidence(SESSION, b"t", bytes(32), _challenge()).encode(), what="t")
    assert isinstance(evidence, dict)
    nested = {**evidence[5], 0: 3, 1: 1}
    with pytest.raises(MalformedMessage, match="unexpected field"):
        Evidence.decode(cbor.dumps({**evidence, 5: nested}))


def test_counters_are_normalized() -> None:
    """Counters are stored sorted by name whatever order the caller gives."""
    hello = Hello(SESSION, (), None, HelloState.UPDATE, (("zeta", 1), ("app", 3)))
    assert hello.counters == (("app", 3), ("zeta", 1))
    with pytest.raises(MalformedMessage, match="duplicate"):
        Hello(SESSION, (), None, HelloState.UPDATE, (("app", 1), ("app", 2)))


# --- size limits and field checks ----------------------------------------------------------------


def test_maximal_messages_fit_their_limits() -> None:
    """The largest legal message of each kind still fits its payload limit."""
    big: list[Any] = [
        Hello(
            SESSION,
            (bytes(MAX_CERTIFICATE_BYTES),) * 2,
            RELEASE,
            HelloState.REATTEST,
            tuple((f"c{i:02}" + "x" * 28, 2**32 - 1) for i in range(MAX_COUNTERS)),
        ),
        Evidence(SESSION, bytes(MAX_TOKEN_BYTES), bytes(32), _challenge()),
        Verdict(SESSION, bytes(4096), bytes(80), RELEASE, 64 << 20),
        Refusal(SESSION, (ReasonCode.EVIDENCE_PROFILE_UNSUPPORTED,) * MAX_REASONS),
        FetchRequest(RELEASE, 64 << 20, CHUNK_MAX_DATA, SESSION),
        Chunk(RELEASE, 0, bytes(CHUNK_MAX_DATA), 64 << 20, SESSION),
        Status(
            "s" * 32,
            "v" * 64,
            tuple((f"c{i:02}" + "x" * 28, 2**32 - 1) for i in range(MAX_COUNTERS)),
            2**32 - 1,
            True,
            "\u20ac" * 256,
        ),
        Telemetry(2**63 - 1, bytes(MAX_TELEMETRY_PAYLOAD), 2**63 - 1),
        CommandEnvelope(bytes(4096)),
    ]
    for message in big:
        assert len(message.encode()) <= message.MAX_BYTES, type(message).__name__


@pytest.mark.parametrize(
    ("decode", "limit"),
    [
        (Hello.decode, ATTEST_MAX_BYTES),
        (decode_attest_down, ATTEST_MAX_BYTES),
        (FetchRequest.decode, FETCH_MAX_BYTES),
        (Chunk.decode, CHUNK_MAX_BYTES),
        (Status.decode, STATUS_MAX_BYTES),
        (Telemetry.decode, TELEMETRY_MAX_BYTES),
        (CommandEnvelope.decode, COMMAND_MAX_BYTES),
        (FleetState.decode, 4096),
        (Event.decode, 8192),
    ],
)
def test_oversize_payloads_are_refused(decode: Callable[[bytes], object], limit: int) -> None:
    """A payload one byte over its limit is refused before it is parsed."""
    with pytest.raises(MalformedMessage, match="exceeds the limit"):
        decode(bytes(limit + 1))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Hello(SessionId(bytes(15)), (), None, HelloState.BOOT), "session_id"),
        (lambda: Hello(SESSION, (b"",) * 3, None, HelloState.BOOT), "certificates"),
        (lambda: Hello(SESSION, (bytes(4097),), None, HelloState.BOOT), "certificates"),
        (lambda: Hello(SESSION, (), ReleaseId("xyz"), HelloState.BOOT), "requested_release"),
        (lambda: Hello(SESSION, (), None, "boot"), "state"),  # type: ignore[arg-type]
        (lambda: Hello(SESSION, (), None, HelloState.BOOT, (("Bad", 1),)), "counters"),
        (lambda: Hello(SESSION, (), None, HelloState.BOOT, (("a", -1),)), "counters"),
        (lambda: Hello(SESSION, (), None, HelloState.BOOT, [("a", 1)]), "counters"),  # type: ignore[arg-type]
        (lambda: Challenge(SESSION, DeviceId("a/b"), bytes(32), 0, bytes(32)), "device id"),
        (lambda: Challenge(SESSION, DEVICE, bytes(31), 0, bytes(32)), "nonce"),
        (lambda: Challenge(SESSION, DEVICE, bytes(32), -1, bytes(32)), "expires_s"),
        (lambda: Challenge(SESSION, DEVICE, bytes(32), 0, bytes(16)), "mac"),
        (lambda: Evidence(SESSION, b"", bytes(32), _challenge()), "token"),
        (lambda: Evidence(SESSION, bytes(MAX_TOKEN_BYTES + 1), bytes(32), _challenge()), "token"),
        (lambda: Evidence(SESSION, b"t", bytes(33), _challenge()), "enclave_key"),
        (lambda: Evidence(SESSION, b"t", bytes(32), None), "challenge"),  # type: ignore[arg-type]
        (lambda: Verdict(SESSION, bytes(4097)), "result"),
        (lambda: Verdict(SESSION, b"r", bytes(79), RELEASE, 1), "grant"),
        (lambda: Verdict(SESSION, b"r", bytes(80)), "release_id"),
        (lambda: Verdict(SESSION, b"r", None, RELEASE), "image_size"),
        (lambda: Verdict(SESSION, b"r", None, RELEASE, 0), "image_size"),
        (lambda: Refusal(SESSION, ()), "reasons"),
        (lambda: Refusal(SESSION, ("device.revoked",)), "reasons"),  # type: ignore[arg-type]
        (lambda: FetchRequest(RELEASE, 0, 0), "length"),
        (lambda: FetchRequest(RELEASE, 0, CHUNK_MAX_DATA + 1), "length"),
        (lambda: FetchRequest(RELEASE, -1, 1), "offset"),
        (lambda: FetchRequest(RELEASE, 0, 1, SessionId(b"")), "session_id"),
        (lambda: Chunk(RELEASE, 10, bytes(10), 15), "total_size"),
        (lambda: Chunk(RELEASE, 0, bytes(CHUNK_MAX_DATA + 1), 1 << 20), "data"),
        (lambda: Chunk(RELEASE, 0, b"", 0), "total_size"),
        (lambda: Chunk(RELEASE, 0, b"x", 5, SessionId(b"x")), "session_id"),
        (lambda: Status("Running", None, (), 0, True), "state"),
        (lambda: Status("running", "v" * 65, (), 0, True), "version"),
        (lambda: Status("running", None, (), 0, 1), "running"),  # type: ignore[arg-type]
        (lambda: Status("running", None, (), 0, True, "\ud800"), "UTF-8"),
        (lambda: Telemetry(0, bytes(MAX_TELEMETRY_PAYLOAD + 1), 0), "payload"),
        (lambda: Telemetry(-1, b"", 0), "seq"),
        (lambda: CommandEnvelope(b""), "command"),
        (lambda: CommandEnvelope(bytes(4097)), "command"),
        (lambda: FleetState(DEVICE, "affirming", None, None, 0), "verdict"),  # type: ignore[arg-type]
        (lambda: FleetState(DEVICE, None, "Bad State", None, 0), "status"),
        (lambda: FleetState(DEVICE, None, None, "x" * 65, 0), "firmware"),
        (lambda: FleetState(DEVICE, None, None, None, -5), "last_seen_s"),
        (lambda: Event("Verdict", None, (), "", 0), "kind"),
        (lambda: Event("a..b", None, (), "", 0), "kind"),
        (lambda: Event("verdict", DeviceId(""), (), "", 0), "device id"),
    ],
)
def test_constructors_validate_fields(build: Callable[[], object], match: str) -> None:
    """Constructors refuse out-of-range fields with a MalformedMessage naming the field."""
    with pytest.raises(MalformedMessage, match=match):
        build()


def test_hello_refuses_unknown_state_on_the_wire() -> None:
    """An unknown hello state is malformed."""
    hello = cbor.loads(Hello(SESSION, (), None, HelloState.BOOT).encode(), what="t")
    assert isinstance(hello, dict)
    with pytest.raises(MalformedMessage, match=r"hello\.state"):
        Hello.decode(cbor.dumps({**hello, 5: "party"}))


def test_counters_limit_on_the_wire() -> None:
    """More counters than allowed are refused while decoding."""
    hello = cbor.loads(Hello(SESSION, (), None, HelloState.BOOT).encode(), what="t")
    assert isinstance(hello, dict)
    many = {f"c{i}": 1 for i in range(MAX_COUNTERS + 1)}
    with pytest.raises(MalformedMessage, match="counters"):
        Hello.decode(cbor.dumps({**hello, 6: many}))


# --- JSON ----------------------------------------------------------------------------------------


def test_fleet_state_json_is_compact_and_sorted() -> None:
    """Fleet state is compact UTF-8 JSON with sorted keys and explicit nulls."""
    state = FleetState(
        DEVICE, ResultStatus.WARNING, "running", "1.2.0", 5, (ReasonCode.COUNTER_BELOW_EPOCH,)
    )
    assert state.encode() == (
        b'{"device":"dev-0001","firmware":"1.2.0","last_seen_s":5,'
        b'"reasons":["counter.below_epoch"],"status":"running","type":"fleet_state","v":1,'
        b'"verdict":"warning"}'
    )
    empty = FleetState(DEVICE, None, None, None, 0)
    assert json.loads(empty.encode())["verdict"] is None


def test_event_json_utf8() -> None:
    """Events keep non-ASCII text as UTF-8, not escapes."""
    event = Event("alert.leak", DEVICE, (), "température", 7)
    assert "température".encode() in event.encode()
    assert Event.decode(event.encode()) == event


@pytest.mark.parametrize(
    "text",
    [
        b'{"type":"event","v":1,"kind":"a","device":null,"reasons":[],"detail":"","at_s":NaN}',
        b'{"type":"event","v":1,"kind":"a","kind":"b","device":null,"reasons":[],"detail":"",'
        b'"at_s":1}',
        b'{"type":"event","v":2,"kind":"a","device":null,"reasons":[],"detail":"","at_s":1}',
        b'{"type":"fleet_state","v":1,"kind":"a","device":null,"reasons":[],"detail":"","at_s":1}',
        b'{"type":"event","v":1,"kind":"a","reasons":[],"detail":"","at_s":1}',
        b'{"type":"event","v":1,"kind":"a","device":null,"reasons":[],"detail":"","at_s":1,"x":0}',
        b'{"type":"event","v":1,"kind":"a","device":null,"reasons":["x"],"detail":"","at_s":1}',
        b'{"type":"event","v":1,"kind":"a","device":null,"reasons":[],"detail":"","at_s":1.5}',
        b'{"type":"event","v":1,"kind":"a","device":null,"reasons":[],"detail":"","at_s":true}',
        b'{"type":"event","v":1,"kind":"a","device":null,"reasons":[],"detail":"\\ud800","at_s":1}',
        b"\xff\xfe",
        b"[" * 5000,
        b"[]",
    ],
)
def test_event_decode_refuses_bad_json(text: bytes) -> None:
    """NaN, duplicates, wrong version or type, missing or extra members, bad text are refused."""
    with pytest.raises(MalformedMessage):
        Event.decode(text)


def test_fleet_state_decode_refuses_bad_verdict() -> None:
    """An unknown verdict name is malformed."""
    data = (
        FleetState(DEVICE, None, None, None, 0)
        .encode()
        .replace(b'"verdict":null', b'"verdict":"ok"')
    )
    with pytest.raises(MalformedMessage, match="verdict"):
        FleetState.decode(data)
    with pytest.raises(MalformedMessage, match="expected bytes"):
        FleetState.decode("{}")  # type: ignore[arg-type]
