"""End to end: the whole story through the three console scripts, as subprocesses, on mosquitto.

Also ``scripts/demo``'s driver against the same broker: the whole demo exits 0, and SIGINT stops
it with 130 and no traceback.

vendor init → gateway init → trust add → manufacture → firmware build (two versions) → import →
assign → serve → devices run → all attested, running, sending telemetry → update (assign, reset)
→ all on the new version → a rollback (a reflashed dump with the counters glitched back) refused
with ``counter.rollback``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from gateway.broker import Broker, free_port
from gateway.mqtt import MqttClient, parse_broker_url

pytestmark = [pytest.mark.slow, pytest.mark.broker]

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parent.parent / "examples" / "apps" / "thermostat"
PRODUCT = "e2e-thermostat"
DEVICES = 3
WAIT_S = 40.0
PREFIX = "edgeseal/v1"


def cli(*argv: str) -> str:
    """Run one console script from the venv; its stdout (fails the test on a non-zero exit)."""
    proc = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, f"{argv[:3]} exited {proc.returncode}: {proc.stderr[-400:]}"
    return proc.stdout


def cli_json(*argv: str) -> object:
    """Run a console script that prints JSON and parse it."""
    return json.loads(cli(*argv))


def poll(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


@dataclass
class Watch:
    """What the broker shows: fleet states, verdict events and telemetry counts per device."""

    since_s: int = field(default_factory=lambda: int(time.time()) - 1)
    states: dict[str, dict[str, object]] = field(default_factory=dict)
    verdicts: list[tuple[float, str, str, tuple[str, ...]]] = field(default_factory=list)
    telemetry: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, topic: str, payload: bytes) -> None:
        """Record one message."""
        parts = topic.split("/")
        with self.lock:
            if parts[-1] == "telemetry":
                self.telemetry[parts[-3]] = self.telemetry.get(parts[-3], 0) + 1
            elif parts[-1] == "state":
                state = json.loads(payload)
                if state["last_seen_s"] >= self.since_s:  # not retained from another test
                    self.states[parts[-2]] = state
            elif parts[-1] == "events":
                event = json.loads(payload)
                if event.get("kind") == "verdict":
                    reasons = tuple(event["reasons"])
                    entry = (time.monotonic(), event["device"], event["detail"], reasons)
                    self.verdicts.append(entry)

    def running(self, device: str, version: str) -> bool:
        """The fleet state says affirming, running ``version``."""
        with self.lock:
            state = self.states.get(device, {})
        return (state.get("verdict"), state.get("status"), state.get("firmware")) == (
            "affirming",
            "running",
            version,
        )

    def verdict_since(self, device: str, since: float) -> tuple[str, tuple[str, ...]] | None:
        """The latest verdict event for ``device`` received after ``since``."""
        with self.lock:
            found = [(s, r) for at, d, s, r in self.verdicts if d == device and at >= since]
        return found[-1] if found else None


@dataclass
class Fleet:
    """The workspaces and the running processes of one story."""

    root: Path
    url: str
    devices: list[str] = field(default_factory=list)
    procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=dict)

    @property
    def gw(self) -> tuple[str, str, str]:
        """``edgeseal-gateway --home GW``."""
        return ("edgeseal-gateway", "--home", str(self.root / "gw"))

    def home(self, device: str) -> Path:
        """A device's board home."""
        return self.root / "fleet" / device

    def start(self, name: str, *argv: str) -> None:
        """Start a console script in the background, output to ``logs/NAME.log``."""
        (self.root / "logs").mkdir(exist_ok=True)
        log = (self.root / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], stdout=log, stderr=log)
        self.procs[name] = (proc, log)

    def run_device(self, device: str) -> None:
        """Run a device's normal world against the broker."""
        self.start(
            device, "edgeseal-device", "run", "--home", str(self.home(device)), "--broker", self.url
        )

    def stop(self, name: str) -> int:
        """SIGTERM one process and return its exit status."""
        proc, log = self.procs.pop(name)
        proc.terminate()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
        return code

    def stop_all(self) -> dict[str, int]:
        """Stop the devices, then the gateway; their exit statuses."""
        names = [n for n in self.procs if n != "gateway"] + [
            n for n in self.procs if n == "gateway"
        ]
        return {name: self.stop(name) for name in names}

    def log(self, name: str) -> str:
        """A process's log so far."""
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker) -> Iterator[Fleet]:
    """A fleet whose processes are stopped at the end whatever happens."""
    made = Fleet(tmp_path, broker.url)
    try:
        yield made
    finally:
        made.stop_all()


