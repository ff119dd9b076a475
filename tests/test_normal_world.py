"""The normal world: backoff, the chunked updater, the MQTT link, and the agent on a real board."""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from device import factory
from device.attacks.scanner import Scanner, Secret
from device.hardware.flash import Flash, FlashLayout
from device.hardware.power import Board
from device.hardware.slots import SlotStatus, SlotStore, Swap
from device.normal_world import mqtt
from device.normal_world.agent import Agent, AgentConfig
from device.normal_world.backoff import Backoff
from device.normal_world.public_state import read_status_file
from device.normal_world.updater import (
    ChunkVerdict,
    Download,
    DownloadError,
    find_release,
    slot_release,
)
from gateway.broker import Broker
from protocol import image, keys, messages, topics
from protocol.errors import InvalidChallenge, MalformedMessage, UsageError
from protocol.ids import DeviceId, ReleaseId, class_id, product
from protocol.reasons import Status
from protocol.results import Command, CommandKind, Lease, TrustVector, sign_command
from protocol.stage import TrustAnchors
from protocol.verifier import (
    Accepted,
    Appraisal,
    AppraisalRequest,
    DeviceKeys,
    KeyRelease,
    Rejected,
    VerifierConfig,
    VerifierSession,
)

NOW = 1_800_000_000
VENDOR_KEY = ec.generate_private_key(ec.SECP256R1())
CEK = bytes(range(32, 64))


@functools.cache
def sealed(version: str = "1.0.0", counter: int = 1, size: int = 3000) -> bytes:
    """A sealed image of an app whose source is ``size`` bytes (cached: ECDSA is randomized)."""
    source = (b"# app\n" + bytes(random.Random(version).randbytes(size)).hex().encode())[:size]
    bundle = image.AppBundle(sources=(("main.py", source),))
    return image.seal_image(
        bundle.encode(),
        cek=CEK,
        iv=bytes(12),
        key_id=bytes(16),
        vendor_key=VENDOR_KEY,
        class_id=class_id(product("thermostat")),
        version=version,
        security_counter=counter,
        min_runtime_version="1.0.0",
        created_s=NOW,
    )


def release_of(data: bytes) -> ReleaseId:
    """The release id of a sealed image."""
    return ReleaseId(image.manifest_digest(image.parse_unverified_image(data)).hex())


@pytest.fixture
def slots(tmp_path: Path) -> SlotStore:
    """Slots of 64 KiB on a small flash, slot A holding version 1.0.0 confirmed."""
    layout = FlashLayout.build(
        [("slot_a", 64 * 1024), ("slot_b", 64 * 1024), ("trailer", 2 * 4096)], sector_size=4096
    )
    store = SlotStore(Flash.create(tmp_path / "flash.bin", layout))
    store.install(sealed("1.0.0"))
    store.boot_select()
    return store


# --- backoff --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=40))
def test_backoff_delays_stay_within_the_exponential_ceiling(seed: int, attempts: int) -> None:
    """Every delay lies between the floor and min(cap, base·2ⁿ)."""
    backoff = Backoff(random.Random(seed), base_s=0.5, cap_s=30.0, floor_s=0.05)
    for n in range(attempts):
        delay = backoff.next_delay_s()
        assert 0.05 <= delay <= min(30.0, 0.5 * 2**n)


def test_backoff_is_reproducible_and_resets() -> None:
    """The same seed gives the same jittered delays; reset starts from the base again."""
    first = Backoff(random.Random(7))
    second = Backoff(random.Random(7))
    delays = [first.next_delay_s() for _ in range(6)]
    assert delays == [second.next_delay_s() for _ in range(6)]
    assert len(set(delays)) == 6  # jittered, not a fixed ladder
    first.reset()
    assert first.attempt == 0 and first.next_delay_s() <= first.base_s


def test_backoff_rejects_inverted_bounds() -> None:
    """A cap below the base is a configuration mistake."""
    with pytest.raises(ValueError, match="floor_s"):
        Backoff(random.Random(1), base_s=5.0, cap_s=1.0)


# --- broker URLs ----------------------------------------------------------------------------------


def test_broker_url_parses_host_and_port() -> None:
    """mqtt://host:port parses; the port defaults to 1883."""
    assert mqtt.parse_broker_url("mqtt://127.0.0.1:1999") == mqtt.BrokerAddress("127.0.0.1", 1999)
    assert mqtt.parse_broker_url("mqtt://broker.example").port == 1883


@pytest.mark.parametrize(
    "url",
    ["http://h:1", "mqtt://", "mqtt://h:99999", "mqtt://h/path", "mqtt://u@h", "h:1883", ""],
)
def test_bad_broker_url_is_a_usage_error(url: str) -> None:
    """Another scheme, no host, a bad port or extra parts are refused."""
    with pytest.raises(UsageError):
        mqtt.parse_broker_url(url)


# --- the updater ---------------------------------------------------------------------------------


def feed(download: Download, data: bytes, *, skip: int | None = None) -> ChunkVerdict:
    """Answer every request of ``download`` from ``data``; stop before request ``skip``."""
    verdict = ChunkVerdict.IGNORED
    count = 0
    while (request := download.next_request()) is not None and count != skip:
        piece = data[request.offset : request.offset + request.length]
        chunk = messages.Chunk(request.release_id, request.offset, piece, len(data))
        verdict = download.on_chunk(chunk)
        count += 1
    return verdict


