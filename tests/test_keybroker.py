"""The key broker: the typed release rule, run-time re-checks, receipts, and PostgreSQL."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Connection, Engine

from gateway.appraisal import AppraisalOutcome, Finding, conclude
from gateway.db import open_engine
from gateway.explain import explain
from gateway.hooks import RegistryHooks
from gateway.keybroker import (
    KeyBroker,
    KeyReleaseRefused,
    ReleasableVerdict,
    check_release_rule,
    releasable_verdict,
)
from gateway.kms import KeyFileKms
from gateway.ledger import LedgerKind
from gateway.policy import LeaseRule
from gateway.registry import AppraisalSnapshot, Registry, ReleaseRecord
from protocol import cbor
from protocol.bundles import wrap_release_cek
from protocol.errors import InvalidSignedMessage
from protocol.ids import DeviceId, Product, SessionId
from protocol.reasons import ReasonCode, Status
from protocol.results import Lease, verify_receipt
from protocol.verifier import Accepted, Rejected
from tests.conftest import FakeClock
from tests.test_appraisal import (
    CEK,
    DEVICE,
    DIGEST,
    EPOCH,
    PRODUCT,
    RELEASE,
    Gateway,
    assert_refused,
    attest,
    build_gateway,
    grant_of,
    platform,
)
from tests.test_appraisal import (
    gateway as gateway,  # the fixture, re-exported for this module
)

SESSION = SessionId(bytes(range(16)))


def outcome(
    gw: Gateway, *codes: ReasonCode, skipped: bool = False, epoch: int = EPOCH
) -> AppraisalOutcome:
    """An appraisal outcome for DEVICE with findings of ``codes`` and the assigned release."""
    findings = [Finding(code, explain(code, device=DEVICE)) for code in codes]
    return conclude(
        device_id=DEVICE,
        session_id=SESSION,
        product=PRODUCT,
        findings=findings,
        policy_version=0,
        epoch=epoch,
        release=gw.registry.get_release(RELEASE),
        measurements_skipped=skipped,
    )


def broker(gw: Gateway) -> KeyBroker:
    """A broker over the gateway's registry, ledger and KMS."""
    return KeyBroker(gw.registry, gw.ledger, gw.kms)


# --- the type ------------------------------------------------------------------------------------


def test_releasable_verdict_cannot_be_built_directly(gateway: Gateway) -> None:
    """Only releasable_verdict constructs a ReleasableVerdict; replace() re-checks the rule."""
    release = gateway.registry.get_release(RELEASE)
    with pytest.raises(TypeError, match="releasable_verdict"):
        ReleasableVerdict(DEVICE, SESSION, PRODUCT, Status.AFFIRMING, (), False, release, EPOCH)
    verdict = releasable_verdict(outcome(gateway))
    assert verdict is not None
    with pytest.raises(KeyReleaseRefused):
        replace(verdict, status=Status.CONTRAINDICATED)
    with pytest.raises(KeyReleaseRefused):
        replace(verdict, epoch=EPOCH + 1)


@pytest.mark.parametrize(
    ("codes", "skipped", "releasable"),
    [
        ((), False, True),
        ((ReasonCode.COUNTER_BELOW_EPOCH,), False, True),
        ((), True, True),
        ((ReasonCode.COUNTER_BELOW_EPOCH,), True, True),
        ((ReasonCode.PLATFORM_SMT_ENABLED,), False, False),
        ((ReasonCode.COUNTER_BELOW_EPOCH, ReasonCode.PLATFORM_SMT_ENABLED), False, False),
        ((ReasonCode.APP_NO_RELEASE,), False, False),
        ((ReasonCode.BOOT_RUNTIME_MISMATCH,), True, False),
        ((ReasonCode.COUNTER_BELOW_EPOCH, ReasonCode.IMAGE_BELOW_EPOCH), False, False),
        ((ReasonCode.DEVICE_REVOKED,), False, False),
    ],
)
def test_release_rule(
    gateway: Gateway, codes: tuple[ReasonCode, ...], skipped: bool, releasable: bool
) -> None:
    """Affirming, the below-epoch warning, or a marked skip releases; nothing else does."""
    verdict = releasable_verdict(outcome(gateway, *codes, skipped=skipped))
    assert (verdict is not None) is releasable


