"""Database engines and transactions for the registry and the ledger (DESIGN §10).

One URL picks the backend:

- ``sqlite:///path`` or a plain file path: a SQLite file in WAL mode (``synchronous = NORMAL``)
  with foreign keys on and a busy timeout. pysqlite's own transaction handling is switched off
  and every transaction starts with an explicit ``BEGIN`` (SQLAlchemy's documented recipe), so
  a write transaction can say ``BEGIN IMMEDIATE`` and take SQLite's single writer lock up front:
  two processes then serialize instead of failing on a lock upgrade.
- ``postgresql://`` or ``postgresql+psycopg://``: PostgreSQL through psycopg 3. A write transaction
  may take a transaction-scoped advisory lock (``pg_advisory_xact_lock``) to serialize with every
  other gateway process on the same database.

Schemas are versioned per component (``registry``, ``ledger``) in one ``schema_version`` table;
``ensure_schema`` creates a component's tables once, under the write lock, and refuses a database
written by a newer edgeseal.
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import ConnectionPoolEntry

from protocol.errors import TransportError, UsageError

#: How long a SQLite writer waits for another writer before failing (milliseconds).
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
#: How long a PostgreSQL connection attempt may take (seconds).
PG_CONNECT_TIMEOUT_S: Final = 5
#: Advisory lock key under which schemas are created (an arbitrary 63-bit constant).
SCHEMA_LOCK_KEY: Final = 0x6564_6765_7365_0001

_OPTION_BEGIN: Final = "edgeseal_sqlite_begin"

schema_metadata: Final = sa.MetaData()
schema_version_table: Final = sa.Table(
    "schema_version",
    schema_metadata,
    sa.Column("component", sa.String(32), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)


class SchemaVersionError(UsageError):
    """The database holds a schema this edgeseal cannot use (written by a newer version).

    Raised by ``Registry.open`` and ``Ledger.open``; upgrade edgeseal or point it at another
    database.
    """


def open_engine(url: str, *, wal_checkpoints_elsewhere: bool = False) -> Engine:
    """Open the registry database named by ``url`` and check that it is reachable.

    Args:
        url: ``sqlite:///path``, a plain file path (SQLite), ``postgresql://...`` or
            ``postgresql+psycopg://...``.
        wal_checkpoints_elsewhere: SQLite only: this engine's commits leave WAL checkpoints to
            a ``WalCheckpointer`` (up to ``WAL_BACKSTOP_PAGES``, when they checkpoint again).

    Raises:
        UsageError: the URL is malformed, names another backend or driver, or an in-memory SQLite.
        TransportError: the database cannot be reached or opened.
    """
    parsed = _parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
        if wal_checkpoints_elsewhere:
            event.listen(engine, "connect", _sqlite_backstop_checkpoints)
    else:
        engine = _postgres_engine(parsed)
    try:
        with engine.connect():
            pass
    except exc.DBAPIError as err:
        engine.dispose()
        raise TransportError(
            f"database {parsed.render_as_string(hide_password=True)} unreachable: "
            f"{type(err.orig).__name__}"
        ) from err
    return engine


def is_sqlite(engine: Engine) -> bool:
    """Whether ``engine`` is a SQLite engine (else PostgreSQL)."""
    return engine.dialect.name == "sqlite"


@contextmanager
def write_transaction(engine: Engine, *, lock_key: int | None = None) -> Iterator[Connection]:
    """One write transaction, committed on normal exit and rolled back on an exception.

    On SQLite it starts with ``BEGIN IMMEDIATE`` (the database's one writer lock, so every write
    transaction is serialized). On PostgreSQL, when ``lock_key`` is given, it first takes
    ``pg_advisory_xact_lock(lock_key)``, released at commit or rollback.

    Raises:
        TransportError: the database failed underneath (unreachable, lock timeout).
    """
    with _translated(), engine.connect() as conn:
        if is_sqlite(engine):
            conn.execution_options(**{_OPTION_BEGIN: "BEGIN IMMEDIATE"})
        with conn.begin():
            if lock_key is not None and not is_sqlite(engine):
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_key)))
            yield conn


class PinnedWriter:
    """Write transactions on one connection kept between them, for the attestation hot path.

    ``write_transaction`` takes a connection from the pool and gives it back for every
    transaction: on SQLite that costs ~20 us of SQLAlchemy pool and event work, as much as the
    hot path's own statements. On SQLite this keeps one connection out of the pool (one
    transaction at a time, behind a lock) and runs each write transaction's ``BEGIN IMMEDIATE``
    and ``COMMIT`` (or ``ROLLBACK``) straight on the driver, as ``HotStatement`` runs the
    statements. A statement run through SQLAlchemy inside (``conn.execute``) joins the
    transaction, which then ends through SQLAlchemy. A connection that SQLAlchemy invalidated
    (the database failed underneath) is dropped and the next transaction opens a fresh one. On
    PostgreSQL it is ``write_transaction`` itself (whose pool pings a connection before use).
    """

    def __init__(self, engine: Engine) -> None:
        """A writer on ``engine``; nothing is opened before the first transaction."""
        self._engine = engine
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction, committed on normal exit and rolled back on an exception.

        Raises:
            TransportError: the database failed underneath (unreachable, lock timeout).
        """
        if not is_sqlite(self._engine):
            with write_transaction(self._engine) as conn:
                yield conn
            return
        with self._lock, _translated():
            conn = self._connection()
            driver = _sqlite_driver(conn)
            _on_driver(conn, driver, "BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                _end_on_driver(conn, driver, commit=False)
                raise
            _end_on_driver(conn, driver, commit=True)

    def close(self) -> None:
        """Give the connection back to the pool (a later transaction takes one again)."""
        with self._lock:
            self._drop()

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.invalidated:
            return conn
        self._drop()
        conn = self._engine.connect()
        self._conn = conn
        # Back to the pool when the writer is dropped without close(), not left to the GC.
        self._finalizer = weakref.finalize(self, conn.close)
        return conn

    def _drop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # closes the connection once
            self._finalizer = None
        self._conn = None


def _sqlite_driver(conn: Connection) -> sqlite3.Connection:
    driver = conn.connection.driver_connection
    if not isinstance(driver, sqlite3.Connection):
        raise TypeError("expected a sqlite3 driver connection")
    return driver


def _on_driver(conn: Connection, driver: sqlite3.Connection, statement: str) -> None:
    """Run ``statement`` (no parameters, no rows) straight on ``conn``'s driver connection, with
    driver errors wrapped as SQLAlchemy would (a busy timeout, ...)."""
    try:
        cursor = driver.cursor()
        _announce(conn, cursor, statement, (), many=False)
        cursor.execute(statement)
        cursor.close()
    except sqlite3.Error as err:
        raise exc.DBAPIError.instance(statement, None, err, sqlite3.Error) from err


def _end_on_driver(conn: Connection, driver: sqlite3.Connection, *, commit: bool) -> None:
    """Commit or roll back a transaction a ``PinnedWriter`` began on the driver; through
    SQLAlchemy when a statement run through it joined (SQLAlchemy then holds it as begun)."""
    if conn.in_transaction():
        if commit:
            conn.commit()
        else:
            conn.rollback()
        return
    if not driver.in_transaction:  # SQLite ended it itself (some errors roll back)
        return
    if not commit:
        _on_driver(conn, driver, "ROLLBACK")
        return
    try:
        _on_driver(conn, driver, "COMMIT")
    except BaseException:
        if driver.in_transaction:
            _on_driver(conn, driver, "ROLLBACK")
        raise


def take_write_lock(conn: Connection, lock_key: int) -> None:
    """Serialize the rest of ``conn``'s write transaction under ``lock_key``.

    On PostgreSQL: ``pg_advisory_xact_lock(lock_key)`` now, so what the transaction read before
    was read without it (READ COMMITTED) and must be checked again under it where it matters.
    On SQLite nothing: ``write_transaction`` began with ``BEGIN IMMEDIATE``, so the transaction
    has held the database's one writer lock, and seen no other writer's commit, from its start.

    Raises:
        TransportError: the database failed underneath (unreachable, lock timeout).
    """
    if conn.dialect.name == "sqlite":
        return
    with _translated():
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_key)))