@pytest.fixture
def watch(broker: Broker) -> Iterator[Watch]:
    """A subscriber to the fleet states, the events and the telemetry."""
    seen = Watch()
    client = MqttClient(
        parse_broker_url(broker.url),
        client_id=f"e2e-watch-{time.monotonic_ns()}",
        subscriptions=(f"{PREFIX}/fleet/+/state", f"{PREFIX}/events", f"{PREFIX}/d/+/up/telemetry"),
        on_message=seen.on_message,
    )
    client.start()
    try:
        yield seen
    finally:
        client.stop()


def setup_story(fleet: Fleet) -> dict[str, str]:
    """Workspaces, trust, devices, two releases, imports, assignments; the release ids."""
    root, gw = fleet.root, fleet.gw
    cli("edgeseal-provision", "vendor", "init", str(root / "vendor"), "--json")
    cli(*gw, "init", "--json")
    cli(*gw, "trust", "add", "manufacturer-ca", str(root / "vendor" / "ca-cert.pem"))
    cli(*gw, "trust", "add", "vendor", str(root / "vendor" / "firmware.pem"))
    made = cli_json(
        "edgeseal-provision", "manufacture", "--vendor", str(root / "vendor"),
        "--product", PRODUCT, "--count", str(DEVICES), "--out", str(root / "fleet"),
        "--gateway-result-key", str(root / "gw" / "result-key.pem"), "--json",
    )  # fmt: skip
    assert isinstance(made, dict)
    fleet.devices = [str(d) for d in made["devices"]]
    (root / "rel").mkdir()
    releases: dict[str, str] = {}
    for version, counter in (("1.0.0", "1"), ("1.1.0", "2")):
        built = cli_json(
            "edgeseal-provision", "firmware", "build", str(APP), "--vendor", str(root / "vendor"),
            "--product", PRODUCT, "--version", version, "--security-counter", counter,
            "--gateway-hpke-key", str(root / "gw" / "hpke-key.pem"), "--out", str(root / "rel"),
            "--json",
        )  # fmt: skip
        assert isinstance(built, dict)
        releases[version] = str(built["release_id"])
        imported = cli_json(*gw, "import", str(built["release"]), "--json")
        assert imported == {
            "type": "release",
            "release": releases[version],
            "product": PRODUCT,
            "version": version,
        }
    enrolled = cli_json(*gw, "import", str(root / "fleet" / "enrollment.bundle"), "--json")
    assert isinstance(enrolled, dict) and enrolled["devices"] == DEVICES
    for device in fleet.devices:
        cli(*gw, "assign", device, releases["1.0.0"])
    return releases


def registry_rows(fleet: Fleet) -> dict[str, dict[str, object]]:
    """``edgeseal-gateway devices --json`` by device id."""
    rows = cli_json(*fleet.gw, "devices", "--json")
    assert isinstance(rows, list)
    return {str(r["device"]): r for r in rows}


def confirmed(fleet: Fleet, device: str, version: str) -> bool:
    """``edgeseal-device status``: ``version`` is in a confirmed slot."""
    status = cli_json("edgeseal-device", "status", "--home", str(fleet.home(device)), "--json")
    assert isinstance(status, dict)
    return any(
        i["version"] == version and i["status"] == "confirmed" for i in status["flash"]["images"]
    )