def test_download_writes_the_inactive_slot_in_chunks_and_marks_it_pending(
    slots: SlotStore,
) -> None:
    """A 20 KB image in 4 KiB chunks lands in the inactive slot, checked and pending."""
    new = sealed("2.0.0", 2, size=20_000)
    release = release_of(new)
    target = slots.inactive()
    download = Download(slots, release, total_size=len(new), chunk_bytes=4096)
    assert download.slot == target != slots.active()
    assert feed(download, new) is ChunkVerdict.COMPLETE
    assert download.is_complete() and download.next_request() is None
    state = slots.state()
    assert state.swap is Swap.PENDING and state.slots[state.other].status is SlotStatus.READY
    assert slots.read_image(target) == new
    found = find_release(slots, release)
    assert found is not None and found.slot == target and found.version == "2.0.0"


def test_download_learns_the_size_from_the_first_chunk(slots: SlotStore) -> None:
    """Without a size (an update command), the first chunk's total size starts the slot write."""
    new = sealed("2.1.0", 3)
    download = Download(slots, release_of(new), chunk_bytes=1024)
    assert download.slot is None
    assert feed(download, new) is ChunkVerdict.COMPLETE
    assert slots.read_image(slots.inactive()) == new


def test_interrupted_download_resumes_from_its_offset(slots: SlotStore) -> None:
    """After a lost connection the next request continues where the last chunk ended."""
    new = sealed("2.0.0", 2, size=9000)
    download = Download(slots, release_of(new), total_size=len(new), chunk_bytes=2048)
    feed(download, new, skip=2)
    request = download.next_request()
    assert request is not None and request.offset == 4096
    assert feed(download, new) is ChunkVerdict.COMPLETE


def test_stale_and_foreign_chunks_are_ignored(slots: SlotStore) -> None:
    """A duplicate of an earlier chunk or a chunk of another release changes nothing."""
    new = sealed("2.0.0", 2)
    release = release_of(new)
    download = Download(slots, release, total_size=len(new), chunk_bytes=1024)
    first = messages.Chunk(release, 0, new[:1024], len(new))
    assert download.on_chunk(first) is ChunkVerdict.WRITTEN
    assert download.on_chunk(first) is ChunkVerdict.IGNORED
    other = messages.Chunk(ReleaseId("ab" * 32), 1024, new[1024:2048], len(new))
    assert download.on_chunk(other) is ChunkVerdict.IGNORED
    ahead = messages.Chunk(release, 2048, new[2048:3072], len(new))
    assert download.on_chunk(ahead) is ChunkVerdict.IGNORED
    assert download.offset == 1024


@pytest.mark.parametrize("fault", ["short", "long_total", "changed_total"])
def test_chunk_of_the_wrong_size_fails_the_download(slots: SlotStore, fault: str) -> None:
    """A chunk shorter than asked, or a total size that changes, is a DownloadError."""
    new = sealed("2.0.0", 2)
    release = release_of(new)
    download = Download(slots, release, total_size=len(new), chunk_bytes=1024)
    if fault == "short":
        bad = messages.Chunk(release, 0, new[:1000], len(new))
    elif fault == "long_total":
        bad = messages.Chunk(release, 0, new[:1024], len(new) + 5)
    else:
        download.on_chunk(messages.Chunk(release, 0, new[:1024], len(new)))
        bad = messages.Chunk(release, 1024, new[1024:2048], len(new) - 1)
    with pytest.raises(DownloadError):
        download.on_chunk(bad)
    assert slots.state().swap is Swap.NONE


@pytest.mark.parametrize("fault", ["flipped_ciphertext", "other_release", "not_an_image"])
def test_image_that_does_not_check_out_is_never_marked_pending(
    slots: SlotStore, fault: str
) -> None:
    """A flipped ciphertext bit, an image of another release or garbage is refused at the end."""
    new = sealed("2.0.0", 2)
    release = release_of(new)
    if fault == "flipped_ciphertext":
        data = new[:-1] + bytes([new[-1] ^ 1])
    elif fault == "other_release":
        data = sealed("9.9.9", 9)
    else:
        data = bytes(len(new))
    download = Download(slots, release, total_size=len(data), chunk_bytes=4096)
    with pytest.raises(DownloadError):
        feed(download, data)
    state = slots.state()
    assert state.swap is Swap.NONE and state.slots[state.other].status is SlotStatus.WRITING
    assert slot_release(slots, slots.inactive()) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), max_size=40))
def test_chunks_in_any_order_land_in_order_or_not_at_all(order: list[int]) -> None:
    """Whatever order and duplicates chunks arrive in, only the one asked for is written."""
    new = sealed("2.0.0", 2, size=4000)
    pieces = [new[i : i + 1024] for i in range(0, len(new), 1024)]
    with tempfile.TemporaryDirectory() as tmp:
        layout = FlashLayout.build(
            [("slot_a", 16 * 1024), ("slot_b", 16 * 1024), ("trailer", 2 * 4096)]
        )
        store = SlotStore(Flash.create(Path(tmp) / "flash.bin", layout))
        download = Download(store, release_of(new), chunk_bytes=1024)
        expected = 0
        for index in (i % len(pieces) for i in order):
            chunk = messages.Chunk(release_of(new), index * 1024, pieces[index], len(new))
            wanted = index == expected < len(pieces)
            verdict = download.on_chunk(chunk)
            assert (verdict is not ChunkVerdict.IGNORED) == wanted
            expected += wanted
            assert download.offset == min(expected * 1024, len(new))
        assert download.is_complete() == (expected == len(pieces))
        if download.is_complete():
            assert store.read_image(store.inactive()) == new


