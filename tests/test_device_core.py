"""The device core end to end: factory, RoT and enclave processes, door, power (DESIGN §3–§5, §8).

Real processes, no mocks: each test manufactures a board in a temporary directory, powers it on and
plays the gateway by hand with the protocol helpers (sign_result, seal_grant, sign_command).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from device import factory
from device.enclave import api, frames
from device.enclave.api import (
    Accepted,
    AppState,
    Attestation,
    BootFailed,
    DoorClosed,
    EnclaveDoor,
    EnclaveRefused,
    EnclaveStateError,
    OfflineReason,
    TelemetryItem,
)
from device.enclave.nvstore import NV_PARTITION
from device.enclave.service import version_key
from device.hardware.clock import BoardClock
from device.hardware.debug import DebugPort
from device.hardware.flash import Flash
from device.hardware.fuses import FUSES_FILE, FuseMap, Fuses, Lifecycle
from device.hardware.power import Board
from device.hardware.slots import SlotStore
from device.rot.service import OutOfOrder, RotService, StageRefused, power_on
from protocol import cbor, ids, keys, psa
from protocol.bundles import ComponentType, ReferenceValue
from protocol.errors import InvalidToken, MalformedMessage, UsageError, VerificationError
from protocol.grant import seal_grant
from protocol.ids import DeviceId, SessionId
from protocol.image import AppBundle, manifest_digest, parse_unverified_image, seal_image
from protocol.reasons import Status
from protocol.results import (
    AttestationResult,
    Command,
    CommandKind,
    Lease,
    TrustVector,
    sign_command,
    sign_result,
)
from protocol.stage import TrustAnchors

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "examples" / "apps" / "thermostat"
NOW_S = 1_800_000_000
PRODUCT = "thermostat"
DEVICE = DeviceId("dev-core-1")


@dataclass(frozen=True)
class World:
    """The keys of the manufacturer, the vendor and the gateway, made once for the module."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    rotpk: ec.EllipticCurvePrivateKey
    vendor: ec.EllipticCurvePrivateKey
    result_key: ec.EllipticCurvePrivateKey
    anchors: TrustAnchors
    bundle: AppBundle


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test manufacturer CA")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def world() -> World:
    """Fresh keys and the thermostat app bundle."""
    ca_key, ca_cert = _ca()
    vendor = ec.generate_private_key(ec.SECP256R1())
    result_key = ec.generate_private_key(ec.SECP256R1())
    anchors = TrustAnchors(
        vendor_signer_ids=(keys.signer_id(vendor.public_key()),),
        gateway_result_key=keys.p256_point(result_key.public_key()),
    )
    sources = tuple((p.name, p.read_bytes()) for p in sorted(APP_DIR.glob("*.py")))
    return World(
        ca_key=ca_key,
        ca_cert=ca_cert,
        rotpk=ec.generate_private_key(ec.SECP256R1()),
        vendor=vendor,
        result_key=result_key,
        anchors=anchors,
        bundle=AppBundle(sources=sources),
    )


@dataclass(frozen=True)
class Release:
    """A sealed image and the secrets only the vendor and the gateway hold."""

    image: bytes
    cek: bytes
    digest: bytes

    @property
    def release_id(self) -> str:
        """The release id of the image."""
        return self.digest.hex()


def make_release(
    world: World, *, counter: int = 1, version: str = "1.0.0", min_runtime: str = "1.0.0"
) -> Release:
    """Seal the thermostat bundle for the product."""
    cek = os.urandom(32)
    image = seal_image(
        world.bundle.encode(),
        cek=cek,
        iv=os.urandom(12),
        key_id=os.urandom(16),
        vendor_key=world.vendor,
        class_id=ids.class_id(ids.product(PRODUCT)),
        version=version,
        security_counter=counter,
        min_runtime_version=min_runtime,
        created_s=NOW_S,
    )
    return Release(image, cek, manifest_digest(parse_unverified_image(image)))


@dataclass
class Rig:
    """A manufactured, powered board with its release."""

    home: Path
    board: Board
    door: EnclaveDoor
    device: factory.ManufacturedDevice
    release: Release
    huk: bytes


def manufacture(
    world: World,
    home: Path,
    *,
    secure_boot: bool = True,
    counters: dict[str, int] | None = None,
    image_counter: int = 1,
) -> tuple[factory.ManufacturedDevice, Release, bytes]:
    """A board in ``home`` with the thermostat image installed."""
    huk = os.urandom(32)
    device = factory.manufacture(
        home,
        device_id=DEVICE,
        product=PRODUCT,
        huk=huk,
        ca_key=world.ca_key,
        ca_cert=world.ca_cert,
        rotpk=world.rotpk,
        secure_boot=secure_boot,
        anchors=world.anchors,
        counters=counters,
        layout=factory.small_layout(),
    )
    release = make_release(world, counter=image_counter)
    factory.install_image(home, release.image)
    return device, release, huk


