"""``scripts/bench device``: cold boot to app running, and the attestation round trip.

A real board (``device.hardware.power.Board``: the RoT and enclave processes, the door) is driven
the way the normal-world agent drives it (``device.normal_world.agent``: boot, hello, challenge,
``door.attest``, evidence, verdict, ``door.accept``, ``door.run``) against a real gateway
(``gateway.service.build_runner`` in this process, on SQLite) over a private loopback mosquitto.

- Cold boot: ``Board.power_on`` to the app running, split into its steps; and the real
  normal-world agent (``Agent.run`` in a thread) from its start to a status saying the app runs.
  The interpreter start of the board's processes is measured (``python -I -c pass``) and
  subtracted.
- Round trip: hello → challenge → evidence (token signed in the RoT through the door) → verdict,
  with the app running, p50/p99 over many round trips; target p50 ≤ 5 ms.

The gateway's attestation rate limit is lifted for the bench (one device attests hundreds of
times). Exit 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rich.console import Console
from rich.table import Table

from device import factory
from device.enclave.api import AppState, EnclaveDoor
from device.hardware.power import Board
from device.normal_world import mqtt as nw_mqtt
from device.normal_world.agent import Agent, AgentConfig
from gateway import db
from gateway.broker import Broker, running_mosquitto
from gateway.mqtt import MqttClient, parse_broker_url
from gateway.registry import ReferenceValue, Registry, TrustAnchorKind
from gateway.service import Bucket, RateLimits, RunOptions, ServiceRunner, build_runner
from gateway.state import Workspace, init_workspace
from protocol import ids, image, keys, messages, topics
from protocol.attester import (
    AttesterEvent,
    AttesterSession,
    ChallengeReceived,
    Ignored,
    Refused,
    VerdictReceived,
)
from protocol.ids import DeviceId, SessionId
from protocol.stage import TrustAnchors
from scripts.benchmarks.releases import register_release
from scripts.benchmarks.timing import machine

ROOT: Final = Path(__file__).resolve().parents[2]
APP_DIR: Final = ROOT / "examples" / "apps" / "thermostat"
PRODUCT: Final = "thermostat"
DEVICE: Final = DeviceId("bench-device-1")
TARGET_P50_MS: Final = 5.0
WAIT_S: Final = 10.0


# --- the world: PKI, gateway registry, board -----------------------------------------------------


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench manufacturer CA")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _seal_app(vendor: ec.EllipticCurvePrivateKey, cek: bytes) -> bytes:
    sources = tuple((p.name, p.read_bytes()) for p in sorted(APP_DIR.glob("*.py")))
    return image.seal_image(
        image.AppBundle(sources=sources).encode(),
        cek=cek,
        iv=os.urandom(12),
        key_id=os.urandom(16),
        vendor_key=vendor,
        class_id=ids.class_id(ids.product(PRODUCT)),
        version="1.0.0",
        security_counter=1,
        min_runtime_version="1.0.0",
        created_s=int(time.time()),
    )


def make_world(workspace: Workspace, home: Path) -> None:
    """Manufacture a SECURED board with the thermostat installed; enroll it in the gateway's
    registry with its CA and reference values; publish and assign the release."""
    ca_key, ca_cert = _ca()
    rotpk = ec.generate_private_key(ec.SECP256R1())
    vendor = ec.generate_private_key(ec.SECP256R1())
    anchors = TrustAnchors(
        vendor_signer_ids=(keys.signer_id(vendor.public_key()),),
        gateway_result_key=keys.p256_point(workspace.result_public_key()),
    )
    made = factory.manufacture(
        home,
        device_id=DEVICE,
        product=PRODUCT,
        huk=os.urandom(32),
        ca_key=ca_key,
        ca_cert=ca_cert,
        rotpk=rotpk,
        secure_boot=True,
        anchors=anchors,
        layout=factory.small_layout(),
    )
    cek = os.urandom(32)
    sealed = _seal_app(vendor, cek)
    factory.install_image(home, sealed)
    engine = db.open_engine(workspace.default_db_url)
    registry = Registry.open(engine)
    product = ids.product(PRODUCT)
    registry.add_trust_anchor(
        TrustAnchorKind.MANUFACTURER_CA,
        public_key=ca_key.public_key(),
        name="bench CA",
        now_s=1,
        cert_der=ca_cert.public_bytes(serialization.Encoding.DER),
    )
    for value in made.reference_values:
        registry.add_reference_value(
            ReferenceValue(
                product,
                value.component,
                value.measurement,
                value.version,
                value.signer_id,
                value.security_counter,
                "bench",
            ),
            now_s=1,
        )
    registry.enroll_device(
        DEVICE,
        product=product,
        cert_secured_der=made.cert_secured_der,
        cert_debug_der=made.cert_debug_der,
        iak_secured_point=_point(made.cert_secured_der),
        iak_debug_point=_point(made.cert_debug_der),
        counters=dict(made.counters),
        now_s=1,
    )
    release = register_release(registry, workspace, sealed, cek, product=product, version="1.0.0")
    registry.assign(DEVICE, release, now_s=2)
    engine.dispose()


def _point(cert_der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(cert_der).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return keys.p256_point(key)


# --- the device side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """One attestation as the device saw it (milliseconds)."""

    total_ms: float
    challenge_ms: float
    door_attest_ms: float
    verdict_ms: float
    verdict: messages.Verdict


class DeviceSide:
    """The normal world's MQTT face (TCP_NODELAY) and the board's door, driven by hand."""

    def __init__(self, broker: Broker, home: Path) -> None:
        """Connect to the broker (the board stays off)."""
        self.home = home
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.client = MqttClient(
            parse_broker_url(broker.url),
            client_id=f"bench-device-{uuid.uuid4().hex[:6]}",
            subscriptions=(f"{topics.DEFAULT_PREFIX}/d/{DEVICE}/down/attest",),
            on_message=lambda _topic, payload: self.inbox.put(payload),
        )
        self.client.start()
        self.certificates = factory.read_certificates(home)[:1]

    def close(self) -> None:
        """Disconnect."""
        self.client.stop()

    def attest(self, door: EnclaveDoor, counters: messages.Counters) -> RoundTrip:
        """hello → challenge → door.attest → evidence → verdict.

        Raises:
            RuntimeError: the gateway refused.
        """
        while not self.inbox.empty():  # replies to someone else's sessions (the agent's)
            self.inbox.get_nowait()
        session = AttesterSession(DEVICE, SessionId(os.urandom(16)), timeout_s=10)
        up = topics.attest_up(DEVICE)
        start = time.perf_counter()
        hello = session.start(
            now_s=int(time.time()), certificates=self.certificates, counters=counters
        )
        self.client.publish(up, hello)
        challenge = self._next(session)
        challenged = time.perf_counter()
        if not isinstance(challenge, ChallengeReceived):
            raise RuntimeError(f"expected a challenge, got {challenge}")
        attestation = door.attest(session.session_id, challenge.gateway_nonce)
        attested = time.perf_counter()
        evidence = session.send_evidence(
            token=attestation.token, enclave_key=attestation.enclave_key, now_s=int(time.time())
        )
        self.client.publish(up, evidence)
        final = self._next(session)
        end = time.perf_counter()
        if isinstance(final, Refused):
            raise RuntimeError(f"the gateway refused: {final.reasons}")
        if not isinstance(final, VerdictReceived):
            raise RuntimeError(f"expected a verdict, got {final}")
        return RoundTrip(
            1000 * (end - start),
            1000 * (challenged - start),
            1000 * (attested - challenged),
            1000 * (end - attested),
            final.verdict,
        )

    def _next(self, session: AttesterSession) -> AttesterEvent:
        """The next event of ``session``, skipping messages of other sessions."""
        while True:
            event = session.receive_data(self.inbox.get(timeout=WAIT_S))
            if not isinstance(event, Ignored):
                return event


@dataclass(frozen=True, slots=True)
class ColdBoot:
    """One cold boot, step by step (milliseconds)."""

    power_on_and_boot_ms: float
    attest_ms: float
    accept_ms: float
    run_ms: float

    @property
    def total_ms(self) -> float:
        """Power on to the app running."""
        return self.power_on_and_boot_ms + self.attest_ms + self.accept_ms + self.run_ms


def cold_boot(board: Board, device: DeviceSide) -> tuple[ColdBoot, EnclaveDoor]:
    """Power on, boot, attest, accept the grant, run the app; the steps' times and the door."""
    start = time.perf_counter()
    door = board.power_on()
    info = door.boot()
    booted = time.perf_counter()
    trip = device.attest(door, info.counters)
    attested = time.perf_counter()
    verdict = trip.verdict
    if verdict.grant is None or verdict.release_id is None:
        raise RuntimeError("the verdict released no key")
    door.accept(verdict.session_id, verdict.result, verdict.grant, verdict.release_id)
    accepted = time.perf_counter()
    status = door.run()
    running = time.perf_counter()
    if status.state is not AppState.RUNNING:
        raise RuntimeError(f"the app is {status.state}, not running")
    return (
        ColdBoot(
            1000 * (booted - start),
            1000 * (attested - booted),
            1000 * (accepted - attested),
            1000 * (running - accepted),
        ),
        door,
    )


