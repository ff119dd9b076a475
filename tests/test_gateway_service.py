"""The gateway's MQTT service against a real mosquitto: attestation, chunks, commands, fuzzing.

Devices are scripted with ``protocol.attester.AttesterSession`` over the gateway's own typed MQTT
adapter (``tests.scripted_fleet``); their evidence is a real PSA token signed by an IAK whose
certificate chains to a trusted manufacturer CA. Each test uses its own topic prefix on the shared
broker, so retained messages and late replies never cross tests. The refusal matrix over the broker
is ``tests/test_gateway_refusals.py``.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import db
from gateway.broker import Broker, find_mosquitto, free_port, running_mosquitto
from gateway.commands import CommandIssuer
from gateway.hooks import RegistryHooks
from gateway.ledger import Ledger
from gateway.mqtt import MqttClient, parse_broker_url
from gateway.policy import RegistryPolicy
from gateway.registry import Registry
from gateway.service import (
    FLEET_STATE_REFRESH_S,
    Bucket,
    GatewayService,
    HooksRecorder,
    RateLimiter,
    RateLimits,
    ServiceSettings,
)
from gateway.state import init_workspace
from protocol import cbor, image, keys, messages, topics
from protocol.ids import DeviceId, ReleaseId, SessionId
from protocol.reasons import ReasonCode, Status
from protocol.results import CommandKind, verify_command, verify_result
from tests.conftest import missing
from tests.scripted_fleet import (
    WAIT_S,
    Fleet,
    Outcome,
    ScriptedDevice,
    World,
    enroll,
    publish_release,
    world_context,
)

ROOT = Path(__file__).resolve().parent.parent


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path, broker: Broker, rng: random.Random) -> Iterator[World]:
    """A running gateway on the test broker with an empty registry."""
    with world_context(tmp_path, broker, rng, RateLimits()) as made:
        yield made


def _wait_counter(service: GatewayService, name: str, at_least: int = 1) -> int:
    deadline = time.monotonic() + WAIT_S
    while service.counters[name] < at_least:
        service.wait_for_total(service.total() + 1, max(0.0, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            break
    return service.counters[name]


# --- attestation ---------------------------------------------------------------------------------


def test_enrolled_device_is_granted_a_key_that_opens(world: World) -> None:
    """A genuine device with an assigned release gets an affirming signed result and a grant."""
    fleet_device = world.fleet.make_device("dev-0001")
    enroll(world.registry, world.fleet, fleet_device)
    release = world.fleet.make_release(1000)
    publish_release(world.registry, world.kms, release)
    world.registry.assign(fleet_device.device_id, release.release_id, now_s=2)
    dashboard: queue.Queue[tuple[str, bytes]] = queue.Queue()
    watcher = MqttClient(
        world.broker,
        client_id=f"dash-{uuid.uuid4().hex[:6]}",
        subscriptions=(
            topics.fleet_state_filter(prefix=world.prefix),
            topics.events(prefix=world.prefix),
        ),
        on_message=lambda t, p: dashboard.put((t, p)),
    )
    watcher.start()
    device = world.device(fleet_device)
    try:
        outcome = device.attest()
    finally:
        device.close()
    assert outcome.verdict is not None, outcome.refused
    assert outcome.cek == release.cek
    result = verify_result(
        outcome.verdict.result,
        world.kms.result_public_key(),
        device_id=fleet_device.device_id,
        session_id=SessionId(outcome.session_id),
        now_s=int(time.time()),
    )
    assert result.status is Status.AFFIRMING
    assert outcome.verdict.release_id == release.release_id
    assert outcome.verdict.image_size == len(release.image)
    seen = {dashboard.get(timeout=WAIT_S)[0] for _ in range(2)}
    watcher.stop()
    assert seen == {
        topics.fleet_state(fleet_device.device_id, prefix=world.prefix),
        topics.events(prefix=world.prefix),
    }
    assert world.service.counters["attest.accepted"] == 1
    assert [v.status for v in world.registry.verdicts(fleet_device.device_id)] == [Status.AFFIRMING]


def test_unknown_device_is_refused_with_device_unknown(world: World) -> None:
    """A device the registry does not hold is refused ``device.unknown`` at its hello."""
    device = world.device(world.fleet.make_device("ghost-1"))
    try:
        outcome = device.attest()
    finally:
        device.close()
    assert outcome.verdict is None
    assert outcome.refused == (ReasonCode.DEVICE_UNKNOWN,)
    assert world.registry.verdicts(DeviceId("ghost-1")) == ()


def test_revoked_device_is_refused_with_device_revoked(world: World) -> None:
    """A revoked device's genuine evidence is refused ``device.revoked``, and recorded."""
    fleet_device = world.fleet.make_device("dev-0002")
    enroll(world.registry, world.fleet, fleet_device)
    world.registry.revoke_device(fleet_device.device_id, reason="stolen", now_s=2)
    device = world.device(fleet_device)
    try:
        outcome = device.attest()
    finally:
        device.close()
    assert ReasonCode.DEVICE_REVOKED in outcome.refused
    assert world.registry.verdicts(fleet_device.device_id)[-1].status is Status.CONTRAINDICATED


