"""The hash-chained ledger and its signed checkpoints, on SQLite and on PostgreSQL (DESIGN §10)."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable

import cbor2
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from gateway import db
from gateway.db import SchemaVersionError
from gateway.ledger import (
    CHECKPOINT_AAD,
    GENESIS_HASH,
    LEDGER_LOCK_KEY,
    CheckpointStatus,
    Ledger,
    LedgerCorrupt,
    LedgerEvent,
    LedgerKind,
    LedgerReport,
    ProblemKind,
    entry_hash,
    parse_checkpoint,
)
from protocol import cbor, cose
from protocol.errors import InvalidSignature, MalformedMessage
from protocol.ids import DeviceId
from protocol.keys import derive_p256

DEV = DeviceId("dev-0001")
OTHER = DeviceId("dev-0002")


@pytest.fixture
def ledger(engines: Callable[[], Engine]) -> Ledger:
    """A ledger on a fresh database."""
    return Ledger.open(engines())


@pytest.fixture
def result_key(rng: random.Random) -> ec.EllipticCurvePrivateKey:
    """The gateway result key that signs checkpoints."""
    return derive_p256(rng.randbytes(32), b"result")


def fill(ledger: Ledger, count: int) -> None:
    """Append ``count`` events alternating between two devices."""
    for n in range(count):
        device = DEV if n % 2 == 0 else OTHER
        ledger.append(LedgerKind.VERDICT, cbor.dumps({"n": n}), device=device, now_s=1000 + n)


def sql(engine: Engine, statement: str, **params: object) -> None:
    """Run raw SQL as an attacker with write access to the database would."""
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def engine_of(ledger: Ledger) -> Engine:
    """The engine under ``ledger`` (the attacker's handle on the same file or schema)."""
    return ledger.engine


def first_problem(report: LedgerReport) -> tuple[int, ProblemKind]:
    """The seq and kind of the report's first problem."""
    assert not report.ok
    return report.problems[0].seq, report.problems[0].kind


def rewrite_from(engine: Engine, seq: int, body: bytes) -> None:
    """Rewrite entry ``seq``'s body and recompute every later hash, as a careful attacker would."""
    with engine.begin() as conn:
        rows = conn.execute(
            sa.text(
                "select seq, kind, device, body, at_s, prev_hash from ledger_entries order by seq"
            )
        ).all()
        prev = GENESIS_HASH
        for row in rows:
            new_body = body if row.seq == seq else bytes(row.body)
            prev_hash = bytes(row.prev_hash) if row.seq < seq else prev
            digest = entry_hash(row.seq, row.kind, row.device, new_body, row.at_s, prev_hash)
            if row.seq >= seq:
                conn.execute(
                    sa.text(
                        "update ledger_entries set body = :b, prev_hash = :p, entry_hash = :h "
                        "where seq = :s"
                    ),
                    {"b": new_body, "p": prev_hash, "h": digest, "s": row.seq},
                )
            prev = digest


# --- hashing and the happy path ---------------------------------------------------------------


def test_entry_hash_is_sha256_of_the_canonical_array() -> None:
    """The entry hash is SHA-256 over canonical CBOR [seq, kind, device, body, at_s, prev]."""
    encoded = cbor2.dumps([7, "verdict", "dev-0001", b"\xa0", 99, bytes(32)], canonical=True)
    assert entry_hash(7, "verdict", "dev-0001", b"\xa0", 99, bytes(32)) == (
        hashlib.sha256(encoded).digest()
    )
    assert entry_hash(7, "verdict", None, b"\xa0", 99, bytes(32)) != (
        hashlib.sha256(encoded).digest()
    )


def test_append_links_entries_and_verifies(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """Appended entries chain from the genesis hash and verify."""
    first = ledger.append(
        LedgerKind.ENROLLMENT, cbor.dumps({"id": "dev-0001"}), device=DEV, now_s=5
    )
    second = ledger.append(LedgerKind.POLICY_CHANGE, cbor.dumps({"version": 2}), now_s=6)
    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    assert (second.seq, second.prev_hash, second.device) == (2, first.entry_hash, None)
    assert ledger.head().entry_hash == second.entry_hash
    report = ledger.verify(result_key.public_key())
    assert report.ok
    assert report.problems == ()
    assert report.entries == 2
    assert report.head == ledger.head()
    assert (report.checkpoint, report.checkpoint_seq) == (CheckpointStatus.NONE, None)


def test_entries_filter_by_device_and_limit(ledger: Ledger) -> None:
    """entries() lists oldest first, per device, the latest ``limit``."""
    fill(ledger, 7)
    assert [e.seq for e in ledger.entries()] == list(range(1, 8))
    assert [e.seq for e in ledger.entries(DEV)] == [1, 3, 5, 7]
    assert [e.seq for e in ledger.entries(OTHER, limit=2)] == [4, 6]
    last = ledger.entries(limit=1)[0]
    assert (last.kind, last.device, cbor2.loads(last.body)) == (LedgerKind.VERDICT, DEV, {"n": 6})


NON_CANONICAL_BODIES = (
    b"\x18\x01",  # 1 in a two-byte form: not the shortest
    bytes.fromhex("a2616202616101"),  # {"b": 2, "a": 1}: keys not sorted
    b"\x01\x02",  # trailing bytes
    b"",  # nothing
    b"\xff",  # a lone break code
)


def test_append_refuses_non_canonical_bodies(ledger: Ledger) -> None:
    """A body that is not exactly one canonical CBOR item is refused and nothing is appended."""
    for body in NON_CANONICAL_BODIES:
        with pytest.raises(ValueError, match="ledger body"):
            ledger.append(LedgerKind.COMMAND, body, now_s=1)
    assert ledger.head().seq == 0


def test_schema_reopen_and_newer_refusal(engines: Callable[[], Engine]) -> None:
    """The ledger schema reopens with its data and refuses a newer version."""
    engine = engines()
    fill(Ledger.open(engine), 2)
    assert Ledger.open(engines()).head().seq == 2
    sql(engine, "update schema_version set version = 2 where component = 'ledger'")
    with pytest.raises(SchemaVersionError, match="version 2"):
        Ledger.open(engine)


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_signs_the_head(ledger: Ledger, result_key: ec.EllipticCurvePrivateKey) -> None:
    """A checkpoint verifies under the result key and names the head."""
    fill(ledger, 3)
    made = ledger.checkpoint(result_key, now_s=2000)
    parsed = parse_checkpoint(made.signed, result_key.public_key())
    assert (parsed.seq, parsed.head_hash, parsed.at_s) == (3, ledger.head().entry_hash, 2000)
    fill(ledger, 2)
    report = ledger.verify(result_key.public_key())
    assert report.ok
    assert (report.checkpoint, report.checkpoint_seq, report.entries) == (
        CheckpointStatus.VALID,
        3,
        5,
    )


def test_checkpoint_accepts_a_kms_signer(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """An Es256Signer callable (a KMS) signs checkpoints; an empty ledger checkpoints seq 0."""
    made = ledger.checkpoint(cose.es256_signer(result_key), now_s=1)
    assert (made.seq, made.head_hash) == (0, GENESIS_HASH)
    assert ledger.verify(result_key.public_key()).checkpoint is CheckpointStatus.VALID


def test_checkpoint_signature_is_domain_separated(result_key: ec.EllipticCurvePrivateKey) -> None:
    """A result-key signature over the same payload without the checkpoint AAD is refused."""
    payload = cbor.dumps([1, bytes(32), 5])
    plain = cose.sign1_create(payload, result_key)
    with pytest.raises(InvalidSignature):
        parse_checkpoint(plain, result_key.public_key())
    signed = cose.sign1_create(payload, result_key, external_aad=CHECKPOINT_AAD)
    assert parse_checkpoint(signed, result_key.public_key()).seq == 1


def test_checkpoint_under_another_key_is_invalid(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey, rng: random.Random
) -> None:
    """A checkpoint checked with the wrong public key is reported invalid."""
    fill(ledger, 2)
    ledger.checkpoint(result_key, now_s=1)
    wrong = derive_p256(rng.randbytes(32), b"other").public_key()
    report = ledger.verify(wrong)
    assert first_problem(report) == (2, ProblemKind.CHECKPOINT_INVALID)
    assert report.checkpoint is CheckpointStatus.INVALID


def test_tampered_checkpoint_rows_are_invalid(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """A flipped signature bit, a truncated signature or a moved seq column is invalid."""
    fill(ledger, 3)
    signed = ledger.checkpoint(result_key, now_s=1).signed
    engine = engine_of(ledger)
    for forged in (signed[:-1] + bytes([signed[-1] ^ 1]), signed[:-5], signed + b"\x00"):
        sql(engine, "update ledger_checkpoints set signed = :s", s=forged)
        report = ledger.verify(result_key.public_key())
        assert first_problem(report) == (3, ProblemKind.CHECKPOINT_INVALID)
    sql(engine, "update ledger_checkpoints set signed = :s, seq = 2", s=signed)
    assert first_problem(ledger.verify(result_key.public_key())) == (
        2,
        ProblemKind.CHECKPOINT_INVALID,
    )


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_parse_checkpoint_raises_only_malformed_or_invalid(data: bytes) -> None:
    """Arbitrary bytes given as a checkpoint raise only MalformedMessage or InvalidSignature."""
    public = derive_p256(bytes(32), b"result").public_key()
    with pytest.raises((MalformedMessage, InvalidSignature)):
        parse_checkpoint(data, public)


# --- tampering --------------------------------------------------------------------------------


def test_modified_body_is_named(ledger: Ledger, result_key: ec.EllipticCurvePrivateKey) -> None:
    """An entry whose body was changed in place is named as modified."""
    fill(ledger, 5)
    sql(engine_of(ledger), "update ledger_entries set body = :b where seq = 3", b=cbor.dumps(0))
    report = ledger.verify(result_key.public_key())
    assert first_problem(report) == (3, ProblemKind.MODIFIED)
    assert len(report.problems) == 1


def test_modified_metadata_is_named(ledger: Ledger, result_key: ec.EllipticCurvePrivateKey) -> None:
    """Changing an entry's kind, device or time is named as a modification of that entry."""
    fill(ledger, 5)
    engine = engine_of(ledger)
    sql(engine, "update ledger_entries set kind = 'revocation' where seq = 2")
    sql(engine, "update ledger_entries set device = 'dev-9999' where seq = 3")
    sql(engine, "update ledger_entries set at_s = 1 where seq = 4")
    report = ledger.verify(result_key.public_key())
    assert [(p.seq, p.kind) for p in report.problems] == [
        (2, ProblemKind.MODIFIED),
        (3, ProblemKind.MODIFIED),
        (4, ProblemKind.MODIFIED),
    ]


def test_deleted_middle_entry_is_named(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """A deleted entry in the middle is named by its seq."""
    fill(ledger, 5)
    sql(engine_of(ledger), "delete from ledger_entries where seq = 3")
    report = ledger.verify(result_key.public_key())
    assert first_problem(report) == (3, ProblemKind.DELETED)
    assert "3..3" in report.problems[0].detail


def test_deleted_first_entry_is_named(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """Deleting the first entries is a gap from seq 1."""
    fill(ledger, 4)
    sql(engine_of(ledger), "delete from ledger_entries where seq <= 2")
    assert first_problem(ledger.verify(result_key.public_key())) == (1, ProblemKind.DELETED)


def test_deleted_last_entry_is_found_by_the_checkpoint(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """Deleting the last entry leaves a valid-looking chain that the checkpoint contradicts."""
    fill(ledger, 5)
    ledger.checkpoint(result_key, now_s=1)
    sql(engine_of(ledger), "delete from ledger_entries where seq = 5")
    report = ledger.verify(result_key.public_key())
    assert first_problem(report) == (5, ProblemKind.TAIL_DELETED)
    assert report.checkpoint is CheckpointStatus.MISMATCH
    assert report.entries == 4


def test_recomputed_tail_is_found_by_the_checkpoint(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """Rewriting an entry and recomputing every later hash is caught by the signed checkpoint."""
    fill(ledger, 6)
    ledger.checkpoint(result_key, now_s=1)
    rewrite_from(engine_of(ledger), 3, cbor.dumps({"n": "forged"}))
    report = ledger.verify(result_key.public_key())
    assert [p.kind for p in report.problems] == [ProblemKind.CHECKPOINT_MISMATCH]
    assert report.problems[0].seq == 6
    assert report.checkpoint is CheckpointStatus.MISMATCH


def test_recomputed_tail_after_the_checkpoint_is_caught_at_the_next_one(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """Every checkpoint is checked, so an old one still pins the chain below a newer one."""
    fill(ledger, 4)
    ledger.checkpoint(result_key, now_s=1)
    fill(ledger, 2)
    ledger.checkpoint(result_key, now_s=2)
    rewrite_from(engine_of(ledger), 2, cbor.dumps("forged"))
    report = ledger.verify(result_key.public_key())
    assert [(p.seq, p.kind) for p in report.problems] == [
        (4, ProblemKind.CHECKPOINT_MISMATCH),
        (6, ProblemKind.CHECKPOINT_MISMATCH),
    ]


def test_single_recomputed_entry_breaks_the_next_link(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """An entry rewritten with its own hash recomputed leaves the next entry unlinked."""
    fill(ledger, 5)
    engine = engine_of(ledger)
    (row,) = ledger.entries()[1:2]
    body = cbor.dumps("forged")
    digest = entry_hash(row.seq, row.kind.value, row.device, body, row.at_s, row.prev_hash)
    sql(
        engine,
        "update ledger_entries set body = :b, entry_hash = :h where seq = 2",
        b=body,
        h=digest,
    )
    assert first_problem(ledger.verify(result_key.public_key())) == (3, ProblemKind.UNLINKED)


def test_reordered_entries_are_named(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """Swapping two entries' seqs names both as reordered."""
    fill(ledger, 6)
    engine = engine_of(ledger)
    sql(engine, "update ledger_entries set seq = 100 where seq = 2")
    sql(engine, "update ledger_entries set seq = 2 where seq = 5")
    sql(engine, "update ledger_entries set seq = 5 where seq = 100")
    report = ledger.verify(result_key.public_key())
    assert first_problem(report) == (2, ProblemKind.REORDERED)
    assert [(p.seq, p.kind) for p in report.problems] == [
        (2, ProblemKind.REORDERED),
        (5, ProblemKind.REORDERED),
    ]
    assert "written as seq 5" in report.problems[0].detail


def test_unknown_kind_makes_entries_refuse(ledger: Ledger) -> None:
    """A stored entry with an unknown kind is reported as corrupt, not passed on."""
    fill(ledger, 2)
    sql(engine_of(ledger), "update ledger_entries set kind = 'bogus' where seq = 1")
    with pytest.raises(LedgerCorrupt, match="unknown kind"):
        ledger.entries()


# --- concurrency ------------------------------------------------------------------------------


def test_concurrent_appends_from_two_engines_keep_one_chain(
    engines: Callable[[], Engine], result_key: ec.EllipticCurvePrivateKey
) -> None:
    """Two gateways appending at once produce one unbroken chain with every entry."""
    ledgers = [Ledger.open(engines()), Ledger.open(engines())]
    barrier = threading.Barrier(len(ledgers))
    errors: list[BaseException] = []
    per_writer = 15

    def write(ledger: Ledger, writer: int) -> None:
        barrier.wait(timeout=10)
        try:
            for n in range(per_writer):
                ledger.append(LedgerKind.COMMAND, cbor.dumps([writer, n]), device=DEV, now_s=n)
        except BaseException as err:  # collected and asserted on below
            errors.append(err)

    threads = [
        threading.Thread(target=write, args=(ledger, writer))
        for writer, ledger in enumerate(ledgers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    report = ledgers[0].verify(result_key.public_key())
    assert report.ok
    assert report.entries == 2 * per_writer
    bodies = {cbor2.loads(entry.body)[0] for entry in ledgers[1].entries()}
    assert bodies == {0, 1}


def test_append_in_chains_several_events_in_one_transaction(
    ledger: Ledger, result_key: ec.EllipticCurvePrivateKey
) -> None:
    """Events appended together inside one locked transaction extend the one chain in order."""
    fill(ledger, 2)
    events = [
        LedgerEvent(LedgerKind.RELEASE, cbor.dumps({"r": 1}), DEV),
        LedgerEvent(LedgerKind.VERDICT, cbor.dumps({"v": 1}), DEV),
    ]
    with db.write_transaction(ledger.engine, lock_key=LEDGER_LOCK_KEY) as conn:
        made = Ledger.append_in(conn, events, now_s=5000)
    assert [entry.seq for entry in made] == [3, 4]
    assert made[1].prev_hash == made[0].entry_hash
    assert ledger.head().entry_hash == made[1].entry_hash
    assert ledger.verify(result_key.public_key()).ok


def test_append_in_rolls_back_with_the_transaction(ledger: Ledger) -> None:
    """Entries appended in a transaction that fails are not kept, and the chain is unchanged."""
    fill(ledger, 1)
    before = ledger.head()

    def append_then_fail() -> None:
        with db.write_transaction(ledger.engine, lock_key=LEDGER_LOCK_KEY) as conn:
            Ledger.append_in(conn, [LedgerEvent(LedgerKind.VERDICT, cbor.dumps(1))], now_s=1)
            raise RuntimeError("fails after the append")

    with pytest.raises(RuntimeError):
        append_then_fail()
    assert ledger.head() == before


def test_append_in_refuses_non_canonical_bodies(ledger: Ledger) -> None:
    """A non-canonical body in a batch is refused and nothing of the batch is kept."""
    events = [
        LedgerEvent(LedgerKind.VERDICT, cbor.dumps(1)),
        LedgerEvent(LedgerKind.VERDICT, cbor2.dumps({"b": 1, "a": 2})),
    ]
    with (
        db.write_transaction(ledger.engine, lock_key=LEDGER_LOCK_KEY) as conn,
        pytest.raises(ValueError, match="canonical"),
    ):
        Ledger.append_in(conn, events, now_s=1)
    assert ledger.head().seq == 0
