"""Appraisal, policy and explainer: real exchanges in memory over a real SQLite registry.

The device side is built here from protocol pieces only: IAKs from ``keys.derive_iak``, tokens from
``psa.sign_token``, and X.509 certificates from a test manufacturer CA made with ``cryptography``.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import appraisal
from gateway.db import open_engine
from gateway.explain import (
    ADVICE,
    MEASUREMENTS_SKIPPED,
    explain,
    explanation_json,
    parse_explanation_json,
)
from gateway.hooks import RegistryHooks
from gateway.kms import KeyFileKms
from gateway.ledger import Ledger, LedgerKind
from gateway.policy import (
    LeaseRule,
    LifecycleRule,
    Policy,
    PolicyError,
    RegistryPolicy,
    load_policy,
    store_policy,
)
from gateway.registry import (
    DeviceRecord,
    DeviceStatus,
    ReferenceValue,
    Registry,
    RegistryConflict,
    ReleaseRecord,
    TrustAnchor,
    TrustAnchorKind,
    VerdictRecord,
)
from protocol import keys, messages, psa
from protocol.attester import (
    AttesterEvent,
    AttesterSession,
    ChallengeReceived,
    Refused,
    VerdictReceived,
)
from protocol.bundles import ComponentType, wrap_release_cek
from protocol.grant import open_grant
from protocol.ids import DeviceId, Product, ReleaseId, SessionId, class_id
from protocol.reasons import ReasonCode, Status
from protocol.results import Lease, verify_result
from protocol.verifier import (
    Accepted,
    AppraisalRequest,
    ChallengeIssued,
    KeyClass,
    Rejected,
    VerifierEvent,
    VerifierSession,
)
from tests.conftest import FakeClock

NOW = 1_800_000_000
YEAR_S = 365 * 86_400
PRODUCT = Product("thermostat")
DEVICE = DeviceId("dev-0001")
STRANGER = DeviceId("dev-0002")
SECRET = b"s" * 32
CEK = bytes(range(32))
SECURED_CLASS = psa.lifecycle_class(psa.Lifecycle.SECURED)
DEBUG_CLASS = psa.lifecycle_class(psa.Lifecycle.NON_PSA_ROT_DEBUG)
HUK = bytes(range(100, 132))
SECURED_IAK = keys.derive_iak(HUK, SECURED_CLASS)
DEBUG_IAK = keys.derive_iak(HUK, DEBUG_CLASS)
OTHER_HUK = bytes(range(1, 33))
CA_KEY = keys.derive_p256(b"\x01" * 32, b"test/manufacturer-ca")
ROGUE_CA_KEY = keys.derive_p256(b"\x02" * 32, b"test/rogue-ca")
ROTPK = keys.derive_p256(b"\x03" * 32, b"test/rotpk")
ROTPK_ID = keys.signer_id(ROTPK.public_key())
ATTACKER_ID = hashlib.sha256(b"attacker key").digest()
BL2_OLD = hashlib.sha256(b"bl2 0.9").digest()
BL2 = hashlib.sha256(b"bl2 1.0").digest()
RUNTIME = hashlib.sha256(b"runtime 1.0").digest()
MODIFIED = hashlib.sha256(b"runtime built to exfiltrate").digest()
DIGEST = hashlib.sha256(b"manifest 2.0").digest()
RELEASE = ReleaseId(DIGEST.hex())
OLD_DIGEST = hashlib.sha256(b"manifest 1.0").digest()
OLD_RELEASE = ReleaseId(OLD_DIGEST.hex())
EPOCH = 2
IMAGE = b"\xa5" * 1000


# --- the device side -----------------------------------------------------------------------------


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if unit is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name(attributes)


def _when(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def make_ca(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    """A self-signed test manufacturer CA certificate."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_when(NOW - YEAR_S))
        .not_valid_after(_when(NOW + 10 * YEAR_S))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )


CA_CERT = make_ca(CA_KEY, "edgeseal test manufacturer CA")
ROGUE_CA_CERT = make_ca(ROGUE_CA_KEY, "rogue CA")


def issue(
    iak: ec.EllipticCurvePrivateKey,
    *,
    device: DeviceId = DEVICE,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] = (CA_KEY, CA_CERT),
    debug: bool = False,
    not_after_s: int = NOW + 5 * YEAR_S,
) -> bytes:
    """A DER device certificate over ``iak`` (subject = device id; debug ones marked so)."""
    ca_key, ca_cert = ca
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(device, "debug-class" if debug else None))
        .issuer_name(ca_cert.subject)
        .public_key(iak.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(NOW - YEAR_S))
        .not_valid_after(_when(not_after_s))
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def component(kind: str, measurement: bytes, signer: bytes = ROTPK_ID) -> psa.SoftwareComponent:
    """A software component as an edgeseal RoT records it."""
    return psa.SoftwareComponent(measurement, signer, kind, "1.0", "sha-256")


def good_claims(nonce: bytes, iak: ec.EllipticCurvePrivateKey = SECURED_IAK) -> psa.PsaClaims:
    """The claims of a genuine, up-to-date, SECURED device."""
    return psa.PsaClaims(
        profile=psa.PROFILE_RFC9783,
        client_id=1,
        lifecycle=psa.Lifecycle.SECURED,
        implementation_id=bytes(32),
        boot_seed=bytes(32),
        instance_id=keys.instance_id(iak.public_key()),
        nonce=nonce,
        software_components=(component("BL2", BL2), component("RT", RUNTIME)),
        platform=platform(),
    )


