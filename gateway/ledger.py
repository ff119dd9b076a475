"""The hash-chained, append-only ledger of lifecycle events (DESIGN §10).

Entries live in ``ledger_entries`` in the registry's database. Entry ``seq`` (1, 2, ...) carries

    entry_hash = SHA-256(canonical CBOR [seq, kind, device, body, at_s, prev_hash])

where ``prev_hash`` is the previous entry's ``entry_hash`` (32 zero bytes before entry 1),
``device`` is a text string or null and ``body`` is the canonical CBOR bytes of the event.
Appends are serialized across processes: ``BEGIN IMMEDIATE`` on SQLite, ``pg_advisory_xact_lock`` on
PostgreSQL, inside the append transaction.

The chain alone finds a modified entry (its hash does not match), a deleted or reordered one (a
sequence gap, a broken link, an entry hashed under another seq). It cannot find a deleted last
entry or a tail rewritten with recomputed hashes; for that the gateway signs checkpoints: a
COSE_Sign1 by the result key over canonical CBOR [head seq, head hash, at_s], with external AAD
``edgeseal/ledger/checkpoint/v1`` so the signature is never mistaken for a result or a command.
``verify`` checks that every checkpoint's (seq, hash) is on the chain. A checkpoint shows only
what existed when it was signed; publish them elsewhere (events topic, logs) to also find a
deleted checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Connection, Engine, RowMapping

from gateway import db
from protocol import cbor, cose
from protocol.errors import MalformedMessage, VerificationError
from protocol.ids import DeviceId

#: The ledger schema this code reads and writes.
SCHEMA_VERSION: Final = 1
#: Advisory lock key that serializes appends on PostgreSQL (an arbitrary 63-bit constant).
LEDGER_LOCK_KEY: Final = 0x6564_6765_7365_0002
#: ``prev_hash`` of entry 1.
GENESIS_HASH: Final = bytes(32)
#: External AAD of checkpoint signatures: domain separation from other result-key signatures.
CHECKPOINT_AAD: Final = b"edgeseal/ledger/checkpoint/v1"
#: Largest event body accepted (bytes).
MAX_BODY_BYTES: Final = 1 << 20
#: ``verify`` stops listing problems after this many.
MAX_PROBLEMS: Final = 1000

metadata: Final = sa.MetaData()

entries_table: Final = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("device", sa.String(64), index=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("at_s", sa.BigInteger, nullable=False),
    sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("entry_hash", sa.LargeBinary(32), nullable=False),
)

checkpoints_table: Final = sa.Table(
    "ledger_checkpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("head_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("at_s", sa.BigInteger, nullable=False),
    sa.Column("signed", sa.LargeBinary, nullable=False),
)


class LedgerCorrupt(VerificationError):
    """A stored entry cannot be read back as a ledger entry (raised by ``entries``); run
    ``ledger verify`` to locate the tampering."""


class LedgerKind(StrEnum):
    """What happened: the ``kind`` of a ledger entry (stored; never rename)."""

    ENROLLMENT = "enrollment"
    VERDICT = "verdict"
    RELEASE = "release"
    REVOCATION = "revocation"
    COMMAND = "command"
    TRUST_CHANGE = "trust_change"
    POLICY_CHANGE = "policy_change"
    EPOCH_CHANGE = "epoch_change"
    IMPORT = "import"


class ProblemKind(StrEnum):
    """What ``verify`` found wrong; stable dotted ids."""

    MODIFIED = "ledger.entry.modified"
    DELETED = "ledger.entry.deleted"
    REORDERED = "ledger.entry.reordered"
    UNLINKED = "ledger.entry.unlinked"
    CHECKPOINT_INVALID = "ledger.checkpoint.invalid"
    CHECKPOINT_MISMATCH = "ledger.checkpoint.mismatch"
    TAIL_DELETED = "ledger.checkpoint.beyond_head"


class CheckpointStatus(StrEnum):
    """How the latest signed checkpoint compares with the chain."""

    NONE = "none"
    VALID = "valid"
    INVALID = "invalid"
    MISMATCH = "mismatch"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger entry as stored."""

    seq: int
    kind: LedgerKind
    device: DeviceId | None
    body: bytes
    at_s: int
    prev_hash: bytes
    entry_hash: bytes


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """One event to append (``Ledger.append_in``): kind, canonical CBOR body, device."""

    kind: LedgerKind
    body: bytes
    device: DeviceId | None = None