def test_slot_release_reads_the_active_image(slots: SlotStore) -> None:
    """The confirmed image in the active slot is found by its release id, unverified."""
    found = slot_release(slots, slots.active())
    assert found is not None and found.status is SlotStatus.CONFIRMED
    assert found.release_id == release_of(sealed("1.0.0"))
    assert (
        found.release_id
        == hashlib.sha256(image.parse_unverified_image(sealed("1.0.0")).manifest_bytes).hexdigest()
    )


# --- the MQTT link --------------------------------------------------------------------------------


def wait_for(link: mqtt.MqttLink, kind: type[object], polls: int = 250) -> list[mqtt.LinkEvent]:
    """Poll ``link`` until an event of ``kind`` arrives (at most ``polls`` × 20 ms)."""
    seen: list[mqtt.LinkEvent] = []
    for _ in range(polls):
        seen.extend(link.poll(0.02))
        if any(isinstance(e, kind) for e in seen):
            return seen
    raise AssertionError(f"no {kind.__name__} within {polls} polls: {seen}")


def test_link_connects_with_nodelay_subscribes_and_receives(broker: Broker) -> None:
    """A link comes up with TCP_NODELAY on its socket and receives on its subscription."""
    address = mqtt.parse_broker_url(broker.url)
    link = mqtt.MqttLink(address, "nw-link-test", ["edgeseal/test/link/#"])
    link.connect()
    wait_for(link, mqtt.LinkUp)
    sock = link._client.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    link.poll(0.05)  # let the SUBACK in before publishing to ourselves
    link.publish("edgeseal/test/link/x", b"\x00payload")
    events = wait_for(link, mqtt.Received)
    received = [e for e in events if isinstance(e, mqtt.Received)]
    assert received[0] == mqtt.Received("edgeseal/test/link/x", b"\x00payload")
    link.disconnect()
    assert not link.connected
    with pytest.raises(Exception, match="not connected"):
        link.publish("edgeseal/test/link/x", b"late")


def test_link_to_a_closed_port_fails_as_transport_error() -> None:
    """Connecting where nothing listens raises TransportError, no event is left behind."""
    from gateway.broker import free_port
    from protocol.errors import TransportError

    address = mqtt.BrokerAddress("127.0.0.1", free_port())
    link = mqtt.MqttLink(address, "nw-closed", [], connect_timeout_s=0.5)
    with pytest.raises(TransportError):
        link.connect()
    assert link.poll(0.0) == [] and not link.connected


# --- the agent on a real board, against a gateway played by the test ------------------------------

APPS = Path(__file__).resolve().parent.parent / "examples" / "apps"
CANARY = b"EDGESEAL-CANARY-7f3a9c2e-SECRET-ALGORITHM"
#: Faster app timings than the shipped configs, so telemetry flows within a test's patience.
FAST_CONFIG = {
    "thermostat": {"PERIOD_MS": "const(20)", "PUBLISH_EVERY": "const(2)"},
    "secret_filter": {"SAMPLE_MS": "const(10)", "PUBLISH_MS": "const(50)"},
}
WAIT_S = 30.0


@dataclass(frozen=True)
class Release:
    """A sealed example app and what the gateway needs to release it."""

    name: str
    image: bytes
    cek: bytes
    release_id: ReleaseId

    @property
    def digest(self) -> bytes:
        """The manifest digest."""
        return bytes.fromhex(self.release_id)