def platform(
    app: int = EPOCH, *, secure_boot: bool = True, debug_port: bool = False, smt: bool = False
) -> psa.PlatformClaims:
    """Platform claims with the given app counter and flags."""
    return psa.PlatformClaims.create(
        {"app": app, "bl2": 1, "runtime": 1},
        boot_count=7,
        secure_boot=secure_boot,
        debug_port_open=debug_port,
        smt_enabled=smt,
    )


def with_runtime(
    measurement: bytes, signer: bytes = ROTPK_ID
) -> Callable[[psa.PsaClaims], psa.PsaClaims]:
    """An edit replacing the runtime component."""

    def edit(claims: psa.PsaClaims) -> psa.PsaClaims:
        return replace(
            claims,
            software_components=(
                claims.software_components[0],
                component("RT", measurement, signer),
            ),
        )

    return edit


# --- the gateway side ----------------------------------------------------------------------------


@dataclass
class Gateway:
    """A gateway over a real registry, ledger and key-file KMS; ``policy`` is what is in force."""

    registry: Registry
    ledger: Ledger
    kms: KeyFileKms
    clock: FakeClock
    policy: Policy = field(default_factory=Policy.default)

    def hooks(self) -> RegistryHooks:
        """Fresh hooks (as a second gateway process would make)."""
        return RegistryHooks(
            self.registry, self.ledger, self.kms, lambda: self.policy, lambda: self.clock.now_s
        )

    def verifier(self, hooks: RegistryHooks, device: DeviceId = DEVICE) -> VerifierSession:
        """A verifier session for ``device`` under the policy in force."""
        config = self.policy.verifier_config(secret=SECRET, result_signer=self.kms.result_signer())
        return VerifierSession(config, hooks, device)

    def last_verdict(self, device: DeviceId = DEVICE) -> VerdictRecord:
        """The device's newest recorded verdict."""
        (record,) = self.registry.verdicts(device, limit=1)
        return record


def build_gateway(url: str, key_path: Path, clock: FakeClock) -> Gateway:
    """A gateway with the test CA trusted, DEVICE enrolled, reference values and a release."""
    engine = open_engine(url)
    registry, ledger = Registry.open(engine), Ledger.open(engine)
    kms = KeyFileKms.create(key_path)
    now = clock.now_s
    registry.add_trust_anchor(
        TrustAnchorKind.MANUFACTURER_CA,
        public_key=CA_KEY.public_key(),
        name="test CA",
        now_s=now,
        cert_der=CA_CERT.public_bytes(Encoding.DER),
    )
    enroll(registry, DEVICE, HUK, now_s=now)
    for kind, measurement, version, counter in (
        (ComponentType.BL2, BL2_OLD, "0.9", 0),
        (ComponentType.BL2, BL2, "1.0", 1),
        (ComponentType.RUNTIME, RUNTIME, "1.0", 1),
    ):
        value = ReferenceValue(PRODUCT, kind, measurement, version, ROTPK_ID, counter, "factory")
        registry.add_reference_value(value, now_s=now)
    add_release(registry, kms, OLD_DIGEST, counter=1, now_s=now)
    add_release(registry, kms, DIGEST, counter=EPOCH, now_s=now)
    registry.set_epoch(PRODUCT, EPOCH, now_s=now)
    registry.assign(DEVICE, RELEASE, now_s=now)
    return Gateway(registry, ledger, kms, clock)


def enroll(
    registry: Registry,
    device: DeviceId,
    huk: bytes,
    *,
    now_s: int,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] = (CA_KEY, CA_CERT),
) -> None:
    """Enroll a device with certificates from ``ca`` over the IAKs derived from ``huk``."""
    secured, debug = keys.derive_iak(huk, SECURED_CLASS), keys.derive_iak(huk, DEBUG_CLASS)
    registry.enroll_device(
        device,
        product=PRODUCT,
        cert_secured_der=issue(secured, device=device, ca=ca),
        cert_debug_der=issue(debug, device=device, ca=ca, debug=True),
        iak_secured_point=keys.p256_point(secured.public_key()),
        iak_debug_point=keys.p256_point(debug.public_key()),
        counters={"app": 1, "bl2": 1, "runtime": 1},
        now_s=now_s,
    )


def add_release(
    registry: Registry, kms: KeyFileKms, digest: bytes, *, counter: int, now_s: int
) -> None:
    """Store a release whose CEK is HPKE-wrapped to the gateway, as a vendor bundle brings it."""
    registry.add_release(
        ReleaseId(digest.hex()),
        product=PRODUCT,
        version=f"{counter}.0",
        security_counter=counter,
        sealed_image=IMAGE,
        wrapped_cek=wrap_release_cek(CEK, kms.hpke_public_key(), digest),
        created_s=now_s,
        now_s=now_s,
    )


@pytest.fixture
def gateway(tmp_path: Path, clock: FakeClock) -> Iterator[Gateway]:
    """A gateway over a SQLite registry in ``tmp_path``."""
    gw = build_gateway(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "gateway.key", clock)
    yield gw
    gw.registry.engine.dispose()


