"""The registry and its engines, on SQLite and on PostgreSQL (DESIGN §9, §10)."""

from __future__ import annotations

import datetime
import itertools
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from gateway import db
from gateway.db import SchemaVersionError, open_engine
from gateway.registry import (
    CHALLENGE_PURGE_GRACE_S,
    ChallengeExpired,
    ChallengeReplayed,
    DeviceStatus,
    ReferenceValue,
    Registry,
    RegistryConflict,
    TrustAnchorKind,
    UnknownDevice,
    UnknownRelease,
    UnknownTrustAnchor,
)
from protocol.bundles import ComponentType
from protocol.errors import InvalidChallenge, TransportError, UsageError
from protocol.ids import DeviceId, Product, ReleaseId, SessionId, class_id
from protocol.keys import derive_p256, p256_point, signer_id
from protocol.reasons import Status
from tests.conftest import FakeClock

THERMO = Product("thermostat")
METER = Product("meter")
DEV = DeviceId("dev-0001")
_DEVICE_NUMBERS = itertools.count()


@pytest.fixture
def registry(engines: Callable[[], Engine]) -> Registry:
    """A registry on a fresh database."""
    return Registry.open(engines())


def key(rng: random.Random) -> ec.EllipticCurvePrivateKey:
    """A P-256 key from the seeded RNG."""
    return derive_p256(rng.randbytes(32), b"test")


def point(rng: random.Random) -> bytes:
    """A SEC1 point of a fresh P-256 key."""
    return p256_point(key(rng).public_key())


def enroll(
    registry: Registry, rng: random.Random, device: DeviceId = DEV, product: Product = THERMO
) -> None:
    """Enroll ``device`` with made-up certificates and fresh IAK points."""
    registry.enroll_device(
        device,
        product=product,
        cert_secured_der=b"cert-secured",
        cert_debug_der=b"cert-debug",
        iak_secured_point=point(rng),
        iak_debug_point=point(rng),
        counters={"app": 1, "boots": 3},
        now_s=1000,
    )


def release_id(n: int) -> ReleaseId:
    """A release id made from ``n``."""
    return ReleaseId(f"{n:064x}")


def add_release(registry: Registry, n: int, counter: int, product: Product = THERMO) -> ReleaseId:
    """Add release ``n`` with security counter ``counter`` and a 1000-byte image."""
    rid = release_id(n)
    registry.add_release(
        rid,
        product=product,
        version=f"1.{n}",
        security_counter=counter,
        sealed_image=bytes(range(250)) * 4,
        wrapped_cek=b"wrapped-" + bytes([n]),
        created_s=500,
        now_s=1000,
    )
    return rid