def test_update_chunks_are_served_in_order_and_reassemble(world: World) -> None:
    """The assigned release is served chunk by chunk and reassembles byte-exact and opens."""
    fleet_device = world.fleet.make_device("dev-0003")
    enroll(world.registry, world.fleet, fleet_device)
    release = world.fleet.make_release(150_000)
    publish_release(world.registry, world.kms, release)
    world.registry.assign(fleet_device.device_id, release.release_id, now_s=2)
    device = world.device(fleet_device)
    try:
        outcome = device.attest()
        assert outcome.verdict is not None and outcome.cek is not None
        size = outcome.verdict.image_size
        assert size == len(release.image)
        assembled = bytearray()
        while len(assembled) < size:
            device.fetch(release.release_id, len(assembled), messages.CHUNK_MAX_DATA)
            chunk = messages.Chunk.decode(device.receive(topics.Channel.CHUNK))
            assert (chunk.offset, chunk.total_size) == (len(assembled), size)
            assembled += chunk.data
    finally:
        device.close()
    assert bytes(assembled) == release.image
    vendors = {
        keys.signer_id(world.fleet.vendor_key.public_key()): world.fleet.vendor_key.public_key()
    }
    sealed = image.parse_unverified_image(bytes(assembled))
    image.open_image(sealed, outcome.cek, trusted_vendors=vendors, min_security_counter=1)
    assert world.service.counters["fetch.served"] == 3


def test_release_not_assigned_is_not_served(world: World) -> None:
    """A fetch for a release other than the assigned one, or past the end, gets no chunk."""
    fleet_device = world.fleet.make_device("dev-0004")
    enroll(world.registry, world.fleet, fleet_device)
    assigned, other = world.fleet.make_release(100), world.fleet.make_release(100, counter=2)
    publish_release(world.registry, world.kms, assigned)
    publish_release(world.registry, world.kms, other)
    world.registry.assign(fleet_device.device_id, assigned.release_id, now_s=2)
    device = world.device(fleet_device)
    try:
        device.fetch(other.release_id, 0, 1024)
        assert _wait_counter(world.service, "fetch.not_assigned") == 1
        device.fetch(assigned.release_id, len(assigned.image), 1024)
        assert _wait_counter(world.service, "fetch.out_of_range") == 1
        with pytest.raises(queue.Empty):
            device.receive(topics.Channel.CHUNK, timeout_s=0.2)
    finally:
        device.close()
    assert world.service.counters["fetch.served"] == 0


def test_commands_are_signed_sequenced_and_ledgered(world: World) -> None:
    """Commands carry increasing sequence numbers from the registry and verify on the device."""
    fleet_device = world.fleet.make_device("dev-0005")
    enroll(world.registry, world.fleet, fleet_device)
    device = world.device(fleet_device)
    try:
        assert world.service.send_command(fleet_device.device_id, CommandKind.REATTEST) == 1
        assert world.service.send_command(fleet_device.device_id, CommandKind.REVOKE) == 2
        envelopes = [
            messages.CommandEnvelope.decode(device.receive(topics.Channel.CMD)) for _ in range(2)
        ]
    finally:
        device.close()
    key = world.kms.result_public_key()
    first = verify_command(
        envelopes[0].command,
        key,
        device_id=fleet_device.device_id,
        now_s=int(time.time()),
        last_seq=0,
    )
    second = verify_command(
        envelopes[1].command,
        key,
        device_id=fleet_device.device_id,
        now_s=int(time.time()),
        last_seq=first.seq,
    )
    assert (first.kind, second.kind) == (CommandKind.REATTEST, CommandKind.REVOKE)
    kinds = [entry.kind.value for entry in world.ledger.entries(fleet_device.device_id)]
    assert kinds.count("command") == 2