@dataclass(frozen=True, slots=True)
class ChangeMark:
    """Where one SQLite connection's view of the database stands (``change_mark``).

    Two marks of one connection are equal only when nothing was committed in between: not by
    another connection or process (``PRAGMA data_version`` moves), nor by this connection
    (``total_changes`` counts every row it inserted, updated or deleted, rolled back ones too:
    at worst a change is seen where there was none). A cache of what the database held may be
    kept under a mark and used while a later mark equals it.
    """

    connection: sqlite3.Connection
    data_version: int
    total_changes: int

    def after_own_writes(self) -> ChangeMark:
        """The mark once this transaction's own writes are counted in, for after its commit.

        Taken inside the write transaction that ``change_mark`` marked: nobody else can commit
        while it holds SQLite's writer lock, so only this connection's own changes moved.
        """
        return ChangeMark(self.connection, self.data_version, self.connection.total_changes)


def change_mark(conn: Connection) -> ChangeMark | None:
    """The ``ChangeMark`` of ``conn``, inside a ``write_transaction`` on SQLite; None on
    PostgreSQL, where no such mark exists and a cache must not be trusted.

    Raises:
        sqlalchemy.exc.DBAPIError: the database refused (as ``conn.execute`` would).
    """
    if not is_sqlite_connection(conn):
        return None
    driver = _sqlite_driver(conn)
    cursor = driver.cursor()
    _announce(conn, cursor, _DATA_VERSION, (), many=False)
    try:
        (version,) = cursor.execute(_DATA_VERSION).fetchone()
    except sqlite3.Error as err:
        raise exc.DBAPIError.instance(_DATA_VERSION, None, err, sqlite3.Error) from err
    finally:
        cursor.close()
    return ChangeMark(driver, int(version), driver.total_changes)


