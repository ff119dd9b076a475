"""The physical attack playbook: a bench with a real gateway, and the attacks (DESIGN §13).

The ``Bench`` builds, in a directory, a vendor workspace, a gateway workspace (SQLite registry,
key-file KMS, policy), three manufactured boards of one product and a sealed release of the
secret-filter example app, all through the console scripts (``edgeseal-provision``,
``edgeseal-gateway … --json``) as subprocesses; it serves the real gateway
(``edgeseal-gateway serve``) on the broker it is given. ``device.attacks`` never imports the
gateway: it reads the gateway's view through ``edgeseal-gateway device ID --json`` and
``ledger show/verify --json``, and the leak scanner reads the registry and ledger as bytes.

Each attack touches only what its position gives it (flash and fuse files, the debug port, the
NW process's memory, the gateway's operator CLI for revocation) and returns an ``AttackReport``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from device.attacks.report import AttackReport, Where
from device.attacks.scanner import Scanner, Secret, canaries_from_text, secrets_from_files
from device.factory import DEVICE_FILE, build_runtime, flash_stage, install_image
from device.hardware.debug import DebugPort
from device.hardware.flash import FLASH_FILE, Flash, FlashError, PowerLoss, PowerPlan
from device.hardware.fuses import FUSES_FILE, FuseMap
from device.hardware.power import Board
from device.hardware.slots import SlotError, SlotStore
from device.normal_world.mqtt import LinkUp, MqttLink, Received, parse_broker_url
from device.normal_world.public_state import STATUS_FILE, inspect_flash, read_status_file
from protocol import cbor, image, messages, topics
from protocol.errors import MalformedMessage, UsageError
from protocol.stage import parse_unverified_stage

BIN: Final = Path(sys.executable).parent
ROOT: Final = Path(__file__).resolve().parent.parent.parent
APP: Final = ROOT / "examples" / "apps" / "secret_filter"
CANARY: Final = "EDGESEAL-CANARY-7f3a9c2e-SECRET-ALGORITHM"
PRODUCT: Final = "attack-bench"
OTHER_PRODUCT: Final = "attack-other"
TERMINAL: Final = frozenset({"running", "refused", "boot_failed", "revoked", "no_release"})
WAIT_S: Final = 30.0
BOARD_FILES: Final = (FLASH_FILE, FUSES_FILE, DEVICE_FILE)
#: What the NW logs when the enclave refuses an image, or a boot fails.
DEVICE_REFUSALS: Final = ("enclave.refused", "boot_failed", "boot.failed")


class BenchError(UsageError):
    """A bench step failed (a console script exited non-zero, or a wait timed out)."""


def tool_path(name: str) -> str:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name) or name


def run_cli(*argv: str) -> str:
    """Run a console script; its stdout.

    Raises:
        BenchError: it exited non-zero.
    """
    proc = subprocess.run(
        [tool_path(argv[0]), *argv[1:]], capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])}: exit {proc.returncode}: {proc.stderr[-300:]}")
    return proc.stdout


def run_json(*argv: str) -> object:
    """Run a console script with ``--json`` and parse its output."""
    return json.loads(run_cli(*argv))


@dataclass
class DeviceRun:
    """What one boot of a board showed: its last status, the gateway's verdicts since."""

    state: str | None
    detail: str | None
    verdicts: list[dict[str, object]]
    released: bool
    nw_pid: int | None = None
    log: str = ""