# --- the core without a broker -------------------------------------------------------------------


class _Published:
    """A publisher that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.messages.append((topic, payload, retain))


def test_rate_limiter_refills_over_time() -> None:
    """A bucket of 2 allows two, refuses the third, and allows again after refilling."""
    limiter = RateLimiter(RateLimits(attest=Bucket(capacity=2, per_s=1)))
    device = DeviceId("d1")
    assert [limiter.allow(device, topics.Channel.ATTEST, 0.0) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert limiter.allow(device, topics.Channel.ATTEST, 1.0)
    assert limiter.allow(DeviceId("d2"), topics.Channel.ATTEST, 1.0)


def test_rate_limiter_forgets_the_least_recent_devices() -> None:
    """The limiter remembers a bounded number of devices."""
    limiter = RateLimiter(RateLimits(attest=Bucket(capacity=1, per_s=0)), max_devices=2)
    for name in ("a", "b", "c"):
        assert limiter.allow(DeviceId(name), topics.Channel.ATTEST, 0.0)
    assert limiter.allow(DeviceId("a"), topics.Channel.ATTEST, 0.0)
    assert not limiter.allow(DeviceId("c"), topics.Channel.ATTEST, 0.0)


def _core_service(
    world: World, published: _Published, settings: ServiceSettings, clock: Callable[[], float]
) -> GatewayService:
    """A ``GatewayService`` on ``world``'s registry that publishes into ``published``."""
    policy = RegistryPolicy(world.registry)
    hooks = RegistryHooks(world.registry, world.ledger, world.kms, policy, lambda: int(clock()))
    signer = world.kms.result_signer()
    return GatewayService(
        policy().verifier_config(secret=bytes(32), result_signer=signer),
        hooks,
        world.registry,
        published,
        recorder=HooksRecorder(hooks),
        commands=CommandIssuer(world.registry, world.ledger, signer, clock=clock),
        settings=settings,
        clock=clock,
        randomness=os.urandom,
    )


def test_rate_limited_hello_is_answered_rate_limited(world: World) -> None:
    """Over its budget, a device's hello gets a ``rate.limited`` refusal and nothing else runs."""
    published = _Published()
    limits = RateLimits(attest=Bucket(capacity=1, per_s=0))
    service = _core_service(world, published, ServiceSettings(limits=limits), lambda: 100.0)
    hello = messages.Hello(SessionId(bytes(16)), (), None, messages.HelloState.BOOT)
    topic = topics.attest_up("dev-x")
    service.handle(topic, hello.encode())
    service.handle(topic, hello.encode())
    service.handle(topic, b"garbage")
    refusals = [messages.Refusal.decode(payload).reasons for _, payload, _ in published.messages]
    assert refusals == [(ReasonCode.DEVICE_UNKNOWN,), (ReasonCode.RATE_LIMITED,)]
    assert service.counters == {"attest.refused.device.unknown": 1, "rate.limited": 2}


def test_hostile_messages_are_counted_by_reason(world: World) -> None:
    """Bad topics, oversized and malformed payloads are each counted under their reason."""
    service = world.service
    prefix = world.prefix
    cases = [
        (f"{prefix}/d/dev/up/chunk", b"x", "topic.malformed"),
        (f"{prefix}/d/dev/up/attest/extra", b"x", "topic.malformed"),
        (f"{prefix}/d/-bad/up/attest", b"x", "topic.malformed"),
        (topics.fetch_up("dev", prefix=prefix), bytes(300), "payload.oversized"),
        (topics.attest_up("dev", prefix=prefix), b"\xa0", "attest.malformed"),
        (topics.fetch_up("dev", prefix=prefix), b"\xff", "fetch.malformed"),
        (topics.status_up("dev", prefix=prefix), b"", "status.malformed"),
        (topics.telemetry_up("dev", prefix=prefix), b"\x00", "telemetry.malformed"),
    ]
    for topic, payload, _ in cases:
        service.handle(topic, payload)
    expected: dict[str, int] = {}
    for _, _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert service.counters == expected