_DATA_VERSION: Final = "PRAGMA data_version"


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """One read transaction (a consistent snapshot on SQLite; read committed on PostgreSQL).

    Raises:
        TransportError: the database failed underneath.
    """
    with _translated(), engine.connect() as conn, conn.begin():
        yield conn


def ensure_schema(engine: Engine, component: str, version: int, metadata: sa.MetaData) -> None:
    """Create ``component``'s tables at ``version``, or check the version already there.

    Creation runs under the write lock (``BEGIN IMMEDIATE`` / an advisory lock), so two processes
    opening a new database at once create it exactly once.

    Raises:
        SchemaVersionError: the database holds a newer (or unknown older) version of ``component``.
        TransportError: the database failed underneath.
    """
    with write_transaction(engine, lock_key=SCHEMA_LOCK_KEY) as conn:
        schema_metadata.create_all(conn, checkfirst=True)
        found = conn.execute(
            sa.select(schema_version_table.c.version).where(
                schema_version_table.c.component == component
            )
        ).scalar_one_or_none()
        if found is None:
            metadata.create_all(conn, checkfirst=True)
            conn.execute(
                sa.insert(schema_version_table).values(component=component, version=version)
            )
            return
    _check_version(component, found, version)


def _check_version(component: str, found: int, supported: int) -> None:
    if found > supported:
        raise SchemaVersionError(
            f"{component} schema: the database is at version {found}, this edgeseal supports "
            f"up to {supported}; upgrade edgeseal"
        )
    if found < supported:
        raise SchemaVersionError(
            f"{component} schema: the database is at version {found}, expected {supported}, "
            "and no migration exists"
        )


