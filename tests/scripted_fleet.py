"""A scripted fleet for the gateway's real-broker tests: a CA, devices, releases, a device client.

Shared by ``tests/test_gateway_service.py`` and ``tests/test_gateway_refusals.py``. Devices are
scripted with ``protocol.attester.AttesterSession`` over the gateway's own typed MQTT adapter
(``gateway.mqtt.MqttClient``); their evidence is a real PSA token signed by an IAK whose
certificate chains to the fleet's manufacturer CA. ``world_context`` runs one gateway in process
on the test broker, each under its own topic prefix so retained messages never cross tests.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

from gateway import db
from gateway.broker import Broker
from gateway.kms import Kms
from gateway.ledger import Ledger
from gateway.mqtt import BrokerAddress, MqttClient, parse_broker_url
from gateway.registry import ReferenceValue, Registry, TrustAnchorKind
from gateway.service import GatewayService, RateLimits, RunOptions, ServiceRunner, build_runner
from gateway.state import Workspace, init_workspace
from protocol import bundles, grant, ids, image, keys, messages, psa, topics
from protocol.attester import AttesterSession, ChallengeReceived, Refused, VerdictReceived
from protocol.bundles import ComponentType
from protocol.ids import DeviceId, Product, ReleaseId, SessionId
from protocol.reasons import ReasonCode

PRODUCT = Product("thermostat")
SECURED = int(psa.Lifecycle.SECURED)
NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC)
WAIT_S = 10.0

#: Builds a device's token from the nonce the challenge binds (see ``ScriptedDevice.attest``).
MakeToken = Callable[[bytes], bytes]


# --- a small fleet: manufacturer, vendor, devices, releases -----------------------------------


def _cert(
    subject: str,
    key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    return builder.sign(signer, hashes.SHA256())


@dataclass
class FleetDevice:
    """A device's secrets and what its RoT measures."""

    device_id: DeviceId
    iak: ec.EllipticCurvePrivateKey
    debug_iak: ec.EllipticCurvePrivateKey
    cert_der: bytes
    debug_cert_der: bytes
    product: Product = PRODUCT


@dataclass
class Release:
    """A sealed image, its CEK and its id."""

    release_id: ReleaseId
    image: bytes
    cek: bytes
    counter: int
    product: Product = PRODUCT


@dataclass
class Fleet:
    """The manufacturer CA, boot-stage references, the vendor and the devices made."""

    rng: random.Random
    ca_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    vendor_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    rotpk: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Manufacturer CA")])
        self.ca_name = name
        self.ca_cert = _cert("Test Manufacturer CA", self.ca_key.public_key(), name, self.ca_key)
        self.bl2 = self.rng.randbytes(32)
        self.runtime = self.rng.randbytes(32)
        self.stage_signer = keys.signer_id(self.rotpk.public_key())

    def make_device(self, device_id: str, *, product: Product = PRODUCT) -> FleetDevice:
        """A device of ``product`` with both IAKs and their certificates from the CA."""
        iak = ec.generate_private_key(ec.SECP256R1())
        debug = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(device_id, iak.public_key(), self.ca_name, self.ca_key)
        debug_cert = _cert(device_id, debug.public_key(), self.ca_name, self.ca_key)
        der = serialization.Encoding.DER
        return FleetDevice(
            ids.device_id(device_id),
            iak,
            debug,
            cert.public_bytes(der),
            debug_cert.public_bytes(der),
            product,
        )

    def reference_values(self) -> tuple[bundles.ReferenceValue, ...]:
        """The manufacturer's reference values of BL2 and the runtime stage."""
        return tuple(
            bundles.ReferenceValue(kind, value, "1.0.0", self.stage_signer, 1)
            for kind, value in self.stages()
        )

    def make_release(self, size: int, counter: int = 1, *, product: Product = PRODUCT) -> Release:
        """A sealed image of ``product`` with ``size`` plaintext bytes."""
        cek = self.rng.randbytes(32)
        sealed = image.seal_image(
            self.rng.randbytes(size),
            cek=cek,
            iv=self.rng.randbytes(12),
            key_id=self.rng.randbytes(16),
            vendor_key=self.vendor_key,
            class_id=ids.class_id(product),
            version=f"1.{counter}.0",
            security_counter=counter,
            min_runtime_version="1.0.0",
            created_s=1_700_000_000,
        )
        digest = image.manifest_digest(image.parse_unverified_image(sealed))
        return Release(ids.release_id(digest), sealed, cek, counter, product)

    def stages(self) -> tuple[tuple[ComponentType, bytes], ...]:
        """The boot stages a genuine token measures, with their reference measurements."""
        return ((ComponentType.BL2, self.bl2), (ComponentType.RUNTIME, self.runtime))

    def token(
        self,
        device: FleetDevice,
        nonce: bytes,
        *,
        app_counter: int = 1,
        lifecycle: int = SECURED,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        measurements: Mapping[ComponentType, bytes] | None = None,
    ) -> bytes:
        """A PSA token as the device's RoT would sign it.

        Args:
            signing_key: the key that signs (and whose instance id is claimed); the device's
                SECURED-class IAK by default.
            measurements: boot-stage measurements claimed instead of the fleet's references.
        """
        key = device.iak if signing_key is None else signing_key
        claimed = measurements or {}
        components = tuple(
            psa.SoftwareComponent(
                claimed.get(kind, reference), self.stage_signer, kind.value, "1.0.0", "sha-256"
            )
            for kind, reference in self.stages()
        )
        platform = psa.PlatformClaims.create(
            {"app": app_counter, "bl2": 1, "runtime": 1},
            boot_count=1,
            secure_boot=True,
            debug_port_open=False,
            smt_enabled=False,
        )
        claims = psa.PsaClaims(
            profile=psa.PROFILE_RFC9783,
            client_id=1,
            lifecycle=lifecycle,
            implementation_id=bytes(range(32)),
            boot_seed=os.urandom(32),
            instance_id=keys.instance_id(key.public_key()),
            nonce=nonce,
            software_components=components,
            platform=platform,
        )
        return psa.sign_token(claims, key)