def test_exception_in_handler_is_counted_as_internal_error(world: World) -> None:
    """An exception escaping the service is caught at the adapter boundary and counted."""
    world.service.internal_error(RuntimeError("boom"))
    assert world.service.counters["internal.error"] == 1


def test_status_updates_the_retained_fleet_state(world: World) -> None:
    """A status from an enrolled device is recorded; one from an unknown device is not."""
    fleet_device = world.fleet.make_device("dev-0006")
    enroll(world.registry, world.fleet, fleet_device)
    status = messages.Status("running", "1.2.0", (("app", 1),), 3, True)
    world.service.handle(
        topics.status_up(fleet_device.device_id, prefix=world.prefix), status.encode()
    )
    world.service.handle(topics.status_up("stranger", prefix=world.prefix), status.encode())
    assert world.service.counters == {"status.recorded": 1, "status.unknown_device": 1}
    states: queue.Queue[bytes] = queue.Queue()
    watcher = MqttClient(
        world.broker,
        client_id=f"dash-{uuid.uuid4().hex[:6]}",
        subscriptions=(topics.fleet_state(fleet_device.device_id, prefix=world.prefix),),
        on_message=lambda _t, p: states.put(p),
    )
    watcher.start()
    try:
        state = messages.FleetState.decode(states.get(timeout=WAIT_S))
    finally:
        watcher.stop()
    assert (state.status, state.firmware, state.verdict) == ("running", "1.2.0", None)


@pytest.mark.parametrize("refresh_s", [FLEET_STATE_REFRESH_S, 0])
def test_fleet_state_is_published_on_change_and_at_most_once_a_minute_otherwise(
    world: World, refresh_s: int
) -> None:
    """An unchanged state (only its last-seen time moves) is not published again within the
    refresh interval (FLEET_STATE_REFRESH_S by default); a change is published at once; with an
    interval of 0 every state is published."""
    fleet_device = world.fleet.make_device("dev-0007")
    enroll(world.registry, world.fleet, fleet_device)
    published = _Published()
    now = [100.0]
    settings = ServiceSettings(fleet_state_refresh_s=refresh_s)
    service = _core_service(world, published, settings, lambda: now[0])
    topic = topics.status_up(fleet_device.device_id)

    def status_at(at_s: float, version: str) -> list[int]:
        now[0] = at_s
        published.messages.clear()
        service.handle(topic, messages.Status("running", version, (), 1, True).encode())
        return [messages.FleetState.decode(p).last_seen_s for _, p, retain in published.messages]

    if refresh_s == 0:
        assert [status_at(at, "1.2.0") for at in (100, 100, 101)] == [[100], [100], [101]]
        return
    assert status_at(100, "1.2.0") == [100]
    assert status_at(110, "1.2.0") == []  # nothing but the time changed
    assert status_at(111, "1.3.0") == [111]  # a change: at once
    assert status_at(111 + refresh_s - 1, "1.3.0") == []
    assert status_at(111 + refresh_s, "1.3.0") == [111 + refresh_s]
    assert all(retain for _, _, retain in published.messages)


# --- fuzzing -------------------------------------------------------------------------------------

FUZZ_MESSAGES = 10_000
FUZZ_BATCH = 1_000


def _valid_payloads(rng: random.Random) -> list[tuple[topics.Channel, bytes]]:
    challenge = messages.Challenge(
        SessionId(rng.randbytes(16)),
        DeviceId("dev-f"),
        rng.randbytes(32),
        2_000_000_000,
        rng.randbytes(32),
    )
    evidence = messages.Evidence(
        SessionId(rng.randbytes(16)), rng.randbytes(200), rng.randbytes(32), challenge
    )
    hello = messages.Hello(
        SessionId(rng.randbytes(16)), (rng.randbytes(300),), None, messages.HelloState.BOOT
    )
    fetch = messages.FetchRequest(ReleaseId("ab" * 32), 0, 4096)
    status = messages.Status("running", "1.0.0", (("app", 1),), 1, True)
    telemetry = messages.Telemetry(1, b"temperature=21", 5)
    return [
        (topics.Channel.ATTEST, hello.encode()),
        (topics.Channel.ATTEST, evidence.encode()),
        (topics.Channel.FETCH, fetch.encode()),
        (topics.Channel.STATUS, status.encode()),
        (topics.Channel.TELEMETRY, telemetry.encode()),
    ]


