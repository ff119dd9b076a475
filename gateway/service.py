"""The gateway's MQTT service core: topic → handler, rate limits, counters (DESIGN §9–§10).

Sans-IO-ish: ``GatewayService.handle(topic, payload)`` is called by the MQTT adapter for every
message on the device up topics and publishes through a ``Publisher``; the clock and the RNG are
injected. Rules:

- The device id is the topic's, never the payload's (docs/protocol.md §1).
- Attestation is stateless (DESIGN §9): every payload on ``…/up/attest`` goes to a fresh
  ``VerifierSession``; evidence is checked against the MAC of the challenge it echoes, so any
  instance sharing the challenge secret can answer it.
- Every message received is counted under exactly one reason in ``counters`` (``Counter[str]``):
  what was done with it (``attest.challenge``, ``fetch.served``, ...) or why it was dropped
  (``topic.malformed``, ``payload.oversized``, ``attest.malformed``, ``rate.limited``, ...).
  Drops are logged at most once per reason per ``LOG_INTERVAL_S``.
- Payloads are bounded before decoding (each message type's ``MAX_BYTES``); each device has a
  token bucket per channel class; an attestation over its budget is answered ``rate.limited``
  when the payload carries a session id to answer.
- Nothing here catches ``Exception``: an unexpected failure escapes to the adapter's callback
  boundary, which logs it and calls ``internal_error`` (counted ``internal.error``).
- Each verdict on evidence that answers a challenge this gateway issued is recorded (appraised
  ones by the hooks, earlier refusals by the ``VerdictRecorder``) and announced: a JSON ``Event``
  on ``{prefix}/events`` and the retained ``FleetState`` on ``{prefix}/fleet/{device}/state``.
  Refused hellos and forged challenges are counted, not recorded, so a flood cannot fill the
  ledger.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from gateway import db
from gateway.chunks import ChunkServer, FetchRefusal, Served
from gateway.commands import CommandIssuer
from gateway.explain import explain
from gateway.hooks import RegistryHooks
from gateway.kms import Kms
from gateway.ledger import Ledger
from gateway.mqtt import BrokerAddress, MqttClient
from gateway.policy import RegistryPolicy
from gateway.registry import Registry
from gateway.state import Workspace
from protocol import messages, topics
from protocol.errors import MalformedMessage, RemoteProtocolError, TransportError
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.reasons import ReasonCode, Status
from protocol.results import CommandKind, Signer
from protocol.verifier import (
    Accepted,
    ChallengeIssued,
    Rejected,
    VerifierConfig,
    VerifierHooks,
    VerifierSession,
)

_log = logging.getLogger(__name__)

#: A drop reason is logged at most once per this many seconds.
LOG_INTERVAL_S: Final = 60
#: How often ``ServiceRunner.run`` checkpoints the SQLite WAL (``db.WalCheckpointer``).
WAL_CHECKPOINT_EVERY_S: Final = 0.2
#: By default, a retained fleet state that would differ only in its last-seen time is published
#: again only once this many seconds (gateway time) have passed since it was last published.
FLEET_STATE_REFRESH_S: Final = 60
#: Devices whose rate-limit buckets are remembered (least recently seen forgotten first).
MAX_TRACKED_DEVICES: Final = 100_000
INTERNAL_ERROR: Final = "internal.error"
RATE_LIMITED: Final = "rate.limited"

_LIMITS: Final = {
    topics.Channel.ATTEST: messages.ATTEST_MAX_BYTES,
    topics.Channel.FETCH: messages.FETCH_MAX_BYTES,
    topics.Channel.STATUS: messages.STATUS_MAX_BYTES,
    topics.Channel.TELEMETRY: messages.TELEMETRY_MAX_BYTES,
}


class Publisher(Protocol):
    """Where the service publishes (the MQTT adapter, or a list in tests)."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue one message."""
        ...


