"""Database engines and transactions for the registry and the ledger (DESIGN §10).

One URL picks the backend:

- ``sqlite:///path`` or a plain file path: a SQLite file in WAL mode with foreign keys on and a busy
  timeout. pysqlite's own transaction handling is switched off and every transaction starts with an
  explicit ``BEGIN`` (SQLAlchemy's documented recipe), so a write transaction can say
  ``BEGIN IMMEDIATE`` and take SQLite's single writer lock up front: two processes then serialize
  instead of failing on a lock upgrade.
- ``postgresql://`` or ``postgresql+psycopg://``: PostgreSQL through psycopg 3. A write transaction
  may take a transaction-scoped advisory lock (``pg_advisory_xact_lock``) to serialize with every
  other gateway process on the same database.

Schemas are versioned per component (``registry``, ``ledger``) in one ``schema_version`` table;
``ensure_schema`` creates a component's tables once, under the write lock, and refuses a database
written by a newer edgeseal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

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


def open_engine(url: str) -> Engine:
    """Open the registry database named by ``url`` and check that it is reachable.

    Args:
        url: ``sqlite:///path``, a plain file path (SQLite), ``postgresql://...`` or
            ``postgresql+psycopg://...``.

    Raises:
        UsageError: the URL is malformed, names another backend or driver, or an in-memory SQLite.
        TransportError: the database cannot be reached or opened.
    """
    parsed = _parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
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
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    """Emit our own BEGIN (IMMEDIATE for write transactions)."""
    conn.exec_driver_sql(conn.get_execution_options().get(_OPTION_BEGIN, "BEGIN"))


def _postgres_engine(url: URL) -> Engine:
    connect_args: dict[str, object] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