def _mutate(rng: random.Random, payload: bytes) -> bytes:
    choice = rng.randrange(7)
    data = bytearray(payload)
    if choice == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        del data[rng.randrange(len(data) + 1) :]
    elif choice == 2:
        data += rng.randbytes(rng.randint(1, 8))
    elif choice == 3:
        return rng.randbytes(rng.randint(0, 64))
    elif choice == 4:
        return cbor.dumps({rng.randint(0, 8): rng.choice([1, b"x", "y", [], {}]) for _ in range(4)})
    elif choice == 5 and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _fuzz_topic(rng: random.Random, prefix: str, channel: topics.Channel) -> str:
    device = rng.choice(["dev-f", "dev-f", f"ghost-{rng.randrange(50)}"])
    roll = rng.randrange(20)
    if roll == 0:
        return f"{prefix}/d/{device}/up/chunk"
    if roll == 1:
        return f"{prefix}/d/{device}/up/{channel.value}/more"
    return f"{prefix}/d/{device}/up/{channel.value}"


@pytest.fixture
def fuzz_world(tmp_path: Path, broker: Broker, rng: random.Random) -> Iterator[World]:
    """A running gateway whose rate limits do not hide the payloads from the decoders."""
    big = Bucket(capacity=1e9, per_s=1e9)
    with world_context(tmp_path, broker, rng, RateLimits(attest=big, fetch=big, other=big)) as made:
        yield made


def test_fuzzed_payloads_are_counted_and_harmless(fuzz_world: World, rng: random.Random) -> None:
    """10,000 random and mutated payloads are each counted, none is an internal error, the ledger
    still verifies, and a genuine device attests afterwards."""
    world = fuzz_world
    fleet_device = world.fleet.make_device("dev-f")
    enroll(world.registry, world.fleet, fleet_device)
    release = world.fleet.make_release(500)
    publish_release(world.registry, world.kms, release)
    world.registry.assign(fleet_device.device_id, release.release_id, now_s=2)
    valid = _valid_payloads(rng)
    sender = MqttClient(world.broker, client_id=f"fuzz-{uuid.uuid4().hex[:6]}")
    sender.start()
    try:
        for sent in range(1, FUZZ_MESSAGES + 1):
            channel, payload = rng.choice(valid)
            if rng.randrange(10):
                payload = _mutate(rng, payload)
            sender.publish(_fuzz_topic(rng, world.prefix, channel), payload, qos=0)
            if sent % FUZZ_BATCH == 0:
                assert world.service.wait_for_total(sent, 30), world.service.counters
    finally:
        sender.stop()
    counters = world.service.counters
    assert sum(counters.values()) == FUZZ_MESSAGES
    assert counters["internal.error"] == 0
    assert world.ledger.verify(world.kms.result_public_key()).ok
    device = world.device(fleet_device)
    try:
        outcome = device.attest()
    finally:
        device.close()
    assert outcome.cek == release.cek


# --- two gateway processes, one fleet ------------------------------------------------------------


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    return lines.get(timeout=timeout_s)


def _serve(home: Path, db_url: str, broker: Broker) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "gateway",
        "--home",
        str(home),
        "--db",
        db_url,
        "serve",
        "--broker",
        broker.url,
        "--share-group",
        "g",
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT
    )


def _attest_with_retries(device: ScriptedDevice, attempts: int = 5) -> Outcome:
    for _ in range(attempts):
        try:
            return device.attest(timeout_s=3)
        except queue.Empty:
            continue  # the gateway that held our session died: a new session
    raise AssertionError(f"{device.device.device_id}: no verdict after {attempts} sessions")


