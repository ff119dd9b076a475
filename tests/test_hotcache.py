"""The hot path's cache (gateway.hotcache): used while the database has not changed, never after.

One ``RegistryHooks`` attests again and again, as the serving gateway does; between attestations
the registry is changed through the same engine (this connection's own writes) or through
another engine (another process). Each change must be seen by the very next appraisal.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from gateway import db
from gateway.hooks import RegistryHooks
from gateway.hotcache import SnapshotCache
from gateway.ledger import Ledger, LedgerHead, LedgerKind
from gateway.registry import ChallengeReplayed, Registry
from protocol import cbor
from protocol.reasons import ReasonCode
from protocol.verifier import Accepted, Rejected
from tests.conftest import FakeClock
from tests.test_appraisal import (
    DEVICE,
    EPOCH,
    PRODUCT,
    Gateway,
    attest,
    build_gateway,
    platform,
)

# --- db.change_mark ------------------------------------------------------------------------------


def _mark(engine: Engine) -> db.ChangeMark | None:
    with db.write_transaction(engine) as conn:
        return db.change_mark(conn)


def test_change_mark_holds_while_nothing_is_committed(tmp_path: Path) -> None:
    engine = db.open_engine(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        Registry.open(engine)
        first = _mark(engine)
        assert first is not None
        assert _mark(engine) == first
    finally:
        engine.dispose()


def test_change_mark_moves_on_another_connections_commit(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine, other = db.open_engine(url), db.open_engine(url)
    try:
        Registry.open(engine)
        before = _mark(engine)
        Registry(other).set_epoch(PRODUCT, 3, now_s=clock.now_s)
        assert _mark(engine) != before
    finally:
        engine.dispose()
        other.dispose()


def test_change_mark_moves_on_this_connections_own_writes_even_rolled_back(
    tmp_path: Path,
) -> None:
    engine = db.open_engine(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        Registry.open(engine)
        before = _mark(engine)
        insert = sa.text("INSERT INTO epochs (product, epoch, set_at_s) VALUES ('p', 1, 0)")
        with db.write_transaction(engine) as conn:
            assert db.change_mark(conn) == before  # the same pooled connection
            conn.execute(insert)
            conn.rollback()
        assert _mark(engine) != before
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgresql_has_no_change_mark(pg_url: str) -> None:
    engine = db.open_engine(pg_url)
    try:
        assert _mark(engine) is None
    finally:
        engine.dispose()


# --- db.PinnedWriter ----------------------------------------------------------------------------


def _insert_epoch(conn: sa.Connection, product: str) -> None:
    conn.execute(
        sa.text("INSERT INTO epochs (product, epoch, set_at_s) VALUES (:p, 1, 0)"), {"p": product}
    )


def _epochs(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(sa.text("SELECT product FROM epochs"))]


@pytest.fixture
def pinned(tmp_path: Path) -> Iterator[tuple[Engine, db.PinnedWriter]]:
    """A registry database on SQLite and a pinned writer on it."""
    engine = db.open_engine(f"sqlite:///{tmp_path / 'w.db'}")
    writer = db.PinnedWriter(engine)
    try:
        Registry.open(engine)
        yield engine, writer
    finally:
        writer.close()
        engine.dispose()


def test_pinned_writer_keeps_one_connection_and_commits(
    pinned: tuple[Engine, db.PinnedWriter],
) -> None:
    engine, writer = pinned
    drivers = []
    for product in ("a", "b"):
        with writer.transaction() as conn:
            drivers.append(conn.connection.driver_connection)
            _insert_epoch(conn, product)
    assert drivers[0] is drivers[1]
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    assert sorted(_epochs(engine)) == ["a", "b"]
    writer.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_pinned_writer_rolls_back_and_goes_on(pinned: tuple[Engine, db.PinnedWriter]) -> None:
    engine, writer = pinned

    def fail_midway() -> None:
        with writer.transaction() as conn:
            _insert_epoch(conn, "lost")
            raise RuntimeError("fails mid-transaction")

    with pytest.raises(RuntimeError):
        fail_midway()
    with writer.transaction() as conn:
        _insert_epoch(conn, "kept")
    assert _epochs(engine) == ["kept"]


def test_pinned_writer_rolls_back_driver_level_statements(
    pinned: tuple[Engine, db.PinnedWriter],
) -> None:
    """Statements run straight on the driver (the hot path's) are rolled back with the rest of
    a failed transaction, and the writer goes on."""
    engine, writer = pinned

    def consume(conn: sa.Connection, nonce: bytes) -> None:
        Registry.consume_challenge_in(conn, nonce, device=DEVICE, expires_s=10, now_s=1)

    with writer.transaction() as conn:
        consume(conn, b"a" * 32)

    def replay_after_another() -> None:
        with writer.transaction() as conn:
            consume(conn, b"b" * 32)
            consume(conn, b"a" * 32)

    with pytest.raises(ChallengeReplayed):
        replay_after_another()
    with writer.transaction() as conn:
        consume(conn, b"c" * 32)
    with engine.connect() as conn:
        used = conn.execute(sa.text("SELECT challenge_id FROM used_challenges")).scalars()
        assert sorted(used) == [b"a" * 32, b"c" * 32]


def test_pinned_writer_replaces_an_invalidated_connection(
    pinned: tuple[Engine, db.PinnedWriter],
) -> None:
    engine, writer = pinned
    with writer.transaction() as conn:
        first = conn
    first.invalidate()
    with writer.transaction() as conn:
        assert conn is not first
        _insert_epoch(conn, "after")
    assert _epochs(engine) == ["after"]


def test_a_dropped_pinned_writer_gives_its_connection_back(tmp_path: Path) -> None:
    engine = db.open_engine(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        writer = db.PinnedWriter(engine)
        with writer.transaction():
            pass
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        del writer
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_pinned_writer_on_postgresql_takes_a_pooled_connection_each_time(pg_url: str) -> None:
    engine = db.open_engine(pg_url)
    writer = db.PinnedWriter(engine)
    try:
        Registry.open(engine)
        with writer.transaction() as conn:
            _insert_epoch(conn, "pg")
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert _epochs(engine) == ["pg"]
    finally:
        writer.close()
        engine.dispose()


# --- SnapshotCache ---------------------------------------------------------------------------


class _Conn:
    """Stands in for a sqlite3 connection in a mark (only its identity matters)."""

    total_changes = 0


def _fake_mark(version: int, changes: int = 0, conn: object | None = None) -> db.ChangeMark:
    return db.ChangeMark(conn or _SHARED, version, changes)  # type: ignore[arg-type]


_SHARED = _Conn()
HEAD = LedgerHead(5, bytes(32))


def test_cache_keeps_nothing_without_a_mark() -> None:
    cache = SnapshotCache()
    cache.open(None)
    cache.committed(None, None, head=HEAD, changed=None)
    assert cache.head(None) is None
    assert len(cache) == 0


def test_cache_gives_the_head_only_at_the_mark_it_was_committed_at() -> None:
    cache = SnapshotCache()
    opened, after = _fake_mark(1), _fake_mark(1, 4)
    cache.open(opened)
    cache.committed(opened, after, head=HEAD, changed=None)
    assert cache.head(after) == HEAD
    assert cache.head(opened) is None  # the own writes moved it
    cache.open(_fake_mark(2, 4))  # someone else committed
    assert cache.head(_fake_mark(2, 4)) is None
    cache.open(_fake_mark(1, 4, _Conn()))  # another connection
    assert cache.head(_fake_mark(1, 4)) is None


def test_cache_drops_everything_when_two_transactions_interleave() -> None:
    cache = SnapshotCache()
    first, second = _fake_mark(1), _fake_mark(1, 0, _Conn())
    cache.open(first)
    cache.open(second)
    cache.committed(first, _fake_mark(1, 4), head=HEAD, changed=None)
    assert cache.head(_fake_mark(1, 4)) is None
    cache.committed(second, _fake_mark(1, 4, _Conn()), head=HEAD, changed=None)
    assert cache.head(second) is None


def test_forget_drops_the_head() -> None:
    cache = SnapshotCache()
    opened, after = _fake_mark(1), _fake_mark(1, 4)
    cache.open(opened)
    cache.committed(opened, after, head=HEAD, changed=None)
    cache.forget()
    cache.open(after)
    assert cache.head(after) is None


# --- through the hooks, on a real database -------------------------------------------------------


@contextmanager
def _counting(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


@pytest.fixture
def hot(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[Gateway, RegistryHooks, Engine]]:
    """A gateway on SQLite, one set of hooks for every attestation, and a second engine on the
    same file (another process's connection)."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    gw = build_gateway(url, tmp_path / "gateway.key", clock)
    other = db.open_engine(url)
    try:
        yield gw, gw.hooks(), other
    finally:
        other.dispose()
        gw.registry.engine.dispose()


def test_a_second_attestation_reads_no_snapshot(
    hot: tuple[Gateway, RegistryHooks, Engine], rng: random.Random
) -> None:
    """The first attestation raises the device's stored counters (none were stored), which
    drops it; the second reads and keeps it; the third reads nothing."""
    gw, hooks, _other = hot
    assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
    assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
    with _counting(gw.registry.engine) as statements:
        assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
    reads = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
    assert reads == [], reads
    assert gw.ledger.verify(gw.kms.result_public_key()).ok


Change = Callable[[Registry, Ledger, FakeClock], None]


def _refused(gw: Gateway, rng: random.Random, hooks: RegistryHooks, code: ReasonCode) -> None:
    """The next attestation is refused with ``code`` and no receipt is added."""
    receipts = len(gw.registry.receipts(DEVICE))
    exchange = attest(gw, rng, hooks=hooks)
    assert isinstance(exchange.event, Rejected), exchange.event
    assert code in exchange.event.reasons
    assert len(gw.registry.receipts(DEVICE)) == receipts


def _revoke(registry: Registry, _ledger: Ledger, clock: FakeClock) -> None:
    registry.revoke_device(DEVICE, reason="stolen", now_s=clock.now_s)


def _raise_epoch(registry: Registry, _ledger: Ledger, clock: FakeClock) -> None:
    registry.set_epoch(PRODUCT, EPOCH + 1, now_s=clock.now_s)


def _raise_counters(registry: Registry, _ledger: Ledger, _clock: FakeClock) -> None:
    registry.set_counters(DEVICE, {"app": EPOCH + 1, "bl2": 1, "runtime": 1})


CHANGES: list[tuple[str, Change, ReasonCode]] = [
    ("revoke", _revoke, ReasonCode.DEVICE_REVOKED),
    ("epoch", _raise_epoch, ReasonCode.IMAGE_BELOW_EPOCH),
    ("counters", _raise_counters, ReasonCode.COUNTER_ROLLBACK),
]


@pytest.mark.parametrize("through", ["same engine", "another engine"])
@pytest.mark.parametrize(("_name", "change", "code"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_change_between_attestations_is_seen_at_once(
    hot: tuple[Gateway, RegistryHooks, Engine],
    rng: random.Random,
    clock: FakeClock,
    through: str,
    _name: str,
    change: Change,
    code: ReasonCode,
) -> None:
    gw, hooks, other = hot
    assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
    assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)  # served from the cache
    if through == "same engine":
        change(gw.registry, gw.ledger, clock)
    else:
        change(Registry(other), Ledger(other), clock)
    _refused(gw, rng, hooks, code)


def test_counters_raised_by_an_attestation_are_seen_by_the_next(
    hot: tuple[Gateway, RegistryHooks, Engine], rng: random.Random
) -> None:
    """The hot path's own counter raise drops the device from the cache: a token that goes back
    below it is counter.rollback."""
    gw, hooks, _other = hot
    assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
    higher = attest(gw, rng, hooks=hooks, edit=lambda c: replace(c, platform=platform(EPOCH + 1)))
    assert isinstance(higher.event, Accepted)
    _refused(gw, rng, hooks, ReasonCode.COUNTER_ROLLBACK)


def test_ledger_entries_from_another_process_keep_one_chain(
    hot: tuple[Gateway, RegistryHooks, Engine], rng: random.Random, clock: FakeClock
) -> None:
    gw, hooks, other = hot
    body = cbor.dumps({"note": "from another process"})
    for _ in range(3):
        assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
        Ledger(other).append(LedgerKind.TRUST_CHANGE, body, now_s=clock.now_s)
        gw.ledger.append(LedgerKind.TRUST_CHANGE, body, now_s=clock.now_s)  # this engine
    assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
    report = gw.ledger.verify(gw.kms.result_public_key())
    assert report.ok, report.problems
    assert report.entries == gw.ledger.head().seq


@pytest.mark.postgres
def test_postgresql_reads_the_snapshot_every_time(
    tmp_path: Path, clock: FakeClock, rng: random.Random, pg_url: str
) -> None:
    gw = build_gateway(pg_url, tmp_path / "gateway.key", clock)
    hooks = gw.hooks()
    try:
        assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
        with _counting(gw.registry.engine) as statements:
            assert isinstance(attest(gw, rng, hooks=hooks).event, Accepted)
        assert any("FROM devices" in sql for sql in statements)
        _revoke(gw.registry, gw.ledger, clock)
        _refused(gw, rng, hooks, ReasonCode.DEVICE_REVOKED)
    finally:
        gw.registry.engine.dispose()
