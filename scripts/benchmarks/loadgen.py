"""The gateway bench's load generator: many simulated devices on one MQTT connection.

Run by ``scripts.benchmarks.gateway_bench`` as a separate process::

    python -m scripts.benchmarks.loadgen FLEET.json --broker mqtt://HOST:PORT --total N
        --warmup W --concurrency C --out RESULT.json

Each device's IAK is derived from its HUK (``protocol.keys.derive_iak``); evidence is signed live
for each challenge. ``concurrency`` sessions are kept in flight, each on a different device (the
devices are used round robin, so the gateway's per-device rate limits are respected when the
fleet is large enough). One paho client (``gateway.mqtt.MqttClient``, TCP_NODELAY set)
multiplexes every device: it subscribes to ``{prefix}/d/+/down/attest``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from gateway.mqtt import MqttClient, parse_broker_url
from protocol import keys, psa, topics
from protocol.attester import AttesterSession, ChallengeReceived, Refused, VerdictReceived
from protocol.ids import DeviceId, SessionId

#: The SECURED lifecycle (PSA 0x3000) and its IAK class.
SECURED: Final = 0x3000
SECURED_CLASS: Final = SECURED >> 8


@dataclass(frozen=True, slots=True)
class SimDevice:
    """One simulated device: its id, IAK, certificate and enclave key."""

    device_id: DeviceId
    iak: ec.EllipticCurvePrivateKey
    cert_der: bytes
    enclave_raw: bytes


@dataclass(frozen=True, slots=True)
class FleetFile:
    """What the bench hands the load generator: the prefix, the stage references, the devices."""

    prefix: str
    bl2: bytes
    runtime: bytes
    stage_signer: bytes
    devices: tuple[SimDevice, ...]


def load_fleet(path: Path) -> FleetFile:
    """Read the fleet JSON written by the gateway bench; derive every device's IAK."""
    data = json.loads(path.read_text())
    devices = []
    for item in data["devices"]:
        enclave = x25519.X25519PrivateKey.generate()
        devices.append(
            SimDevice(
                DeviceId(item["id"]),
                keys.derive_iak(bytes.fromhex(item["huk"]), SECURED_CLASS),
                bytes.fromhex(item["cert"]),
                keys.x25519_raw(enclave.public_key()),
            )
        )
    return FleetFile(
        data["prefix"],
        bytes.fromhex(data["bl2"]),
        bytes.fromhex(data["runtime"]),
        bytes.fromhex(data["stage_signer"]),
        tuple(devices),
    )


def sign_token(fleet: FleetFile, device: SimDevice, nonce: bytes) -> bytes:
    """A PSA token as the device's RoT would sign it (two measured stages, secure boot)."""
    components = (
        psa.SoftwareComponent(fleet.bl2, fleet.stage_signer, "BL2", "1.0.0", "sha-256"),
        psa.SoftwareComponent(fleet.runtime, fleet.stage_signer, "RT", "1.0.0", "sha-256"),
    )
    platform = psa.PlatformClaims.create(
        {"app": 1, "bl2": 1, "runtime": 1},
        boot_count=1,
        secure_boot=True,
        debug_port_open=False,
        smt_enabled=False,
    )
    claims = psa.PsaClaims(
        profile=psa.PROFILE_RFC9783,
        client_id=1,
        lifecycle=SECURED,
        implementation_id=bytes(range(32)),
        boot_seed=os.urandom(32),
        instance_id=keys.instance_id(device.iak.public_key()),
        nonce=nonce,
        software_components=components,
        platform=platform,
    )
    return psa.sign_token(claims, device.iak)


@dataclass(slots=True)
class _InFlight:
    device: SimDevice
    session: AttesterSession
    started: float


class LoadGenerator:
    """Keeps ``concurrency`` attestations in flight until ``total`` have ended."""

    def __init__(self, fleet: FleetFile, broker_url: str, *, total: int, concurrency: int):
        """Prepare; nothing is sent before ``run``."""
        self._fleet = fleet
        self._total = total
        self._concurrency = concurrency
        self._idle: deque[SimDevice] = deque(fleet.devices)
        self._flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._started = 0
        self.ended_at: list[float] = []
        self.latencies_s: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self._client = MqttClient(
            parse_broker_url(broker_url),
            client_id=f"edgeseal-loadgen-{os.getpid()}",
            subscriptions=(f"{fleet.prefix}/d/+/down/attest",),
            on_message=self._on_message,
        )

    def run(self, timeout_s: float) -> bool:
        """Connect, run every attestation; False when they did not all end within ``timeout_s``."""
        self._client.start()
        try:
            with self._lock:
                for _ in range(self._concurrency):
                    self._start_next()
            return self._done.wait(timeout_s)
        finally:
            self._client.stop()

    def _start_next(self) -> None:
        if self._started >= self._total or not self._idle:
            return
        device = self._idle.popleft()
        self._started += 1
        session = AttesterSession(device.device_id, SessionId(os.urandom(16)), timeout_s=60)
        hello = session.start(now_s=int(time.time()), certificates=(device.cert_der,))
        self._flight[device.device_id] = _InFlight(device, session, time.perf_counter())
        self._client.publish(topics.attest_up(device.device_id, prefix=self._fleet.prefix), hello)

    def _on_message(self, topic: str, payload: bytes) -> None:
        ref = topics.parse_topic(topic, self._fleet.prefix)
        with self._lock:
            flight = self._flight.get(ref.device_id)
            if flight is None:
                self.outcomes["stray"] += 1
                return
            event = flight.session.receive_data(payload)
            if isinstance(event, ChallengeReceived):
                device = flight.device
                token = sign_token(self._fleet, device, event.binding_for(device.enclave_raw))
                evidence = flight.session.send_evidence(
                    token=token, enclave_key=device.enclave_raw, now_s=int(time.time())
                )
                self._client.publish(
                    topics.attest_up(device.device_id, prefix=self._fleet.prefix), evidence
                )
                return
            if isinstance(event, VerdictReceived):
                granted = event.verdict.grant is not None
                self.outcomes["granted" if granted else "verdict.no_grant"] += 1
            elif isinstance(event, Refused):
                self.outcomes["refused." + ",".join(str(r) for r in event.reasons)] += 1
            else:
                self.outcomes["ignored"] += 1
                return
            self._end(flight)

    def _end(self, flight: _InFlight) -> None:
        now = time.perf_counter()
        self.ended_at.append(now)
        self.latencies_s.append(now - flight.started)
        del self._flight[flight.device.device_id]
        self._idle.append(flight.device)
        if len(self.ended_at) >= self._total:
            self._done.set()
        else:
            self._start_next()


def main() -> int:
    """Run the load and write the per-attestation figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fleet", type=Path)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--total", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fleet = load_fleet(args.fleet)
    print("ready", flush=True)
    gen = LoadGenerator(fleet, args.broker, total=args.total, concurrency=args.concurrency)
    finished = gen.run(args.timeout)
    result = {
        "finished": finished,
        "ended_at": gen.ended_at,
        "latencies_s": gen.latencies_s,
        "outcomes": dict(gen.outcomes),
    }
    args.out.write_text(json.dumps(result))
    return 0 if finished else 1


if __name__ == "__main__":
    raise SystemExit(main())