@pytest.fixture
def rig(world: World, tmp_path: Path) -> Iterator[Rig]:
    """A powered board with secure boot on."""
    device, release, huk = manufacture(world, tmp_path)
    board = Board(tmp_path)
    door = board.power_on()
    try:
        yield Rig(tmp_path, board, door, device, release, huk)
    finally:
        board.power_off()


def session() -> SessionId:
    """A fresh session id."""
    return ids.session_id(os.urandom(16))


def iak_public(huk: bytes, lifecycle: int) -> ec.EllipticCurvePublicKey:
    """The IAK public key of a HUK in a lifecycle."""
    return keys.derive_iak(huk, lifecycle >> 8).public_key()


def gateway_release(
    world: World,
    rig: Rig,
    sid: SessionId,
    attestation: Attestation,
    *,
    lease: Lease | None = None,
    cek: bytes | None = None,
    release: Release | None = None,
) -> tuple[bytes, bytes]:
    """What the gateway sends after an affirming appraisal: the signed result and the grant."""
    release = release or rig.release
    result = AttestationResult(
        device_id=DEVICE,
        session_id=sid,
        status=Status.AFFIRMING,
        trust_vector=TrustVector.baseline(),
        reasons=(),
        policy_version=1,
        issued_s=NOW_S,
        expires_s=NOW_S + 300,
        manifest_digest=release.digest,
        lease=lease,
        verifier_id="test-gateway",
    )
    grant = seal_grant(
        release.cek if cek is None else cek,
        keys.x25519_from_raw(attestation.enclave_key),
        device_id=DEVICE,
        session_id=sid,
        manifest_digest=release.digest,
    )
    return sign_result(result, world.result_key), grant


def attest_and_accept(
    world: World, rig: Rig, *, lease: Lease | None = None, release: Release | None = None
) -> Accepted:
    """One full attestation with key release."""
    release = release or rig.release
    sid = session()
    attestation = rig.door.attest(sid, os.urandom(32))
    result, grant = gateway_release(world, rig, sid, attestation, lease=lease, release=release)
    return rig.door.accept(sid, result, grant, release.release_id)


def reference(device: factory.ManufacturedDevice, kind: ComponentType) -> ReferenceValue:
    """The factory's reference value of a boot stage."""
    return next(r for r in device.reference_values if r.component is kind)


def component(claims: psa.PsaClaims, kind: str) -> psa.SoftwareComponent:
    """The token's component of ``kind``."""
    found = psa.find_component(claims, kind)
    assert found is not None, f"no {kind} component"
    return found


def wait_for_telemetry(door: EnclaveDoor, needle: bytes) -> list[TelemetryItem]:
    """Poll the door until an item containing ``needle`` arrives (at most 10 s)."""
    seen: list[TelemetryItem] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = door.poll_telemetry(64)
        seen.extend(batch)
        if any(needle in item.payload for item in seen):
            return seen
        if not batch:
            time.sleep(0.02)  # polling a real process's output: nothing to wait on in-process
    raise AssertionError(f"telemetry {needle!r} never arrived; got {seen!r}")


# --- the main path --------------------------------------------------------------------------------


def test_attest_accept_run_streams_telemetry_and_leaks_nothing(world: World, rig: Rig) -> None:
    """Boot → attest → accept → run → telemetry; tokens carry the RoT's measurements."""
    info = rig.door.boot()
    assert (info.device_id, info.product, info.lifecycle) == (DEVICE, PRODUCT, Lifecycle.SECURED)
    assert info.release_id == rig.release.release_id and info.slot in ("slot_a", "slot_b")
    assert info.secure_boot and not info.debug_open and not info.has_lease

    sid, challenge = session(), os.urandom(32)
    attestation = rig.door.attest(sid, challenge)
    nonce = psa.bind_nonce(challenge, attestation.enclave_key)
    claims = psa.verify_token(
        attestation.token, iak_public(rig.huk, Lifecycle.SECURED), expected_nonce=nonce
    )
    assert claims.instance_id == keys.instance_id(iak_public(rig.huk, Lifecycle.SECURED))
    assert claims.lifecycle == Lifecycle.SECURED
    assert claims.implementation_id == rig.device.implementation_id
    for kind in (ComponentType.BL2, ComponentType.RUNTIME):
        measured = component(claims, str(kind))
        assert measured.measurement_value == reference(rig.device, kind).measurement
        assert measured.signer_id == keys.signer_id(world.rotpk.public_key())
    assert psa.find_component(claims, "APP") is None
    assert claims.platform is not None and claims.platform.secure_boot
    assert not claims.platform.debug_port_open and claims.platform.boot_count == 1

    result, grant = gateway_release(world, rig, sid, attestation, lease=Lease(2, NOW_S + 3600))
    accepted = rig.door.accept(sid, result, grant, rig.release.release_id)
    assert (accepted.release_id, accepted.version) == (rig.release.release_id, "1.0.0")

    later = rig.door.attest(session(), os.urandom(32))
    app = component(psa.parse_unverified_token(later.token), "APP")
    assert app.measurement_value == rig.release.digest

    assert rig.door.run().state is AppState.RUNNING
    seen = wait_for_telemetry(rig.door, b"thermostat: setpoint")
    assert seen[0].topic_suffix == "stdout"
    confirmed = rig.door.confirm()
    assert confirmed.app_counter == 1 and not confirmed.trial_confirmed
    assert rig.door.stop().state is AppState.EXITED

    # Nothing the NW received or the flash holds contains the CEK or the plaintext.
    received = repr((info, attestation, accepted, later, seen, confirmed)).encode()
    flash = (rig.home / "flash.bin").read_bytes()
    secret_windows = [rig.release.cek, *(src[:48] for _, src in world.bundle.sources)]
    for secret in secret_windows:
        assert secret not in received and secret.hex().encode() not in received
        assert secret not in flash


