"""``scripts/bench gateway``: full attestations per second through one gateway process.

One ``python -m gateway serve`` process on SQLite and a private mosquitto; a separate load
generator process (``scripts.benchmarks.loadgen``) signs evidence live for each challenge for
many enrolled devices. The rate is the steady state: every device has attested twice in the
warm-up (its certificate chain checked and cached, its counters stored, its appraisal snapshot
kept), as in a fleet that re-attests; the rate of the first round (first attestations) is
printed too. Beside the rate: the gateway-side crypto bound
(ES256 verify + HPKE seal + 2 × ES256 sign) measured in this run, the ratio, p50/p99 latency, and
a py-spy profile of a second, shorter run (where the gateway's time goes). Exit 1 when a target
is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import queue
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID
from rich.console import Console
from rich.table import Table
from sqlalchemy import event

from gateway import db
from gateway.broker import Broker, running_mosquitto
from gateway.commands import CommandIssuer
from gateway.hooks import RegistryHooks
from gateway.ledger import Ledger
from gateway.policy import RegistryPolicy
from gateway.registry import ReferenceValue, Registry, TrustAnchorKind
from gateway.service import Bucket, GatewayService, HooksRecorder, RateLimits, ServiceSettings
from gateway.state import Workspace, init_workspace
from protocol import grant, ids, image, keys, topics
from protocol.attester import AttesterSession, ChallengeReceived, VerdictReceived
from protocol.bundles import ComponentType
from protocol.ids import Product, ReleaseId, SessionId
from scripts.benchmarks.loadgen import SECURED_CLASS, load_fleet, sign_token
from scripts.benchmarks.releases import register_release
from scripts.benchmarks.timing import Figure, combined, rate, report

ROOT: Final = Path(__file__).resolve().parents[2]
PRODUCT: Final = Product("bench-thermostat")
DEBUG_CLASS: Final = 0x10
NOT_BEFORE: Final = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER: Final = datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC)
TARGET_RATIO: Final = 0.15
TARGET_ABSOLUTE: Final = 500.0


@dataclass(frozen=True, slots=True)
class Settings:
    """The bench's shape."""

    devices: int = 1000
    #: Two attestations per device (round robin). The first checks the device certificate chain
    #: (an ES256 verify outside the bound, then cached) and stores the fuse counters, which drops
    #: the device's appraisal snapshot from the gateway's cache (gateway.hotcache); the second
    #: keeps its snapshot. From then on each attestation is as in a fleet that re-attests.
    warmup: int = 2000
    measured: int = 2000
    concurrency: int = 16
    profile_total: int = 4000
    #: ``serve --state-refresh``. 0: every verdict publishes the device's retained state, as in a
    #: fleet re-attesting less often than once a minute; here each device re-attests every few
    #: seconds, and the gateway's default (60 s) would skip most of those publishes.
    state_refresh_s: int = 0


# --- the fleet ---------------------------------------------------------------------------------


def _cert(subject: str, key: ec.EllipticCurvePublicKey, ca: ec.EllipticCurvePrivateKey) -> bytes:
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench Manufacturer CA")])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .sign(ca, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def build_fleet(workspace: Workspace, count: int, fleet_path: Path) -> None:
    """Trust a test CA, add reference values and a release, enroll and assign ``count`` devices;
    write the load generator's fleet file (HUKs, certificates, stage references)."""
    engine = db.open_engine(workspace.default_db_url)
    registry = Registry.open(engine)
    ca = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert("Bench Manufacturer CA", ca.public_key(), ca)
    registry.add_trust_anchor(
        TrustAnchorKind.MANUFACTURER_CA,
        public_key=ca.public_key(),
        name="bench CA",
        now_s=1,
        cert_der=ca_cert,
    )
    rotpk = ec.generate_private_key(ec.SECP256R1())
    stage_signer = keys.signer_id(rotpk.public_key())
    bl2, runtime = os.urandom(32), os.urandom(32)
    for kind, value in ((ComponentType.BL2, bl2), (ComponentType.RUNTIME, runtime)):
        registry.add_reference_value(
            ReferenceValue(PRODUCT, kind, value, "1.0.0", stage_signer, 1, "bench"), now_s=1
        )
    release = _publish_release(registry, workspace)
    devices = []
    for index in range(count):
        huk = os.urandom(32)
        device_id = ids.device_id(f"bench-{index:05d}")
        secured = keys.derive_iak(huk, SECURED_CLASS).public_key()
        debug = keys.derive_iak(huk, DEBUG_CLASS).public_key()
        cert = _cert(device_id, secured, ca)
        registry.enroll_device(
            device_id,
            product=PRODUCT,
            cert_secured_der=cert,
            cert_debug_der=_cert(device_id, debug, ca),
            iak_secured_point=keys.p256_point(secured),
            iak_debug_point=keys.p256_point(debug),
            now_s=1,
        )
        registry.assign(device_id, release, now_s=2)
        devices.append({"id": device_id, "huk": huk.hex(), "cert": cert.hex()})
    engine.dispose()
    fleet = {
        "prefix": topics.DEFAULT_PREFIX,
        "bl2": bl2.hex(),
        "runtime": runtime.hex(),
        "stage_signer": stage_signer.hex(),
        "devices": devices,
    }
    fleet_path.write_text(json.dumps(fleet))


