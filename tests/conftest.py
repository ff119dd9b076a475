"""Shared fixtures: vectors, a fake clock, a seeded RNG, a real mosquitto, a PostgreSQL database.

A missing broker or database skips the tests that need it, with the reason, except with CI=true,
where it fails the run (a skip in CI is a defect).
"""

from __future__ import annotations

import os
import random
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine

from gateway.broker import Broker, find_mosquitto, running_mosquitto
from gateway.db import open_engine

if TYPE_CHECKING:
    from device.attacks.playbook import Bench
    from device.attacks.report import AttackReport

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
PG_URL = os.environ.get("EDGESEAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def vectors_dir() -> Path:
    """The shared interoperability vectors (EDGESEAL_VECTORS or ../shared/vectors)."""
    return Path(os.environ.get("EDGESEAL_VECTORS", ROOT.parent / "shared" / "vectors"))


def missing(reason: str) -> None:
    """Skip with ``reason``, or fail under CI=true."""
    if IN_CI:
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The shared vectors folder; skipped with a reason where it is absent (never in CI)."""
    path = vectors_dir()
    if not path.is_dir():
        missing(f"interoperability vectors not found at {path} (set EDGESEAL_VECTORS)")
    return path


@dataclass
class FakeClock:
    """A clock the test moves by hand; ``now_s`` is seconds since the epoch."""

    now_s: int = 1_800_000_000

    def advance(self, seconds: int) -> None:
        """Move the clock forward by ``seconds``."""
        self.now_s += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at a fixed time."""
    return FakeClock()


@pytest.fixture
def rng() -> random.Random:
    """A seeded RNG; ``rng.randbytes(n)`` feeds the pure protocol."""
    return random.Random(0xED6E5EA1)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A private mosquitto on a free loopback port with the project's config."""
    if find_mosquitto() is None:
        missing("mosquitto is not installed (apt-get install mosquitto)")
    with running_mosquitto() as running:
        yield running


@pytest.fixture(scope="session")
def attack_bench(broker: Broker) -> Iterator[Bench]:
    """One attack bench for the session: workspaces, three boards, a release, the gateway serving.

    Shared by every ``tests/test_attacks*.py`` module; each attack restores what it touched. On a
    mosquitto of its own: its gateway serves every device under the default prefix, and it lives
    until the session ends, so on the shared broker it would answer other tests' devices.
    """
    from device.attacks.playbook import Bench

    with (
        tempfile.TemporaryDirectory(prefix="edgeseal-attack-") as tmp,
        running_mosquitto() as private,
    ):
        made = Bench(Path(tmp), private.url)
        made.setup()
        made.start_gateway()
        try:
            yield made
        finally:
            made.stop()


@pytest.fixture(scope="module")
def attack_reports() -> dict[str, AttackReport]:
    """Each attack's report, run once per test module (``tests.attack_reports.report_of``)."""
    return {}


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema for one test, as a SQLAlchemy URL; dropped afterwards."""
    try:
        import psycopg
    except ImportError:
        missing("psycopg is not installed (pip install edgeseal[postgres])")
        raise
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as err:
        missing(f"PostgreSQL unreachable at {PG_URL}: {str(err).strip()[:120]}")
        raise
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            base = PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)
            yield f"{base}?options=-csearch_path%3D{schema}"
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for one test: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def engines(db_url: str) -> Iterator[Callable[[], Engine]]:
    """A factory of engines on the test's database (each disposed afterwards)."""
    made: list[Engine] = []

    def make() -> Engine:
        made.append(open_engine(db_url))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()