def trust(registry: Registry, fleet: Fleet, now_s: int = 1) -> None:
    """Trust the fleet's manufacturer CA."""
    registry.add_trust_anchor(
        TrustAnchorKind.MANUFACTURER_CA,
        public_key=fleet.ca_key.public_key(),
        name="test CA",
        now_s=now_s,
        cert_der=fleet.ca_cert.public_bytes(serialization.Encoding.DER),
    )


def add_reference_values(
    registry: Registry, fleet: Fleet, product: Product = PRODUCT, now_s: int = 1
) -> None:
    """Record the fleet's boot-stage reference values for ``product``."""
    for value in fleet.reference_values():
        registry.add_reference_value(
            ReferenceValue(
                product,
                value.component,
                value.measurement,
                value.version,
                value.signer_id,
                value.security_counter,
                "test",
            ),
            now_s=now_s,
        )


def enroll_device(registry: Registry, device: FleetDevice, now_s: int = 1) -> None:
    """Enroll ``device`` in the registry under its product (nothing else is trusted or added)."""
    registry.enroll_device(
        device.device_id,
        product=device.product,
        cert_secured_der=device.cert_der,
        cert_debug_der=device.debug_cert_der,
        iak_secured_point=keys.p256_point(device.iak.public_key()),
        iak_debug_point=keys.p256_point(device.debug_iak.public_key()),
        now_s=now_s,
    )


def enroll(registry: Registry, fleet: Fleet, device: FleetDevice, now_s: int = 1) -> None:
    """Enroll ``device``, first trusting the fleet's CA and stages when no CA is trusted yet."""
    if not registry.list_trust_anchors(TrustAnchorKind.MANUFACTURER_CA):
        trust(registry, fleet, now_s)
        add_reference_values(registry, fleet, PRODUCT, now_s)
    enroll_device(registry, device, now_s)


def publish_release(registry: Registry, kms: Kms, release: Release) -> None:
    """Store ``release`` with its CEK wrapped to the gateway's HPKE key."""
    digest = bytes.fromhex(release.release_id)
    registry.add_release(
        release.release_id,
        product=release.product,
        version=f"1.{release.counter}.0",
        security_counter=release.counter,
        sealed_image=release.image,
        wrapped_cek=bundles.wrap_release_cek(release.cek, kms.hpke_public_key(), digest),
        created_s=1,
        now_s=1,
    )


# --- a scripted device over MQTT ---------------------------------------------------------------


@dataclass
class Outcome:
    """How one attestation ended: the verdict (and the CEK it opened) or the refusal."""

    verdict: messages.Verdict | None = None
    refused: tuple[ReasonCode, ...] = ()
    cek: bytes | None = None
    session_id: bytes = b""
    #: The last payload the gateway sent on ``…/down/attest``, exactly as received.
    reply: bytes = b""
    #: The evidence payload sent (empty when the hello was refused).
    evidence: bytes = b""