def self_signed(private: ec.EllipticCurvePrivateKey) -> bytes:
    """A self-signed DER certificate over ``private``'s public key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(private, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def run_together(*tasks: Callable[[], object]) -> list[BaseException]:
    """Run ``tasks`` on threads released together; return what they raised."""
    barrier = threading.Barrier(len(tasks))
    errors: list[BaseException] = []

    def run(task: Callable[[], object]) -> None:
        barrier.wait(timeout=10)
        try:
            task()
        except BaseException as err:  # collected and asserted on by the caller
            errors.append(err)

    threads = [threading.Thread(target=run, args=(task,)) for task in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return errors


# --- engines --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mysql://root@localhost/x",
        "postgresql+psycopg2://postgres@127.0.0.1/test",
        "sqlite://",
        "sqlite:///:memory:",
        "/no/such/directory/registry.db",
        "postgresql://host:notaport/x",
    ],
)
def test_open_engine_refuses_bad_urls(url: str) -> None:
    """An unusable URL is a UsageError that names the problem."""
    with pytest.raises(UsageError, match="database URL"):
        open_engine(url)


def test_open_engine_reports_unreachable_postgres() -> None:
    """A PostgreSQL server that does not answer is a TransportError."""
    with pytest.raises(TransportError, match="unreachable"):
        open_engine("postgresql://postgres@127.0.0.1:1/test")


def test_open_engine_takes_a_plain_path_as_sqlite(tmp_path: Path) -> None:
    """A file path opens SQLite in WAL mode with foreign keys on."""
    engine = open_engine(str(tmp_path / "plain.db"))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert engine.dialect.name == "sqlite"
        assert (tmp_path / "plain.db").exists()
    finally:
        engine.dispose()


def test_wal_checkpoints_move_out_of_the_committing_connection(tmp_path: Path) -> None:
    """With ``wal_checkpoints_elsewhere`` commits let the WAL grow (up to the backstop); a
    ``WalCheckpointer`` then copies every frame into the database file."""
    engine = open_engine(str(tmp_path / "wal.db"), wal_checkpoints_elsewhere=True)
    checkpointer = db.WalCheckpointer(engine)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == (
                db.WAL_BACKSTOP_PAGES
            )
            conn.exec_driver_sql("CREATE TABLE t (v BLOB)")
            for _ in range(1_500):  # > 1,000 pages: the default would have checkpointed
                conn.exec_driver_sql("INSERT INTO t VALUES (randomblob(4000))")
                conn.commit()
        written = 1_500 * 4_000
        database, wal = tmp_path / "wal.db", tmp_path / "wal.db-wal"
        assert database.stat().st_size < written // 10 < written < wal.stat().st_size
        checkpointer.checkpoint()
        assert database.stat().st_size > written
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1_500
    finally:
        checkpointer.close()
        engine.dispose()


@pytest.mark.postgres
def test_wal_checkpointer_is_a_no_op_on_postgresql(pg_url: str) -> None:
    """PostgreSQL has no WAL for us to checkpoint: the checkpointer does nothing."""
    engine = open_engine(pg_url, wal_checkpoints_elsewhere=True)
    try:
        checkpointer = db.WalCheckpointer(engine)
        checkpointer.checkpoint()
        checkpointer.close()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_open_engine_normalizes_postgresql_to_psycopg(pg_url: str) -> None:
    """A postgresql:// URL is served by psycopg 3."""
    engine = open_engine(pg_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        assert engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
    finally:
        engine.dispose()


# --- schema ---------------------------------------------------------------------------------


def test_schema_is_created_then_reopened(engines: Callable[[], Engine], rng: random.Random) -> None:
    """Opening twice keeps the data; a second engine (another process) sees it."""
    first = Registry.open(engines())
    enroll(first, rng)
    again = Registry.open(engines())
    assert again.get_device(DEV).product == THERMO
    with again.engine.connect() as conn:
        version = conn.execute(
            sa.text("select version from schema_version where component = 'registry'")
        ).scalar()
    assert version == 1


def test_open_refuses_another_schema_version(engines: Callable[[], Engine]) -> None:
    """A database at a newer (or unknown older) schema version is refused with a clear error."""
    engine = engines()
    Registry.open(engine)
    for stored in (2, 99, 0):
        with engine.begin() as conn:
            conn.execute(
                sa.text("update schema_version set version = :v where component = 'registry'"),
                {"v": stored},
            )
        with pytest.raises(SchemaVersionError, match=f"version {stored}"):
            Registry.open(engine)


def test_concurrent_opens_create_the_schema_once(engines: Callable[[], Engine]) -> None:
    """Two processes opening a new database at once both succeed."""
    first, second = engines(), engines()
    errors = run_together(lambda: Registry.open(first), lambda: Registry.open(second))
    assert errors == []
    with first.connect() as conn:
        assert conn.execute(sa.text("select count(*) from schema_version")).scalar() == 1


# --- devices --------------------------------------------------------------------------------


def test_enroll_then_get_returns_the_record(registry: Registry, rng: random.Random) -> None:
    """An enrolled device reads back field for field."""
    secured, debug = point(rng), point(rng)
    made = registry.enroll_device(
        DEV,
        product=THERMO,
        cert_secured_der=b"c1",
        cert_debug_der=b"c2",
        iak_secured_point=secured,
        iak_debug_point=debug,
        counters={"bl2": 2, "app": 7},
        now_s=1234,
    )
    got = registry.get_device(DEV)
    assert got == made
    assert got.class_id == class_id(THERMO)
    assert (got.iak_secured_point, got.iak_debug_point) == (secured, debug)
    assert got.status is DeviceStatus.ACTIVE
    assert not got.revoked
    assert dict(got.counters) == {"app": 7, "bl2": 2}
    assert got.enrolled_at_s == 1234


def test_unknown_device_is_none_or_raises(registry: Registry) -> None:
    """find_device gives None and get_device raises UnknownDevice for an unknown id."""
    assert registry.find_device(DEV) is None
    with pytest.raises(UnknownDevice, match="dev-0001"):
        registry.get_device(DEV)


def test_enroll_twice_is_a_conflict(registry: Registry, rng: random.Random) -> None:
    """A device id is enrolled once."""
    enroll(registry, rng)
    with pytest.raises(RegistryConflict, match="already enrolled"):
        enroll(registry, rng)


def test_enroll_refuses_a_bad_iak_point(registry: Registry, rng: random.Random) -> None:
    """An empty, short or compressed IAK point is refused."""
    for bad in (b"", b"\x04" + bytes(63), b"\x02" + bytes(64)):
        with pytest.raises(ValueError, match="IAK point"):
            registry.enroll_device(
                DEV,
                product=THERMO,
                cert_secured_der=b"c",
                cert_debug_der=b"c",
                iak_secured_point=point(rng),
                iak_debug_point=bad,
                now_s=1,
            )
    assert registry.find_device(DEV) is None


def test_revoke_marks_the_device_once(registry: Registry, rng: random.Random) -> None:
    """Revocation is recorded with its time and reason, and a second revoke keeps the first."""
    enroll(registry, rng)
    revoked = registry.revoke_device(DEV, reason="stolen", now_s=2000)
    assert revoked.status is DeviceStatus.REVOKED
    assert revoked.revoked
    assert (revoked.revoked_at_s, revoked.revoke_reason) == (2000, "stolen")
    again = registry.revoke_device(DEV, reason="other", now_s=3000)
    assert (again.revoked_at_s, again.revoke_reason) == (2000, "stolen")
    with pytest.raises(UnknownDevice):
        registry.revoke_device(DeviceId("nobody"), reason="x", now_s=1)


def test_list_devices_by_product(registry: Registry, rng: random.Random) -> None:
    """Devices list in id order, optionally of one product."""
    enroll(registry, rng, DeviceId("b"))
    enroll(registry, rng, DeviceId("a"))
    enroll(registry, rng, DeviceId("m"), METER)
    assert [d.device_id for d in registry.list_devices()] == ["a", "b", "m"]
    assert [d.device_id for d in registry.list_devices(METER)] == ["m"]


def test_set_counters_replaces_them(registry: Registry, rng: random.Random) -> None:
    """Counters are replaced as a whole; negative counters are refused."""
    enroll(registry, rng)
    assert dict(registry.set_counters(DEV, {"app": 9}).counters) == {"app": 9}
    with pytest.raises(ValueError, match="non-negative"):
        registry.set_counters(DEV, {"app": -1})
    with pytest.raises(UnknownDevice):
        registry.set_counters(DeviceId("nobody"), {})


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One SQLite registry shared by the examples of a property test."""
    engine = open_engine(str(tmp_path_factory.mktemp("shared") / "registry.db"))
    yield Registry.open(engine)
    engine.dispose()


@settings(max_examples=100, deadline=None)
@given(
    counters=st.dictionaries(
        st.text(min_size=1, max_size=12), st.integers(0, 2**63 - 1), max_size=6
    )
)
def test_counters_round_trip(counters: dict[str, int], shared_registry: Registry) -> None:
    """Any counters map stored with a device reads back equal."""
    device = DeviceId(f"prop-{next(_DEVICE_NUMBERS)}")
    shared_registry.enroll_device(
        device,
        product=THERMO,
        cert_secured_der=b"c",
        cert_debug_der=b"c",
        iak_secured_point=b"\x04" + bytes(64),
        iak_debug_point=b"\x04" + bytes(64),
        counters=counters,
        now_s=1,
    )
    assert dict(shared_registry.get_device(device).counters) == counters


# --- trust anchors --------------------------------------------------------------------------


def test_trust_anchors_add_list_remove(registry: Registry, rng: random.Random) -> None:
    """Anchors are listed per kind, found by signer id, and removed once."""
    vendor, ca = key(rng), key(rng)
    ca_cert = self_signed(ca)
    added = registry.add_trust_anchor(
        TrustAnchorKind.VENDOR, public_key=vendor.public_key(), name="acme", now_s=5
    )
    assert added.signer_id == signer_id(vendor.public_key())
    registry.add_trust_anchor(
        TrustAnchorKind.MANUFACTURER_CA,
        public_key=ca.public_key(),
        name="factory",
        now_s=6,
        cert_der=ca_cert,
    )
    assert len(registry.list_trust_anchors()) == 2
    (only,) = registry.list_trust_anchors(TrustAnchorKind.VENDOR)
    assert only == added
    assert only.public_key().public_numbers() == vendor.public_key().public_numbers()
    found = registry.find_trust_anchor(TrustAnchorKind.MANUFACTURER_CA, signer_id(ca.public_key()))
    assert found is not None
    assert found.cert_der == ca_cert
    assert registry.find_trust_anchor(TrustAnchorKind.BUNDLE_SIGNER, added.signer_id) is None
    registry.remove_trust_anchor(TrustAnchorKind.VENDOR, added.signer_id)
    assert registry.list_trust_anchors(TrustAnchorKind.VENDOR) == ()
    with pytest.raises(UnknownTrustAnchor):
        registry.remove_trust_anchor(TrustAnchorKind.VENDOR, added.signer_id)


def test_trust_anchor_duplicates_and_wrong_certificates_are_refused(
    registry: Registry, rng: random.Random
) -> None:
    """The same key twice for one kind conflicts; a certificate of another key is refused."""
    vendor, other = key(rng), key(rng)
    registry.add_trust_anchor(
        TrustAnchorKind.VENDOR, public_key=vendor.public_key(), name="a", now_s=1
    )
    with pytest.raises(RegistryConflict, match="already trusted"):
        registry.add_trust_anchor(
            TrustAnchorKind.VENDOR, public_key=vendor.public_key(), name="b", now_s=2
        )
    registry.add_trust_anchor(
        TrustAnchorKind.BUNDLE_SIGNER, public_key=vendor.public_key(), name="c", now_s=3
    )
    with pytest.raises(ValueError, match="does not carry"):
        registry.add_trust_anchor(
            TrustAnchorKind.MANUFACTURER_CA,
            public_key=vendor.public_key(),
            name="ca",
            now_s=4,
            cert_der=self_signed(other),
        )
    with pytest.raises(ValueError, match="not a DER"):
        registry.add_trust_anchor(
            TrustAnchorKind.MANUFACTURER_CA,
            public_key=vendor.public_key(),
            name="ca",
            now_s=4,
            cert_der=b"\x30\x03junk",
        )


# --- reference values -----------------------------------------------------------------------


def test_reference_values_are_idempotent_and_conflict_checked(registry: Registry) -> None:
    """Re-adding a reference value is a no-op; the same measurement with other data conflicts."""
    bl2 = ReferenceValue(THERMO, ComponentType.BL2, b"\x01" * 32, "1.0", b"\xaa" * 32, 1, "batch-1")
    rt = ReferenceValue(
        THERMO, ComponentType.RUNTIME, b"\x02" * 32, "2.0", b"\xbb" * 32, 3, "batch-1"
    )
    registry.add_reference_value(bl2, now_s=1)
    registry.add_reference_value(rt, now_s=1)
    registry.add_reference_value(bl2, now_s=2)
    assert registry.reference_values(THERMO) == (bl2, rt)
    assert registry.reference_values(THERMO, ComponentType.RUNTIME) == (rt,)
    assert registry.reference_values(METER) == ()
    changed = ReferenceValue(
        THERMO, ComponentType.BL2, b"\x01" * 32, "1.1", b"\xaa" * 32, 1, "batch-2"
    )
    with pytest.raises(RegistryConflict, match="recorded differently"):
        registry.add_reference_value(changed, now_s=3)


# --- releases, epochs, assignments ----------------------------------------------------------


def test_releases_store_and_serve_images(registry: Registry) -> None:
    """A release reads back; its image is served whole and in chunks."""
    rid = add_release(registry, 1, counter=4)
    got = registry.get_release(rid)
    assert (got.product, got.version, got.security_counter, got.size_bytes) == (
        THERMO,
        "1.1",
        4,
        1000,
    )
    assert got.wrapped_cek == b"wrapped-\x01"
    image = bytes(range(250)) * 4
    assert registry.release_image(rid) == image
    assert registry.release_chunk(rid, 0, 100) == image[:100]
    assert registry.release_chunk(rid, 990, 100) == image[990:]
    assert registry.release_chunk(rid, 1000, 10) == b""
    with pytest.raises(ValueError, match="out of range"):
        registry.release_chunk(rid, -1, 10)
    assert [r.release_id for r in registry.list_releases(THERMO)] == [rid]
    assert registry.list_releases(METER) == ()


def test_unknown_and_duplicate_releases(registry: Registry) -> None:
    """Unknown releases raise UnknownRelease; duplicate ids conflict; ids must be digests."""
    add_release(registry, 1, counter=1)
    with pytest.raises(RegistryConflict, match="already exists"):
        add_release(registry, 1, counter=1)
    missing = release_id(2)
    assert registry.find_release(missing) is None
    for call in (registry.get_release, registry.release_image):
        with pytest.raises(UnknownRelease):
            call(missing)
    with pytest.raises(UnknownRelease):
        registry.release_chunk(missing, 0, 1)
    with pytest.raises(ValueError, match="release id"):
        registry.add_release(
            ReleaseId("AB" * 32),
            product=THERMO,
            version="1",
            security_counter=1,
            sealed_image=b"x",
            wrapped_cek=b"k",
            created_s=1,
            now_s=1,
        )


def test_epochs_only_go_up(registry: Registry) -> None:
    """The epoch starts at 0, rises, and refuses to fall."""
    assert registry.epoch(THERMO) == 0
    registry.set_epoch(THERMO, 3, now_s=1)
    registry.set_epoch(THERMO, 3, now_s=2)
    registry.set_epoch(THERMO, 5, now_s=3)
    assert (registry.epoch(THERMO), registry.epoch(METER)) == (5, 0)
    with pytest.raises(RegistryConflict, match="below the current 5"):
        registry.set_epoch(THERMO, 4, now_s=4)
    with pytest.raises(ValueError, match="non-negative"):
        registry.set_epoch(METER, -1, now_s=4)


def test_assignments(registry: Registry, rng: random.Random) -> None:
    """A device is assigned one release of its product at or above the epoch."""
    enroll(registry, rng)
    old, new = add_release(registry, 1, counter=1), add_release(registry, 2, counter=2)
    other = add_release(registry, 3, counter=9, product=METER)
    assert registry.assignment(DEV) is None
    registry.assign(DEV, old, now_s=1)
    assert registry.assignment(DEV) == old
    registry.assign(DEV, new, now_s=2)
    assert registry.assignment(DEV) == new
    with pytest.raises(RegistryConflict, match="meter"):
        registry.assign(DEV, other, now_s=3)
    registry.set_epoch(THERMO, 2, now_s=3)
    with pytest.raises(RegistryConflict, match="below the epoch"):
        registry.assign(DEV, old, now_s=4)
    with pytest.raises(UnknownRelease):
        registry.assign(DEV, release_id(7), now_s=5)
    with pytest.raises(UnknownDevice):
        registry.assign(DeviceId("nobody"), new, now_s=5)
    assert registry.assignment(DEV) == new


# --- challenges and command sequence numbers ------------------------------------------------


def test_challenge_is_single_use(registry: Registry, clock: FakeClock) -> None:
    """A challenge is consumed once; the second use is a replay."""
    challenge = bytes(range(32))
    registry.consume_challenge(challenge, device=DEV, expires_s=clock.now_s + 30, now_s=clock.now_s)
    with pytest.raises(ChallengeReplayed):
        registry.consume_challenge(
            challenge, device=DEV, expires_s=clock.now_s + 30, now_s=clock.now_s + 1
        )
    registry.consume_challenge(bytes(32), device=DEV, expires_s=clock.now_s + 30, now_s=clock.now_s)


def test_expired_and_purged_challenges_stay_refused(registry: Registry, clock: FakeClock) -> None:
    """An expired challenge is refused; purging never makes a used challenge usable again."""
    challenge, expires = b"\x07" * 32, clock.now_s + 30
    registry.consume_challenge(challenge, device=DEV, expires_s=expires, now_s=clock.now_s)
    clock.advance(31)
    with pytest.raises(ChallengeExpired):
        registry.consume_challenge(b"\x08" * 32, device=DEV, expires_s=expires, now_s=clock.now_s)
    assert registry.purge_expired_challenges(clock.now_s) == 0
    clock.advance(CHALLENGE_PURGE_GRACE_S)
    assert registry.purge_expired_challenges(clock.now_s) == 1
    with pytest.raises(InvalidChallenge):
        registry.consume_challenge(challenge, device=DEV, expires_s=expires, now_s=clock.now_s)


def test_challenge_id_size_is_checked(registry: Registry) -> None:
    """A challenge id of the wrong size (0, 15 or 65 bytes) is a caller's error."""
    for size in (0, 15, 65):
        with pytest.raises(ValueError, match="challenge id"):
            registry.consume_challenge(bytes(size), device=DEV, expires_s=10, now_s=1)


def test_concurrent_consumes_let_exactly_one_win(engines: Callable[[], Engine]) -> None:
    """Two gateways consuming the same challenge at once: one succeeds, one sees a replay."""
    first, second = Registry.open(engines()), Registry.open(engines())
    for round_ in range(8):
        challenge = bytes([round_]) * 32

        def consume(registry: Registry, challenge: bytes = challenge) -> Callable[[], None]:
            return lambda: registry.consume_challenge(challenge, device=DEV, expires_s=100, now_s=1)

        errors = run_together(consume(first), consume(second))
        assert len(errors) == 1
        assert isinstance(errors[0], ChallengeReplayed)


def test_command_seq_is_monotonic_per_device(registry: Registry, rng: random.Random) -> None:
    """Sequence numbers count 1, 2, 3 per device; unknown devices get none."""
    enroll(registry, rng)
    enroll(registry, rng, DeviceId("dev-0002"))
    assert [registry.next_command_seq(DEV) for _ in range(3)] == [1, 2, 3]
    assert registry.next_command_seq(DeviceId("dev-0002")) == 1
    assert registry.next_command_seq(DEV) == 4
    with pytest.raises(UnknownDevice):
        registry.next_command_seq(DeviceId("nobody"))


def test_concurrent_command_seqs_are_distinct(
    engines: Callable[[], Engine], rng: random.Random
) -> None:
    """Two gateways drawing sequence numbers at once never draw the same one."""
    first, second = Registry.open(engines()), Registry.open(engines())
    enroll(first, rng)
    drawn: list[int] = []

    def draw(registry: Registry) -> Callable[[], None]:
        return lambda: drawn.extend(registry.next_command_seq(DEV) for _ in range(10))

    assert run_together(draw(first), draw(second)) == []
    assert sorted(drawn) == list(range(1, 21))


# --- verdicts, receipts, policies -----------------------------------------------------------


def test_verdict_history(registry: Registry) -> None:
    """Verdicts read back oldest first; a limit keeps the latest ones."""
    session = SessionId(bytes(16))
    for at_s, status in enumerate(Status):
        registry.record_verdict(
            DEV,
            session_id=session,
            status=status,
            reasons=("boot.measurement.mismatch",) if at_s else (),
            policy_version=1,
            explanation_json='{"claims": []}',
            now_s=at_s,
        )
    history = registry.verdicts(DEV)
    assert [v.status for v in history] == list(Status)
    assert history[1].reasons == ("boot.measurement.mismatch",)
    assert history[0].session_id == session
    assert history[0].explanation_json == '{"claims": []}'
    assert registry.verdicts(DEV, limit=1) == history[-1:]
    assert registry.verdicts(DeviceId("other")) == ()
    with pytest.raises(ValueError, match="Expecting"):
        registry.record_verdict(
            DEV,
            session_id=session,
            status=Status.WARNING,
            reasons=(),
            policy_version=1,
            explanation_json="{not json",
            now_s=9,
        )


def test_receipt_history(registry: Registry) -> None:
    """Receipts read back oldest first, as recorded."""
    rid = release_id(1)
    for n in range(3):
        registry.record_receipt(
            DEV, session_id=SessionId(bytes([n]) * 16), release_id=rid, receipt=b"r%d" % n, now_s=n
        )
    receipts = registry.receipts(DEV)
    assert [r.receipt for r in receipts] == [b"r0", b"r1", b"r2"]
    assert receipts[2].release_id == rid
    assert receipts[2].at_s == 2
    assert registry.receipts(DEV, limit=2) == receipts[1:]


def test_policies_only_move_forward(registry: Registry) -> None:
    """The latest policy is the highest version; an old version number is refused."""
    assert registry.latest_policy() is None
    registry.add_policy(1, "require: secure_boot", now_s=1)
    registry.add_policy(3, "require: secure_boot, smt_off", now_s=2)
    latest = registry.latest_policy()
    assert latest is not None
    assert (latest.version, latest.at_s) == (3, 2)
    assert latest.document == "require: secure_boot, smt_off"
    with pytest.raises(RegistryConflict, match="not above 3"):
        registry.add_policy(2, "x", now_s=3)


def test_raise_counters_in_never_lowers_a_counter(registry: Registry, rng: random.Random) -> None:
    """Counters seen are merged upwards inside a write transaction; lower values change nothing."""
    enroll(registry, rng)
    with db.write_transaction(registry.engine) as conn:
        assert Registry.raise_counters_in(conn, DEV, {"app": 0, "boots": 1}) is None
        raised = Registry.raise_counters_in(conn, DEV, {"app": 4, "new": 2})
    assert raised is not None and dict(raised) == {"app": 4, "boots": 3, "new": 2}
    assert dict(registry.get_device(DEV).counters) == {"app": 4, "boots": 3, "new": 2}
    with db.write_transaction(registry.engine) as conn:
        assert Registry.raise_counters_in(conn, DeviceId("nobody"), {"app": 9}) is None


def test_appraisal_snapshot_reads_what_the_appraisal_needs(
    registry: Registry, rng: random.Random
) -> None:
    """The snapshot holds the device, its epoch and assignment, or None for an unknown device."""
    enroll(registry, rng)
    snapshot = registry.appraisal_snapshot(DEV)
    assert snapshot is not None
    assert snapshot.device == registry.get_device(DEV)
    assert (snapshot.epoch, snapshot.assigned, snapshot.assigned_release) == (0, None, None)
    assert snapshot.reference_values == registry.reference_values(THERMO)
    assert registry.appraisal_snapshot(DeviceId("nobody")) is None