# --- one exchange --------------------------------------------------------------------------------


@dataclass
class Exchange:
    """What happened in one exchange, on both sides."""

    event: VerifierEvent
    device_event: AttesterEvent
    session_id: SessionId
    enclave: x25519.X25519PrivateKey
    payload: bytes = b""


def attest(
    gw: Gateway,
    rng: random.Random,
    *,
    device: DeviceId = DEVICE,
    iak: ec.EllipticCurvePrivateKey = SECURED_IAK,
    edit: Callable[[psa.PsaClaims], psa.PsaClaims] | None = None,
    nonce: bytes | None = None,
    delay_s: int = 1,
    hooks: RegistryHooks | None = None,
) -> Exchange:
    """Run hello → challenge → evidence → verdict or refusal, recording refusals as the service
    does."""
    hooks = hooks or gw.hooks()
    session = AttesterSession(device, SessionId(rng.randbytes(16)), timeout_s=60)
    verifier = gw.verifier(hooks, device)
    enclave = x25519.X25519PrivateKey.generate()
    hello = session.start(now_s=gw.clock.now_s, certificates=(b"cert",))
    event = verifier.receive_data(hello, now_s=gw.clock.now_s, randomness=rng.randbytes)
    payload = b""
    if isinstance(event, ChallengeIssued):
        challenged = session.receive_data(event.payload)
        assert isinstance(challenged, ChallengeReceived)
        raw = keys.x25519_raw(enclave.public_key())
        claims = good_claims(nonce or challenged.binding_for(raw), iak)
        token = psa.sign_token(edit(claims) if edit else claims, iak)
        payload = session.send_evidence(token=token, enclave_key=raw, now_s=gw.clock.now_s)
        gw.clock.advance(delay_s)
        event = verifier.receive_data(payload, now_s=gw.clock.now_s, randomness=rng.randbytes)
    if isinstance(event, Rejected):
        hooks.record_rejection(device, session.session_id, event, now_s=gw.clock.now_s)
    assert not isinstance(event, ChallengeIssued)
    device_event = session.receive_data(event.payload)
    return Exchange(event, device_event, session.session_id, enclave, payload)


def assert_refused(
    gw: Gateway, exchange: Exchange, code: ReasonCode, device: DeviceId = DEVICE
) -> None:
    """Refused with ``code`` (the device sees the codes only), explained, and no key released."""
    event = exchange.event
    assert isinstance(event, Rejected), event
    assert code in event.reasons
    assert isinstance(exchange.device_event, Refused)
    assert exchange.device_event.reasons == event.reasons
    record = gw.last_verdict(device)
    assert record.status is Status.CONTRAINDICATED
    assert code.value in record.reasons and record.session_id == exchange.session_id
    found = [e for e in parse_explanation_json(record.explanation_json) if e.code == code.value]
    assert found and all(e.cause and e.fix and e.claim and e.expected and e.got for e in found)
    assert gw.registry.receipts(device) == ()


def grant_of(exchange: Exchange) -> bytes:
    """The CEK the device's grant opens to."""
    assert isinstance(exchange.device_event, VerdictReceived)
    verdict = exchange.device_event.verdict
    assert verdict.grant is not None and verdict.release_id == RELEASE
    return open_grant(
        verdict.grant,
        exchange.enclave,
        device_id=DEVICE,
        session_id=exchange.session_id,
        manifest_digest=DIGEST,
    )


# --- accepted ------------------------------------------------------------------------------------


def test_genuine_device_gets_a_grant_that_opens(gateway: Gateway, rng: random.Random) -> None:
    """A genuine device is affirmed, its result verifies and its grant opens to the CEK."""
    exchange = attest(gateway, rng)
    assert isinstance(exchange.event, Accepted)
    assert exchange.event.appraisal.reasons == ()
    assert grant_of(exchange) == CEK
    assert isinstance(exchange.device_event, VerdictReceived)
    result = verify_result(
        exchange.device_event.verdict.result,
        gateway.kms.result_public_key(),
        device_id=DEVICE,
        session_id=exchange.session_id,
        now_s=gateway.clock.now_s,
    )
    assert result.status is Status.AFFIRMING and result.manifest_digest == DIGEST
    assert result.lease == Lease(offline_boots=3, expires_s=gateway.clock.now_s + 86_400)
    record = gateway.last_verdict()
    assert record.status is Status.AFFIRMING and record.reasons == ()
    assert parse_explanation_json(record.explanation_json) == ()
    kinds = [entry.kind for entry in gateway.ledger.entries(DEVICE)]
    assert kinds == [LedgerKind.RELEASE, LedgerKind.VERDICT]
    assert gateway.registry.get_device(DEVICE).counters["app"] == EPOCH


# --- refusals by the verifier session, before the appraisal --------------------------------------


def test_unknown_device_is_refused_and_explained(gateway: Gateway, rng: random.Random) -> None:
    """A device that is not enrolled gets device.unknown at hello; the refusal is explained."""
    assert_refused(
        gateway, attest(gateway, rng, device=STRANGER), ReasonCode.DEVICE_UNKNOWN, STRANGER
    )


def test_bad_signature_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """A token signed by a key that is not an enrolled IAK (a clone) is refused."""
    exchange = attest(gateway, rng, iak=keys.derive_iak(OTHER_HUK, SECURED_CLASS))
    assert_refused(gateway, exchange, ReasonCode.EVIDENCE_SIGNATURE_INVALID)