def test_simulated_app_clock_publishes_state_at_once(world: World, tmp_path: Path) -> None:
    """On a simulated app clock the thermostat's periodic MQTT publishes arrive without waiting."""
    device, release, huk = manufacture(world, tmp_path)
    with Board(tmp_path, simulated_app_clock=True) as board:
        rig = Rig(tmp_path, board, board.power_on(), device, release, huk)
        attest_and_accept(world, rig)
        rig.door.run()
        seen = wait_for_telemetry(rig.door, b'"tick": 10,')
        state = [item for item in seen if item.topic_suffix == "thermostat/state"]
        assert state and b"setpoint_c" in state[0].payload
        assert rig.door.stop().state is AppState.EXITED


def test_accept_refuses_a_second_use_of_a_session(world: World, rig: Rig) -> None:
    """A session's key is used once: replaying the accept is refused."""
    sid = session()
    attestation = rig.door.attest(sid, os.urandom(32))
    result, grant = gateway_release(world, rig, sid, attestation)
    rig.door.accept(sid, result, grant, rig.release.release_id)
    with pytest.raises(EnclaveRefused) as refused:
        rig.door.accept(sid, result, grant, rig.release.release_id)
    assert refused.value.kind == "session"


def test_accept_refuses_forged_results_and_grants(world: World, rig: Rig) -> None:
    """A result under another key, a grant for another key, or a flipped bit are refused."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    cases: list[tuple[str, str]] = []
    for case in ("wrong-key", "flipped-result", "flipped-grant", "other-cek"):
        sid = session()
        attestation = rig.door.attest(sid, os.urandom(32))
        result, grant = gateway_release(world, rig, sid, attestation)
        if case == "wrong-key":
            result, grant = gateway_release(
                World(**{**world.__dict__, "result_key": stranger}), rig, sid, attestation
            )
        elif case == "flipped-result":
            result = result[:-1] + bytes([result[-1] ^ 1])
        elif case == "flipped-grant":
            grant = grant[:-1] + bytes([grant[-1] ^ 1])
        else:
            result, grant = gateway_release(world, rig, sid, attestation, cek=os.urandom(32))
        with pytest.raises(EnclaveRefused) as refused:
            rig.door.accept(sid, result, grant, rig.release.release_id)
        cases.append((case, refused.value.kind))
    assert cases == [
        ("wrong-key", "result"),
        ("flipped-result", "result"),
        ("flipped-grant", "grant"),
        ("other-cek", "image"),
    ]
    with pytest.raises(EnclaveStateError):
        rig.door.run()


def test_image_below_the_fuse_counter_is_refused_before_decryption(
    world: World, tmp_path: Path
) -> None:
    """An image whose counter is below the fuse "app" counter is refused even with a wrong CEK."""
    device, release, huk = manufacture(world, tmp_path, counters={"app": 5}, image_counter=3)
    with Board(tmp_path) as board:
        door = board.power_on()
        rig = Rig(tmp_path, board, door, device, release, huk)
        sid = session()
        attestation = door.attest(sid, os.urandom(32))
        # A wrong CEK: if the enclave decrypted first, this would fail as "image".
        result, grant = gateway_release(world, rig, sid, attestation, cek=os.urandom(32))
        with pytest.raises(EnclaveRefused) as refused:
            door.accept(sid, result, grant, release.release_id)
        assert refused.value.kind == "rolled_back"


def _download(home: Path, image: bytes) -> str:
    """What the NW does with an update: write the inactive slot and mark it pending."""
    slots = SlotStore(Flash.open(home / "flash.bin"))
    slots.begin_update(len(image))
    for offset in range(0, len(image), 4096):
        slots.write_chunk(offset, image[offset : offset + 4096])
    return slots.mark_pending()


def test_update_boots_as_trial_and_confirm_advances_the_counter(world: World, rig: Rig) -> None:
    """A downloaded update boots once as a trial; confirm after it ran makes it primary and
    advances the fuse "app" counter; an unconfirmed trial reverts."""
    attest_and_accept(world, rig)
    update = make_release(world, counter=2, version="2.0.0")
    target = _download(rig.home, update.image)
    rig.door = rig.board.reset()
    info = rig.door.boot()
    assert (info.slot, info.trial, info.release_id) == (target, True, update.release_id)
    rig.door = rig.board.reset()  # no confirm: the trial is over, back to the old image
    info = rig.door.boot()
    assert (info.trial, info.release_id) == (False, rig.release.release_id)

    target = _download(rig.home, update.image)
    rig.door = rig.board.reset()
    accepted = attest_and_accept(world, rig, release=update)
    assert (accepted.version, accepted.security_counter) == ("2.0.0", 2)
    with pytest.raises(EnclaveStateError):
        rig.door.confirm()  # not yet run
    assert rig.door.run().trial
    confirmed = rig.door.confirm()
    assert (confirmed.slot, confirmed.app_counter, confirmed.trial_confirmed) == (target, 2, True)
    rig.door = rig.board.reset()
    info = rig.door.boot()
    assert (info.slot, info.trial, info.release_id) == (target, False, update.release_id)
    assert dict(info.counters)["app"] == 2


def test_image_needing_a_newer_runtime_is_refused(world: World, rig: Rig) -> None:
    """An image whose manifest asks for a newer runtime stage is not loaded."""
    newer = make_release(world, version="3.0.0", min_runtime="1.2")
    rig.release = newer
    slot = _download(rig.home, newer.image)
    rig.door = rig.board.reset()
    assert rig.door.boot().slot == slot
    with pytest.raises(EnclaveRefused) as refused:
        attest_and_accept(world, rig)
    assert refused.value.kind == "image"
    assert version_key("1.10.2-rc1") == (1, 10, 2) > version_key("1.9") > version_key("1.0.0+b")


# --- lease, commands, debug -----------------------------------------------------------------------


def test_offline_boots_within_the_lease_then_refused(world: World, rig: Rig) -> None:
    """Two offline boots are allowed by a two-boot lease; the third is refused."""
    attest_and_accept(world, rig, lease=Lease(2, NOW_S + 3600))
    left = []
    for _ in range(2):
        rig.door = rig.board.reset()
        assert rig.door.boot().has_lease
        offline = rig.door.boot_offline()
        assert offline and offline.release_id == rig.release.release_id
        left.append(offline.boots_left)
        assert rig.door.run().state is AppState.RUNNING
    assert left == [1, 0]
    rig.door = rig.board.reset()
    refused = rig.door.boot_offline()
    assert not refused and refused.reason is OfflineReason.BOOTS_SPENT
    with pytest.raises(EnclaveStateError):
        rig.door.run()


def test_offline_boot_refused_once_gateway_time_passes_the_expiry(world: World, rig: Rig) -> None:
    """A command stamped after the lease's expiry moves gateway time on: offline boots stop."""
    attest_and_accept(world, rig, lease=Lease(5, NOW_S + 100))
    BoardClock(rig.home).set_board_time(NOW_S + 10**6)  # the attacker's clock is not consulted
    rig.door = rig.board.reset()
    assert rig.door.boot_offline()
    later = Command(DEVICE, 1, CommandKind.REATTEST, NOW_S + 200, NOW_S + 900)
    assert rig.door.command(sign_command(later, world.result_key)).kind is CommandKind.REATTEST
    rig.door = rig.board.reset()
    assert rig.door.boot_offline().reason is OfflineReason.EXPIRED