@dataclass(frozen=True, slots=True)
class LedgerHead:
    """The last entry's seq and hash (0 and ``GENESIS_HASH`` for an empty ledger)."""

    seq: int
    entry_hash: bytes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement of the head at one time."""

    seq: int
    head_hash: bytes
    at_s: int
    signed: bytes


@dataclass(frozen=True, slots=True)
class LedgerProblem:
    """One finding of ``verify``: where, what, and a sentence for people."""

    seq: int
    kind: ProblemKind
    detail: str


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """The outcome of ``verify``; ``problems[0]`` is the first problem along the chain."""

    ok: bool
    entries: int
    head: LedgerHead
    problems: tuple[LedgerProblem, ...]
    checkpoint: CheckpointStatus
    checkpoint_seq: int | None


def entry_hash(
    seq: int, kind: str, device: str | None, body: bytes, at_s: int, prev_hash: bytes
) -> bytes:
    """SHA-256 of canonical CBOR [seq, kind, device, body, at_s, prev_hash]."""
    fields = [seq, kind, device, body, at_s, prev_hash]
    return hashlib.sha256(cbor.dumps_ordered(fields)).digest()  # no map: nothing to sort


def checkpoint_payload(seq: int, head_hash: bytes, at_s: int) -> bytes:
    """The bytes a checkpoint signs: canonical CBOR [seq, head hash, at_s]."""
    return cbor.dumps([seq, head_hash, at_s])


def parse_checkpoint(signed: bytes, public_key: cose.PublicKey) -> Checkpoint:
    """Verify a signed checkpoint and decode it.

    Raises:
        MalformedMessage: not a well-formed checkpoint.
        InvalidSignature: the signature does not verify under ``public_key``.
    """
    payload = cose.sign1_verify(signed, public_key, external_aad=CHECKPOINT_AAD)
    what = "ledger checkpoint"
    seq, head, at_s = cbor.expect_list(cbor.loads(payload, what=what), what=what, length=3)
    return Checkpoint(
        seq=cbor.expect_int(seq, what=f"{what}.seq", lo=0),
        head_hash=cbor.expect_bytes(head, what=f"{what}.head_hash", size=32),
        at_s=cbor.expect_int(at_s, what=f"{what}.at_s"),
        signed=signed,
    )


class Ledger:
    """The ledger in one database; open it with ``Ledger.open(engine)``."""

    __slots__ = ("_engine",)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def open(cls, engine: Engine) -> Ledger:
        """Create the ledger tables in ``engine``'s database, or check the ones there.

        Raises:
            SchemaVersionError: the database holds a ledger schema of another version.
            TransportError: the database failed underneath.
        """
        db.ensure_schema(engine, "ledger", SCHEMA_VERSION, metadata)
        return cls(engine)

    @property
    def engine(self) -> Engine:
        """The engine this ledger writes to."""
        return self._engine

    def append(
        self, kind: LedgerKind, body: bytes, *, device: DeviceId | None = None, now_s: int
    ) -> LedgerEntry:
        """Append one event, serialized with every other writer of this database.

        Args:
            kind: what happened.
            body: the event as canonical CBOR bytes (``protocol.cbor.dumps``).
            device: the device concerned, if any.
            now_s: the gateway's time.

        Raises:
            ValueError: ``body`` is not canonical CBOR, or too large.
            TransportError: the database failed underneath.
        """
        _check_body(body)
        with db.write_transaction(self._engine, lock_key=LEDGER_LOCK_KEY) as conn:
            (entry,) = self.append_in(conn, [LedgerEvent(kind, body, device)], now_s=now_s)
        return entry

    @staticmethod
    def append_in(
        conn: Connection,
        events: Sequence[LedgerEvent],
        *,
        now_s: int,
        head: LedgerHead | None = None,
    ) -> tuple[LedgerEntry, ...]:
        """Append ``events`` in order inside the caller's write transaction ``conn``.

        ``conn`` must be a write transaction on this ledger's engine that holds the ledger lock
        (``db.write_transaction(engine, lock_key=LEDGER_LOCK_KEY)``, or ``db.take_write_lock``
        inside ``db.PinnedWriter.transaction``): the lock (``BEGIN IMMEDIATE`` on SQLite, the
        advisory lock on PostgreSQL) serializes every writer, so the head read here, once per
        call, is the head of the one chain every process shares. A caller that knows the head
        under that lock (``gateway.hotcache``) passes it as ``head`` and none is read; a stale
        one would clash on the next sequence number, the primary key, and roll the transaction
        back. The entries are committed (or rolled back) with the caller's transaction.

        Raises:
            ValueError: a body is not canonical CBOR, or too large.
            TransportError: the database failed underneath.
        """
        checked = [(LedgerKind(event.kind), event.body, event.device) for event in events]
        for _kind, body, _device in checked:
            _check_body(body)
        if not checked:
            return ()
        if head is None:
            head = _head(conn)
        seq, prev = head.seq, head.entry_hash
        entries: list[LedgerEntry] = []
        for kind, body, device in checked:
            seq += 1
            digest = entry_hash(seq, kind.value, device, body, now_s, prev)
            entries.append(LedgerEntry(seq, kind, device, body, now_s, prev, digest))
            prev = digest
        _INSERT_ENTRY.run_many(
            conn,
            [
                {
                    "seq": entry.seq,
                    "kind": entry.kind.value,
                    "device": entry.device,
                    "body": entry.body,
                    "at_s": entry.at_s,
                    "prev_hash": entry.prev_hash,
                    "entry_hash": entry.entry_hash,
                }
                for entry in entries
            ],
        )
        return tuple(entries)

    def head(self) -> LedgerHead:
        """The current head of the chain."""
        with db.read_transaction(self._engine) as conn:
            return _head(conn)

    def entries(
        self, device: DeviceId | None = None, limit: int | None = None
    ) -> tuple[LedgerEntry, ...]:
        """Entries oldest first (of ``device`` when given; the latest ``limit`` when given).

        Raises:
            LedgerCorrupt: a stored entry has an unknown kind (run ``verify``).
        """
        query = sa.select(entries_table).order_by(entries_table.c.seq.desc())
        if device is not None:
            query = query.where(entries_table.c.device == device)
        if limit is not None:
            query = query.limit(limit)
        with db.read_transaction(self._engine) as conn:
            rows = [row._mapping for row in conn.execute(query)]
        return tuple(_entry(row) for row in reversed(rows))

    def checkpoint(
        self, signer: ec.EllipticCurvePrivateKey | cose.Es256Signer, *, now_s: int
    ) -> Checkpoint:
        """Sign the current head with the result key and store the checkpoint.

        Args:
            signer: the gateway result key, or a KMS ``Es256Signer``.
            now_s: the gateway's time.
        """
        head = self.head()
        payload = checkpoint_payload(head.seq, head.entry_hash, now_s)
        signed = cose.sign1_create(payload, signer, external_aad=CHECKPOINT_AAD)
        with db.write_transaction(self._engine) as conn:
            conn.execute(
                sa.insert(checkpoints_table).values(
                    seq=head.seq, head_hash=head.entry_hash, at_s=now_s, signed=signed
                )
            )
        return Checkpoint(head.seq, head.entry_hash, now_s, signed)

    def verify(self, public_key: cose.PublicKey) -> LedgerReport:
        """Walk the chain and compare it with every signed checkpoint.

        Never raises for tampering: each problem is named in the report, first along the chain
        first, then the checkpoint findings.

        Raises:
            TransportError: the database failed underneath.
        """
        # Checkpoints first: every checkpoint read names a head that the entries read after it
        # contains, so a concurrent append cannot look like a deleted tail.
        with db.read_transaction(self._engine) as conn:
            checkpoint_rows = [
                row._mapping
                for row in conn.execute(
                    sa.select(checkpoints_table).order_by(checkpoints_table.c.id)
                )
            ]
        with db.read_transaction(self._engine) as conn:
            rows = [
                _StoredEntry.from_row(row._mapping)
                for row in conn.execute(sa.select(entries_table).order_by(entries_table.c.seq))
            ]
        problems = list(_chain_problems(rows))
        head = LedgerHead(rows[-1].seq, rows[-1].entry_hash) if rows else _empty_head()
        hashes = {row.seq: row.entry_hash for row in rows}
        status = CheckpointStatus.NONE
        latest_seq: int | None = None
        for checkpoint_row in checkpoint_rows:
            found = _checkpoint_problem(checkpoint_row, public_key, hashes, head)
            status, latest_seq = _status(found), int(checkpoint_row["seq"])
            if found is not None:
                problems.append(found)
        problems = problems[:MAX_PROBLEMS]
        return LedgerReport(
            ok=not problems,
            entries=len(rows),
            head=head,
            problems=tuple(problems),
            checkpoint=status,
            checkpoint_seq=latest_seq,
        )


@dataclass(frozen=True, slots=True)
class _StoredEntry:
    """A stored row, with whether its hash matches its content."""

    seq: int
    kind: str
    device: str | None
    body: bytes
    at_s: int
    prev_hash: bytes
    entry_hash: bytes

    @classmethod
    def from_row(cls, row: RowMapping) -> _StoredEntry:
        return cls(
            seq=int(row["seq"]),
            kind=str(row["kind"]),
            device=None if row["device"] is None else str(row["device"]),
            body=bytes(row["body"]),
            at_s=int(row["at_s"]),
            prev_hash=bytes(row["prev_hash"]),
            entry_hash=bytes(row["entry_hash"]),
        )

    def hash_as(self, seq: int) -> bytes:
        """The entry's hash if it sat at ``seq``."""
        return entry_hash(seq, self.kind, self.device, self.body, self.at_s, self.prev_hash)

    @property
    def intact(self) -> bool:
        """Whether the stored hash matches the stored content at its own seq."""
        return self.hash_as(self.seq) == self.entry_hash