class ScriptedDevice:
    """A device's MQTT face: hello, evidence, fetches, commands."""

    def __init__(self, broker: BrokerAddress, fleet: Fleet, device: FleetDevice, prefix: str):
        """Connect and subscribe to the device's down topics."""
        self.fleet, self.device, self.prefix = fleet, device, prefix
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = MqttClient(
            broker,
            client_id=f"dev-{device.device_id}-{uuid.uuid4().hex[:6]}",
            subscriptions=topics.device_filters(device.device_id, prefix=prefix),
            on_message=lambda topic, payload: self.inbox.put((topic, payload)),
        )
        self.client.start()

    def close(self) -> None:
        """Disconnect."""
        self.client.stop()

    def receive(self, channel: topics.Channel, timeout_s: float = WAIT_S) -> bytes:
        """The next payload on ``…/down/{channel}`` (others are dropped).

        Raises:
            queue.Empty: nothing arrived in time.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            topic, payload = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if topic.endswith(f"/down/{channel.value}"):
                return payload

    def attest(
        self,
        *,
        timeout_s: float = WAIT_S,
        app_counter: int = 1,
        make_token: MakeToken | None = None,
        before_evidence: Callable[[], None] | None = None,
    ) -> Outcome:
        """One attestation session; a new session id every time.

        Args:
            make_token: builds the token from the binding nonce (a genuine token by default).
            before_evidence: called between the challenge and the evidence (e.g. to let time pass).
        """
        session_id = SessionId(os.urandom(16))
        session = AttesterSession(self.device.device_id, session_id, timeout_s=30)
        attest_up = topics.attest_up(self.device.device_id, prefix=self.prefix)
        hello = session.start(now_s=int(time.time()), certificates=(self.device.cert_der,))
        self.client.publish(attest_up, hello)
        event, reply = self._next_event(session, timeout_s)
        if isinstance(event, Refused):
            return Outcome(refused=event.reasons, session_id=session_id, reply=reply)
        assert isinstance(event, ChallengeReceived)
        enclave = x25519.X25519PrivateKey.generate()
        enclave_raw = keys.x25519_raw(enclave.public_key())
        nonce = event.binding_for(enclave_raw)
        if make_token is None:
            token = self.fleet.token(self.device, nonce, app_counter=app_counter)
        else:
            token = make_token(nonce)
        evidence = session.send_evidence(
            token=token, enclave_key=enclave_raw, now_s=int(time.time())
        )
        if before_evidence is not None:
            before_evidence()
        self.client.publish(attest_up, evidence)
        final, reply = self._next_event(session, timeout_s)
        if isinstance(final, Refused):
            return Outcome(
                refused=final.reasons, session_id=session_id, reply=reply, evidence=evidence
            )
        assert isinstance(final, VerdictReceived)
        verdict = final.verdict
        cek = None
        if verdict.grant is not None and verdict.release_id is not None:
            cek = grant.open_grant(
                verdict.grant,
                enclave,
                device_id=self.device.device_id,
                session_id=session_id,
                manifest_digest=bytes.fromhex(verdict.release_id),
            )
        return Outcome(
            verdict=verdict, cek=cek, session_id=session_id, reply=reply, evidence=evidence
        )

    def _next_event(
        self, session: AttesterSession, timeout_s: float
    ) -> tuple[ChallengeReceived | VerdictReceived | Refused, bytes]:
        while True:
            payload = self.receive(topics.Channel.ATTEST, timeout_s)
            event = session.receive_data(payload)
            if not isinstance(event, ChallengeReceived | VerdictReceived | Refused):
                continue
            return event, payload

    def send_attest(self, payload: bytes, *, timeout_s: float = WAIT_S) -> bytes:
        """Publish raw ``payload`` on ``…/up/attest`` (a replay); the next ``…/down/attest``."""
        self.client.publish(topics.attest_up(self.device.device_id, prefix=self.prefix), payload)
        return self.receive(topics.Channel.ATTEST, timeout_s)

    def fetch(self, release: ReleaseId, offset: int, length: int) -> None:
        """Ask for a chunk."""
        request = messages.FetchRequest(release_id=release, offset=offset, length=length)
        self.client.publish(
            topics.fetch_up(self.device.device_id, prefix=self.prefix), request.encode()
        )


# --- one gateway in process ----------------------------------------------------------------------


@dataclass
class World:
    """One gateway (in process) with its workspace, stores and fleet."""

    workspace: Workspace
    kms: Kms
    registry: Registry
    ledger: Ledger
    fleet: Fleet
    runner: ServiceRunner
    prefix: str
    broker: BrokerAddress

    @property
    def service(self) -> GatewayService:
        """The running gateway service."""
        return self.runner.service

    def device(self, fleet_device: FleetDevice) -> ScriptedDevice:
        """A connected scripted device (close it when done)."""
        return ScriptedDevice(self.broker, self.fleet, fleet_device, self.prefix)


@contextlib.contextmanager
def world_context(
    tmp_path: Path,
    broker: Broker,
    rng: random.Random,
    limits: RateLimits,
    *,
    clock: Callable[[], float] = time.time,
) -> Iterator[World]:
    """A running gateway on ``broker`` with an empty registry in ``tmp_path``; gateway time is
    ``clock``."""
    workspace = init_workspace(tmp_path / "home")
    kms = workspace.open_kms()
    engine = db.open_engine(workspace.default_db_url)
    registry, ledger = Registry.open(engine), Ledger.open(engine)
    prefix = f"t{uuid.uuid4().hex[:8]}/v1"
    address = parse_broker_url(broker.url)
    options = RunOptions(broker=address, prefix=prefix, limits=limits)
    runner = build_runner(workspace, workspace.default_db_url, options, kms=kms, clock=clock)
    runner.start()
    try:
        yield World(workspace, kms, registry, ledger, Fleet(rng), runner, prefix, address)
    finally:
        runner.close()
        kms.close()
        engine.dispose()