def _publish_release(registry: Registry, workspace: Workspace) -> ReleaseId:
    vendor = ec.generate_private_key(ec.SECP256R1())
    cek = os.urandom(32)
    sealed = image.seal_image(
        os.urandom(800),
        cek=cek,
        iv=os.urandom(12),
        key_id=os.urandom(16),
        vendor_key=vendor,
        class_id=ids.class_id(PRODUCT),
        version="1.1.0",
        security_counter=1,
        min_runtime_version="1.0.0",
        created_s=1_700_000_000,
    )
    return register_release(registry, workspace, sealed, cek, product=PRODUCT, version="1.1.0")


# --- processes -----------------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    return lines.get(timeout=timeout_s)


@contextlib.contextmanager
def serving(
    workspace: Workspace, broker: Broker, state_refresh_s: int
) -> Iterator[subprocess.Popen[str]]:
    """``python -m gateway serve`` on the workspace's SQLite, until SIGTERM at the end."""
    command = [sys.executable, "-m", "gateway", "--home", str(workspace.home)]
    command += ["serve", "--broker", broker.url, "--state-refresh", str(state_refresh_s)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT
    )
    try:
        line = _read_line(proc, 30)
        if not line.startswith("serving on"):
            raise RuntimeError(f"the gateway did not start: {line!r}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The load generator's figures."""

    ended_at: list[float]
    latencies_s: list[float]
    outcomes: dict[str, int]
    finished: bool


def run_load(
    broker: Broker,
    fleet_path: Path,
    total: int,
    concurrency: int,
    on_ready: Callable[[], object] | None = None,
) -> LoadResult:
    """Run the load generator process to the end; its figures.

    ``on_ready`` is called once the generator has derived its keys, just before it connects.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    command = [sys.executable, "-m", "scripts.benchmarks.loadgen", str(fleet_path)]
    command += ["--broker", broker.url, "--total", str(total)]
    command += ["--concurrency", str(concurrency), "--out", str(out_path)]
    try:
        with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip() == "ready" and on_ready is not None:
                    on_ready()
            proc.wait(timeout=600)
        data = json.loads(out_path.read_text())
    finally:
        out_path.unlink(missing_ok=True)
    return LoadResult(data["ended_at"], data["latencies_s"], data["outcomes"], data["finished"])


# --- profile -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Profile:
    """py-spy samples of the gateway process, folded by function."""

    samples: int
    own: Counter[str]
    cumulative: Counter[str]
    by_file: Counter[str]


def fold_raw(text: str) -> Profile:
    """Fold py-spy's raw (collapsed stack) output into own and cumulative samples.

    Only paho's network thread is kept (every message is handled on it, one at a time); idle
    samples are included, so the percentages are of that thread's wall time.
    """
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if "(" in frame]
        if not frames or not any("_thread_main" in frame for frame in frames):
            continue
        total += count
        own[_short(frames[-1])] += count
        by_file[_file_of(frames[-1])] += count
        for frame in {_short(f) for f in frames if _is_project(f)}:
            cumulative[frame] += count
    return Profile(total, own, cumulative, by_file)


def _is_project(frame: str) -> bool:
    """Whether a frame is edgeseal's own code (gateway/, protocol/)."""
    return _file_of(frame).startswith(("gateway/", "protocol/"))


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``; line numbers folded away."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({_shorten_path(path)})"


def _file_of(frame: str) -> str:
    where = frame.partition(" (")[2]
    return _shorten_path(where.rstrip(")").rsplit(":", 1)[0])


def _shorten_path(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", f"{ROOT}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def profile_gateway(
    workspace: Workspace, broker: Broker, fleet_path: Path, settings: Settings
) -> Profile | None:
    """A shorter run with py-spy attached to the warmed-up gateway; None without py-spy."""
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        return None
    with (
        tempfile.TemporaryDirectory() as tmp,
        serving(workspace, broker, settings.state_refresh_s) as gateway,
    ):
        raw = Path(tmp) / "gateway.raw"
        command = [str(pyspy), "record", "--pid", str(gateway.pid), "--format", "raw"]
        command += ["--rate", "250", "--idle", "--nonblocking", "-o", str(raw)]
        spies: list[subprocess.Popen[bytes]] = []

        def attach() -> None:
            out = subprocess.DEVNULL
            spies.append(subprocess.Popen(command, stdout=out, stderr=out))

        run_load(broker, fleet_path, settings.warmup, settings.concurrency)  # steady state first
        try:
            run_load(broker, fleet_path, settings.profile_total, settings.concurrency, attach)
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
        if not raw.exists():
            return None
        return fold_raw(raw.read_text())


def print_profile(console: Console, profile: Profile) -> None:
    """The top 15 functions by own and by cumulative samples, and own time by file."""
    for title, counter in (
        ("gateway profile: own time (top 15 functions)", profile.own),
        ("gateway profile: cumulative time (top 15 edgeseal functions)", profile.cumulative),
        ("gateway profile: own time by file (top 15)", profile.by_file),
    ):
        heading = f"{title}: % of paho's network thread wall time, {profile.samples} samples"
        table = Table(title=heading)
        table.add_column("file" if "by file" in title else "function")
        table.add_column("samples", justify="right")
        table.add_column("%", justify="right")
        for name, count in counter.most_common(15):
            table.add_row(name[:110], str(count), f"{100 * count / max(1, profile.samples):.1f}")
        console.print(table)


# --- the service in process, without MQTT ---------------------------------------------------------


class _ListPublisher:
    """Keeps what the service publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))


@dataclass(frozen=True, slots=True)
class InProcess:
    """``GatewayService.handle`` alone: its rate and its database work per attestation."""

    attestations_per_s: float
    hello_ms: float
    evidence_ms: float
    statements: float
    commits: float
    by_statement: Counter[str]


def in_process(
    workspace: Workspace, fleet_path: Path, count: int, state_refresh_s: int
) -> InProcess:
    """Drive ``count`` attestations straight into ``GatewayService.handle`` (no broker, no
    paho; evidence signed outside the timed calls) and count the SQL it runs.

    ``count`` devices attest once untimed (certificate chains checked, caches filled), then once
    more, timed: the steady state, as in the MQTT run after its warm-up."""
    fleet = load_fleet(fleet_path)
    engine = db.open_engine(workspace.default_db_url)
    statements, commits = [0], [0]
    by_statement: Counter[str] = Counter()

    def _statement(*args: object) -> None:
        text = " ".join(str(args[2]).split())
        if text == "COMMIT":  # the hot path's own, run on the driver (db.PinnedWriter)
            commits[0] += 1
            return
        statements[0] += 1
        by_statement[text[:90]] += 1

    event.listen(engine, "before_cursor_execute", _statement)
    # Commits through SQLAlchemy (a transaction a statement joined, or write_transaction).
    event.listen(engine, "commit", lambda *_a: commits.__setitem__(0, commits[0] + 1))
    registry, ledger = Registry.open(engine), Ledger.open(engine)
    publisher = _ListPublisher()
    with workspace.open_kms() as kms:
        signer = kms.result_signer()
        policy = RegistryPolicy(registry)
        config = policy().verifier_config(secret=workspace.challenge_secret(), result_signer=signer)
        hooks = RegistryHooks(registry, ledger, kms, policy, lambda: int(time.time()))
        unlimited = Bucket(capacity=1e9, per_s=1e9)
        service = GatewayService(
            config,
            hooks,
            registry,
            publisher,
            recorder=HooksRecorder(hooks),
            commands=CommandIssuer(registry, ledger, signer, clock=time.time),
            settings=ServiceSettings(
                limits=RateLimits(attest=unlimited), fleet_state_refresh_s=state_refresh_s
            ),
            clock=time.time,
            randomness=os.urandom,
        )
        hello_s = evidence_s = 0.0
        for index in range(2 * count):
            if index == count:  # the first pass warmed the caches, as the MQTT warm-up does
                hello_s = evidence_s = 0.0
                statements[0] = commits[0] = 0
                by_statement.clear()
            device = fleet.devices[index % count]
            topic = topics.attest_up(device.device_id, prefix=fleet.prefix)
            session = AttesterSession(device.device_id, SessionId(os.urandom(16)), timeout_s=60)
            hello = session.start(now_s=int(time.time()), certificates=(device.cert_der,))
            publisher.sent.clear()
            start = time.perf_counter()
            service.handle(topic, hello)
            hello_s += time.perf_counter() - start
            event_ = session.receive_data(_attest_reply(publisher))
            assert isinstance(event_, ChallengeReceived)
            token = sign_token(fleet, device, event_.binding_for(device.enclave_raw))
            evidence = session.send_evidence(
                token=token, enclave_key=device.enclave_raw, now_s=int(time.time())
            )
            publisher.sent.clear()
            start = time.perf_counter()
            service.handle(topic, evidence)
            evidence_s += time.perf_counter() - start
            verdict = session.receive_data(_attest_reply(publisher))
            assert isinstance(verdict, VerdictReceived)
            assert verdict.verdict.grant is not None
    engine.dispose()
    return InProcess(
        count / (hello_s + evidence_s),
        1000 * hello_s / count,
        1000 * evidence_s / count,
        statements[0] / count,
        commits[0] / count,
        by_statement,
    )


def sqlite_commit_rate(directory: Path, synchronous: str) -> float:
    """Write transactions per second (BEGIN IMMEDIATE, one INSERT, COMMIT) in WAL mode on the
    filesystem the gateway's database is on; the raw primitive under the registry and ledger."""
    path = directory / f"commit-{synchronous.lower()}.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        row = os.urandom(200)

        def commit() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (row,))
            conn.execute("COMMIT")

        return rate(commit, min_time_s=0.2, repeats=3)
    finally:
        conn.close()


def _attest_reply(publisher: _ListPublisher) -> bytes:
    return next(payload for topic, payload in publisher.sent if topic.endswith("/down/attest"))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- main ----------------------------------------------------------------------------------------


def crypto_bound() -> dict[str, float]:
    """The gateway's per-attestation primitives, measured in this run."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = os.urandom(200)
    sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    recipient = x25519.X25519PrivateKey.generate()
    public = key.public_key()
    return {
        "es256_sign": rate(lambda: key.sign(data, ec.ECDSA(hashes.SHA256()))),
        "es256_verify": rate(lambda: public.verify(sig, data, ec.ECDSA(hashes.SHA256()))),
        "hpke_seal": rate(
            lambda: grant._SUITE.encrypt(bytes(32), recipient.public_key(), info=b"x" * 32)
        ),
    }


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Settings()
    parser.add_argument("--devices", type=int, default=default.devices)
    parser.add_argument("--measured", type=int, default=default.measured)
    parser.add_argument("--warmup", type=int, default=default.warmup)
    parser.add_argument("--concurrency", type=int, default=default.concurrency)
    parser.add_argument(
        "--state-refresh",
        type=int,
        default=default.state_refresh_s,
        help="the gateway's --state-refresh (default 0: a state published at every verdict)",
    )
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    settings = Settings(
        args.devices,
        args.warmup,
        args.measured,
        args.concurrency,
        state_refresh_s=args.state_refresh,
    )
    console = Console()
    raw = crypto_bound()
    bound = combined(raw["es256_verify"], raw["hpke_seal"], raw["es256_sign"], raw["es256_sign"])
    with tempfile.TemporaryDirectory(prefix="edgeseal-gwbench-") as tmp:
        workspace = init_workspace(Path(tmp) / "home")
        fleet_path = Path(tmp) / "fleet.json"
        started = time.perf_counter()
        build_fleet(workspace, settings.devices, fleet_path)
        console.print(
            f"enrolled {settings.devices} devices in {time.perf_counter() - started:.1f} s"
        )
        with running_mosquitto() as broker:
            with serving(workspace, broker, settings.state_refresh_s) as gateway:
                total = settings.warmup + settings.measured
                cpu_before, wall_before = _cpu_s(gateway.pid), time.perf_counter()
                load = run_load(broker, fleet_path, total, settings.concurrency)
                cpu_s, wall_s = _cpu_s(gateway.pid) - cpu_before, time.perf_counter() - wall_before
            profile = None
            if not args.no_profile:
                profile = profile_gateway(workspace, broker, fleet_path, settings)
        alone = in_process(
            workspace, fleet_path, min(400, settings.devices), settings.state_refresh_s
        )
        commit_normal = sqlite_commit_rate(Path(tmp), "NORMAL")
    if not load.finished or len(load.ended_at) < total:
        console.print(f"[red]the load did not finish: {load.outcomes}[/red]")
        return 1
    ended = load.ended_at
    steady = settings.measured / (ended[total - 1] - ended[settings.warmup - 1])
    first_round = min(settings.devices, settings.warmup)
    first = (first_round - 1) / max(ended[first_round - 1] - ended[0], 1e-9)
    latencies = [s * 1000 for s in load.latencies_s[settings.warmup :]]
    figures = [
        Figure("ES256 sign", raw["es256_sign"]),
        Figure("ES256 verify", raw["es256_verify"]),
        Figure("HPKE seal", raw["hpke_seal"]),
        Figure("full attestations (1 gateway process)", steady, bound, TARGET_RATIO),
    ]
    ok = report("edgeseal gateway benchmark", figures)
    console.print(
        f"attestations: {settings.measured} measured after {settings.warmup} warm-up, "
        f"{settings.devices} devices, {settings.concurrency} in flight, state refresh "
        f"{settings.state_refresh_s} s; outcomes {load.outcomes}"
    )
    console.print(
        f"first attestations (the warm-up's first round: certificate chains checked, counters "
        f"stored): "
        f"{first:,.0f}/s"
    )
    console.print(
        f"latency hello→verdict: p50 {statistics.median(latencies):.2f} ms, "
        f"p99 {_percentile(latencies, 0.99):.2f} ms"
    )
    console.print(
        f"gateway process CPU: {1000 * cpu_s / total:.2f} ms per attestation, "
        f"{100 * cpu_s / wall_s:.0f}% of one core over the load (load generator startup included)"
    )
    console.print(
        f"GatewayService.handle in process, no MQTT: {alone.attestations_per_s:,.0f} "
        f"attestations/s (hello {alone.hello_ms:.2f} ms + evidence {alone.evidence_ms:.2f} ms); "
        f"{alone.statements:.1f} SQL statements and {alone.commits:.1f} commits per attestation"
    )
    writes = alone.by_statement["BEGIN IMMEDIATE"] / min(400, settings.devices)
    console.print(
        f"SQLite write transactions on this filesystem (WAL, synchronous = NORMAL as the gateway "
        f"runs it): {commit_normal:,.0f}/s; {writes:.0f} per attestation"
    )
    table = Table(title="SQL per attestation, in process (top 12)")
    table.add_column("statement")
    table.add_column("per attestation", justify="right")
    for text, count in alone.by_statement.most_common(12):
        table.add_row(text, f"{count / min(400, settings.devices):.2f}")
    console.print(table)
    granted = load.outcomes.get("granted", 0)
    if granted != total:
        console.print(f"[red]only {granted} of {total} attestations were granted[/red]")
        ok = False
    absolute_ok = steady >= TARGET_ABSOLUTE
    console.print(
        f"absolute target ≥ {TARGET_ABSOLUTE:.0f}/s: "
        f"{'met' if absolute_ok else 'NOT met'} ({steady:,.0f}/s)"
    )
    if profile is not None:
        print_profile(console, profile)
    else:
        console.print("no profile (py-spy unavailable or --no-profile)")
    console.print(f"nproc: {os.cpu_count()}, load average: {os.getloadavg()}")
    return 0 if ok and absolute_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