@pytest.mark.postgres
@pytest.mark.slow
def test_two_gateway_processes_share_the_fleet(
    tmp_path: Path, broker: Broker, pg_url: str, rng: random.Random
) -> None:
    """Two ``serve`` processes in one share group on PostgreSQL serve every device, survive the
    loss of one of them, and write one ledger chain."""
    workspace = init_workspace(tmp_path / "home")
    fleet = Fleet(rng)
    engine = db.open_engine(pg_url)
    registry, ledger = Registry.open(engine), Ledger.open(engine)
    release = fleet.make_release(800)
    with workspace.open_kms() as kms:
        publish_release(registry, kms, release)
    made = [fleet.make_device(f"dev-{index:03d}") for index in range(6)]
    for fleet_device in made:
        enroll(registry, fleet, fleet_device)
        registry.assign(fleet_device.device_id, release.release_id, now_s=2)
    gateways = [_serve(workspace.home, pg_url, broker) for _ in range(2)]
    address = parse_broker_url(broker.url)
    devices = [ScriptedDevice(address, fleet, d, topics.DEFAULT_PREFIX) for d in made]
    outcomes: queue.Queue[Outcome] = queue.Queue()

    def attest_three_times(device: ScriptedDevice) -> None:
        for _ in range(3):
            outcomes.put(_attest_with_retries(device))

    try:
        for proc in gateways:
            assert _read_line(proc, 20).startswith("serving on"), "a gateway did not start"
        threads = [threading.Thread(target=attest_three_times, args=(d,)) for d in devices]
        for thread in threads:
            thread.start()
        while outcomes.qsize() < 4:  # mid-run: sessions are in flight on both gateways
            time.sleep(0.005)
        gateways[0].kill()
        for thread in threads:
            thread.join(timeout=60)
        gateways[0].wait(timeout=10)
        gateways[1].send_signal(signal.SIGTERM)
        gateways[1].wait(timeout=20)
        final = gateways[1].stdout.read() if gateways[1].stdout else ""
    finally:
        for device in devices:
            device.close()
        for proc in gateways:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
    results = [outcomes.get_nowait() for _ in range(outcomes.qsize())]
    assert len(results) == 3 * len(devices)
    assert all(outcome.cek == release.cek for outcome in results), [o.refused for o in results]
    assert gateways[1].returncode == 0
    assert "attest.accepted=" in final
    report = ledger.verify(workspace.result_public_key())
    engine.dispose()
    assert report.ok, report.problems
    assert report.entries >= len(results)


# --- the connection ------------------------------------------------------------------------------


def test_gateway_reconnects_after_the_broker_restarts(tmp_path: Path, rng: random.Random) -> None:
    """When the broker goes away and comes back, the gateway reconnects, resubscribes and serves;
    its socket has TCP_NODELAY."""
    port = free_port()
    if find_mosquitto() is None:
        missing("mosquitto is not installed (apt-get install mosquitto)")
    with running_mosquitto(port=port) as broker:
        first = broker.process
        with world_context(tmp_path, broker, rng, RateLimits()) as world:
            assert world.runner.client.tcp_nodelay
            fleet_device = world.fleet.make_device("dev-r")
            enroll(world.registry, world.fleet, fleet_device)
            first.terminate()
            first.wait(timeout=10)
            with running_mosquitto(port=port):
                assert world.runner.client.wait_ready(WAIT_S)
                device = world.device(fleet_device)
                try:
                    outcome = device.attest()
                finally:
                    device.close()
            assert ReasonCode.APP_NOT_ASSIGNED in outcome.refused


def test_drops_are_logged_once_per_interval(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A flood of one kind of bad message is counted in full but logged once."""
    with caplog.at_level(logging.WARNING, logger="gateway.service"):
        for _ in range(50):
            world.service.handle(f"{world.prefix}/d/dev/up/chunk", b"x")
    assert world.service.counters["topic.malformed"] == 50
    assert len([r for r in caplog.records if "topic.malformed" in r.getMessage()]) == 1


_CHANNEL_NAMES = st.sampled_from(["attest", "fetch", "status", "telemetry", "chunk", "cmd", "x"])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    device=st.from_regex(r"[A-Za-z0-9._-]{0,8}", fullmatch=True),
    direction=st.sampled_from(["up", "down", "sideways"]),
    channel=_CHANNEL_NAMES,
    payload=st.binary(max_size=300),
)
def test_any_message_is_counted_exactly_once(
    world: World, device: str, direction: str, channel: str, payload: bytes
) -> None:
    """Whatever the topic and payload, ``handle`` raises nothing and counts the message once."""
    before = world.service.total()
    world.service.handle(f"{world.prefix}/d/{device}/{direction}/{channel}", payload)
    assert world.service.total() == before + 1
    assert world.service.counters["internal.error"] == 0