def test_release_rule_refuses_images_below_the_epoch_or_of_another_product(
    gateway: Gateway,
) -> None:
    """The rule itself refuses an image below the epoch or for another product, with the code."""
    release = gateway.registry.get_release(RELEASE)
    kwargs = {"status": Status.AFFIRMING, "reasons": (), "measurements_skipped": False}
    with pytest.raises(KeyReleaseRefused) as below:
        check_release_rule(release=release, product=PRODUCT, epoch=EPOCH + 1, **kwargs)  # type: ignore[arg-type]
    assert below.value.code is ReasonCode.IMAGE_BELOW_EPOCH
    with pytest.raises(KeyReleaseRefused) as other:
        check_release_rule(release=release, product=Product("lamp"), epoch=0, **kwargs)  # type: ignore[arg-type]
    assert other.value.code is ReasonCode.APP_NOT_ASSIGNED
    assert releasable_verdict(outcome(gateway, epoch=EPOCH + 1)) is None


def test_broker_takes_only_releasable_verdicts(gateway: Gateway) -> None:
    """Handing the broker anything else is a TypeError, not a release."""
    with pytest.raises(TypeError, match="ReleasableVerdict"):
        broker(gateway).release(outcome(gateway), policy=gateway.policy, now_s=0)  # type: ignore[arg-type]


# --- run-time re-checks --------------------------------------------------------------------------


def test_broker_rechecks_the_epoch_at_run_time(gateway: Gateway) -> None:
    """An epoch raised after the appraisal refuses the release, and no receipt is written."""
    verdict = releasable_verdict(outcome(gateway))
    assert verdict is not None
    gateway.registry.set_epoch(PRODUCT, EPOCH + 1, now_s=gateway.clock.now_s)
    with pytest.raises(KeyReleaseRefused) as refused:
        broker(gateway).release(verdict, policy=gateway.policy, now_s=gateway.clock.now_s)
    assert refused.value.code is ReasonCode.IMAGE_BELOW_EPOCH
    assert gateway.registry.receipts(DEVICE) == ()


class RacingRegistry(Registry):
    """A registry whose epoch another process raises while an appraisal is under way: right
    after the appraisal read its snapshot, inside the appraisal's write transaction (or, with
    ``revoke``, that revokes the device)."""

    raiser: threading.Thread | None = None
    revoke = False

    def __init__(self, engine: Engine) -> None:
        """A registry on ``engine``, and another connection pool to the same database (the other
        process); ``close`` disposes of it."""
        super().__init__(engine)
        self.other = Registry(open_engine(str(engine.url.render_as_string(hide_password=False))))

    def close(self) -> None:
        """Dispose of the other process's engine."""
        self.other.engine.dispose()

    def appraisal_snapshot_in(self, conn: Connection, device: DeviceId) -> AppraisalSnapshot | None:
        """The snapshot; meanwhile another connection raises the epoch (and commits)."""
        snapshot = super().appraisal_snapshot_in(conn, device)
        assert snapshot is not None
        if self.revoke:
            self.raiser = threading.Thread(
                target=self.other.revoke_device, args=(device,), kwargs={"reason": "x", "now_s": 0}
            )
        else:
            self.raiser = threading.Thread(
                target=self.other.set_epoch,
                args=(snapshot.device.product, snapshot.epoch + 1),
                kwargs={"now_s": 0},
            )
        self.raiser.start()
        self.raiser.join(RAISE_WAIT_S)
        return snapshot


#: How long the racing epoch raise is given before the appraisal goes on without it.
RAISE_WAIT_S = 1.0


def test_epoch_raised_during_the_appraisal_refuses_the_key(
    tmp_path: Path, clock: FakeClock, rng: random.Random, pg_url: str
) -> None:
    """PostgreSQL: another gateway raises the epoch after the appraisal read it; the broker reads
    it again under the ledger lock and refuses as image.below_epoch."""
    gw = build_gateway(pg_url, tmp_path / "gateway.key", clock)
    racing = RacingRegistry(gw.registry.engine)
    hooks = RegistryHooks(racing, gw.ledger, gw.kms, lambda: gw.policy, lambda: gw.clock.now_s)
    try:
        exchange = attest(gw, rng, hooks=hooks)
        assert racing.raiser is not None and not racing.raiser.is_alive()
        assert_refused(gw, exchange, ReasonCode.IMAGE_BELOW_EPOCH)
    finally:
        racing.close()
        gw.registry.engine.dispose()