@contextmanager
def _translated() -> Iterator[None]:
    """Turn a database failure underneath into ``TransportError`` (integrity errors pass)."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as err:
        raise TransportError(f"database failed: {type(err.orig).__name__}: {err.orig}") from err


def _parse_url(url: str) -> URL:
    if not isinstance(url, str) or not url:
        raise UsageError("database URL: expected sqlite:///PATH, a file path or postgresql://...")
    if "://" not in url:
        return URL.create("sqlite", database=str(Path(url).expanduser().resolve()))
    try:
        parsed = sa.make_url(url)
    except (exc.ArgumentError, ValueError) as err:
        raise UsageError(f"database URL: not a valid URL: {url!r:.80}") from err
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise UsageError("database URL: in-memory SQLite is not supported, give a file path")
        return parsed
    raise UsageError(
        f"database URL: backend {parsed.drivername!r} unsupported, "
        "use sqlite:///PATH or postgresql://..."
    )


def _sqlite_engine(url: URL) -> Engine:
    database = Path(str(url.database)).expanduser()
    if not database.parent.is_dir():
        raise UsageError(f"database URL: directory {str(database.parent)!r} does not exist")
    engine = sa.create_engine(url)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: object, _record: ConnectionPoolEntry) -> None:
    """Per connection: manual transactions, WAL, foreign keys, a busy timeout."""
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # With WAL, NORMAL syncs at checkpoints, not at every COMMIT: a committed transaction
        # survives a process crash; only the last ones may be lost on power loss (SQLite docs,
        # "PRAGMA synchronous"). Each COMMIT otherwise waits on an fsync.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


#: With a ``WalCheckpointer``: the WAL size (pages) at which a commit checkpoints after all.
WAL_BACKSTOP_PAGES: Final = 16_384


def _sqlite_backstop_checkpoints(dbapi_connection: object, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    try:
        cursor.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}")
    finally:
        cursor.close()


class WalCheckpointer:
    """Checkpoints a SQLite WAL from the caller's (idle) thread, not in a committing one.

    By default SQLite checkpoints inside the COMMIT that grows the WAL past 1,000 pages: the
    gateway's message thread would copy pages and fsync the database file while devices wait.
    The serving process opens its engine with ``wal_checkpoints_elsewhere`` and calls
    ``checkpoint`` often from its housekeeping thread; ``sqlite3`` releases the GIL meanwhile,
    so the work moves to the other core. PASSIVE never blocks readers or the writer. A no-op
    on PostgreSQL.
    """

    def __init__(self, engine: Engine) -> None:
        """A connection of its own to ``engine``'s SQLite file (none for PostgreSQL)."""
        self._conn: sqlite3.Connection | None = None
        if is_sqlite(engine):
            path = str(engine.url.database)
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")

    def checkpoint(self) -> None:
        """Copy what the WAL holds into the database file, as far as readers allow.

        Raises:
            TransportError: the database cannot be written.
        """
        if self._conn is None:
            return
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as err:
            raise TransportError(f"WAL checkpoint failed: {type(err).__name__}") from err

    def close(self) -> None:
        """Close its connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _sqlite_on_begin(conn: Connection) -> None:
    """Emit our own BEGIN (IMMEDIATE for write transactions), straight on the driver's
    connection: a BEGIN needs no result, parameters or statement events, and SQLAlchemy's
    execution path would cost more than the BEGIN itself."""
    driver = _sqlite_driver(conn)
    if driver.in_transaction:  # begun by a PinnedWriter: SQLAlchemy joins it
        return
    _on_driver(conn, driver, conn.get_execution_options().get(_OPTION_BEGIN, "BEGIN"))


def _postgres_engine(url: URL) -> Engine:
    connect_args: dict[str, object] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


#: What a ``HotStatement`` wraps.
HotStatementKind = sa.Select[Any] | sa.Insert | sa.Update


class HotStatement:
    """A statement of the attestation hot path, built once and run with little overhead.

    On SQLite it is compiled once (per set of parameter names) and run straight on the driver
    connection underneath ``conn`` — inside the transaction ``conn`` began, with driver errors
    wrapped as SQLAlchemy would (``IntegrityError``, ``OperationalError``, ...). On PostgreSQL
    it runs through ``conn.execute`` as any statement. Either way the rows come back as
    mappings of column name (or label) to value.
    """

    __slots__ = ("_compiled", "_lock", "_statement")

    def __init__(self, statement: HotStatementKind) -> None:
        """Wrap ``statement`` (bound parameters named with ``sa.bindparam``)."""
        self._statement = statement
        self._compiled: dict[tuple[str, ...], tuple[str, tuple[str, ...], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    @property
    def statement(self) -> HotStatementKind:
        """The SQLAlchemy statement."""
        return self._statement

    def rows(
        self, conn: Connection, params: Mapping[str, object] | None = None
    ) -> list[Mapping[Any, Any]]:
        """Run with ``params``; every row as a mapping.

        Raises:
            sqlalchemy.exc.DBAPIError: the database refused (as ``conn.execute`` would).
        """
        params = params or {}
        if not is_sqlite_connection(conn):
            result = conn.execute(self._statement, dict(params))
            return [row._mapping for row in result] if result.returns_rows else []
        sql, names, defaults = self._sqlite_form(conn, tuple(params))
        values = tuple(params[name] if name in params else defaults[name] for name in names)
        cursor = self._run(conn, sql, [values], many=False)
        try:
            if cursor.description is None:
                return []
            columns = [column[0] for column in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def first(
        self, conn: Connection, params: Mapping[str, object] | None = None
    ) -> Mapping[Any, Any] | None:
        """The first row, or None."""
        found = self.rows(conn, params)
        return found[0] if found else None

    def run_many(self, conn: Connection, params: Sequence[Mapping[str, object]]) -> None:
        """Run once per mapping in ``params`` (an INSERT of several rows); nothing returned."""
        if not params:
            return
        if not is_sqlite_connection(conn):
            conn.execute(self._statement, [dict(one) for one in params])
            return
        sql, names, defaults = self._sqlite_form(conn, tuple(params[0]))
        values = [
            tuple(one[name] if name in one else defaults[name] for name in names) for one in params
        ]
        self._run(conn, sql, values, many=True).close()

    def _sqlite_form(
        self, conn: Connection, keys: tuple[str, ...]
    ) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        """The SQL, its parameter names in order, and the values bound in the statement itself
        (a ``LIMIT 1``), compiled once per set of parameter names."""
        found = self._compiled.get(keys)
        if found is None:
            compiled = self._statement.compile(dialect=conn.dialect, column_keys=list(keys))
            names = tuple(compiled.positiontup or ())
            found = (str(compiled), names, dict(compiled.params))
            with self._lock:
                self._compiled[keys] = found
        return found

    @staticmethod
    def _run(
        conn: Connection, sql: str, values: list[tuple[object, ...]], *, many: bool
    ) -> sqlite3.Cursor:
        driver = _sqlite_driver(conn)
        cursor = driver.cursor()
        _announce(conn, cursor, sql, values, many=many)
        try:
            if many:
                cursor.executemany(sql, values)
            else:
                cursor.execute(sql, values[0])
        except sqlite3.Error as err:
            cursor.close()
            raise exc.DBAPIError.instance(sql, values, err, sqlite3.Error) from err
        return cursor


def is_sqlite_connection(conn: Connection) -> bool:
    """Whether ``conn`` is a connection to SQLite (else PostgreSQL)."""
    return conn.dialect.name == "sqlite"


def _announce(conn: Connection, cursor: object, sql: str, values: object, *, many: bool) -> None:
    """Fire ``before_cursor_execute`` for SQL run straight on the driver, when anyone listens
    (statement counters, tracing), with no execution context."""
    if conn.dispatch.before_cursor_execute:
        conn.dispatch.before_cursor_execute(conn, cursor, sql, values, None, many)