def test_story_attest_update_and_a_refused_rollback(fleet: Fleet, watch: Watch) -> None:
    """Devices attest and run, update to v2, and a rolled-back board is refused with its reason."""
    releases = setup_story(fleet)
    fleet.start("gateway", *fleet.gw, "serve", "--broker", fleet.url)
    poll(lambda: "serving on" in fleet.log("gateway"), "the gateway connects")
    for device in fleet.devices:
        fleet.run_device(device)

    # Attested, running 1.0.0, sending telemetry; the registry agrees.
    poll(lambda: all(watch.running(d, "1.0.0") for d in fleet.devices), "all running 1.0.0")
    poll(lambda: all(watch.telemetry.get(d, 0) > 0 for d in fleet.devices), "telemetry")
    rows = registry_rows(fleet)
    assert {
        d: (rows[d]["last_verdict"], rows[d]["assigned"]) for d in fleet.devices
    } == dict.fromkeys(fleet.devices, ("affirming", releases["1.0.0"]))
    victim = fleet.devices[-1]
    dump = fleet.root / "dump"
    dump.mkdir()
    for name in ("flash.bin", "fuses.bin"):
        shutil.copy2(fleet.home(victim) / name, dump / name)

    # Update: assign 1.1.0 and reset every device; each downloads, trial-boots and runs it.
    for device in fleet.devices:
        cli(*fleet.gw, "assign", device, releases["1.1.0"])
        fleet.stop(device)
        fleet.run_device(device)
    poll(lambda: all(watch.running(d, "1.1.0") for d in fleet.devices), "all running 1.1.0")
    poll(lambda: confirmed(fleet, victim, "1.1.0"), "the update confirmed")
    rows = registry_rows(fleet)
    assert {rows[d]["assigned"] for d in fleet.devices} == {releases["1.1.0"]}

    # One more reset so the gateway sees the advanced app counter.
    fleet.stop(victim)
    since = time.monotonic()
    fleet.run_device(victim)
    poll(lambda: watch.verdict_since(victim, since) is not None, "the victim re-attests")
    assert watch.verdict_since(victim, since) == ("affirming", ())
    assert registry_rows(fleet)[victim]["counters"] == {
        "app": 2,
        "bl2": 1,
        "command_seq": 0,
        "offline_boots": 0,
        "runtime": 1,
    }

    # Rollback: reflash the dump taken on 1.0.0, counters included; the gateway refuses it.
    fleet.stop(victim)
    for name in ("flash.bin", "fuses.bin"):
        shutil.copy2(dump / name, fleet.home(victim) / name)
    since = time.monotonic()
    fleet.run_device(victim)
    poll(lambda: watch.verdict_since(victim, since) is not None, "the rolled-back board attests")
    status, reasons = watch.verdict_since(victim, since) or ("", ())
    assert (status, reasons) == ("contraindicated", ("counter.rollback",))
    detail = cli_json(*fleet.gw, "device", victim, "--json")
    assert isinstance(detail, dict)
    last = [t for t in detail["timeline"] if t["event"] == "verdict"][-1]
    assert last["reasons"] == ["counter.rollback"]
    assert [f["code"] for f in last["explanation"]] == ["counter.rollback"]
    assert all(watch.running(d, "1.1.0") for d in fleet.devices[:-1])

    # Everything stops cleanly on SIGTERM.
    assert set(fleet.stop_all().values()) == {0}


def run_demo_driver(tmp_path: Path, broker: Broker) -> subprocess.Popen[str]:
    """Start the demo driver on one device against ``broker``, output captured."""
    argv = [sys.executable, "-m", "scripts.demo_driver", "--devices", "1"]
    argv += ["--broker", broker.url, "--home", str(tmp_path / "demo")]
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_demo_driver_runs_the_whole_story(tmp_path: Path, broker: Broker) -> None:
    """The demo attests, updates, shows both attacks refused with reasons, and exits 0."""
    proc = run_demo_driver(tmp_path, broker)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "Traceback" not in out
    assert "fleet on 1.1.0" in out
    assert "reasons counter.rollback" in out
    assert "lifecycle.debug" in out and "demo done" in out
    assert "Traceback" not in "".join(
        p.read_text(errors="replace") for p in (tmp_path / "demo" / "logs").iterdir()
    )


def test_demo_driver_interrupted_exits_130(tmp_path: Path, broker: Broker) -> None:
    """SIGINT while the fleet runs stops every child in order and exits 130 without a traceback."""
    proc = run_demo_driver(tmp_path, broker)
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if "starting 1 devices" in line:
            break
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted" in out and "Traceback" not in out
    gateway_log = (tmp_path / "demo" / "logs" / "gateway.log").read_text()
    assert "stopped;" in gateway_log
    assert _processes_mentioning(str(tmp_path / "demo")) == [], "a child outlived the demo"


def _processes_mentioning(text: str) -> list[int]:
    """The pids whose command line contains ``text`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_embedded_broker_serves_mqtt_311(tmp_path: Path) -> None:
    """The amqtt fallback, in its own process, carries a QoS 1 message between two 3.1.1 clients."""
    pytest.importorskip("amqtt", reason="amqtt is not installed (edgeseal[embedded-broker])")
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "scripts.embedded_broker", "--port", str(port)]
    log = (tmp_path / "amqtt.log").open("wb")
    proc = subprocess.Popen(argv, cwd=root, stdout=log, stderr=log)
    got: list[tuple[str, bytes]] = []
    try:
        poll(lambda: b"listening" in (tmp_path / "amqtt.log").read_bytes(), "amqtt listens", 20)
        url = parse_broker_url(f"mqtt://127.0.0.1:{port}")
        sub = MqttClient(
            url,
            client_id="e2e-sub",
            subscriptions=("e2e/#",),
            on_message=lambda t, p: got.append((t, p)),
        )
        pub = MqttClient(url, client_id="e2e-pub")
        sub.start()
        pub.start()
        try:
            pub.publish_and_wait("e2e/x", b"\x00\xffpayload")
            poll(lambda: bool(got), "the message arrives", 10)
        finally:
            pub.stop()
            sub.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        log.close()
    assert got == [("e2e/x", b"\x00\xffpayload")]
    assert code == 0