@dataclass(frozen=True)
class Pki:
    """Every key the test plays with: manufacturer CA, ROTPK, vendor, gateway result key."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    rotpk: ec.EllipticCurvePrivateKey
    vendor_key: ec.EllipticCurvePrivateKey
    result_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> Pki:
        """Fresh keys and a self-signed manufacturer CA."""
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test manufacturer CA")])
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(1)
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        return cls(
            ca_key,
            ca_cert,
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
        )

    def anchors(self) -> TrustAnchors:
        """The trust anchors the runtime stage carries."""
        return TrustAnchors(
            vendor_signer_ids=(keys.signer_id(self.vendor_key.public_key()),),
            gateway_result_key=keys.p256_point(self.result_key.public_key()),
        )

    def seal_app(self, name: str, version: str, counter: int, cek: bytes) -> Release:
        """Seal examples/apps/NAME (with fast timings) under ``cek``, signed by the vendor."""
        sources = []
        for path in sorted((APPS / name).glob("*.py")):
            text = path.read_text()
            if path.name == "config.py":
                for key, value in FAST_CONFIG[name].items():
                    text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
            sources.append((path.name, text.encode()))
        data = image.seal_image(
            image.AppBundle(sources=tuple(sources)).encode(),
            cek=cek,
            iv=os.urandom(12),
            key_id=os.urandom(16),
            vendor_key=self.vendor_key,
            class_id=class_id(product(name.replace("_", "-"))),
            version=version,
            security_counter=counter,
            min_runtime_version="1.0.0",
            created_s=int(time.time()),
        )
        return Release(name, data, cek, release_of(data))

    def command(self, device: DeviceId, seq: int, kind: CommandKind, **kw: ReleaseId) -> bytes:
        """A signed command envelope for ``device``."""
        now = int(time.time())
        command = Command(device, seq, kind, now, now + 600, kw.get("release_id"))
        return messages.CommandEnvelope(sign_command(command, self.result_key)).encode()


@pytest.fixture(scope="module")
def pki() -> Pki:
    """Module-wide keys (key generation is cheap, CA certificates less so)."""
    return Pki.generate()


def manufacture_board(
    home: Path, pki: Pki, device: str, app: Release | None, product_name: str = "secret-filter"
) -> DeviceKeys:
    """A SECURED board with signed stages and, when given, ``app`` installed; its enrolled keys."""
    huk = os.urandom(32)
    made = factory.manufacture(
        home,
        device_id=device,
        product=app.name.replace("_", "-") if app else product_name,
        huk=huk,
        ca_key=pki.ca_key,
        ca_cert=pki.ca_cert,
        rotpk=pki.rotpk,
        secure_boot=True,
        anchors=pki.anchors(),
        layout=factory.small_layout(),
    )
    if app is not None:
        factory.install_image(home, app.image)
    secured = x509.load_der_x509_certificate(made.cert_secured_der).public_key()
    debug = x509.load_der_x509_certificate(made.cert_debug_der).public_key()
    assert isinstance(secured, ec.EllipticCurvePublicKey)
    assert isinstance(debug, ec.EllipticCurvePublicKey)
    return DeviceKeys(secured, debug)


class TestGateway(threading.Thread):
    """The gateway, played in a thread: verifier sessions, chunks, and a capture of all traffic."""

    __test__ = False

    def __init__(self, broker: Broker, pki: Pki) -> None:
        """Subscribe to everything under the default prefix."""
        super().__init__(daemon=True)
        self.address = mqtt.parse_broker_url(broker.url)
        self.pki = pki
        self.link = mqtt.MqttLink(self.address, f"test-gw-{os.getpid()}", ["edgeseal/v1/#"])
        self.config = VerifierConfig(secret=os.urandom(32), result_signer=pki.result_key)
        self.enrolled: dict[DeviceId, DeviceKeys] = {}
        self.assigned: dict[DeviceId, Release] = {}
        self.releases: dict[ReleaseId, Release] = {}
        self.sessions: dict[bytes, VerifierSession] = {}
        self.used: set[bytes] = set()
        self.captured: list[mqtt.Received] = []
        self.outcomes: list[tuple[DeviceId, str]] = []
        self.fetches: list[messages.FetchRequest] = []
        self.drop_at_fetch: int | None = None
        self.outbox: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.halt = threading.Event()

    # VerifierHooks
    def device_keys(self, device_id: DeviceId) -> DeviceKeys | None:
        """The enrolled keys."""
        return self.enrolled.get(device_id)

    def appraise(self, request: AppraisalRequest) -> Appraisal:
        """Single use by nonce, then affirm, releasing the device's assigned app."""
        if request.challenge.nonce in self.used:
            raise InvalidChallenge("challenge already used")
        self.used.add(request.challenge.nonce)
        app = self.assigned[request.device_id]
        release = KeyRelease(app.cek, app.digest, app.release_id, len(app.image))
        return Appraisal(
            status=Status.AFFIRMING,
            reasons=(),
            trust_vector=TrustVector.baseline(),
            policy_version=1,
            release=release,
            lease=Lease(offline_boots=2, expires_s=request.now_s + 3600),
        )

    def add(
        self, device: DeviceId, keys_: DeviceKeys, app: Release, *, enroll: bool = True
    ) -> None:
        """Assign ``device`` the app ``app``, and enroll it unless told not to."""
        with self.cond:
            if enroll:
                self.enrolled[device] = keys_
            self.assigned[device] = app
            self.releases[app.release_id] = app

    def send(self, topic: str, payload: bytes) -> None:
        """Publish from the gateway thread (thread-safe hand-over)."""
        with self.cond:
            self.outbox.append((topic, payload))

    def run(self) -> None:
        """Serve until ``halt``."""
        self.link.connect()
        while not self.halt.is_set():
            for event in self.link.poll(0.01):
                if isinstance(event, mqtt.Received):
                    self._on(event)
            with self.cond:
                outbox, self.outbox = self.outbox, []
            for topic, payload in outbox:
                self.link.publish(topic, payload)
        self.link.disconnect()

    def stop(self) -> None:
        """Stop the thread."""
        self.halt.set()
        self.join(10)

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        """Wait (on the condition, no sleeping) until ``predicate`` holds."""
        with self.cond:
            if not self.cond.wait_for(predicate, timeout_s):
                raise AssertionError(f"timed out waiting for {what}")

    def _on(self, event: mqtt.Received) -> None:
        with self.cond:
            self.captured.append(event)
            try:
                ref = topics.parse_topic(event.topic)
            except MalformedMessage:
                self.cond.notify_all()
                return
            if ref.direction is topics.Direction.UP:
                if ref.channel is topics.Channel.ATTEST:
                    self._on_attest(ref.device_id, event.payload)
                elif ref.channel is topics.Channel.FETCH:
                    self._on_fetch(ref.device_id, event.payload)
            self.cond.notify_all()

    def _on_attest(self, device: DeviceId, payload: bytes) -> None:
        message = messages.decode_attest_up(payload)
        session = self.sessions.setdefault(
            message.session_id, VerifierSession(self.config, self, device)
        )
        outcome = session.receive_data(payload, now_s=int(time.time()), randomness=os.urandom)
        if isinstance(outcome, Accepted):
            self.outcomes.append((device, "accepted"))
        elif isinstance(outcome, Rejected):
            self.outcomes.append((device, "rejected:" + ",".join(outcome.reasons)))
        self.link.publish(topics.attest_down(device), outcome.payload)

    def _on_fetch(self, device: DeviceId, payload: bytes) -> None:
        request = messages.FetchRequest.decode(payload)
        self.fetches.append(request)
        if self.drop_at_fetch is not None and len(self.fetches) == self.drop_at_fetch:
            self._kick(device)
            return  # this request is lost with the connection
        app = self.releases[request.release_id]
        data = app.image[request.offset : request.offset + request.length]
        chunk = messages.Chunk(
            request.release_id, request.offset, data, len(app.image), request.session_id
        )
        self.link.publish(topics.chunk_down(device), chunk.encode())

    def _kick(self, device: DeviceId) -> None:
        """Drop the device's broker connection: connect with its client id (session takeover)."""
        intruder = mqtt.MqttLink(self.address, f"edgeseal-nw-{device}", [])
        intruder.connect()
        for _ in range(200):
            if any(isinstance(e, mqtt.LinkUp) for e in intruder.poll(0.01)):
                break
        intruder.disconnect()

    # Views over the capture
    def statuses(self, device: DeviceId) -> list[messages.Status]:
        """Every status the device published, in order."""
        topic = topics.status_up(device)
        return [messages.Status.decode(e.payload) for e in self.captured if e.topic == topic]

    def telemetry(self, device: DeviceId) -> list[messages.Telemetry]:
        """Every telemetry message of the device, in order."""
        topic = topics.telemetry_up(device)
        return [messages.Telemetry.decode(e.payload) for e in self.captured if e.topic == topic]