def test_offline_boot_needs_a_lease(world: World, rig: Rig) -> None:
    """Without a lease in the result, an offline boot is refused."""
    attest_and_accept(world, rig, lease=None)
    rig.door = rig.board.reset()
    assert rig.door.boot_offline().reason is OfflineReason.NO_LEASE


def test_revoke_command_erases_the_lease_and_replays_are_refused(world: World, rig: Rig) -> None:
    """A signed revoke erases the lease; a replayed, unsigned or foreign command is refused."""
    attest_and_accept(world, rig, lease=Lease(5, NOW_S + 3600))
    rig.door.run()
    revoke = Command(DEVICE, 1, CommandKind.REVOKE, NOW_S, NOW_S + 600)
    outcome = rig.door.command(sign_command(revoke, world.result_key))
    assert (outcome.kind, outcome.seq) == (CommandKind.REVOKE, 1)
    assert rig.door.status().state is AppState.EMPTY
    token = rig.door.attest(session(), os.urandom(32)).token
    assert psa.find_component(psa.parse_unverified_token(token), "APP") is None
    bad = [
        sign_command(revoke, world.result_key),  # replayed sequence number
        sign_command(
            revoke.__class__(DEVICE, 2, CommandKind.REATTEST, NOW_S, NOW_S + 600),
            ec.generate_private_key(ec.SECP256R1()),
        ),
        sign_command(
            Command(DeviceId("other"), 3, CommandKind.REVOKE, NOW_S, NOW_S + 9), world.result_key
        ),
        b"\xd2\x84garbage",
    ]
    for data in bad:
        with pytest.raises(EnclaveRefused) as refused:
            rig.door.command(data)
        assert refused.value.kind == "command"
    update = Command(DEVICE, 2, CommandKind.UPDATE, NOW_S, NOW_S + 600, ids.release_id(bytes(32)))
    assert rig.door.command(sign_command(update, world.result_key)).release_id == "00" * 32
    rig.door = rig.board.reset()
    assert rig.door.boot_offline().reason is OfflineReason.NO_LEASE