def test_wrong_binding_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """A token whose nonce does not bind this challenge and enclave key is refused."""
    exchange = attest(gateway, rng, nonce=bytes(32))
    assert_refused(gateway, exchange, ReasonCode.EVIDENCE_BINDING_MISMATCH)


def test_expired_challenge_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """Evidence arriving after the policy's challenge lifetime is refused."""
    exchange = attest(gateway, rng, delay_s=gateway.policy.challenge_ttl_s + 1)
    assert_refused(gateway, exchange, ReasonCode.CHALLENGE_EXPIRED)


def test_replayed_challenge_is_refused_by_another_process(
    gateway: Gateway, rng: random.Random
) -> None:
    """Evidence replayed to a second gateway instance on the same registry is nonce.replayed."""
    first = attest(gateway, rng)
    assert isinstance(first.event, Accepted)
    other = gateway.hooks()
    replayed = gateway.verifier(other).receive_data(
        first.payload, now_s=gateway.clock.now_s, randomness=rng.randbytes
    )
    assert isinstance(replayed, Rejected) and replayed.reasons == (ReasonCode.NONCE_REPLAYED,)
    other.record_rejection(DEVICE, first.session_id, replayed, now_s=gateway.clock.now_s)
    record = gateway.last_verdict()
    assert record.reasons == ("nonce.replayed",)
    assert len(gateway.registry.receipts(DEVICE)) == 1


# --- refusals by the appraisal -------------------------------------------------------------------


def test_revoked_device_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """A revoked device is refused with device.revoked."""
    gateway.registry.revoke_device(DEVICE, reason="stolen", now_s=gateway.clock.now_s)
    assert_refused(gateway, attest(gateway, rng), ReasonCode.DEVICE_REVOKED)


def test_certificate_from_an_untrusted_ca_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """A device whose certificate chains to a CA the operator does not trust is refused."""
    enroll(gateway.registry, STRANGER, OTHER_HUK, now_s=NOW, ca=(ROGUE_CA_KEY, ROGUE_CA_CERT))
    gateway.registry.assign(STRANGER, RELEASE, now_s=NOW)
    exchange = attest(gateway, rng, device=STRANGER, iak=keys.derive_iak(OTHER_HUK, SECURED_CLASS))
    assert_refused(gateway, exchange, ReasonCode.CERTIFICATE_UNTRUSTED, STRANGER)
    assert isinstance(exchange.event, Rejected)
    assert exchange.event.reasons == (ReasonCode.CERTIFICATE_UNTRUSTED,)


def test_debug_class_key_is_refused_with_every_finding(
    gateway: Gateway, rng: random.Random
) -> None:
    """A token under the debug-class IAK claiming debug lifecycle gets both findings."""

    def debug(claims: psa.PsaClaims) -> psa.PsaClaims:
        return replace(claims, lifecycle=psa.Lifecycle.NON_PSA_ROT_DEBUG)

    exchange = attest(gateway, rng, iak=DEBUG_IAK, edit=debug)
    assert_refused(gateway, exchange, ReasonCode.CERTIFICATE_DEBUG_CLASS)
    assert_refused(gateway, exchange, ReasonCode.LIFECYCLE_DEBUG)


def test_debug_lifecycle_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """A SECURED-key token claiming a debug lifecycle is refused with lifecycle.debug."""
    exchange = attest(
        gateway, rng, edit=lambda c: replace(c, lifecycle=psa.Lifecycle.RECOVERABLE_PSA_ROT_DEBUG)
    )
    assert_refused(gateway, exchange, ReasonCode.LIFECYCLE_DEBUG)


def test_provisioning_lifecycle_is_not_secured(gateway: Gateway, rng: random.Random) -> None:
    """A lifecycle that is neither SECURED nor debug is lifecycle.not_secured."""
    exchange = attest(gateway, rng, edit=lambda c: replace(c, lifecycle=0x2001))
    assert_refused(gateway, exchange, ReasonCode.LIFECYCLE_NOT_SECURED)


def _bl2(measurement: bytes, signer: bytes = ROTPK_ID) -> Callable[[psa.PsaClaims], psa.PsaClaims]:
    def edit(claims: psa.PsaClaims) -> psa.PsaClaims:
        return replace(
            claims,
            software_components=(
                component("BL2", measurement, signer),
                claims.software_components[1],
            ),
        )

    return edit


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (_bl2(hashlib.sha256(b"patched bl2").digest()), ReasonCode.BOOT_BL2_MISMATCH),
        (with_runtime(MODIFIED), ReasonCode.BOOT_RUNTIME_MISMATCH),
        (with_runtime(RUNTIME, ATTACKER_ID), ReasonCode.BOOT_SIGNER_MISMATCH),
        (_bl2(BL2_OLD), ReasonCode.BOOT_STAGE_ROLLBACK),
        (
            lambda c: replace(c, software_components=c.software_components[:1]),
            ReasonCode.BOOT_STAGE_MISSING,
        ),
    ],
    ids=["bl2", "runtime", "signer", "rollback", "missing"],
)
def test_boot_chain_mismatches_are_refused(
    gateway: Gateway,
    rng: random.Random,
    edit: Callable[[psa.PsaClaims], psa.PsaClaims],
    code: ReasonCode,
) -> None:
    """Each boot-stage deviation is refused with its own reason code."""
    exchange = attest(gateway, rng, edit=edit)
    assert_refused(gateway, exchange, code)
    assert isinstance(exchange.event, Rejected) and exchange.event.reasons == (code,)