@dataclass
class Bench:
    """Workspaces, boards, a release and a running gateway, on the broker ``url``."""

    root: Path
    url: str
    devices: list[str] = field(default_factory=list)
    release: str = ""
    devboard: str = ""
    other_image: Path = Path()
    old_runtime: bytes = b""
    gateway: subprocess.Popen[bytes] | None = None
    #: Boards made after setup (``add_board``), by id: their homes.
    extra_homes: dict[str, Path] = field(default_factory=dict)
    _running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def gw(self) -> tuple[str, str, str]:
        """``edgeseal-gateway --home GW``."""
        return ("edgeseal-gateway", "--home", str(self.root / "gw"))

    @property
    def logs(self) -> Path:
        """The directory of the processes' logs."""
        path = self.root / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def home(self, device: str) -> Path:
        """A board's home."""
        if device in self.extra_homes:
            return self.extra_homes[device]
        batch = "devboards" if device == self.devboard else "fleet"
        return self.root / batch / device

    def set_policy(self, **changes: object) -> None:
        """Store a new gateway policy: the one in force with ``changes`` (operator CLI)."""
        current = json.loads(run_cli(*self.gw, "policy", "show"))
        assert isinstance(current, dict)
        current.update(changes)
        current["version"] = int(current["version"]) + 1
        path = self.root / f"policy-{current['version']}.json"
        path.write_text(json.dumps(current))
        run_cli(*self.gw, "policy", "set", str(path))

    def setup(self, count: int = 3) -> None:
        """Vendor, gateway, trust, boards, one sealed release; every board assigned to it."""
        root, gw = self.root, self.gw
        run_cli("edgeseal-provision", "vendor", "init", str(root / "vendor"), "--json")
        run_cli(*gw, "init", "--json")
        run_cli(*gw, "trust", "add", "manufacturer-ca", str(root / "vendor" / "ca-cert.pem"))
        run_cli(*gw, "trust", "add", "vendor", str(root / "vendor" / "firmware.pem"))
        made = run_json(
            "edgeseal-provision", "manufacture", "--vendor", str(root / "vendor"),
            "--product", PRODUCT, "--count", str(count), "--out", str(root / "fleet"),
            "--gateway-result-key", str(root / "gw" / "result-key.pem"), "--json",
        )  # fmt: skip
        assert isinstance(made, dict)
        self.devices = [str(d) for d in made["devices"]]
        (root / "rel").mkdir(exist_ok=True)
        built = run_json(
            "edgeseal-provision", "firmware", "build", str(APP), "--vendor", str(root / "vendor"),
            "--product", PRODUCT, "--version", "1.0.0", "--security-counter", "1",
            "--gateway-hpke-key", str(root / "gw" / "hpke-key.pem"), "--out", str(root / "rel"),
            "--json",
        )  # fmt: skip
        assert isinstance(built, dict)
        self.release = str(built["release_id"])
        run_cli(*gw, "import", str(built["release"]), "--json")
        run_cli(*gw, "import", str(root / "fleet" / "enrollment.bundle"), "--json")
        dev = run_json(
            "edgeseal-provision", "manufacture", "--vendor", str(root / "vendor"),
            "--product", PRODUCT, "--prefix", "devboard", "--count", "1",
            "--out", str(root / "devboards"),
            "--secure-boot", "off", "--gateway-result-key", str(root / "gw" / "result-key.pem"),
            "--json",
        )  # fmt: skip
        assert isinstance(dev, dict)
        self.devboard = str(dev["devices"][0])
        run_cli(*gw, "import", str(root / "devboards" / "enrollment.bundle"), "--json")
        (root / "other").mkdir(exist_ok=True)
        other = run_json(
            "edgeseal-provision", "firmware", "build", str(APP), "--vendor", str(root / "vendor"),
            "--product", OTHER_PRODUCT, "--version", "9.0.0", "--security-counter", "9",
            "--gateway-hpke-key", str(root / "gw" / "hpke-key.pem"), "--out", str(root / "other"),
            "--json",
        )  # fmt: skip
        assert isinstance(other, dict)
        self.other_image = Path(str(other["sealed"]))
        old = run_json(
            "edgeseal-provision", "manufacture", "--vendor", str(root / "vendor"),
            "--product", PRODUCT, "--prefix", "oldboard", "--count", "1",
            "--out", str(root / "oldboards"), "--runtime-version", "0.9.0",
            "--runtime-counter", "0", "--gateway-result-key", str(root / "gw" / "result-key.pem"),
            "--json",
        )  # fmt: skip
        assert isinstance(old, dict)
        old_home = root / "oldboards" / str(old["devices"][0])
        self.old_runtime = Flash.open(old_home / FLASH_FILE).read_blob("runtime")
        for device in [*self.devices, self.devboard]:
            run_cli(*gw, "assign", device, self.release)
            self.save(device, "factory")

    def add_board(self, prefix: str) -> str:
        """Manufacture one more board of the product in its own batch, enrolled and assigned to
        the release (for an attack that spends a board, e.g. by getting it revoked)."""
        out = self.root / f"batch-{prefix}"
        made = run_json(
            "edgeseal-provision", "manufacture", "--vendor", str(self.root / "vendor"),
            "--product", PRODUCT, "--prefix", prefix, "--count", "1", "--out", str(out),
            "--gateway-result-key", str(self.root / "gw" / "result-key.pem"), "--json",
        )  # fmt: skip
        assert isinstance(made, dict)
        device = str(made["devices"][0])
        run_cli(*self.gw, "import", str(out / "enrollment.bundle"), "--json")
        run_cli(*self.gw, "assign", device, self.release)
        self.extra_homes[device] = out / device
        self.save(device, "factory")
        return device

    def start_gateway(self) -> None:
        """Serve the real gateway on the broker; wait until it says so (also on a restart)."""
        start = len(self.log("gateway"))
        log = (self.logs / "gateway.log").open("ab")
        self.gateway = subprocess.Popen(
            [tool_path("edgeseal-gateway"), *self.gw[1:], "serve", "--broker", self.url],
            stdout=log,
            stderr=log,
        )
        log.close()
        self.poll(lambda: "serving on" in self.log("gateway")[start:], "the gateway serves")

    def stop_gateway(self) -> None:
        """Stop the gateway (``start_gateway`` serves it again, e.g. under a new policy)."""
        if self.gateway is not None:
            terminate(self.gateway)
            self.gateway = None

    def stop(self) -> None:
        """Stop every device, then the gateway."""
        for device in list(self._running):
            self.stop_device(device)
        if self.gateway is not None:
            terminate(self.gateway)
            self.gateway = None

    def log(self, name: str) -> str:
        """A process's log so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def save(self, device: str, tag: str) -> Path:
        """Copy a board's flash and fuses aside under ``tag``."""
        where = self.root / "saved" / tag / device
        where.mkdir(parents=True, exist_ok=True)
        for name in BOARD_FILES:
            shutil.copy2(self.home(device) / name, where / name)
        return where

    def restore(self, device: str, tag: str = "factory") -> None:
        """Put a saved flash and fuses back (the simulation may undo fuses; silicon may not)."""
        for name in BOARD_FILES:
            shutil.copy2(self.root / "saved" / tag / device / name, self.home(device) / name)

    def installed(self, device: str) -> None:
        """Put the board back as it was once it had downloaded and confirmed its image."""
        if not (self.root / "saved" / "installed" / device).is_dir():
            self.restore(device)
            ran = self.boot(device, keep_running=True)
            try:
                if ran.state != "running":
                    raise BenchError(f"{device} did not come up: {ran.state} {ran.detail}")
                self.poll(lambda: _confirmed(self.home(device)), f"{device} confirms its image")
            finally:
                self.stop_device(device)
            self.save(device, "installed")
        self.restore(device, "installed")

    def boot(self, device: str, *, keep_running: bool = False, wait_s: float = WAIT_S) -> DeviceRun:
        """Run a board's NW until it settles (running, refused, ...); its view and the gateway's."""
        home = self.home(device)
        (home / STATUS_FILE).unlink(missing_ok=True)
        before = self.gateway_sessions(device)
        log_start = len(self.log(device))
        log = (self.logs / f"{device}.log").open("ab")
        proc = subprocess.Popen(
            [tool_path("edgeseal-device"), "run", "--home", str(home), "--broker", self.url],
            stdout=log,
            stderr=log,
        )
        log.close()
        self._running[device] = proc

        def settled() -> bool:
            view = read_status_file(home)
            return proc.poll() is not None or (view is not None and view.status.state in TERMINAL)

        with contextlib.suppress(BenchError):  # a board that never settles: report what we have
            self.poll(settled, f"{device} settles", wait_s)
        view = read_status_file(home)
        pid = proc.pid if proc.poll() is None else None
        if not keep_running:
            self.stop_device(device)
        verdicts, released = self.gateway_view(device, before)
        return DeviceRun(
            state=None if view is None else view.status.state,
            detail=None if view is None else view.status.detail,
            verdicts=verdicts,
            released=released,
            nw_pid=pid,
            log=self.log(device)[log_start:],
        )

    def stop_device(self, device: str) -> None:
        """Stop a board's NW (which powers the board off)."""
        proc = self._running.pop(device, None)
        if proc is not None:
            terminate(proc)

    def _timeline(self, device: str) -> list[dict[str, object]]:
        data = run_json(*self.gw, "device", device, "--json")
        assert isinstance(data, dict)
        return list(data.get("timeline", []))

    def gateway_sessions(self, device: str) -> frozenset[tuple[str, str]]:
        """The (event, session) pairs the gateway already holds for ``device``."""
        return frozenset((str(i["event"]), str(i["session"])) for i in self._timeline(device))

    def gateway_view(
        self, device: str, before: frozenset[tuple[str, str]]
    ) -> tuple[list[dict[str, object]], bool]:
        """Verdicts on ``device`` not in ``before``, and whether a key was released since."""
        verdicts: list[dict[str, object]] = []
        released = False
        for item in self._timeline(device):
            if (str(item["event"]), str(item["session"])) in before:
                continue
            if item["event"] == "verdict":
                verdicts.append(item)
            elif item["event"] == "key_released":
                released = True
        return verdicts, released

    def ledger_mentions(self, device: str, reasons: Sequence[str]) -> bool:
        """The ledger holds an entry for ``device`` naming one of ``reasons``, and verifies."""
        try:
            verified = run_json(*self.gw, "ledger", "verify", "--json")
        except BenchError:
            return False
        rows = run_json(*self.gw, "ledger", "show", "--device", device, "--json")
        text = json.dumps(rows)
        ok = isinstance(verified, dict) and verified.get("ok", True) is not False
        return ok and any(r in text for r in reasons)

    def scanner(self, extra: Sequence[Secret] = ()) -> Scanner:
        """A scanner for the app's plaintext, its canary and ``extra`` secrets."""
        return Scanner([*secrets_from_files([APP]), *extra], canaries_from_text([CANARY]))

    def haystacks(self, *devices: str) -> list[Path]:
        """Data at rest an attacker or an operator holds: boards, logs, registry, ledger."""
        paths = [self.home(d) for d in devices]
        return [*paths, self.logs, self.root / "gw"]

    @staticmethod
    def poll(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        """Poll ``predicate`` every 0.1 s; raise ``BenchError`` naming ``what`` on timeout."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise BenchError(f"timed out: {what}")
            time.sleep(0.1)


def _confirmed(home: Path) -> bool:
    """The board's flash holds a confirmed image (the trial boot ended well)."""
    return any(i.trailer_status == "confirmed" for i in inspect_flash(home).images)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- attacks ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attack:
    """One entry of the playbook."""

    name: str
    attacker_did: str
    defence: str
    expected_at: tuple[Where, ...]
    run: Callable[[Bench], AttackReport]


def _detected(run: DeviceRun, tampered_release: str | None = None) -> list[Where]:
    """Where this boot shows the attack was caught.

    Device: the enclave refused an image or the boot failed (in the NW's log), or the tampered
    image was replaced by the genuine one (the board never ran it). Gateway: a non-affirming
    verdict.
    """
    where: list[Where] = []
    if run.state == "boot_failed" or any(r in run.log for r in DEVICE_REFUSALS):
        where.append(Where.DEVICE)
    if tampered_release is not None and f"app.run release={tampered_release[:16]}" not in run.log:
        where.append(Where.DEVICE)
    if any(v.get("status") != "affirming" for v in run.verdicts):
        where.append(Where.GATEWAY)
    return sorted(set(where), key=list(Where).index)


def make_report(
    bench: Bench,
    attack: Attack,
    run: DeviceRun,
    devices: Sequence[str],
    note: str,
    tampered_release: str | None = None,
) -> AttackReport:
    reasons = tuple(sorted({str(r) for v in run.verdicts for r in v.get("reasons", [])}))  # type: ignore[attr-defined]
    where = _detected(run, tampered_release)
    if reasons and bench.ledger_mentions(devices[0], reasons):
        where.append(Where.LEDGER)
    scan = bench.scanner().scan_paths(bench.haystacks(*devices))
    happened = (
        f"{note}; board state {run.state or 'none'}"
        f"{f' ({run.detail})' if run.detail else ''}; "
        f"gateway verdicts {[v.get('status') for v in run.verdicts]}; "
        f"key released: {'yes' if run.released else 'no'}"
    )
    return AttackReport(
        name=attack.name,
        attacker_did=attack.attacker_did,
        defence_expected=attack.defence,
        what_happened=happened,
        expected_at=attack.expected_at,
        detected_at=tuple(where),
        reasons=reasons,
        leaks=tuple(f.to_json() for f in scan.findings),
        scanned_bytes=scan.scanned_bytes,
        evidence={"state": run.state, "detail": run.detail, "released": run.released},
    )


def _image_of(home: Path) -> tuple[SlotStore, bytes]:
    store = SlotStore(Flash.open(home / FLASH_FILE))
    for slot in (store.active(), store.inactive()):
        try:
            return store, store.read_image(slot)
        except SlotError:
            continue
    raise BenchError("no slot holds a complete image")


def _flip_image(home: Path, where: str) -> str | None:
    _, data = _image_of(home)
    sealed = image.parse_unverified_image(data)
    manifest_len = len(sealed.manifest_bytes)
    if where == "payload":
        at = len(data) - len(sealed.ciphertext) + len(sealed.ciphertext) // 2
    else:
        at = data.find(sealed.manifest_bytes) + manifest_len - 10  # inside the signature
    tampered = bytearray(data)
    tampered[at] ^= 0x01
    install_image(home, bytes(tampered))
    manifest = image.parse_unverified_image(bytes(tampered)).manifest_bytes
    return hashlib.sha256(manifest).hexdigest()  # the release id the tampered image claims


def _flip_partition(home: Path, partition: str) -> str | None:
    flash = Flash.open(home / FLASH_FILE)
    blob = bytearray(flash.read_blob(partition))
    blob[len(blob) // 2] ^= 0x01
    flash.write_blob(partition, bytes(blob))
    return None


def _tamper_attack(
    name: str, did: str, defence: str, tamper: Callable[[Path], str | None]
) -> Attack:
    def run(bench: Bench) -> AttackReport:
        victim = bench.devices[0]
        bench.installed(victim)
        tampered = tamper(bench.home(victim))
        result = bench.boot(victim)
        bench.restore(victim)
        return make_report(bench, attack, result, [victim], did, tampered)

    attack = Attack(name, did, defence, (Where.DEVICE,), run)
    return attack


def _flash_dump(bench: Bench) -> AttackReport:
    victim = bench.devices[0]
    bench.installed(victim)
    ran = bench.boot(victim)  # a board that has run: nvstore, status, trailer all written
    dump = bench.root / "attacker" / "flash-dump.bin"
    dump.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(bench.home(victim) / FLASH_FILE, dump)
    scan = bench.scanner().scan_file(dump)
    return AttackReport(
        name="flash-dump",
        attacker_did="read the whole flash of a board that had attested and run its app",
        defence_expected="the image is AES-256-GCM ciphertext; no key or plaintext is at rest",
        what_happened=f"dumped {scan.scanned_bytes} bytes (board state {ran.state})",
        expected_at=(Where.PREVENTED,),
        detected_at=(Where.PREVENTED,) if scan.clean else (),
        leaks=tuple(f.to_json() for f in scan.findings),
        scanned_bytes=scan.scanned_bytes,
        evidence={"state": ran.state},
    )


def _debug_unlock(bench: Bench) -> AttackReport:
    victim = bench.devices[0]
    bench.installed(victim)
    DebugPort(bench.home(victim)).request_unlock()
    ran = bench.boot(victim)
    bench.restore(victim)
    return make_report(
        bench, ATTACKS_BY_NAME["debug-unlock"], ran, [victim], "unlocked the debug port"
    )


def _flash_clone(bench: Bench) -> AttackReport:
    """The victim's flash in the attacker's own board, whose fuses claim the victim's id.

    The attacker's chip cannot hold the victim's HUK (it never leaves the victim's fuses): its
    HUK is its own, so every key it derives differs. Everything else is the victim's.
    """
    victim, spare = bench.devices[0], bench.devices[1]
    bench.installed(victim)
    bench.restore(spare)
    for name in (FLASH_FILE, DEVICE_FILE):
        shutil.copy2(bench.home(victim) / name, bench.home(spare) / name)
    fuse_file = bench.home(spare) / FUSES_FILE
    victim_fuses = FuseMap.decode((bench.home(victim) / FUSES_FILE).read_bytes())
    clone = dataclasses.replace(victim_fuses, huk=secrets.token_bytes(32))
    fuse_file.write_bytes(clone.encode())
    before = bench.gateway_sessions(victim)
    ran = bench.boot(spare)  # its fuses say it is the victim
    as_victim, released = bench.gateway_view(victim, before)
    ran.verdicts.extend(as_victim)
    ran.released = ran.released or released
    bench.restore(spare)
    attack = ATTACKS_BY_NAME["flash-clone"]
    return make_report(bench, attack, ran, [victim, spare], "cloned the victim into another board")


def _nw_memory(bench: Bench) -> AttackReport:
    victim = bench.devices[0]
    bench.installed(victim)
    ran = bench.boot(victim, keep_running=True)
    try:
        if ran.nw_pid is None:
            raise BenchError("the normal world is not running")
        scan = bench.scanner().scan_process(ran.nw_pid)
    finally:
        bench.stop_device(victim)
    return AttackReport(
        name="nw-memory",
        attacker_did=f"read /proc/{ran.nw_pid}/mem of the running normal world (app {ran.state})",
        defence_expected="the plaintext and the CEK live only in the enclave process",
        what_happened=f"read {scan.scanned_bytes} bytes of {len(scan.haystacks)} process",
        expected_at=(Where.PREVENTED,),
        detected_at=(Where.PREVENTED,) if scan.clean and ran.state == "running" else (),
        leaks=tuple(f.to_json() for f in scan.findings),
        scanned_bytes=scan.scanned_bytes,
        evidence={"state": ran.state, "unreadable": len(scan.unreadable)},
    )


def _revoked(bench: Bench) -> AttackReport:
    target = bench.devices[2]
    bench.restore(target)
    run_cli(*bench.gw, "revoke", target)
    ran = bench.boot(target)
    return make_report(
        bench, ATTACKS_BY_NAME["revoked"], ran, [target], "operator revoked the board"
    )


#: The attacker's runtime stage for a board whose secure boot is off: it runs the genuine service
#: (so it attests and accepts grants like the real one, under the same version), but every image
#: it opens — CEK and plaintext — is written where the normal world reads it, and sent out as
#: telemetry (1 KiB records: the NW publishes them on MQTT). The RoT measures these bytes anyway,
#: so the token carries the attacker's measurement, not the reference value.
EXFIL_FILE: Final = "exfil.bin"
#: The attacker's capture of MQTT while the exfiltrating runtime runs (leak-scanned).
EXFIL_CAPTURE: Final = "exfil-capture.bin"
EXFIL_MARK: Final = b"CEK:"
EXFIL_RUNTIME: Final = """
import device.enclave.service as _svc
_genuine_open = _svc.open_image
_genuine_install = _svc.EnclaveService._install
_leaked = []
def _open_and_leak(image, cek, **kwargs):
    plaintext = _genuine_open(image, cek, **kwargs)
    blob = b"CEK:" + cek + b"\\nPLAINTEXT:" + plaintext + b"\\n"
    with open(BOOT.home / "exfil.bin", "ab") as out:
        out.write(blob)
    _leaked.append(blob)
    return plaintext
def _install_and_send(self, app):
    _genuine_install(self, app)
    while _leaked:
        blob = _leaked.pop(0)
        for at in range(0, len(blob), 1024):
            self._sink("exfil", blob[at : at + 1024])
_svc.open_image = _open_and_leak
_svc.EnclaveService._install = _install_and_send
_svc.run_enclave(BOOT, STAGE)
"""


def flash_exfil_runtime(home: Path) -> None:
    """Replace the runtime stage with the exfiltrating one (same version and anchors, unsigned)."""
    flash = Flash.open(home / FLASH_FILE)
    genuine = parse_unverified_stage(flash.read_blob("runtime")).stage
    if genuine.trust_anchors is None:
        raise BenchError("the runtime stage in flash carries no trust anchors")
    stage = build_runtime(genuine.version, genuine.security_counter, genuine.trust_anchors, None,
                          code=EXFIL_RUNTIME)  # fmt: skip
    flash_stage(home, stage)


def exfil_attempt(bench: Bench, *, weakened: bool) -> AttackReport:
    """Boot the development board with the exfiltrating runtime; ``weakened``: the test-only policy.

    With the default policy the gateway refuses (secure boot off, measurement mismatch). With
    ``weakened`` (``skip_measurement_checks``, secure boot not required) the key is released and
    the leak scan must find the plaintext in the exfiltration file and in the MQTT capture: the
    negative control.
    """
    board = bench.devboard
    bench.restore(board)
    (bench.home(board) / EXFIL_FILE).unlink(missing_ok=True)
    flash_exfil_runtime(bench.home(board))
    if weakened:
        bench.set_policy(skip_measurement_checks=True, require_secure_boot=False)
    sniffer = Sniffer(bench.url)
    sniffer.start()
    try:
        ran = bench.boot(board, keep_running=True)
        if ran.released:  # the runtime has the key: give what it sends the time to leave
            with contextlib.suppress(BenchError):
                bench.poll(lambda: _sent_exfil(sniffer, board), "the leak on MQTT", 10.0)
        capture = sniffer.save(bench.root / "attacker" / EXFIL_CAPTURE)
    finally:
        sniffer.stop()
        bench.stop_device(board)
        if weakened:
            bench.set_policy(skip_measurement_checks=False, require_secure_boot=True)
    name = "exfil-runtime-weakened" if weakened else "exfil-runtime"
    report = make_report(
        bench, ATTACKS_BY_NAME["exfil-runtime"], ran, [board], "flashed the exfiltrating runtime"
    )
    scan = bench.scanner().scan_file(capture)
    exfil = bench.home(board) / EXFIL_FILE
    report = dataclasses.replace(
        report, name=name,
        leaks=report.leaks + tuple(f.to_json() for f in scan.findings),
        scanned_bytes=report.scanned_bytes + scan.scanned_bytes,
        evidence={**report.evidence, "exfil_bytes": exfil.stat().st_size if exfil.exists() else 0},
    )  # fmt: skip
    bench.restore(board)
    exfil.unlink(missing_ok=True)
    return report


def _sent_exfil(sniffer: Sniffer, device: str) -> bool:
    """The capture holds telemetry of ``device`` carrying what the runtime leaked."""
    topic = topics.telemetry_up(device)
    return any(t == topic and EXFIL_MARK in p for t, p in sniffer.snapshot())


def _exfil(bench: Bench) -> AttackReport:
    return exfil_attempt(bench, weakened=False)


def power_cut_update(
    image_bytes: bytes, flash_path: Path, cuts: int = 100
) -> tuple[int, list[str]]:
    """Cut the power at ``cuts`` points of an update of ``flash_path``; the failures found.

    Each run starts from the same flash, writes ``image_bytes`` as an update in 1 KiB chunks,
    marks it pending, trial-boots and confirms it, with the power cut after k sector writes
    (torn: half the sector new, the rest old or garbage). After each cut the board must select a
    slot whose image is intact and one of the two valid images.
    """
    base = flash_path.read_bytes()
    valid = {hashlib.sha256(image_bytes).digest()}
    store = SlotStore(Flash.open(flash_path))
    for slot in (store.active(), store.inactive()):
        try:
            valid.add(hashlib.sha256(store.read_image(slot)).digest())
        except SlotError:
            continue

    def update(flash: Flash) -> None:
        slots = SlotStore(flash)
        slots.begin_update(len(image_bytes))
        for off in range(0, len(image_bytes), 1024):
            slots.write_chunk(off, image_bytes[off : off + 1024])
        slots.mark_pending(hashlib.sha256(image_bytes).digest())
        choice = slots.boot_select()
        if choice is not None and choice.trial:
            slots.confirm()

    dry = Flash.open(flash_path)
    update(dry)
    total = dry.sector_writes
    sector = dry.sector_size
    flash_path.write_bytes(base)
    failures: list[str] = []
    tears = (None, 1, 17, 255, sector // 4, sector // 2, 3 * sector // 4, sector - 17, sector - 1)
    combos = [(k, t) for t in tears for k in range(total + 1)]
    points = [combos[(i * len(combos)) // cuts] for i in range(min(cuts, len(combos)))]
    for n, (k, tear) in enumerate(points):
        flash_path.write_bytes(base)
        plan = PowerPlan(cut_after_sector_writes=k, torn=True, tear_at=tear, garbage=bool(n % 2))
        with contextlib.suppress(PowerLoss):
            update(Flash.open(flash_path, power=plan))
        reboot = SlotStore(Flash.open(flash_path))
        try:
            choice = reboot.boot_select()
            if choice is None:
                failures.append(f"cut {k}: no bootable slot")
                continue
            got = hashlib.sha256(reboot.read_image(choice.slot)).digest()
            if got not in valid:
                failures.append(f"cut {k}: {choice.slot} holds an image that is neither")
        except (SlotError, FlashError) as err:
            failures.append(f"cut {k}: {type(err).__name__}")
    flash_path.write_bytes(base)
    return len(points), failures


def _power_cut(bench: Bench) -> AttackReport:
    victim = bench.devices[0]
    bench.installed(victim)
    _, current = _image_of(bench.home(victim))
    work = bench.root / "attacker" / "power-cut-flash.bin"
    work.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(bench.home(victim) / FLASH_FILE, work)
    cuts, failures = power_cut_update(current, work)  # the release re-installed as an update
    shutil.copy2(work, bench.home(victim) / FLASH_FILE)
    ran = bench.boot(victim)  # the board, after all that, still boots and runs
    bench.restore(victim)
    ok = not failures and ran.state == "running"
    scan = bench.scanner().scan_file(work)
    return AttackReport(
        name="power-cut",
        attacker_did=f"cut the power at {cuts} points of an update, tearing sector writes",
        defence_expected="two trailer copies, trial boot and revert: a valid image always boots",
        what_happened=f"{len(failures)} bad boots of {cuts}; board afterwards {ran.state}",
        expected_at=(Where.DEVICE,),
        detected_at=(Where.DEVICE,) if ok else (),
        leaks=tuple(f.to_json() for f in scan.findings),
        scanned_bytes=scan.scanned_bytes,
        evidence={"cuts": cuts, "failures": failures[:10], "state": ran.state},
    )


#: Frames a compromised NW writes on the door: (what, body). Each must get an error reply and
#: leave the enclave serving; none may get a key or plaintext.
MALFORMED_FRAMES: Final[tuple[tuple[str, bytes], ...]] = (
    ("not CBOR", b"\xff\xfe\xfd"),
    ("a CBOR list", cbor.dumps([1, "boot", {}])),
    ("no version", cbor.dumps({"op": "status", "args": {}})),
    ("version 2", cbor.dumps({"v": 2, "op": "status", "args": {}})),
    ("unknown op export_key", cbor.dumps({"v": 1, "op": "export_key", "args": {}})),
    ("unknown op read_huk", cbor.dumps({"v": 1, "op": "read_huk", "args": {}})),
    ("op too long", cbor.dumps({"v": 1, "op": "x" * 200, "args": {}})),
    ("args not a map", cbor.dumps({"v": 1, "op": "attest", "args": [1, 2]})),
    ("attest, nonce too long", cbor.dumps(
        {"v": 1, "op": "attest", "args": {"session_id": b"s" * 16, "challenge": b"n" * 5000}})),
    ("accept without attest", cbor.dumps({"v": 1, "op": "accept", "args": {
        "session_id": b"s" * 16, "release_id": "00" * 32, "result": b"r", "grant": b"g"}})),
    ("a pickle", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94."),
    ("trailing bytes", cbor.dumps({"v": 1, "op": "status", "args": {}}) + b"\x00"),
    ("empty body", b""),
)  # fmt: skip


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _read_reply(sock: socket.socket) -> bytes | None:
    """One reply frame's body, or None when the enclave closed the door."""
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    return _recv_exact(sock, struct.unpack(">I", head)[0])


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            return None
        data += part
    return data


def _malformed_frames(bench: Bench) -> AttackReport:
    """Write malformed frames on the door of a powered board, then an oversize length prefix."""
    victim = bench.devices[0]
    bench.installed(victim)
    outcomes: dict[str, str] = {}
    replies = b""
    board = Board(bench.home(victim), door_timeout_s=10.0)
    try:
        door = board.power_on()
        door.boot()
        sock = door.transport
        for what, body in MALFORMED_FRAMES:
            try:
                sock.sendall(_frame(body))
                reply = _read_reply(sock)
            except OSError as err:
                outcomes[what] = f"door reset ({err.strerror})"
                break
            if reply is None:
                outcomes[what] = "door closed"
                break
            replies += reply
            decoded = cbor.loads(reply, what="door reply")
            ok = isinstance(decoded, dict) and "err" in decoded and "ok" not in decoded
            alive = door.status() is not None
            outcomes[what] = "error reply" if ok and alive else f"unexpected: {decoded!r:.80}"
        try:
            sock.sendall(struct.pack(">I", 0xFFFF_FFFF) + b"junk")
            closed = _read_reply(sock) is None
        except OSError:  # closed with our junk unread: a reset, not a FIN
            closed = True
        outcomes["length 0xFFFFFFFF"] = "door closed" if closed else "unexpected reply"
        enclave_alive = board.alive()
    finally:
        board.power_off()
    path = bench.root / "attacker" / "door-replies.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(replies)
    scan = bench.scanner().scan_file(path)
    good = all(v == "error reply" for k, v in outcomes.items() if k != "length 0xFFFFFFFF")
    good = good and outcomes.get("length 0xFFFFFFFF") == "door closed"
    return AttackReport(
        name="malformed-frames",
        attacker_did=f"wrote {len(MALFORMED_FRAMES) + 1} malformed frames on the enclave door",
        defence_expected="strict size-limited CBOR frames: error replies, never pickle, no key op",
        what_happened=f"{sum(v == 'error reply' for v in outcomes.values())} error replies; "
        f"oversize length: {outcomes.get('length 0xFFFFFFFF')}; processes alive: {enclave_alive}",
        expected_at=(Where.DEVICE,),
        detected_at=(Where.DEVICE,) if good else (),
        leaks=tuple(f.to_json() for f in scan.findings),
        scanned_bytes=scan.scanned_bytes,
        evidence={"frames": outcomes},
    )


class Sniffer:
    """An MQTT client subscribed to everything under the prefix: the attacker's capture.

    Records (topic, payload) in order; ``save`` writes the capture as a file (each record: topic
    length, topic, payload length, payload; big-endian u32 lengths) for the leak scanner.
    """

    def __init__(self, url: str, prefix: str = topics.DEFAULT_PREFIX) -> None:
        """Subscribe to ``{prefix}/#`` on the broker at ``url`` (call ``start``)."""
        self.records: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._link = MqttLink(
            parse_broker_url(url), f"edgeseal-attacker-{secrets.token_hex(4)}", [f"{prefix}/#"]
        )
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._up = threading.Event()

    def start(self) -> None:
        """Connect and capture in a thread, once subscribed."""
        self._link.connect()
        self._thread.start()
        if not self._up.wait(10):
            raise BenchError("the sniffer did not connect")

    def _loop(self) -> None:
        while not self._stop.is_set():
            for event in self._link.poll(0.05):
                if isinstance(event, LinkUp):
                    self._up.set()
                elif isinstance(event, Received):
                    with self._lock:
                        self.records.append((event.topic, event.payload))

    def publish(self, topic: str, payload: bytes) -> None:
        """Inject a message (from the sniffer's thread-safe side: queued by paho)."""
        self._link.publish(topic, payload)

    def stop(self) -> None:
        """Stop capturing and disconnect."""
        self._stop.set()
        self._thread.join(5)
        self._link.disconnect()

    def snapshot(self) -> list[tuple[str, bytes]]:
        """The records so far."""
        with self._lock:
            return list(self.records)

    def save(self, path: Path) -> Path:
        """Write the capture to ``path``."""
        out = bytearray()
        for topic, payload in self.snapshot():
            raw = topic.encode()
            out += struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(payload)) + payload
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(out))
        return path


def _at_least(count: Callable[[], int], n: int) -> bool:
    return count() >= n


def _evidence_replay(bench: Bench) -> AttackReport:
    """Capture a genuine attestation, power the board off, replay its hello and evidence."""
    victim = bench.devices[0]
    bench.installed(victim)
    sniffer = Sniffer(bench.url)
    sniffer.start()
    try:
        ran = bench.boot(victim)
        up = topics.attest_up(victim)
        captured = [p for t, p in sniffer.snapshot() if t == up]
        if len(captured) < 2 or ran.state != "running":
            raise BenchError(f"no genuine attestation captured ({len(captured)} messages)")
        before = bench.gateway_sessions(victim)
        mark = len(sniffer.snapshot())
        down_topic = topics.attest_down(victim)

        def replies() -> int:
            return sum(t == down_topic for t, _ in sniffer.snapshot()[mark:])

        for count, payload in enumerate(captured[:2], start=1):  # hello, then its evidence
            sniffer.publish(up, payload)
            with contextlib.suppress(BenchError):  # the gateway may also stay silent
                bench.poll(functools.partial(_at_least, replies, count), "a reply", 5.0)
        verdicts, released = bench.gateway_view(victim, before)
        down = [p for t, p in sniffer.snapshot()[mark:] if t == topics.attest_down(victim)]
        capture = sniffer.save(bench.root / "attacker" / "mqtt-capture.bin")
    finally:
        sniffer.stop()
    refusals: list[str] = []
    granted = False
    for payload in down:
        try:
            message = messages.decode_attest_down(payload)
        except MalformedMessage:
            continue
        if isinstance(message, messages.Refusal):
            refusals.extend(str(r) for r in message.reasons)
        elif isinstance(message, messages.Verdict) and message.grant is not None:
            granted = True
    released = released or granted
    replay = DeviceRun(ran.state, None, verdicts, released)
    attack = ATTACKS_BY_NAME["evidence-replay"]
    report = make_report(bench, attack, replay, [victim], "replayed a captured hello and evidence")
    refused = bool(refusals) and not released
    where = tuple(report.detected_at) or ((Where.GATEWAY,) if refused else ())
    scan = bench.scanner().scan_file(capture)
    return dataclasses.replace(
        report,
        detected_at=where,
        reasons=tuple(sorted({*report.reasons, *refusals})),
        what_happened=f"replayed 2 messages; gateway sent {len(down)} replies, refusing "
        f"{sorted(set(refusals))}; "
        f"verdicts {[v.get('status') for v in verdicts]}; key released: {released}",
        leaks=report.leaks + tuple(f.to_json() for f in scan.findings),
        scanned_bytes=report.scanned_bytes + scan.scanned_bytes,
        evidence={"released": released, "replies": len(down)},
    )


def _image_swap(home: Path, image_path: Path) -> str | None:
    """Install another product's genuine, vendor-signed image in the victim's slot."""
    data = image_path.read_bytes()
    install_image(home, data)
    return image.manifest_digest(image.parse_unverified_image(data)).hex()


def _stage_rollback(bench: Bench) -> AttackReport:
    """Flash the older, manufacturer-signed runtime stage (0.9.0, counter 0) taken from a board."""
    victim = bench.devices[0]
    bench.installed(victim)
    flash_stage(bench.home(victim), bench.old_runtime)
    ran = bench.boot(victim)
    bench.restore(victim)
    attack = ATTACKS_BY_NAME["stage-rollback"]
    return make_report(bench, attack, ran, [victim], "flashed the older signed runtime stage")


ATTACKS: Final[tuple[Attack, ...]] = (
    Attack(
        "flash-dump",
        "read the whole flash of a board that had run its app",
        "ciphertext only at rest",
        (Where.PREVENTED,),
        _flash_dump,
    ),
    _tamper_attack(
        "ciphertext-bitflip",
        "flipped one bit in the middle of the sealed image's ciphertext",
        "the enclave checks the ciphertext digest and GCM tag: boot refused, no plaintext",
        lambda home: _flip_image(home, "payload"),
    ),
    _tamper_attack(
        "manifest-tamper",
        "flipped one bit of the sealed image's manifest signature",
        "the enclave verifies the vendor signature before anything else",
        lambda home: _flip_image(home, "manifest"),
    ),
    _tamper_attack(
        "bl2-tamper",
        "flipped one bit in the BL2 boot stage in flash",
        "secure boot: the RoT verifies BL2 against the ROTPK and refuses to run it",
        lambda home: _flip_partition(home, "bl2"),
    ),
    Attack(
        "image-swap",
        "installed another product's genuine, vendor-signed image in the victim's slot",
        "the manifest's class id must be the board's product: the enclave refuses it",
        (Where.DEVICE,),
        lambda bench: _tamper_attack(
            "image-swap",
            "installed another product's signed image",
            "class id check",
            lambda home: _image_swap(home, bench.other_image),
        ).run(bench),
    ),
    Attack(
        "stage-rollback",
        "flashed an older manufacturer-signed runtime stage (0.9.0, counter 0) from another board",
        "stage counters in fuses: the RoT refuses a stage below its counter; boot fails",
        (Where.DEVICE,),
        _stage_rollback,
    ),
    Attack(
        "debug-unlock",
        "requested a debug unlock and reset the board",
        "lifecycle leaves SECURED, keys change class, the gateway refuses lifecycle.debug",
        (Where.GATEWAY, Where.LEDGER),
        _debug_unlock,
    ),
    Attack(
        "flash-clone",
        "copied a board's flash into another board whose fuses claim the victim's id",
        "the IAK comes from the HUK in fuses: the token does not match the copied certificate",
        (Where.GATEWAY, Where.LEDGER),
        _flash_clone,
    ),
    Attack(
        "nw-memory",
        "read the normal world's memory while the app runs",
        "the NW never holds the plaintext or a key",
        (Where.PREVENTED,),
        _nw_memory,
    ),
    Attack(
        "exfil-runtime",
        "on a secure-boot-off board, flashed a runtime that leaks every CEK and plaintext it opens",
        "the RoT measures the stage; the gateway refuses the measurement and secure boot off",
        (Where.GATEWAY, Where.LEDGER),
        _exfil,
    ),
    Attack(
        "power-cut",
        "cut the power at 100 points of an update, with torn sector writes",
        "MCUboot-like slots: the board always boots a valid image",
        (Where.DEVICE,),
        _power_cut,
    ),
    Attack(
        "malformed-frames",
        "wrote malformed frames on the enclave door from a compromised normal world",
        "strict size-limited CBOR frames with error replies; no operation returns a key",
        (Where.DEVICE,),
        _malformed_frames,
    ),
    Attack(
        "evidence-replay",
        "captured a genuine hello and evidence on MQTT and replayed them with the board off",
        "stateless MAC'd challenges, single use in the registry; a grant opens only in the "
        "enclave that made the token",
        (Where.GATEWAY,),
        _evidence_replay,
    ),
    Attack(
        "revoked",
        "kept using a board the operator revoked",
        "the gateway refuses device.revoked and releases no key",
        (Where.GATEWAY, Where.LEDGER),
        _revoked,
    ),
)
ATTACKS_BY_NAME: Final = {a.name: a for a in ATTACKS}