def test_a_command_replayed_after_the_nv_store_is_rolled_back_or_erased_is_refused(
    world: World, rig: Rig
) -> None:
    """The accepted sequence number is in a fuse counter: an older or erased NV store in flash
    does not make a seen command new again; the next sequence number is still accepted."""
    attest_and_accept(world, rig, lease=Lease(5, NOW_S + 3600))
    flash = Flash.open(rig.home / "flash.bin")
    before = flash.read_blob(NV_PARTITION)  # the attacker's copy, last_seq 0
    seen = sign_command(
        Command(DEVICE, 1, CommandKind.REATTEST, NOW_S, NOW_S + 600), world.result_key
    )
    assert rig.door.command(seen).seq == 1
    assert Fuses.in_home(rig.home).counter("command_seq") == 1
    for erase in (False, True):
        if erase:
            flash.erase(NV_PARTITION)
        else:
            flash.write_blob(NV_PARTITION, before)
        rig.door = rig.board.reset()
        with pytest.raises(EnclaveRefused, match="replayed sequence number") as refused:
            rig.door.command(seen)
        assert refused.value.kind == "command"
    newer = Command(DEVICE, 2, CommandKind.REATTEST, NOW_S, NOW_S + 600)
    assert rig.door.command(sign_command(newer, world.result_key)).seq == 2
    assert Fuses.in_home(rig.home).counter("command_seq") == 2


def test_a_board_without_the_command_fuse_refuses_every_command(
    world: World, tmp_path: Path
) -> None:
    """Fail closed: with no fuse counter to hold the sequence number, no command is accepted."""
    manufacture(world, tmp_path)
    path = tmp_path / FUSES_FILE
    burned = FuseMap.decode(path.read_bytes())
    counters = {k: v for k, v in burned.counters.items() if k != "command_seq"}
    path.write_bytes(replace(burned, counters=counters).encode())  # a board burned without it
    board = Board(tmp_path)
    door = board.power_on()
    try:
        command = Command(DEVICE, 1, CommandKind.REVOKE, NOW_S, NOW_S + 600)
        with pytest.raises(EnclaveRefused, match="no command sequence fuse counter"):
            door.command(sign_command(command, world.result_key))
        assert door.status().state is AppState.EMPTY  # the enclave still serves
    finally:
        board.power_off()


def test_debug_unlock_changes_the_key_class_and_locks_the_lease(world: World, rig: Rig) -> None:
    """After a debug unlock and reset: debug lifecycle, debug-class IAK, the lease does not open."""
    attest_and_accept(world, rig, lease=Lease(5, NOW_S + 3600))
    blob = rig.door.seal(b"nw secret")
    DebugPort(rig.home).request_unlock()
    rig.door = rig.board.reset()
    info = rig.door.boot()
    assert info.lifecycle == Lifecycle.NON_PSA_ROT_DEBUG and info.debug_open
    assert not info.has_lease
    assert rig.door.boot_offline().reason is OfflineReason.NO_LEASE
    challenge = os.urandom(32)
    attestation = rig.door.attest(session(), challenge)
    nonce = psa.bind_nonce(challenge, attestation.enclave_key)
    claims = psa.verify_token(
        attestation.token, iak_public(rig.huk, Lifecycle.NON_PSA_ROT_DEBUG), expected_nonce=nonce
    )
    assert claims.lifecycle == Lifecycle.NON_PSA_ROT_DEBUG
    assert claims.platform is not None and claims.platform.debug_port_open
    with pytest.raises(InvalidToken):
        psa.verify_token(attestation.token, iak_public(rig.huk, Lifecycle.SECURED))
    with pytest.raises(EnclaveRefused):
        rig.door.unseal(blob)


def test_seal_unseal_round_trip_and_tamper(rig: Rig) -> None:
    """NW data sealed by the enclave opens again; a flipped bit or garbage does not."""
    blob = rig.door.seal(b"wifi password")
    assert b"wifi password" not in blob
    assert rig.door.unseal(blob) == b"wifi password"
    for bad in (blob[:-1] + bytes([blob[-1] ^ 1]), blob[:-3], b"", b"\x00" * 40):
        with pytest.raises(EnclaveRefused):
            rig.door.unseal(bad)


# --- boot stages ----------------------------------------------------------------------------------