def test_attacker_signed_runtime_gets_both_findings(gateway: Gateway, rng: random.Random) -> None:
    """A runtime of unknown measurement signed by another key is a mismatch and a signer finding."""
    exchange = attest(gateway, rng, edit=with_runtime(MODIFIED, ATTACKER_ID))
    assert isinstance(exchange.event, Rejected)
    assert exchange.event.reasons == (
        ReasonCode.BOOT_RUNTIME_MISMATCH,
        ReasonCode.BOOT_SIGNER_MISMATCH,
    )


def test_older_boot_stage_is_allowed_when_the_policy_says_so(
    gateway: Gateway, rng: random.Random
) -> None:
    """allow_older_boot_stages accepts a genuine older BL2."""
    gateway.policy = replace(gateway.policy, allow_older_boot_stages=True)
    assert isinstance(attest(gateway, rng, edit=_bl2(BL2_OLD)).event, Accepted)


def test_image_below_the_epoch_is_never_released(gateway: Gateway, rng: random.Random) -> None:
    """An assigned release overtaken by a raised epoch is image.below_epoch, fatal."""
    gateway.registry.set_epoch(PRODUCT, EPOCH + 1, now_s=NOW)
    exchange = attest(gateway, rng, edit=lambda c: replace(c, platform=platform(EPOCH + 1)))
    assert_refused(gateway, exchange, ReasonCode.IMAGE_BELOW_EPOCH)


def test_unassigned_device_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """A device with no assigned release is app.not_assigned."""
    enroll(gateway.registry, STRANGER, OTHER_HUK, now_s=NOW)
    exchange = attest(gateway, rng, device=STRANGER, iak=keys.derive_iak(OTHER_HUK, SECURED_CLASS))
    assert_refused(gateway, exchange, ReasonCode.APP_NOT_ASSIGNED, STRANGER)


def test_unknown_app_measurement_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """An APP component naming no known release is app.unknown_release."""

    def app(claims: psa.PsaClaims) -> psa.PsaClaims:
        forged = component("APP", hashlib.sha256(b"forged").digest(), bytes(32))
        return replace(claims, software_components=(*claims.software_components, forged))

    assert_refused(gateway, attest(gateway, rng, edit=app), ReasonCode.APP_UNKNOWN_RELEASE)


def test_known_app_measurement_is_accepted(gateway: Gateway, rng: random.Random) -> None:
    """An APP component naming a release of the product is no finding."""

    def app(claims: psa.PsaClaims) -> psa.PsaClaims:
        running = component("APP", OLD_DIGEST, bytes(32))
        return replace(claims, software_components=(*claims.software_components, running))

    assert isinstance(attest(gateway, rng, edit=app).event, Accepted)


def test_counter_rollback_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """A token whose app counter is below what the registry last saw is counter.rollback."""
    gateway.registry.set_counters(DEVICE, {"app": EPOCH + 1, "bl2": 1, "runtime": 1})
    assert_refused(gateway, attest(gateway, rng), ReasonCode.COUNTER_ROLLBACK)


@pytest.mark.parametrize(
    ("flags", "code"),
    [
        ({"secure_boot": False}, ReasonCode.PLATFORM_SECURE_BOOT_OFF),
        ({"debug_port": True}, ReasonCode.PLATFORM_DEBUG_PORT_OPEN),
    ],
)
def test_platform_flags_against_policy(
    gateway: Gateway, rng: random.Random, flags: dict[str, bool], code: ReasonCode
) -> None:
    """Secure boot off or an open debug port is refused under the default policy."""
    exchange = attest(gateway, rng, edit=lambda c: replace(c, platform=platform(**flags)))
    assert_refused(gateway, exchange, code)


def test_smt_is_a_warning_without_a_key_when_forbidden(
    gateway: Gateway, rng: random.Random
) -> None:
    """forbid_smt makes SMT a warning: a signed result, but no grant."""
    gateway.policy = replace(gateway.policy, forbid_smt=True)
    exchange = attest(gateway, rng, edit=lambda c: replace(c, platform=platform(smt=True)))
    assert isinstance(exchange.event, Accepted)
    assert exchange.event.result.status is Status.WARNING
    assert isinstance(exchange.device_event, VerdictReceived)
    assert exchange.device_event.verdict.grant is None
    assert gateway.registry.receipts(DEVICE) == ()


def test_unsupported_profile_is_refused(gateway: Gateway, rng: random.Random) -> None:
    """A profile outside accepted_profiles is evidence.profile.unsupported."""
    gateway.policy = replace(gateway.policy, accepted_profiles=(psa.PROFILE_PSA_2_0_0,))
    assert_refused(gateway, attest(gateway, rng), ReasonCode.EVIDENCE_PROFILE_UNSUPPORTED)