@pytest.fixture
def gateway(broker: Broker, pki: Pki) -> Iterator[TestGateway]:
    """A running test gateway."""
    gw = TestGateway(broker, pki)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


class StatusLog:
    """Every status an in-process agent reports, with a condition to wait on."""

    def __init__(self) -> None:
        """Empty."""
        self.seen: list[messages.Status] = []
        self.cond = threading.Condition()

    def add(self, status: messages.Status) -> None:
        """The agent's ``on_status`` hook."""
        with self.cond:
            self.seen.append(status)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[messages.Status], bool], what: str) -> None:
        """Wait until some reported status satisfies ``predicate``."""
        with self.cond:
            if not self.cond.wait_for(lambda: any(map(predicate, self.seen)), WAIT_S):
                raise AssertionError(f"timed out waiting for {what}: {self.seen[-3:]}")


class RunningAgent:
    """An agent in a thread of the test process, on a real board (RoT and enclave processes)."""

    def __init__(self, home: Path, broker: Broker | str) -> None:
        """Start the agent."""
        url = broker if isinstance(broker, str) else broker.url
        config = AgentConfig(
            broker=mqtt.parse_broker_url(url),
            connect_timeout_s=1.0,
            chunk_bytes=1024,
            chunk_timeout_s=2.0,
            confirm_after_s=0.3,
            retry_base_s=0.2,
            retry_cap_s=2.0,
        )
        self.board = Board(home)
        self.log = StatusLog()
        self.agent = Agent(self.board, config, rng=random.Random(11), on_status=self.log.add)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop_event,))
        self.thread.start()

    def stop(self) -> None:
        """Stop the agent and power the board off; the agent must have met no internal error."""
        self.stop_event.set()
        self.thread.join(15)
        assert not self.thread.is_alive()
        assert self.agent.errors == 0


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    """Agents started by a test, stopped afterwards whatever happens."""
    started: list[RunningAgent] = []
    try:
        yield started
    finally:
        for running in started:
            running.stop()


def running_with(gw: TestGateway, device: DeviceId, version: str) -> Callable[[], bool]:
    """A predicate: the device's last status says it runs ``version``."""

    def check() -> bool:
        statuses = gw.statuses(device)
        return bool(statuses) and statuses[-1].running and statuses[-1].version == version

    return check


def test_device_boots_attests_runs_thermostat_and_publishes_telemetry(
    tmp_path: Path, pki: Pki, gateway: TestGateway, broker: Broker, agents: list[RunningAgent]
) -> None:
    """Boot, attest, accept the grant, run the thermostat, publish telemetry, confirm."""
    app = pki.seal_app("thermostat", "1.0.0", 1, os.urandom(32))
    device = DeviceId("nw-thermo-1")
    gateway.add(device, manufacture_board(tmp_path / "board", pki, device, app), app)
    agents.append(RunningAgent(tmp_path / "board", broker))
    gateway.wait_for(running_with(gateway, device, "1.0.0"), "the thermostat to run")
    gateway.wait_for(lambda: len(gateway.telemetry(device)) >= 3, "telemetry")
    gateway.wait_for(
        lambda: ("app", 1) in gateway.statuses(device)[-1].counters, "the confirm (app counter)"
    )
    records = gateway.telemetry(device)
    assert [t.seq for t in records[:3]] == [0, 1, 2]
    assert any(b"setpoint" in t.payload or b"temp_c" in t.payload for t in records)
    assert gateway.outcomes == [(device, "accepted")] * len(gateway.outcomes)
    assert gateway.statuses(device)[-1].state == "running"
    assert gateway.fetches == []  # the release was already in the boot slot
    kept = read_status_file(tmp_path / "board")  # what `edgeseal-device status` shows
    assert kept is not None and kept.device_id == device and kept.status.running