EVIL_RUNTIME = """
# A modified runtime that claims to be 1.0.0 and would exfiltrate any key it received.
from device.enclave.service import run_enclave
run_enclave(BOOT, STAGE)
"""


def test_modified_runtime_without_secure_boot_is_measured_as_modified(
    world: World, tmp_path: Path
) -> None:
    """With secure boot off a modified runtime runs, but the RoT measures what it really is."""
    device, _, _ = manufacture(world, tmp_path, secure_boot=False)
    evil = factory.build_runtime("1.0.0", 1, world.anchors, world.rotpk, code=EVIL_RUNTIME)
    factory.flash_stage(tmp_path, evil)
    with Board(tmp_path) as board:
        door = board.power_on()
        claims = psa.parse_unverified_token(door.attest(session(), os.urandom(32)).token)
    runtime = component(claims, "RT")
    assert runtime.version == "1.0.0"
    assert runtime.measurement_value != reference(device, ComponentType.RUNTIME).measurement
    assert runtime.measurement_value == evil.reference.measurement
    assert claims.platform is not None and not claims.platform.secure_boot


@pytest.mark.parametrize("case", ["unsigned", "other-key", "rolled-back"])
def test_secure_boot_refuses_a_bad_runtime_stage(world: World, tmp_path: Path, case: str) -> None:
    """With secure boot on, an unsigned, foreign-signed or rolled-back runtime does not boot."""
    manufacture(world, tmp_path, counters={"runtime": 2})
    if case == "unsigned":
        stage = factory.build_runtime("1.0.0", 2, world.anchors, None, code=EVIL_RUNTIME)
    elif case == "other-key":
        other = ec.generate_private_key(ec.SECP256R1())
        stage = factory.build_runtime("1.0.0", 2, world.anchors, other)
    else:
        stage = factory.build_runtime("0.9.0", 1, world.anchors, world.rotpk)
    factory.flash_stage(tmp_path, stage)
    with Board(tmp_path) as board:
        door = board.power_on()
        with pytest.raises(BootFailed):
            door.boot()
        with pytest.raises(BootFailed):
            door.attest(session(), os.urandom(32))


# --- the door and power ---------------------------------------------------------------------------


def test_killed_enclave_closes_the_door_and_reset_recovers(rig: Rig) -> None:
    """Killing the enclave process gives DoorClosed; a reset brings a working door back."""
    pids = rig.board.pids()
    assert pids is not None and rig.board.alive()
    os.kill(pids.enclave, signal.SIGKILL)
    with pytest.raises(DoorClosed):
        rig.door.status()
    with pytest.raises(DoorClosed):
        rig.door.status()
    assert not rig.board.alive()
    rig.door = rig.board.reset()
    assert rig.door.boot().device_id == DEVICE
    new = rig.board.pids()
    assert new is not None and new.enclave != pids.enclave


def _raw_exchange(sock: socket.socket, frame: bytes) -> cbor.Fields:
    sock.sendall(frame)
    channel = frames.Channel(sock)
    return channel.receive()


def test_malformed_frames_do_not_kill_the_enclave(rig: Rig) -> None:
    """Garbage frames get a malformed reply and the door keeps working; an oversized length
    closes only the connection."""
    sock = rig.door.transport
    garbage = [
        b"\xff\xfe not cbor",
        cbor.dumps([1, 2, 3]),
        cbor.dumps({"v": 2, "op": "status", "args": {}}),
        cbor.dumps({"v": 1, "op": "status"}),
        cbor.dumps({"v": 1, "op": "no_such_op", "args": {}}),
        cbor.dumps({"v": 1, "op": "attest", "args": {"session_id": 5}}),
        cbor.dumps({1: 1}),
    ]
    for body in garbage:
        reply = _raw_exchange(sock, struct.pack(">I", len(body)) + body)
        assert reply.get_map("err").get_str("kind") == "malformed"
    assert rig.door.status().state is AppState.EMPTY
    pids = rig.board.pids()
    assert pids is not None
    sock.sendall(struct.pack(">I", frames.MAX_FRAME_BYTES + 1))
    with pytest.raises(DoorClosed):
        rig.door.status()
    assert rig.board.reset().boot().device_id == DEVICE


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=256))
def test_decode_body_raises_only_frame_error(data: bytes) -> None:
    """Any bytes decode to a frame map or raise FrameError."""
    try:
        fields = frames.decode_body(data)
    except frames.FrameError:
        return
    assert fields.get_int("v") == frames.FRAME_VERSION


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=32),
    st.dictionaries(st.text(max_size=8), st.binary(max_size=64) | st.integers(), max_size=4),
)
def test_frames_round_trip_over_a_socket_pair(op: str, args: dict[str, object]) -> None:
    """A request sent on one end arrives unchanged on the other."""
    left, right = socket.socketpair()
    with left, right:
        frames.Channel(left).send(frames.request(op, args))
        got = frames.Channel(right).receive()
    assert got.get_str("op") == op
    assert {k: got.get_map("args").raw(k) for k in args} == args