def test_every_finding_is_collected(gateway: Gateway, rng: random.Random) -> None:
    """A revoked device with a modified runtime and open platform reports every finding."""
    gateway.registry.revoke_device(DEVICE, reason="test", now_s=NOW)

    def everything(claims: psa.PsaClaims) -> psa.PsaClaims:
        tampered = with_runtime(MODIFIED)(claims)
        return replace(tampered, platform=platform(secure_boot=False, debug_port=True))

    exchange = attest(gateway, rng, edit=everything)
    assert isinstance(exchange.event, Rejected)
    assert set(exchange.event.reasons) == {
        ReasonCode.DEVICE_REVOKED,
        ReasonCode.BOOT_RUNTIME_MISMATCH,
        ReasonCode.PLATFORM_SECURE_BOOT_OFF,
        ReasonCode.PLATFORM_DEBUG_PORT_OPEN,
    }
    explained = {e.code for e in parse_explanation_json(gateway.last_verdict().explanation_json)}
    assert explained == {code.value for code in exchange.event.reasons}


# --- warnings that release -----------------------------------------------------------------------


def test_below_epoch_device_counter_warns_and_releases(
    gateway: Gateway, rng: random.Random
) -> None:
    """A device whose app counter is below the epoch gets a warning and the key it needs."""
    exchange = attest(gateway, rng, edit=lambda c: replace(c, platform=platform(EPOCH - 1)))
    assert isinstance(exchange.event, Accepted)
    assert exchange.event.result.status is Status.WARNING
    assert exchange.event.result.reasons == (ReasonCode.COUNTER_BELOW_EPOCH,)
    assert grant_of(exchange) == CEK
    record = gateway.last_verdict()
    assert record.status is Status.WARNING and record.reasons == ("counter.below_epoch",)
    assert len(gateway.registry.receipts(DEVICE)) == 1


def test_skip_measurement_checks_lets_a_modified_runtime_through_marked(
    gateway: Gateway, rng: random.Random
) -> None:
    """The negative-control switch releases the key to a modified runtime, never silently."""
    gateway.policy = replace(gateway.policy, skip_measurement_checks=True)
    exchange = attest(gateway, rng, edit=with_runtime(MODIFIED, ATTACKER_ID))
    assert isinstance(exchange.event, Accepted)
    assert grant_of(exchange) == CEK
    assert exchange.event.result.status is Status.WARNING
    assert exchange.event.result.trust_vector.executables == 32
    record = gateway.last_verdict()
    assert record.status is Status.WARNING
    assert MEASUREMENTS_SKIPPED in record.reasons
    explained = parse_explanation_json(record.explanation_json)
    assert [e.code for e in explained] == [MEASUREMENTS_SKIPPED]
    assert "skip_measurement_checks" in explained[0].cause


def test_skip_measurement_checks_still_refuses_other_findings(
    gateway: Gateway, rng: random.Random
) -> None:
    """The switch skips measurements only: secure boot off is still refused."""
    gateway.policy = replace(gateway.policy, skip_measurement_checks=True)
    exchange = attest(gateway, rng, edit=lambda c: replace(c, platform=platform(secure_boot=False)))
    assert_refused(gateway, exchange, ReasonCode.PLATFORM_SECURE_BOOT_OFF)
    assert MEASUREMENTS_SKIPPED in gateway.last_verdict().reasons


# --- the policy ----------------------------------------------------------------------------------


def test_verdicts_record_the_stored_policy_version(gateway: Gateway, rng: random.Random) -> None:
    """Verdicts record the version of the policy in force, read from the registry."""
    hooks = RegistryHooks(
        gateway.registry,
        gateway.ledger,
        gateway.kms,
        RegistryPolicy(gateway.registry),
        lambda: gateway.clock.now_s,
    )
    attest(gateway, rng, hooks=hooks)
    assert gateway.last_verdict().policy_version == 0
    store_policy(
        gateway.registry, replace(Policy.default(), version=7), now_s=NOW, ledger=gateway.ledger
    )
    exchange = attest(gateway, rng, hooks=hooks)
    assert isinstance(exchange.event, Accepted) and exchange.event.result.policy_version == 7
    assert gateway.last_verdict().policy_version == 7
    assert LedgerKind.POLICY_CHANGE in {entry.kind for entry in gateway.ledger.entries()}


def test_policy_versions_only_go_up(gateway: Gateway) -> None:
    """A stored policy must be numbered from 1 and above every stored version."""
    registry = gateway.registry
    with pytest.raises(PolicyError, match="numbered from 1"):
        store_policy(registry, Policy.default(), now_s=NOW)
    store_policy(registry, replace(Policy.default(), version=2, forbid_smt=True), now_s=NOW)
    with pytest.raises(RegistryConflict):
        store_policy(registry, replace(Policy.default(), version=2), now_s=NOW)
    assert load_policy(registry) == replace(Policy.default(), version=2, forbid_smt=True)


def test_default_policy_round_trips() -> None:
    """The default policy's JSON parses back to it, and its rules are the safe ones."""
    policy = Policy.default()
    assert Policy.parse(policy.to_json()) == policy
    assert Policy.parse('{"format": 1, "version": 0}') == policy
    assert policy.require_lifecycle is LifecycleRule.SECURED and not policy.skip_measurement_checks
    assert policy.require_secure_boot and policy.forbid_debug_port and not policy.allow_debug_class