def test_device_revoked_during_the_appraisal_gets_no_key(
    tmp_path: Path, clock: FakeClock, rng: random.Random, pg_url: str
) -> None:
    """PostgreSQL: the device is revoked after the appraisal read it; the broker reads the device
    again under the ledger lock and refuses as device.revoked, with no receipt."""
    gw = build_gateway(pg_url, tmp_path / "gateway.key", clock)
    racing = RacingRegistry(gw.registry.engine)
    racing.revoke = True
    hooks = RegistryHooks(racing, gw.ledger, gw.kms, lambda: gw.policy, lambda: gw.clock.now_s)
    try:
        exchange = attest(gw, rng, hooks=hooks)
        assert racing.raiser is not None and not racing.raiser.is_alive()
        assert_refused(gw, exchange, ReasonCode.DEVICE_REVOKED)
        assert gw.registry.receipts(DEVICE) == ()
    finally:
        racing.close()
        gw.registry.engine.dispose()


def test_epoch_raised_during_the_appraisal_waits_for_it_on_sqlite(
    gateway: Gateway, rng: random.Random
) -> None:
    """SQLite: the appraisal holds the writer lock from its first read, so an epoch raise waits
    until the release is committed under the epoch the appraisal saw, then takes effect."""
    racing = RacingRegistry(gateway.registry.engine)
    hooks = RegistryHooks(
        racing, gateway.ledger, gateway.kms, lambda: gateway.policy, lambda: gateway.clock.now_s
    )
    try:
        exchange = attest(gateway, rng, hooks=hooks)
        assert racing.raiser is not None
        assert racing.raiser.is_alive()  # still waiting for the writer lock when it returned
        racing.raiser.join(30)
    finally:
        racing.close()
    assert isinstance(exchange.event, Accepted)
    assert gateway.registry.epoch(PRODUCT) == EPOCH + 1
    assert len(gateway.registry.receipts(DEVICE)) == 1


def test_wrapped_cek_of_another_gateway_is_an_internal_error(
    gateway: Gateway, rng: random.Random, tmp_path: Path
) -> None:
    """A CEK wrapped to another gateway's HPKE key is never released: internal.error."""
    other = KeyFileKms.create(tmp_path / "other.key")
    digest = bytes(31) + b"\x07"
    gateway.registry.add_release(
        digest.hex(),  # type: ignore[arg-type]
        product=PRODUCT,
        version="3.0",
        security_counter=EPOCH,
        sealed_image=b"x" * 10,
        wrapped_cek=wrap_release_cek(CEK, other.hpke_public_key(), digest),
        created_s=0,
        now_s=0,
    )
    gateway.registry.assign(DEVICE, digest.hex(), now_s=0)  # type: ignore[arg-type]
    assert_refused(gateway, attest(gateway, rng), ReasonCode.INTERNAL_ERROR)


# --- receipts and leases -------------------------------------------------------------------------


def test_each_release_has_a_verifiable_receipt(gateway: Gateway, rng: random.Random) -> None:
    """Every release writes one signed receipt, in the registry and in the ledger."""
    sessions = []
    for _ in range(2):
        exchange = attest(gateway, rng)
        assert grant_of(exchange) == CEK
        sessions.append(exchange.session_id)
    records = gateway.registry.receipts(DEVICE)
    assert [record.session_id for record in records] == sessions
    public = gateway.kms.result_public_key()
    for record in records:
        receipt = verify_receipt(record.receipt, public)
        assert receipt.device_id == DEVICE and receipt.manifest_digest == DIGEST
        assert receipt.session_id == record.session_id and record.release_id == RELEASE
    bodies = [
        cbor.loads(entry.body, what="release event")
        for entry in gateway.ledger.entries(DEVICE)
        if entry.kind is LedgerKind.RELEASE
    ]
    assert [body["receipt"] for body in bodies] == [record.receipt for record in records]  # type: ignore[index]
    assert gateway.ledger.verify(public).ok