def test_frame_length_prefix_is_big_endian_and_bounded() -> None:
    """The prefix is 4 bytes big-endian; an oversized message is refused at encoding."""
    frame = frames.encode_frame({"v": 1})
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    with pytest.raises(ValueError, match="exceeds"):
        frames.encode_frame({"v": 1, "x": bytes(frames.MAX_FRAME_BYTES)})
    assert hashlib.sha256(frame).digest()  # deterministic bytes (canonical CBOR)
    assert frames.encode_frame({"v": 1}) == frame


# --- the RoT in process (its request handler, without the pipe) ----------------------------------


def _rot(home: Path) -> RotService:
    fuses = Fuses.in_home(home)
    return RotService(home, fuses, power_on(fuses, bytes(32)))


def _call(rot: RotService, op: str, **args: object) -> cbor.Fields:
    return cbor.Fields(dict(rot.handle(op, cbor.Fields(args, what="args"))), what="reply")


def test_rot_enforces_the_boot_order(world: World, tmp_path: Path) -> None:
    """RT before BL2, a stage twice, a token or a key before RT: all refused as out of order."""
    manufacture(world, tmp_path)
    rot = _rot(tmp_path)
    for op, args in (
        ("load_stage", {"kind": "RT"}),
        ("sign_token", {"nonce": bytes(32), "client_id": 1}),
        ("sealing_key", {"label": "lease"}),
        ("advance_counter", {"name": "app", "value": 1}),
    ):
        with pytest.raises(OutOfOrder):
            rot.handle(op, cbor.Fields(args, what="args"))
    _call(rot, "load_stage", kind="BL2")
    with pytest.raises(OutOfOrder):
        _call(rot, "load_stage", kind="BL2")
    with pytest.raises(MalformedMessage):
        _call(rot, "load_stage", kind="APP")
    with pytest.raises(MalformedMessage):
        _call(rot, "no_such_op")


def test_rot_sealing_key_is_bound_to_the_runtime_measurement(world: World, tmp_path: Path) -> None:
    """The same HUK gives another sealing key to a modified runtime, and per label."""
    huk = os.urandom(32)
    homes = [tmp_path / "good", tmp_path / "evil"]
    for home in homes:
        factory.manufacture(
            home,
            device_id=DEVICE,
            product=PRODUCT,
            huk=huk,
            ca_key=world.ca_key,
            ca_cert=world.ca_cert,
            rotpk=world.rotpk,
            secure_boot=False,
            anchors=world.anchors,
            layout=factory.small_layout(),
        )
    factory.flash_stage(homes[1], factory.build_runtime("1.0.0", 1, world.anchors, None, "pass"))
    found = []
    for home in homes:
        rot = _rot(home)
        _call(rot, "load_stage", kind="BL2")
        _call(rot, "load_stage", kind="RT")
        found.append(_call(rot, "sealing_key", label="lease").get_bytes("key"))
        assert found[-1] != _call(rot, "sealing_key", label="nw").get_bytes("key")
    assert len(found[0]) == 32 and found[0] != found[1]


def test_rot_counters_only_the_enclave_may_advance(world: World, tmp_path: Path) -> None:
    """The enclave may raise "app" and "offline_boots", never lower them nor touch the stages'."""
    manufacture(world, tmp_path, counters={"app": 2})
    rot = _rot(tmp_path)
    _call(rot, "load_stage", kind="BL2")
    _call(rot, "load_stage", kind="RT")
    assert _call(rot, "advance_counter", name="app", value=3).get_int("value") == 3
    with pytest.raises(UsageError):
        _call(rot, "advance_counter", name="app", value=1)
    with pytest.raises(VerificationError):
        _call(rot, "advance_counter", name="runtime", value=9)
    assert _call(rot, "count_offline_boot").get_int("value") == 1
    counters = _call(rot, "fuse_counters").get_map("counters")
    assert counters.get_int("app") == 3 and "boots" not in counters


def test_rot_secure_boot_advances_the_stage_counter_for_a_newer_stage(
    world: World, tmp_path: Path
) -> None:
    """A verified newer runtime raises the fuse counter; the older one is then refused."""
    manufacture(world, tmp_path)
    factory.flash_stage(tmp_path, factory.build_runtime("1.1.0", 4, world.anchors, world.rotpk))
    rot = _rot(tmp_path)
    _call(rot, "load_stage", kind="BL2")
    _call(rot, "load_stage", kind="RT")
    assert Fuses.in_home(tmp_path).counter("runtime") == 4
    factory.flash_stage(tmp_path, factory.build_runtime("1.0.0", 1, world.anchors, world.rotpk))
    rot = _rot(tmp_path)
    _call(rot, "load_stage", kind="BL2")
    with pytest.raises(StageRefused):
        _call(rot, "load_stage", kind="RT")