@settings(max_examples=150, deadline=None)
@given(
    st.builds(
        Policy,
        version=st.integers(0, 2**63 - 1),
        accepted_profiles=st.sampled_from(
            [(psa.PROFILE_RFC9783,), (psa.PROFILE_PSA_2_0_0, psa.PROFILE_RFC9783)]
        ),
        require_lifecycle=st.sampled_from(LifecycleRule),
        allow_debug_class=st.booleans(),
        require_secure_boot=st.booleans(),
        forbid_debug_port=st.booleans(),
        forbid_smt=st.booleans(),
        allow_older_boot_stages=st.booleans(),
        lease=st.builds(
            LeaseRule, offline_boots=st.integers(0, 2**32 - 1), duration_s=st.integers(1, 10**8)
        ),
        result_ttl_s=st.integers(1, 10**8),
        challenge_ttl_s=st.integers(1, 10**8),
        skip_measurement_checks=st.booleans(),
    )
)
def test_any_policy_round_trips(policy: Policy) -> None:
    """Every valid policy survives to_json and parse unchanged."""
    assert Policy.parse(policy.to_json()) == policy


@pytest.mark.parametrize(
    ("document", "field_name"),
    [
        ('{"format": 1, "version": 1, "forbid_smtt": true}', "policy.forbid_smtt"),
        ('{"format": 1, "version": 1, "forbid_smt": 1}', "policy.forbid_smt"),
        ('{"format": 1}', "policy.version"),
        ('{"format": 2, "version": 1}', "policy.format"),
        ('{"version": 1}', "policy.format"),
        ('{"format": 1, "version": -1}', "policy.version"),
        ('{"format": 1, "version": true}', "policy.version"),
        ('{"format": 1, "version": 1, "lease": {"boots": 1}}', "policy.lease.boots"),
        ('{"format": 1, "version": 1, "lease": {"duration_s": 0}}', "policy.lease.duration_s"),
        ('{"format": 1, "version": 1, "lease": []}', "policy.lease"),
        ('{"format": 1, "version": 1, "accepted_profiles": ["x"]}', "policy.accepted_profiles"),
        ('{"format": 1, "version": 1, "accepted_profiles": []}', "policy.accepted_profiles"),
        ('{"format": 1, "version": 1, "require_lifecycle": "debug"}', "policy.require_lifecycle"),
        ('{"format": 1, "version": 1, "challenge_ttl_s": 0}', "policy.challenge_ttl_s"),
        ('{"format": 1, "version": 1, "skip_measurement_checks": "no"}', "skip_measurement"),
        ("[1, 2]", "policy"),
        ("{", "not a JSON document"),
    ],
)
def test_bad_policy_documents_name_the_field(document: str, field_name: str) -> None:
    """Every invalid document raises PolicyError naming the offending field."""
    with pytest.raises(PolicyError, match=field_name.replace(".", r"\.")):
        Policy.parse(document)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_arbitrary_policy_text_raises_only_policy_error(text: str | bytes) -> None:
    """Arbitrary input either parses or raises PolicyError, nothing else."""
    with contextlib.suppress(PolicyError):
        Policy.parse(text)


# --- the explainer -------------------------------------------------------------------------------


def test_every_reason_code_has_an_explanation() -> None:
    """The explainer's table covers every reason code with five filled sentences."""
    assert set(ADVICE) == set(ReasonCode)
    for code in ReasonCode:
        explanation = explain(code, device=DEVICE, product=PRODUCT)
        sentences = (explanation.claim, explanation.expected, explanation.got)
        assert all(sentences) and explanation.cause and explanation.fix
        assert not any("{" in text for text in explanation.to_json_obj().values())


def test_explanation_json_round_trips() -> None:
    """Explanations survive the JSON document stored with a verdict; a bad one is refused."""
    items = tuple(explain(code, device=DEVICE, got="x") for code in ReasonCode)
    assert parse_explanation_json(explanation_json(items)) == items
    for bad in ('{"v": 2, "findings": []}', '{"v": 1}', '{"v": 1, "findings": [{"code": 1}]}'):
        with pytest.raises(ValueError, match="explanation"):
            parse_explanation_json(bad)


# --- the appraisal as a pure function ------------------------------------------------------------

_DEVICE_RECORD = DeviceRecord(
    device_id=DEVICE,
    product=PRODUCT,
    class_id=class_id(PRODUCT),
    cert_secured_der=issue(SECURED_IAK),
    cert_debug_der=issue(DEBUG_IAK, debug=True),
    iak_secured_point=keys.p256_point(SECURED_IAK.public_key()),
    iak_debug_point=keys.p256_point(DEBUG_IAK.public_key()),
    status=DeviceStatus.ACTIVE,
    enrolled_at_s=NOW,
)
_ANCHOR = TrustAnchor(
    kind=TrustAnchorKind.MANUFACTURER_CA,
    signer_id=keys.signer_id(CA_KEY.public_key()),
    public_point=keys.p256_point(CA_KEY.public_key()),
    name="test CA",
    added_at_s=NOW,
)
_REFERENCES = (
    ReferenceValue(PRODUCT, ComponentType.BL2, BL2, "1.0", ROTPK_ID, 1, "factory"),
    ReferenceValue(PRODUCT, ComponentType.RUNTIME, RUNTIME, "1.0", ROTPK_ID, 1, "factory"),
)
_RELEASE_RECORD = ReleaseRecord(RELEASE, PRODUCT, "2.0", EPOCH, b"w", len(IMAGE), NOW, NOW)