class VerdictRecorder(Protocol):
    """Keeps each verdict on verified evidence (registry, ledger, receipts)."""

    def record(
        self, device: DeviceId, session: SessionId, event: Accepted | Rejected, now_s: int
    ) -> None:
        """Record one verdict."""
        ...


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket's shape: ``capacity`` tokens, refilled at ``per_s`` tokens a second."""

    capacity: float
    per_s: float


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per-device budgets, one bucket per channel class."""

    attest: Bucket = Bucket(capacity=20, per_s=2)
    fetch: Bucket = Bucket(capacity=256, per_s=200)
    other: Bucket = Bucket(capacity=30, per_s=5)

    def for_channel(self, channel: topics.Channel) -> Bucket:
        """The bucket shape of ``channel``."""
        if channel is topics.Channel.ATTEST:
            return self.attest
        if channel is topics.Channel.FETCH:
            return self.fetch
        return self.other


@dataclass(slots=True)
class _Tokens:
    level: float
    at: float


class RateLimiter:
    """Token buckets per (device, channel class), bounded in the number of devices."""

    def __init__(self, limits: RateLimits, *, max_devices: int = MAX_TRACKED_DEVICES) -> None:
        """Limit with ``limits``, remembering at most ``max_devices`` devices."""
        self._limits = limits
        self._max = max_devices
        self._buckets: OrderedDict[tuple[DeviceId, str], _Tokens] = OrderedDict()

    def allow(self, device: DeviceId, channel: topics.Channel, now: float) -> bool:
        """Take one token for ``device`` on ``channel``; False when its bucket is empty."""
        shape = self._limits.for_channel(channel)
        key = (device, self._class(channel))
        tokens = self._buckets.pop(key, None) or _Tokens(shape.capacity, now)
        tokens.level = min(shape.capacity, tokens.level + max(0.0, now - tokens.at) * shape.per_s)
        tokens.at = now
        allowed = tokens.level >= 1
        if allowed:
            tokens.level -= 1
        self._buckets[key] = tokens
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return allowed

    @staticmethod
    def _class(channel: topics.Channel) -> str:
        if channel in (topics.Channel.ATTEST, topics.Channel.FETCH):
            return channel.value
        return "other"


@dataclass(slots=True)
class _FleetEntry:
    verdict: Status | None = None
    status: str | None = None
    firmware: str | None = None
    reasons: tuple[ReasonCode, ...] = ()
    #: What the last published state showed (all but the time), and when it was published.
    published: tuple[object, ...] | None = None
    published_at_s: int = 0


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """What the service needs besides its collaborators."""

    prefix: str = topics.DEFAULT_PREFIX
    limits: RateLimits = field(default_factory=RateLimits)
    #: An unchanged fleet state is published again after this many seconds (0: every time).
    fleet_state_refresh_s: int = FLEET_STATE_REFRESH_S


class GatewayService:
    """Maps device topics to handlers; one instance per MQTT connection."""

    def __init__(
        self,
        config: VerifierConfig,
        hooks: VerifierHooks,
        registry: Registry,
        publisher: Publisher,
        *,
        recorder: VerdictRecorder,
        commands: CommandIssuer,
        settings: ServiceSettings | None = None,
        clock: Callable[[], float],
        randomness: Callable[[int], bytes],
    ) -> None:
        """Wire the service.

        Args:
            config: verifier settings (shared challenge secret, result signer).
            hooks: enrollment lookup, single use, appraisal and key release.
            registry: the registry (devices, assignments, releases).
            publisher: where replies, events and fleet states go.
            recorder: keeps verdicts on verified evidence.
            commands: numbers, signs and records commands.
            settings: topic prefix and rate limits.
            clock: gateway time in seconds (``time.time``).
            randomness: random bytes (``os.urandom``).
        """
        self._config = config
        self._hooks = hooks
        self._registry = registry
        self._publisher = publisher
        self._recorder = recorder
        self._commands = commands
        self._settings = settings or ServiceSettings()
        self._clock = clock
        self._randomness = randomness
        self._chunks = ChunkServer(registry)
        self._limiter = RateLimiter(self._settings.limits)
        self._fleet: dict[DeviceId, _FleetEntry] = {}
        self._counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._logged_at: dict[str, float] = {}

    # --- counters

    @property
    def counters(self) -> Counter[str]:
        """A snapshot of the per-reason message counts."""
        with self._lock:
            return Counter(self._counters)

    def total(self) -> int:
        """How many messages have been counted."""
        with self._lock:
            return sum(self._counters.values())

    def wait_for_total(self, total: int, timeout_s: float) -> bool:
        """Wait until at least ``total`` messages are counted; False on timeout (for tests)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: sum(self._counters.values()) >= total, timeout=timeout_s
            )

    def internal_error(self, error: BaseException) -> None:
        """The adapter's report of an exception that escaped ``handle``."""
        self._count(INTERNAL_ERROR, f"{type(error).__name__}: {error}")

    def _count(self, reason: str, detail: str | None = None) -> None:
        with self._changed:
            self._counters[reason] += 1
            self._changed.notify_all()
        if detail is None:
            return
        now = self._clock()
        last = self._logged_at.get(reason)
        if last is None or now - last >= LOG_INTERVAL_S:
            self._logged_at[reason] = now
            _log.warning("%s: %s", reason, detail[:300])

    # --- dispatch

    def handle(self, topic: str, payload: bytes) -> None:
        """Handle one message from a device up topic."""
        try:
            ref = topics.parse_topic(topic, self._settings.prefix)
        except MalformedMessage as err:
            self._count("topic.malformed", str(err))
            return
        if ref.direction is not topics.Direction.UP:
            self._count("topic.malformed", f"not an up topic: {topic:.80}")
            return
        channel = ref.channel
        if len(payload) > _LIMITS[channel]:
            self._count("payload.oversized", f"{len(payload)} bytes on {channel}")
            return
        if not self._limiter.allow(ref.device_id, channel, self._clock()):
            self._rate_limited(ref.device_id, channel, payload)
            return
        handler = {
            topics.Channel.ATTEST: self._on_attest,
            topics.Channel.FETCH: self._on_fetch,
            topics.Channel.STATUS: self._on_status,
            topics.Channel.TELEMETRY: self._on_telemetry,
        }[channel]
        handler(ref.device_id, payload)

    def _now_s(self) -> int:
        return int(self._clock())

    def _rate_limited(self, device: DeviceId, channel: topics.Channel, payload: bytes) -> None:
        self._count(RATE_LIMITED, f"device {device} on {channel}")
        if channel is not topics.Channel.ATTEST:
            return
        try:
            session = messages.decode_attest_up(payload).session_id
        except MalformedMessage:
            return
        refusal = messages.Refusal(session_id=session, reasons=(ReasonCode.RATE_LIMITED,))
        self._publish(topics.attest_down(device, prefix=self._settings.prefix), refusal.encode())

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        self._publisher.publish(topic, payload, qos=qos, retain=retain)

    # --- attestation

    def _on_attest(self, device: DeviceId, payload: bytes) -> None:
        try:
            message = messages.decode_attest_up(payload)
        except MalformedMessage as err:
            self._count("attest.malformed", str(err))
            return
        session = VerifierSession(self._config, self._hooks, device)
        now_s = self._now_s()
        try:
            event = session.receive_message(message, now_s=now_s, randomness=self._randomness)
        except RemoteProtocolError as err:
            self._count("attest.malformed", str(err))
            return
        # Record, then count, then reply: whoever sees the reply sees the verdict and the count.
        announce = self._recorded(device, message, event, now_s)
        if isinstance(event, ChallengeIssued):
            self._count("attest.challenge")
        elif isinstance(event, Accepted):
            self._count("attest.accepted")
        else:
            self._count(
                f"attest.refused.{event.reasons[0]}", self._refusal_detail(device, event, announce)
            )
        self._publish(topics.attest_down(device, prefix=self._settings.prefix), event.payload)
        if announce is not None:
            self._announce(device, announce, now_s)

    @staticmethod
    def _refusal_detail(
        device: DeviceId, event: Rejected, recorded: Accepted | Rejected | None
    ) -> str:
        """The log line's detail: for a refusal nobody records, the explainer's cause and fix."""
        if recorded is not None:
            return f"device {device}: see 'edgeseal-gateway device {device}'"
        advice = explain(event.reasons[0], device=device)
        return f"device {device} (not recorded): {advice.cause} Fix: {advice.fix}"

    def _recorded(
        self,
        device: DeviceId,
        message: messages.AttestUp,
        event: ChallengeIssued | Accepted | Rejected,
        now_s: int,
    ) -> Accepted | Rejected | None:
        """Record a verdict worth keeping; return it when it is to be announced.

        Only evidence answering a challenge this gateway issued counts: anyone can send hellos
        and forged challenges, and those must not fill the registry and the ledger.
        """
        if isinstance(event, ChallengeIssued) or not isinstance(message, messages.Evidence):
            return None
        if isinstance(event, Rejected) and event.reasons == (ReasonCode.CHALLENGE_INVALID,):
            return None
        self._recorder.record(device, message.session_id, event, now_s)
        return event

    def _announce(self, device: DeviceId, event: Accepted | Rejected, now_s: int) -> None:
        """The JSON event and the retained fleet state of a verdict."""
        if isinstance(event, Accepted):
            status, reasons = event.result.status, event.result.reasons
        else:
            status, reasons = Status.CONTRAINDICATED, event.reasons
        announcement = messages.Event(
            kind="verdict",
            device=device,
            reasons=reasons,
            detail=f"{status.value}",
            at_s=now_s,
        )
        # QoS 0: the event stream is a live feed (at most once); the retained fleet state, the
        # registry and the ledger are the record (docs/protocol.md §1).
        self._publish(topics.events(prefix=self._settings.prefix), announcement.encode(), qos=0)
        entry = self._fleet.setdefault(device, _FleetEntry())
        entry.verdict, entry.reasons = status, reasons
        self._publish_state(device, now_s)

    def _publish_state(self, device: DeviceId, now_s: int) -> None:
        """Publish the device's retained state when something in it changed, or when the last one
        published is ``FLEET_STATE_REFRESH_S`` old: a fleet re-attesting in a steady state does
        not rewrite every device's retained message at every attestation (``ServiceSettings``)."""
        entry = self._fleet.setdefault(device, _FleetEntry())
        shown = (entry.verdict, entry.status, entry.firmware, entry.reasons)
        refresh_s = self._settings.fleet_state_refresh_s
        if shown == entry.published and now_s - entry.published_at_s < refresh_s:
            return
        entry.published, entry.published_at_s = shown, now_s
        state = messages.FleetState(
            device=device,
            verdict=entry.verdict,
            status=entry.status,
            firmware=entry.firmware,
            last_seen_s=now_s,
            reasons=entry.reasons,
        )
        topic = topics.fleet_state(device, prefix=self._settings.prefix)
        self._publish(topic, state.encode(), retain=True)

    # --- image download

    def _on_fetch(self, device: DeviceId, payload: bytes) -> None:
        try:
            request = messages.FetchRequest.decode(payload)
        except MalformedMessage as err:
            self._count("fetch.malformed", str(err))
            return
        outcome = self._chunks.serve(device, request)
        if isinstance(outcome, FetchRefusal):
            self._count(outcome.value, f"device {device}, release {request.release_id:.16}")
            return
        self._served(device, outcome)

    def _served(self, device: DeviceId, served: Served) -> None:
        self._count("fetch.served")
        topic = topics.chunk_down(device, prefix=self._settings.prefix)
        self._publish(topic, served.chunk.encode())

    # --- status and telemetry

    def _on_status(self, device: DeviceId, payload: bytes) -> None:
        try:
            status = messages.Status.decode(payload)
        except MalformedMessage as err:
            self._count("status.malformed", str(err))
            return
        if device not in self._fleet and self._registry.find_device(device) is None:
            self._count("status.unknown_device", f"device {device}")
            return
        entry = self._fleet.setdefault(device, _FleetEntry())
        entry.status, entry.firmware = status.state, status.version
        self._count("status.recorded")
        self._publish_state(device, self._now_s())

    def _on_telemetry(self, device: DeviceId, payload: bytes) -> None:
        try:
            messages.Telemetry.decode(payload)
        except MalformedMessage as err:
            self._count("telemetry.malformed", str(err))
            return
        self._count("telemetry.received")

    # --- commands

    def send_command(
        self, device: DeviceId, kind: CommandKind, release: ReleaseId | None = None
    ) -> int:
        """Sign, record and publish a command to ``device``; returns its sequence number.

        Raises:
            UnknownDevice: the device is not enrolled.
        """
        outgoing = self._commands.issue(device, kind, release)
        self._publish(outgoing.topic, outgoing.payload)
        return outgoing.command.seq