def test_rot_token_refuses_bad_nonces(world: World, tmp_path: Path) -> None:
    """Nonces of a size PSA does not allow, and client ids out of range, are refused."""
    manufacture(world, tmp_path)
    rot = _rot(tmp_path)
    _call(rot, "load_stage", kind="BL2")
    _call(rot, "load_stage", kind="RT")
    for nonce, client in ((bytes(31), 1), (bytes(33), 1), (b"", 1), (bytes(32), 1 << 31)):
        with pytest.raises(MalformedMessage):
            _call(rot, "sign_token", nonce=nonce, client_id=client)
    token = _call(rot, "sign_token", nonce=bytes(48), client_id=-5).get_bytes("token")
    claims = psa.verify_token(token, iak_public(Fuses.in_home(tmp_path).huk, Lifecycle.SECURED))
    assert (claims.nonce, claims.client_id) == (bytes(48), -5)


# --- the door's wire forms ------------------------------------------------------------------------

_RELEASE = st.binary(min_size=32, max_size=32).map(lambda b: ids.release_id(b))
_COUNTERS = st.dictionaries(
    st.sampled_from(["app", "bl2", "runtime", "offline_boots"]), st.integers(0, 0xFFFF_FFFF)
).map(lambda d: tuple(sorted(d.items())))


def _wire_fields(wire: dict[str, object]) -> cbor.Fields:
    """What the NW decodes: the wire map after a CBOR round trip."""
    return cbor.Fields(cbor.loads(cbor.dumps(wire), what="reply"), what="reply")


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        api.BootInfo,
        device_id=st.just(DEVICE),
        product=st.just(ids.product(PRODUCT)),
        lifecycle=st.sampled_from([int(Lifecycle.SECURED), int(Lifecycle.NON_PSA_ROT_DEBUG)]),
        secure_boot=st.booleans(),
        debug_open=st.booleans(),
        boot_count=st.integers(0, 1 << 40),
        counters=_COUNTERS,
        runtime_version=st.just("1.0.0"),
        slot=st.none() | st.sampled_from(["slot_a", "slot_b"]),
        trial=st.booleans(),
        release_id=st.none() | _RELEASE,
        image_version=st.none() | st.just("2.1.0"),
        image_counter=st.none() | st.integers(0, 0xFFFF_FFFF),
        has_lease=st.booleans(),
    ),
    st.builds(
        api.EnclaveStatus,
        state=st.sampled_from(list(api.AppState)),
        release_id=st.none() | _RELEASE,
        version=st.none() | st.just("1.0.0"),
        crash=st.none() | st.builds(api.CrashInfo, st.just("ZeroDivisionError"), st.integers(0)),
        trial=st.booleans(),
        has_lease=st.booleans(),
        telemetry_dropped=st.integers(0, 1 << 20),
        counters=_COUNTERS,
    ),
    st.builds(
        api.OfflineBoot,
        allowed=st.booleans(),
        reason=st.sampled_from(list(OfflineReason)),
        release_id=st.none() | _RELEASE,
        version=st.none() | st.just("1.0.0"),
        boots_left=st.integers(0, 100),
    ),
)
def test_door_replies_round_trip(
    info: api.BootInfo, status: api.EnclaveStatus, offline: api.OfflineBoot
) -> None:
    """Every reply the enclave encodes decodes to the same dataclass on the NW side."""
    assert api.boot_info_from_wire(_wire_fields(api.boot_info_wire(info))) == info
    assert api.status_from_wire(_wire_fields(api.status_wire(status))) == status
    assert api.offline_from_wire(_wire_fields(api.offline_wire(offline))) == offline
    accepted = api.Accepted(ids.release_id(bytes(32)), "1.0.0", 3, Lease(2, NOW_S))
    assert api.accepted_from_wire(_wire_fields(api.accepted_wire(accepted))) == accepted
    outcome = api.CommandOutcome(CommandKind.UPDATE, 9, ids.release_id(bytes(32)))
    assert api.outcome_from_wire(_wire_fields(api.outcome_wire(outcome))) == outcome


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)
_KEYS = [
    "device_id", "product", "lifecycle", "secure_boot", "debug_open", "boot_count", "counters",
    "runtime_version", "slot", "trial", "release_id", "image_version", "image_counter",
    "has_lease", "state", "version", "crash", "telemetry_dropped", "allowed", "reason",
    "boots_left", "security_counter", "lease", "kind", "seq", "items",
]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(_KEYS), _ANY, max_size=12))
def test_door_reply_decoders_raise_only_malformed_message(raw: dict[str, object]) -> None:
    """A hostile reply map decodes or raises MalformedMessage, nothing else."""
    fields = cbor.Fields(raw, what="reply")
    for decode in (
        api.boot_info_from_wire,
        api.status_from_wire,
        api.offline_from_wire,
        api.accepted_from_wire,
        api.outcome_from_wire,
    ):
        with contextlib.suppress(MalformedMessage):
            decode(fields)
    with contextlib.suppress(MalformedMessage):
        api.telemetry_from_wire(fields)