_BELOW = (("app", EPOCH - 1), ("bl2", 1), ("runtime", 1))
#: Each fault: how it changes the device record and claims, and the code it must produce.
_FAULTS: dict[
    str,
    tuple[
        ReasonCode, Callable[[DeviceRecord], DeviceRecord], Callable[[psa.PsaClaims], psa.PsaClaims]
    ],
] = {
    "revoked": (
        ReasonCode.DEVICE_REVOKED,
        lambda d: replace(d, status=DeviceStatus.REVOKED, revoked_at_s=NOW, revoke_reason="x"),
        lambda c: c,
    ),
    "bl2": (ReasonCode.BOOT_BL2_MISMATCH, lambda d: d, _bl2(bytes(32))),
    "runtime": (ReasonCode.BOOT_RUNTIME_MISMATCH, lambda d: d, with_runtime(MODIFIED)),
    "lifecycle": (
        ReasonCode.LIFECYCLE_DEBUG,
        lambda d: d,
        lambda c: replace(c, lifecycle=psa.Lifecycle.NON_PSA_ROT_DEBUG),
    ),
    "instance": (
        ReasonCode.CERTIFICATE_MISMATCH,
        lambda d: d,
        lambda c: replace(c, instance_id=b"\x01" + bytes(32)),
    ),
    "rollback": (
        ReasonCode.COUNTER_ROLLBACK,
        lambda d: replace(d, counters={"bl2": 9}),
        lambda c: c,
    ),
    "below": (
        ReasonCode.COUNTER_BELOW_EPOCH,
        lambda d: d,
        lambda c: replace(c, platform=replace(c.platform or platform(), fuse_counters=_BELOW)),
    ),
    "secure_boot": (
        ReasonCode.PLATFORM_SECURE_BOOT_OFF,
        lambda d: d,
        lambda c: replace(c, platform=replace(c.platform or platform(), secure_boot=False)),
    ),
}


def appraisal_request(claims: psa.PsaClaims) -> AppraisalRequest:
    """A request as the verifier session hands it over, for ``claims`` signed by the SECURED IAK."""
    session = SessionId(bytes(16))
    challenge = messages.Challenge(
        session_id=session, device_id=DEVICE, nonce=bytes(32), expires_s=NOW + 30, mac=bytes(32)
    )
    return AppraisalRequest(DEVICE, session, claims, KeyClass.SECURED, NOW, challenge)


@settings(max_examples=120, deadline=None)
@given(st.sets(st.sampled_from(sorted(_FAULTS))))
def test_appraisal_collects_exactly_the_findings_of_any_fault_set(faults: set[str]) -> None:
    """For any combination of faults, the appraisal reports each one's code and nothing else."""
    device, claims = _DEVICE_RECORD, good_claims(bytes(32))
    for name in sorted(faults):
        device, claims = _FAULTS[name][1](device), _FAULTS[name][2](claims)
    request = appraisal_request(claims)
    outcome = appraisal.appraise(
        request,
        device=device,
        policy=Policy.default(),
        anchors=(_ANCHOR,),
        reference_values=_REFERENCES,
        epoch=EPOCH,
        assigned=RELEASE,
        find_release=lambda rid: _RELEASE_RECORD if rid == RELEASE else None,
    )
    expected = {_FAULTS[name][0] for name in faults}
    assert set(outcome.reasons) == expected
    assert len(outcome.explanations) >= len(expected)
    if not expected:
        assert outcome.status is Status.AFFIRMING
    elif expected == {ReasonCode.COUNTER_BELOW_EPOCH}:
        assert outcome.status is Status.WARNING
    else:
        assert outcome.status is Status.CONTRAINDICATED


def test_bare_ca_key_anchor_and_expired_certificate() -> None:
    """An anchor without a certificate still verifies the chain; an expired certificate is found."""
    device = replace(_DEVICE_RECORD, cert_secured_der=issue(SECURED_IAK, not_after_s=NOW - 1))
    request = appraisal_request(good_claims(bytes(32)))
    outcome = appraisal.appraise(
        request,
        device=device,
        policy=Policy.default(),
        anchors=(_ANCHOR,),
        reference_values=_REFERENCES,
        epoch=EPOCH,
        assigned=RELEASE,
        find_release=lambda rid: _RELEASE_RECORD,
    )
    assert outcome.reasons == (ReasonCode.CERTIFICATE_EXPIRED,)


def test_certificate_for_another_device_or_key_is_a_mismatch() -> None:
    """A certificate naming another device, or over another key, is certificate.mismatch."""
    wrong = issue(keys.derive_iak(OTHER_HUK, SECURED_CLASS), device=STRANGER)
    device = replace(_DEVICE_RECORD, cert_secured_der=wrong)
    request = appraisal_request(good_claims(bytes(32)))
    outcome = appraisal.appraise(
        request,
        device=device,
        policy=Policy.default(),
        anchors=(_ANCHOR,),
        reference_values=_REFERENCES,
        epoch=EPOCH,
        assigned=RELEASE,
        find_release=lambda rid: _RELEASE_RECORD,
    )
    assert outcome.reasons == (ReasonCode.CERTIFICATE_MISMATCH,)
    assert len(outcome.findings) == 2