# --- recording verdicts ---------------------------------------------------------------------------


class HooksRecorder:
    """Records what ``RegistryHooks.appraise`` did not: refusals made before any appraisal."""

    def __init__(self, hooks: RegistryHooks) -> None:
        """Record through ``hooks`` (its registry and ledger)."""
        self._hooks = hooks

    def record(
        self, device: DeviceId, session: SessionId, event: Accepted | Rejected, now_s: int
    ) -> None:
        """Record a refusal made before the appraisal; appraised verdicts are recorded already."""
        if isinstance(event, Rejected):
            self._hooks.record_rejection(device, session, event, now_s=now_s)


# --- running the service ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How a ``ServiceRunner`` connects and housekeeps."""

    broker: BrokerAddress
    share_group: str | None = None
    prefix: str = topics.DEFAULT_PREFIX
    client_id: str = ""
    checkpoint_every_s: float = 30.0
    connect_timeout_s: float = 10.0
    limits: RateLimits = field(default_factory=RateLimits)
    fleet_state_refresh_s: int = FLEET_STATE_REFRESH_S


class ServiceRunner:
    """A ``GatewayService`` on a live MQTT connection with ledger checkpoints."""

    def __init__(
        self,
        *,
        config: VerifierConfig,
        hooks: RegistryHooks,
        registry: Registry,
        ledger: Ledger,
        signer: Signer,
        options: RunOptions,
        clock: Callable[[], float],
        randomness: Callable[[int], bytes],
        wal: db.WalCheckpointer | None = None,
    ) -> None:
        """Wire a service to a new MQTT client (nothing connects before ``start``).

        ``wal`` checkpoints the SQLite WAL from ``run``'s thread (``db.WalCheckpointer``).
        """
        self._registry = registry
        self._hooks = hooks
        self._wal = wal
        self._ledger = ledger
        self._signer = signer
        self._options = options
        self._clock = clock
        self._stop = threading.Event()
        self._last_checkpoint_seq = -1
        self.client = MqttClient(
            options.broker,
            client_id=options.client_id or f"edgeseal-gateway-{randomness(6).hex()}",
            subscriptions=topics.gateway_filters(
                prefix=options.prefix, share_group=options.share_group
            ),
            on_message=self._on_message,
            on_error=self._on_error,
        )
        commands = CommandIssuer(registry, ledger, signer, clock=clock, prefix=options.prefix)
        self.service = GatewayService(
            config,
            hooks,
            registry,
            self.client,
            recorder=HooksRecorder(hooks),
            commands=commands,
            settings=ServiceSettings(
                prefix=options.prefix,
                limits=options.limits,
                fleet_state_refresh_s=options.fleet_state_refresh_s,
            ),
            clock=clock,
            randomness=randomness,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.service.handle(topic, payload)

    def _on_error(self, error: BaseException) -> None:
        self.service.internal_error(error)

    def start(self, *, wait: bool = True) -> None:
        """Connect in the background; with ``wait``, until subscribed.

        Raises:
            TransportError: with ``wait``, the broker did not answer in time.
        """
        self.client.start(timeout_s=self._options.connect_timeout_s, wait=wait)

    def stop(self) -> None:
        """Ask ``run`` to return (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> None:
        """Housekeep (ledger checkpoints, challenge purges) until ``stop``, then ``close``.

        Call ``start`` first; paho keeps reconnecting with backoff while the broker is away.
        """
        next_housekeeping = time.monotonic() + self._options.checkpoint_every_s
        try:
            while not self._stop.wait(WAL_CHECKPOINT_EVERY_S):
                self._checkpoint_wal()
                if time.monotonic() >= next_housekeeping:
                    next_housekeeping = time.monotonic() + self._options.checkpoint_every_s
                    self._housekeep()
        finally:
            self.close()

    def _checkpoint_wal(self) -> None:
        if self._wal is None:
            return
        try:
            self._wal.checkpoint()
        except TransportError as err:  # commits checkpoint themselves past the backstop
            _log.warning("WAL checkpoint failed: %s", err)

    def _housekeep(self) -> None:
        try:
            self.checkpoint()
            self._registry.purge_expired_challenges(int(self._clock()))
        except TransportError as err:  # the database is away; the next round retries
            _log.warning("housekeeping failed: %s", err)

    def close(self) -> None:
        """Disconnect, sign a last checkpoint and give back the hot path's connection."""
        self.client.stop()
        self._hooks.close()
        self.checkpoint()
        if self._wal is not None:
            self._checkpoint_wal()
            self._wal.close()

    def checkpoint(self) -> None:
        """Sign a ledger checkpoint when the head moved since the last one."""
        head = self._ledger.head()
        if head.seq != self._last_checkpoint_seq:
            self._ledger.checkpoint(self._signer, now_s=int(self._clock()))
            self._last_checkpoint_seq = head.seq


def build_runner(
    workspace: Workspace,
    db_url: str,
    options: RunOptions,
    *,
    kms: Kms,
    clock: Callable[[], float] = time.time,
    randomness: Callable[[int], bytes] = os.urandom,
) -> ServiceRunner:
    """Open the registry and ledger at ``db_url`` and wire a runner for ``workspace``'s keys.

    Raises:
        UsageError: a bad database URL or workspace (no challenge secret).
        TransportError: the database is unreachable.
    """
    engine = db.open_engine(db_url, wal_checkpoints_elsewhere=True)
    registry = Registry.open(engine)
    ledger = Ledger.open(engine)
    signer = kms.result_signer()
    policy = RegistryPolicy(registry)
    config = policy().verifier_config(secret=workspace.challenge_secret(), result_signer=signer)
    hooks = RegistryHooks(registry, ledger, kms, policy, lambda: int(clock()))
    return ServiceRunner(
        config=config,
        hooks=hooks,
        registry=registry,
        ledger=ledger,
        signer=signer,
        options=options,
        clock=clock,
        randomness=randomness,
        wal=db.WalCheckpointer(engine),
    )