def _chain_problems(rows: Sequence[_StoredEntry]) -> Iterator[LedgerProblem]:
    """The problems along the chain, in seq order."""
    broken = {row.seq for row in rows if not row.intact}
    successor_of = {row.prev_hash: row.seq for row in rows}
    expected_seq, prev_hash, prev_broken = 1, GENESIS_HASH, False
    for row in rows:
        gap = row.seq > expected_seq
        if gap:
            yield LedgerProblem(
                expected_seq,
                ProblemKind.DELETED,
                f"entries {expected_seq}..{row.seq - 1} are missing",
            )
        if row.seq in broken:
            yield _broken_entry(row, broken, successor_of)
        elif not gap and not prev_broken and row.prev_hash != prev_hash:
            yield LedgerProblem(
                row.seq,
                ProblemKind.UNLINKED,
                f"entry {row.seq} does not link to entry {row.seq - 1}: an entry was deleted "
                "or rewritten with a recomputed hash",
            )
        expected_seq, prev_hash, prev_broken = row.seq + 1, row.entry_hash, row.seq in broken


def _broken_entry(
    row: _StoredEntry, broken: set[int], successor_of: dict[bytes, int]
) -> LedgerProblem:
    """Name an entry whose hash does not match: moved from another seq, or modified."""
    candidates = broken - {row.seq}
    if row.entry_hash in successor_of:
        candidates.add(successor_of[row.entry_hash] - 1)
    for seq in sorted(candidates):
        if seq != row.seq and row.hash_as(seq) == row.entry_hash:
            return LedgerProblem(
                row.seq, ProblemKind.REORDERED, f"entry at seq {row.seq} was written as seq {seq}"
            )
    return LedgerProblem(
        row.seq, ProblemKind.MODIFIED, f"entry {row.seq} does not match its hash: it was modified"
    )