def test_update_command_downloads_in_chunks_resumes_after_a_drop_and_confirms(
    tmp_path: Path, pki: Pki, gateway: TestGateway, broker: Broker, agents: list[RunningAgent]
) -> None:
    """A signed update: chunks into the inactive slot, a dropped link resumes, trial, confirm."""
    old = pki.seal_app("thermostat", "1.0.0", 1, os.urandom(32))
    new = pki.seal_app("thermostat", "2.0.0", 2, os.urandom(32))
    device = DeviceId("nw-update-1")
    home = tmp_path / "board"
    gateway.add(device, manufacture_board(home, pki, device, old), old)
    agents.append(RunningAgent(home, broker))
    gateway.wait_for(running_with(gateway, device, "1.0.0"), "version 1 to run")
    first_slot = SlotStore(Flash.open(home / "flash.bin")).active()
    gateway.add(device, gateway.enrolled[device], new)
    gateway.drop_at_fetch = 3
    cmd = pki.command(device, 1, CommandKind.UPDATE, release_id=new.release_id)
    gateway.send(topics.cmd_down(device), cmd)
    gateway.wait_for(running_with(gateway, device, "2.0.0"), "version 2 to run")
    gateway.wait_for(
        lambda: ("app", 2) in gateway.statuses(device)[-1].counters, "the confirm of version 2"
    )
    offsets = [f.offset for f in gateway.fetches]
    chunks = -(-len(new.image) // 1024)
    assert len(new.image) > 3 * 1024
    # Three requests, the third lost with the connection, asked again from the same offset.
    assert offsets == [0, 1024, 2048, *range(2048, chunks * 1024, 1024)]
    assert {f.release_id for f in gateway.fetches} == {new.release_id}
    ups = [
        messages.decode_attest_up(e.payload)
        for e in gateway.captured
        if e.topic == topics.attest_up(device)
    ]
    hellos = [m for m in ups if isinstance(m, messages.Hello)]
    assert [h.state for h in hellos] == [messages.HelloState.BOOT, messages.HelloState.UPDATE]
    assert hellos[-1].requested_release == new.release_id
    slots = SlotStore(Flash.open(home / "flash.bin"))
    state = slots.state()
    assert slots.active() != first_slot and state.swap is Swap.NONE
    assert state.slots[state.primary].status is SlotStatus.CONFIRMED
    assert slots.read_image(slots.active()) == new.image
    assert any(s.state == "updating" for s in gateway.statuses(device))


def test_killed_enclave_is_noticed_and_recovered_by_a_reset(
    tmp_path: Path, pki: Pki, gateway: TestGateway, broker: Broker, agents: list[RunningAgent]
) -> None:
    """SIGKILL of the enclave, then of the RoT: each time the agent resets, reattests, runs."""
    app = pki.seal_app("thermostat", "1.0.0", 1, os.urandom(32))
    device = DeviceId("nw-kill-1")
    gateway.add(device, manufacture_board(tmp_path / "board", pki, device, app), app)
    running = RunningAgent(tmp_path / "board", broker)
    agents.append(running)
    gateway.wait_for(running_with(gateway, device, "1.0.0"), "the app to run")
    pids = running.board.pids()
    assert pids is not None
    boots = gateway.statuses(device)[-1].boot_count
    os.kill(pids.enclave, signal.SIGKILL)
    gateway.wait_for(
        lambda: any(s.state == "recovering" for s in gateway.statuses(device)), "recovery"
    )
    gateway.wait_for(running_with(gateway, device, "1.0.0"), "the app to run again")
    after = running.board.pids()
    assert after is not None and after.enclave != pids.enclave
    last = gateway.statuses(device)[-1]
    assert last.boot_count == boots + 1
    assert last.detail == "" and len(gateway.outcomes) == 2
    # The RoT is a process of its own: its death is noticed the same way.
    os.kill(after.rot, signal.SIGKILL)
    gateway.wait_for(
        lambda: (
            gateway.statuses(device)[-1].boot_count == boots + 2
            and gateway.statuses(device)[-1].running
        ),
        "a second recovery",
    )
    assert len(gateway.outcomes) == 3


def readable_memory(pid: int) -> Iterator[bytes]:
    """Every readable mapping of process ``pid``, from /proc/PID/maps and /proc/PID/mem."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                yield os.pread(fd, end - start, start)
            except OSError:
                continue  # a mapping that vanished or cannot be read (guard pages)
    finally:
        os.close(fd)


def test_nw_process_flash_and_mqtt_never_hold_the_secret(
    tmp_path: Path, pki: Pki, gateway: TestGateway, broker: Broker
) -> None:
    """`edgeseal-device run` runs the secret filter; its memory, flash, traffic hold no secret."""
    cek = os.urandom(32)
    app = pki.seal_app("secret_filter", "1.0.0", 1, cek)
    device = DeviceId("nw-secret-1")
    home = tmp_path / "board"
    gateway.add(device, manufacture_board(home, pki, device, app), app)
    # Every 48-byte run of the plaintext bundle, the CEK and the canary (device.attacks.scanner).
    sealed = image.parse_unverified_image(app.image)
    plaintext = AESGCM(cek).decrypt(
        sealed.manifest.iv, sealed.ciphertext, image.associated_data(sealed.manifest)
    )
    assert CANARY in plaintext  # the app really holds the canary
    scanner = Scanner(
        [Secret("plaintext", plaintext), Secret("cek", cek)], [Secret("canary", CANARY)]
    )
    assert scanner.scan_bytes(b"x" + plaintext[100:148] + b"y", "probe"), (
        "the scanner must see a run"
    )
    argv = [sys.executable, "-m", "device", "run", "--home", str(home), "--broker", broker.url]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        gateway.wait_for(lambda: len(gateway.telemetry(device)) >= 3, "filter telemetry")
        gateway.wait_for(
            lambda: ("app", 1) in gateway.statuses(device)[-1].counters, "the app confirmed"
        )
        assert any(b"filtered" in t.payload for t in gateway.telemetry(device))
        regions = list(readable_memory(proc.pid))
        # The scan sees the NW's own state (a positive control), never the secrets.
        assert any(device.encode() in region for region in regions)
        memory = scanner.scan_process(proc.pid)
        assert memory.scanned_bytes > 0 and memory.clean, memory.to_json()
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr.decode()[-400:]
    assert b"Traceback" not in stderr
    flash = scanner.scan_paths([home / "flash.bin"])
    assert flash.scanned_bytes > 0 and flash.clean, flash.to_json()
    traffic = b"".join(e.payload for e in gateway.captured)
    assert traffic and scanner.scan_bytes(traffic, "mqtt") == []
    assert scanner.scan_bytes(stderr, "stderr") == [] and cek.hex().encode() not in stderr


def test_refused_device_retries_with_a_new_session_and_obeys_revoke(
    tmp_path: Path, pki: Pki, gateway: TestGateway, broker: Broker, agents: list[RunningAgent]
) -> None:
    """A refusal is retried after backoff with a new session id; a signed revoke stops the app."""
    app = pki.seal_app("thermostat", "1.0.0", 1, os.urandom(32))
    device = DeviceId("nw-refused-1")
    enrolled = manufacture_board(tmp_path / "board", pki, device, app)
    gateway.add(device, enrolled, app, enroll=False)
    running = RunningAgent(tmp_path / "board", broker)
    agents.append(running)
    running.log.wait_for(lambda s: s.state == "refused", "a refusal")
    assert running.log.seen[-1].detail == "refused: device.unknown"
    gateway.add(device, enrolled, app)
    gateway.wait_for(running_with(gateway, device, "1.0.0"), "the app to run after a retry")
    ups = [messages.decode_attest_up(e.payload) for e in gateway.captured if "up/attest" in e.topic]
    sessions = [m.session_id for m in ups if isinstance(m, messages.Hello)]
    assert len(sessions) >= 2 and len(set(sessions)) == len(sessions)
    assert gateway.outcomes[0] == (device, "rejected:device.unknown")
    assert gateway.outcomes[-1] == (device, "accepted")
    gateway.send(topics.cmd_down(device), pki.command(device, 1, CommandKind.REVOKE))
    gateway.wait_for(lambda: gateway.statuses(device)[-1].state == "revoked", "the revoked status")
    assert not gateway.statuses(device)[-1].running
    assert running.agent.door is not None
    assert running.agent.door.status().state.value == "empty"
    # A replayed command (same sequence number) is refused by the enclave and changes nothing.
    gateway.send(topics.cmd_down(device), pki.command(device, 1, CommandKind.REATTEST))
    gateway.send(topics.cmd_down(device), pki.command(device, 2, CommandKind.REATTEST))
    gateway.wait_for(lambda: len(gateway.outcomes) >= 3, "the reattest the command asked for")


def test_offline_start_boots_from_the_sealed_lease_only(
    tmp_path: Path, pki: Pki, gateway: TestGateway, broker: Broker
) -> None:
    """Broker unreachable: a board with a lease runs its app offline; one without does not."""
    from gateway.broker import free_port

    app = pki.seal_app("thermostat", "1.0.0", 1, os.urandom(32))
    leased, fresh = DeviceId("nw-lease-1"), DeviceId("nw-lease-2")
    gateway.add(leased, manufacture_board(tmp_path / "a", pki, leased, app), app)
    manufacture_board(tmp_path / "b", pki, fresh, app)
    online = RunningAgent(tmp_path / "a", broker)
    try:
        gateway.wait_for(running_with(gateway, leased, "1.0.0"), "the app to run online")
    finally:
        online.stop()
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    offline, refused = RunningAgent(tmp_path / "a", nowhere), RunningAgent(tmp_path / "b", nowhere)
    try:
        offline.log.wait_for(lambda s: s.state == "offline" and s.running, "an offline boot")
        refused.log.wait_for(lambda s: "offline boot refused" in s.detail, "the refusal")
        assert refused.log.seen[-1].detail == "offline boot refused: no_lease"
        assert not any(s.running for s in refused.log.seen)
    finally:
        offline.stop()
        refused.stop()
    assert offline.log.seen[-1].state == "stopped"


def test_blank_board_downloads_the_release_its_verdict_names(
    tmp_path: Path, pki: Pki, gateway: TestGateway, broker: Broker, agents: list[RunningAgent]
) -> None:
    """No image in flash: the first verdict's release is fetched, trial-booted and confirmed."""
    app = pki.seal_app("secret_filter", "3.0.0", 1, os.urandom(32))
    device = DeviceId("nw-blank-1")
    home = tmp_path / "board"
    gateway.add(device, manufacture_board(home, pki, device, None), app)
    agents.append(RunningAgent(home, broker))
    gateway.wait_for(running_with(gateway, device, "3.0.0"), "the downloaded app to run")
    gateway.wait_for(lambda: ("app", 1) in gateway.statuses(device)[-1].counters, "confirm")
    first_hello = messages.decode_attest_up(
        next(e.payload for e in gateway.captured if e.topic == topics.attest_up(device))
    )
    assert {f.session_id for f in gateway.fetches} == {first_hello.session_id}
    assert [f.offset for f in gateway.fetches] == list(range(0, len(app.image), 1024))
    assert gateway.outcomes == [(device, "accepted")] * 2
    slots = SlotStore(Flash.open(home / "flash.bin"))
    assert slots.read_image(slots.active()) == app.image


def test_trial_the_gateway_does_not_release_is_reverted(
    tmp_path: Path, pki: Pki, gateway: TestGateway, broker: Broker, agents: list[RunningAgent]
) -> None:
    """An update whose trial boot gets the old release back reboots, reverting the trial."""
    old = pki.seal_app("thermostat", "1.0.0", 1, os.urandom(32))
    new = pki.seal_app("thermostat", "2.0.0", 2, os.urandom(32))
    device = DeviceId("nw-revert-1")
    home = tmp_path / "board"
    gateway.add(device, manufacture_board(home, pki, device, old), old)
    agents.append(RunningAgent(home, broker))
    gateway.wait_for(running_with(gateway, device, "1.0.0"), "version 1 to run")
    first_slot = SlotStore(Flash.open(home / "flash.bin")).active()
    gateway.releases[new.release_id] = new  # served in chunks, but never assigned
    gateway.send(
        topics.cmd_down(device),
        pki.command(device, 1, CommandKind.UPDATE, release_id=new.release_id),
    )
    gateway.wait_for(
        lambda: sum(s.state == "updating" for s in gateway.statuses(device)) >= 2, "the revert"
    )
    gateway.wait_for(running_with(gateway, device, "1.0.0"), "version 1 to run again")
    slots = SlotStore(Flash.open(home / "flash.bin"))
    state = slots.state()
    assert slots.active() == first_slot and state.swap is Swap.NONE
    assert state.slots[state.other].status is SlotStatus.REJECTED
    assert all(s.version != "2.0.0" for s in gateway.statuses(device))


def test_telemetry_made_while_the_broker_is_down_arrives_after_it_returns(
    tmp_path: Path, pki: Pki
) -> None:
    """The broker goes away for ~1.5 s while the thermostat runs: no telemetry tick is lost."""
    import json

    from gateway.broker import free_port, running_mosquitto
    from gateway.mqtt import MqttClient, parse_broker_url

    app = pki.seal_app("thermostat", "1.0.0", 1, os.urandom(32))
    device = DeviceId("nw-outage-1")
    port = free_port()
    ticks: list[int] = []
    arrived = threading.Condition()

    def on_telemetry(_topic: str, payload: bytes) -> None:
        text = messages.Telemetry.decode(payload).payload
        if not text.startswith(b"{"):
            return  # the app's print() lines are telemetry too
        with arrived:
            ticks.append(int(json.loads(text)["tick"]))
            arrived.notify_all()

    def wait_ticks(count: int, what: str) -> None:
        with arrived:
            assert arrived.wait_for(lambda: len(ticks) >= count, WAIT_S), what

    def watch(url: str) -> MqttClient:
        client = MqttClient(
            parse_broker_url(url),
            client_id=f"watch-{uuid.uuid4().hex[:8]}",
            subscriptions=(topics.telemetry_up(device),),
            on_message=on_telemetry,
        )
        client.start()
        return client

    with running_mosquitto(port=port) as first:
        gw = TestGateway(first, pki)
        gw.add(device, manufacture_board(tmp_path / "board", pki, device, app), app)
        gw.start()
        watcher = watch(first.url)
        agent = RunningAgent(tmp_path / "board", first)
        wait_ticks(5, "telemetry before the outage")
    # The broker is gone; the watcher saw everything published before it went.
    watcher.stop()
    gw.stop()
    try:
        with arrived:
            before = len(ticks)
        time.sleep(1.5)  # ~37 records at one every 40 ms, all made with the broker gone
        with running_mosquitto(port=port) as second:
            watcher = watch(second.url)
            try:
                wait_ticks(before + 60, "telemetry after the outage")
            finally:
                watcher.stop()
    finally:
        agent.stop()
    # Ticks are 2, 4, 6, …: one run with no hole, across the outage.
    assert ticks == list(range(ticks[0], ticks[0] + 2 * len(ticks), 2)), ticks