def test_receipts_do_not_verify_under_another_key_or_altered(
    gateway: Gateway, rng: random.Random
) -> None:
    """A receipt fails under another key, with a flipped bit, truncated or with trailing bytes."""
    attest(gateway, rng)
    (record,) = gateway.registry.receipts(DEVICE)
    public = gateway.kms.result_public_key()
    flipped = bytearray(record.receipt)
    flipped[-5] ^= 1
    for bad, key in (
        (record.receipt, ec.generate_private_key(ec.SECP256R1()).public_key()),
        (bytes(flipped), public),
        (record.receipt[:-1], public),
        (record.receipt + b"\x00", public),
    ):
        with pytest.raises(InvalidSignedMessage):
            verify_receipt(bad, key)


def test_lease_comes_from_the_policy(gateway: Gateway, rng: random.Random) -> None:
    """The lease attached to a release is the policy's offline boots and duration."""
    gateway.policy = replace(gateway.policy, lease=LeaseRule(offline_boots=9, duration_s=60))
    exchange = attest(gateway, rng)
    assert isinstance(exchange.event, Accepted)
    assert exchange.event.result.lease == Lease(9, gateway.clock.now_s + 60)


def test_no_release_no_receipt(gateway: Gateway, rng: random.Random) -> None:
    """A refused device leaves no receipt and no release entry in the ledger."""
    exchange = attest(gateway, rng, edit=lambda c: replace(c, platform=platform(secure_boot=False)))
    assert isinstance(exchange.event, Rejected)
    assert gateway.registry.receipts(DEVICE) == ()
    assert LedgerKind.RELEASE not in {entry.kind for entry in gateway.ledger.entries()}


# --- two processes, and PostgreSQL ---------------------------------------------------------------


def test_two_gateway_instances_consume_a_challenge_once(gateway: Gateway) -> None:
    """Racing hooks of two gateway instances accept a challenge exactly once."""
    hooks = [gateway.hooks(), gateway.hooks()]
    nonce, expires = bytes(range(32)), gateway.clock.now_s + 30

    def consume(index: int) -> bool:
        return hooks[index % 2].consume_challenge(DEVICE, nonce, expires)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(consume, range(8)))
    assert results.count(True) == 1


@pytest.mark.postgres
def test_full_exchange_on_postgresql(
    pg_url: str, tmp_path: Path, clock: FakeClock, rng: random.Random
) -> None:
    """On PostgreSQL too: a grant that opens, a receipt, then a replay and a revocation refused."""
    gw = build_gateway(pg_url, tmp_path / "gateway.key", clock)
    try:
        exchange = attest(gw, rng)
        assert grant_of(exchange) == CEK
        assert len(gw.registry.receipts(DEVICE)) == 1
        replayed = gw.verifier(gw.hooks()).receive_data(
            exchange.payload, now_s=clock.now_s, randomness=rng.randbytes
        )
        assert isinstance(replayed, Rejected) and replayed.reasons == (ReasonCode.NONCE_REPLAYED,)
        gw.registry.revoke_device(DEVICE, reason="test", now_s=clock.now_s)
        assert_refused_on(gw, rng)
    finally:
        gw.registry.engine.dispose()


def assert_refused_on(gw: Gateway, rng: random.Random) -> None:
    """A revoked device is refused, explained, and leaves the one earlier receipt only."""
    exchange = attest(gw, rng)
    assert isinstance(exchange.event, Rejected)
    assert exchange.event.reasons == (ReasonCode.DEVICE_REVOKED,)
    assert gw.last_verdict().status is Status.CONTRAINDICATED
    assert len(gw.registry.receipts(DEVICE)) == 1


def test_release_record_is_reread_at_run_time(gateway: Gateway) -> None:
    """The broker unwraps the registry's current record, not the appraisal's copy."""
    verdict = releasable_verdict(outcome(gateway))
    assert verdict is not None
    stale = ReleaseRecord(RELEASE, PRODUCT, "2.0", EPOCH, b"stale", 1, 0, 0)
    forged = releasable_verdict(replace(outcome(gateway), release=stale))
    assert forged is not None
    brokered = broker(gateway).release(forged, policy=gateway.policy, now_s=gateway.clock.now_s)
    assert brokered.key_release.cek == CEK and brokered.key_release.image_size > 1