def _checkpoint_problem(
    row: RowMapping, public_key: cose.PublicKey, hashes: dict[int, bytes], head: LedgerHead
) -> LedgerProblem | None:
    """The problem with one stored checkpoint, or None when it is valid and on the chain."""
    stored_seq = int(row["seq"])
    try:
        signed = parse_checkpoint(bytes(row["signed"]), public_key)
    except (MalformedMessage, VerificationError):
        return LedgerProblem(
            stored_seq, ProblemKind.CHECKPOINT_INVALID, "checkpoint signature does not verify"
        )
    if (signed.seq, signed.head_hash) != (stored_seq, bytes(row["head_hash"])):
        return LedgerProblem(
            stored_seq, ProblemKind.CHECKPOINT_INVALID, "checkpoint row differs from what it signs"
        )
    return _checkpoint_against_chain(signed, hashes, head)


def _checkpoint_against_chain(
    signed: Checkpoint, hashes: dict[int, bytes], head: LedgerHead
) -> LedgerProblem | None:
    seq = signed.seq
    if seq > head.seq:
        return LedgerProblem(
            seq,
            ProblemKind.TAIL_DELETED,
            f"a checkpoint covers entry {seq} but the ledger ends at {head.seq}: "
            "entries were deleted from the tail",
        )
    on_chain = GENESIS_HASH if seq == 0 else hashes.get(seq)
    if on_chain is None:
        return LedgerProblem(
            seq, ProblemKind.CHECKPOINT_MISMATCH, f"checkpointed entry {seq} is missing"
        )
    if on_chain != signed.head_hash:
        return LedgerProblem(
            seq,
            ProblemKind.CHECKPOINT_MISMATCH,
            f"entry {seq} differs from the signed checkpoint: the chain was rewritten at or "
            f"before entry {seq}",
        )
    return None