def agent_cold_boot_ms(board: Board, broker: Broker) -> float:
    """Start the real normal-world agent (``device.normal_world.agent.Agent``) on a powered-off
    board; milliseconds until it reports the app running, then stop it (board off)."""
    config = AgentConfig(broker=nw_mqtt.parse_broker_url(broker.url), tick_s=0.005)
    running = threading.Event()

    def on_status(status: messages.Status) -> None:
        if status.running:
            running.set()

    agent = Agent(board, config, rng=random.Random(7), on_status=on_status)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        if not running.wait(WAIT_S):
            raise RuntimeError(f"the agent did not run the app (phase {agent.phase})")
        return 1000 * (time.perf_counter() - start)
    finally:
        stop.set()
        thread.join(WAIT_S)


def interpreter_start_ms(runs: int = 7) -> float:
    """The median wall time of ``python -I -c pass`` (what each board process pays first)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


# --- main ----------------------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _row(table: Table, name: str, values: list[float]) -> None:
    table.add_row(
        name,
        f"{statistics.median(values):.2f}",
        f"{_percentile(values, 0.99):.2f}",
        f"{min(values):.2f}",
        str(len(values)),
    )


def _start_gateway(workspace: Workspace, broker: Broker) -> tuple[ServiceRunner, list[float]]:
    """The gateway in this process; the list collects the wall time of each ``handle`` call."""
    unlimited = Bucket(capacity=1e9, per_s=1e9)
    options = RunOptions(broker=parse_broker_url(broker.url), limits=RateLimits(attest=unlimited))
    kms = workspace.open_kms()
    runner = build_runner(workspace, workspace.default_db_url, options, kms=kms)
    handled_ms: list[float] = []
    handle = runner.service.handle

    def timed(topic: str, payload: bytes) -> None:
        start = time.perf_counter()
        try:
            handle(topic, payload)
        finally:
            handled_ms.append(1000 * (time.perf_counter() - start))

    runner.service.handle = timed  # type: ignore[method-assign]  # timed from outside
    runner.start()
    return runner, handled_ms


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--agent-boots", type=int, default=3)
    args = parser.parse_args(argv)
    console = Console()
    python_ms = interpreter_start_ms()
    boots: list[ColdBoot] = []
    trips: list[RoundTrip] = []
    gateway_ms: list[float] = []
    agent_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="edgeseal-devbench-") as tmp:
        workspace = init_workspace(Path(tmp) / "gateway")
        home = Path(tmp) / "board"
        make_world(workspace, home)
        with running_mosquitto() as broker:
            runner, handled_ms = _start_gateway(workspace, broker)
            device = DeviceSide(broker, home)
            board = Board(home)
            try:
                for _ in range(args.boots):
                    boot, door = cold_boot(board, device)
                    boots.append(boot)
                    board.power_off()
                for _ in range(args.agent_boots):
                    agent_ms.append(agent_cold_boot_ms(Board(home), broker))
                boot, door = cold_boot(board, device)
                counters = door.status().counters
                for index in range(args.warmup + args.round_trips):
                    handled_ms.clear()
                    trip = device.attest(door, counters)
                    if index >= args.warmup:
                        trips.append(trip)
                        gateway_ms.append(sum(handled_ms))
            finally:
                board.power_off()
                device.close()
                runner.close()
    table = Table(title="edgeseal device benchmark (milliseconds)")
    for column in ("measure", "p50", "p99", "min", "n"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    _row(table, "cold boot: power_on + door.boot", [b.power_on_and_boot_ms for b in boots])
    _row(table, "cold boot: attestation", [b.attest_ms for b in boots])
    _row(table, "cold boot: door.accept (grant, image)", [b.accept_ms for b in boots])
    _row(table, "cold boot: door.run", [b.run_ms for b in boots])
    _row(table, "cold boot: power on → app running", [b.total_ms for b in boots])
    _row(
        table,
        "cold boot minus one interpreter start",
        [b.total_ms - python_ms for b in boots],
    )
    if agent_ms:
        _row(table, "cold boot, NW agent: start → status running", agent_ms)
        _row(table, "  minus one interpreter start", [a - python_ms for a in agent_ms])
    _row(table, "round trip: hello → challenge", [t.challenge_ms for t in trips])
    _row(table, "round trip: door.attest (RoT signs)", [t.door_attest_ms for t in trips])
    _row(table, "round trip: evidence → verdict", [t.verdict_ms for t in trips])
    _row(table, "round trip: hello → verdict", [t.total_ms for t in trips])
    _row(table, "  of which gateway handle() (hello + evidence)", gateway_ms)
    _row(
        table,
        "  the rest: device, broker, paho",
        [t.total_ms - g for t, g in zip(trips, gateway_ms, strict=True)],
    )
    console.print(table)
    p50 = statistics.median(t.total_ms for t in trips)
    ok = p50 <= TARGET_P50_MS
    console.print(f"python -I -c pass: {python_ms:.1f} ms (median of 7), subtracted once")
    console.print(
        f"round trip p50 {p50:.2f} ms, target ≤ {TARGET_P50_MS:.0f} ms: "
        f"{'met' if ok else 'NOT met'}"
    )
    console.print(f"machine: {machine()}; load average {os.getloadavg()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