def _status(problem: LedgerProblem | None) -> CheckpointStatus:
    if problem is None:
        return CheckpointStatus.VALID
    if problem.kind is ProblemKind.CHECKPOINT_INVALID:
        return CheckpointStatus.INVALID
    return CheckpointStatus.MISMATCH


def _check_body(body: bytes) -> None:
    if not isinstance(body, bytes):
        raise TypeError(f"ledger body: expected bytes, got {type(body).__name__}")
    decoded = cbor.loads(body, what="ledger body", max_bytes=MAX_BODY_BYTES)
    if cbor.dumps(decoded) != body:
        raise ValueError("ledger body: not canonical CBOR (encode it with protocol.cbor.dumps)")


def _empty_head() -> LedgerHead:
    return LedgerHead(0, GENESIS_HASH)


_SELECT_HEAD: Final = db.HotStatement(
    sa.select(entries_table.c.seq, entries_table.c.entry_hash)
    .order_by(entries_table.c.seq.desc())
    .limit(1)
)
_INSERT_ENTRY: Final = db.HotStatement(sa.insert(entries_table))


def _head(conn: Connection) -> LedgerHead:
    """The head, one indexed query (the primary key, newest first)."""
    row = _SELECT_HEAD.first(conn)
    if row is None:
        return _empty_head()
    return LedgerHead(int(row["seq"]), bytes(row["entry_hash"]))


def _entry(row: RowMapping) -> LedgerEntry:
    try:
        kind = LedgerKind(row["kind"])
    except ValueError as err:
        raise LedgerCorrupt(f"ledger entry {row['seq']}: unknown kind {row['kind']!r:.40}") from err
    return LedgerEntry(
        seq=int(row["seq"]),
        kind=kind,
        device=None if row["device"] is None else DeviceId(row["device"]),
        body=bytes(row["body"]),
        at_s=int(row["at_s"]),
        prev_hash=bytes(row["prev_hash"]),
        entry_hash=bytes(row["entry_hash"]),
    )
