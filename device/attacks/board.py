"""The attacks on the board's image history, clock and normal world (DESIGN §1, §5, §8, §13).

The attacker holds the board: it reads and rewrites the flash file, sets the board's clock, cuts
the board off the network (the NW is pointed at a broker port nobody listens on: it then asks the
enclave for an offline boot), runs code as root in the normal world — the enclave door and MQTT —
and watches the gateway through its operator CLI. Fuses are the RoT's: the attacker reads what
the board reports, never writes them, except where an attack says it steps outside the model.

- ``rollback``: a board of its own runs 1.0.0 (counter 1), takes the update to 2.0.0 (counter 2,
  built here on first use) and confirms it, so its fuse ``app`` counter is 2. The attacker
  reflashes the dump it took on 1.0.0 — the older genuine vendor-signed image and the sealed
  lease holding that image's key. Offline, the enclave refuses the image below the fuse counter
  before decrypting it (the same flash booted offline while the counter was 1); online, the
  gateway releases only the assigned 2.0.0 and the board updates back to it. Outside the model,
  with the fuses glitched back too (as ``tests/test_e2e.py`` does), the gateway, which remembers
  the counters it last saw, refuses ``counter.rollback`` and the ledger records it.
- ``clock-rollback``: a board of its own attests once (the gateway grants an offline lease of N
  boots), then boots offline again and again, its clock wound further back each time, and once
  more after the NV store is rolled back to the copy holding the full lease. The enclave never
  reads the board's clock: expiry is judged in gateway time it has seen (signed results and
  commands), and offline boots are counted in the fuse counter ``offline_boots``, so exactly N
  boots run and the rest are refused ``boots_spent``.
- ``nw-forged-evidence``: the NW cannot reach the IAK (only the RoT signs tokens), so it signs a
  token with its own key claiming the victim's identity and genuine measurements and binding its
  own X25519 key; and it edits genuine tokens keeping their signature (the nonce rebound to its
  key; a development board's ``secure_boot`` flipped on). The gateway verifies every token under
  the enrolled IAK: ``evidence.signature.invalid``, no grant, the refusals recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import secrets
import shutil
import socket
import subprocess
import time
from enum import StrEnum
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from device.attacks.playbook import (
    APP,
    PRODUCT,
    Attack,
    Bench,
    BenchError,
    DeviceRun,
    Sniffer,
    make_report,
    run_cli,
    run_json,
    terminate,
    tool_path,
)
from device.attacks.report import AttackReport, Where
from device.attacks.wire import await_reply, enclave_attests, refused_with, request_challenge
from device.enclave.nvstore import NV_PARTITION
from device.hardware.clock import BoardClock
from device.hardware.flash import FLASH_FILE, Flash
from device.hardware.fuses import Fuses
from device.normal_world.public_state import inspect_flash
from protocol import cbor, cose, keys, messages, psa, topics
from protocol.reasons import ReasonCode

#: The newer release ``rollback`` updates its board to (the bench's own is 1.0.0, counter 1).
NEWER_VERSION: Final = "2.0.0"
NEWER_COUNTER: Final = 2
#: What the NW logs when it asks the enclave for an offline boot (``device.normal_world.agent``).
OFFLINE_LINE: Final = re.compile(r"offline\.boot allowed=(True|False) reason=([a-z_]+)")
#: How far back ``clock-rollback`` winds the board's clock per boot: ten years.
WIND_BACK_S: Final = 10 * 365 * 86_400


# --- the attacker's position: the board off the network, its clock, its flash --------------------


def _dead_broker() -> str:
    """A loopback broker URL nobody listens on: the attacker has cut the board off the network."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"mqtt://127.0.0.1:{port}"


def boot_offline(bench: Bench, device: str) -> tuple[bool, str]:
    """Run the board's real NW with no broker reachable; whether the enclave allowed the
    offline boot, and its reason (``ok``, ``boots_spent``, ``image_refused``, ...).

    Raises:
        BenchError: the NW exited or logged no offline decision within the bench's wait.
    """
    start = len(bench.log(device))
    log = (bench.logs / f"{device}.log").open("ab")
    proc = subprocess.Popen(
        [tool_path("edgeseal-device"), "run", "--home", str(bench.home(device)),
         "--broker", _dead_broker()],
        stdout=log,
        stderr=log,
    )  # fmt: skip
    log.close()
    found: list[re.Match[str]] = []

    def decided() -> bool:
        match = OFFLINE_LINE.search(bench.log(device)[start:])
        if match is not None:
            found.append(match)
            return True
        if proc.poll() is not None:
            raise BenchError(f"{device}: the NW exited ({proc.returncode}) before booting offline")
        return False

    try:
        bench.poll(decided, f"{device} decides on an offline boot")
    finally:
        terminate(proc)
    return found[0].group(1) == "True", found[0].group(2)


def _run_until_confirmed(bench: Bench, device: str, app_counter: int) -> DeviceRun:
    """Boot ``device`` online until it runs and confirms an image at fuse ``app`` counter."""
    home = bench.home(device)
    ran = bench.boot(device, keep_running=True)
    try:
        if ran.state != "running":
            raise BenchError(f"{device} did not come up: {ran.state} {ran.detail}")

        def confirmed() -> bool:
            images = inspect_flash(home).images
            done = any(
                i.trailer_status == "confirmed" and i.security_counter == app_counter
                for i in images
            )
            return done and Fuses.in_home(home).counter("app") == app_counter

        bench.poll(confirmed, f"{device} confirms its image at app counter {app_counter}")
    finally:
        bench.stop_device(device)
    return ran


def _nv_blob(bench: Bench, device: str) -> bytes:
    return Flash.open(bench.home(device) / FLASH_FILE).read_blob(NV_PARTITION)


def _offline_boots(bench: Bench, device: str) -> int:
    """The fuse counter of offline boots (the bench reads it; the attacker cannot lower it)."""
    return Fuses.in_home(bench.home(device)).counter("offline_boots")


def _scanned(report: AttackReport, bench: Bench, *extra: Path) -> AttackReport:
    """``report`` with ``extra`` files leak-scanned as well."""
    if not extra:
        return report
    scan = bench.scanner().scan_paths(list(extra))
    return dataclasses.replace(
        report,
        leaks=report.leaks + tuple(f.to_json() for f in scan.findings),
        scanned_bytes=report.scanned_bytes + scan.scanned_bytes,
    )


# --- rollback -------------------------------------------------------------------------------------


def newer_release(bench: Bench) -> str:
    """The release id of 2.0.0 (counter 2) of the bench's product: built, sealed and imported
    through the console scripts on first use, as ``Bench.setup`` builds 1.0.0."""
    out = bench.root / "rel-newer"
    record = out / "built.json"
    if record.exists():
        return str(json.loads(record.read_text())["release_id"])
    out.mkdir(parents=True, exist_ok=True)
    built = run_json(
        "edgeseal-provision", "firmware", "build", str(APP), "--vendor", str(bench.root / "vendor"),
        "--product", PRODUCT, "--version", NEWER_VERSION,
        "--security-counter", str(NEWER_COUNTER),
        "--gateway-hpke-key", str(bench.root / "gw" / "hpke-key.pem"), "--out", str(out),
        "--json",
    )  # fmt: skip
    if not isinstance(built, dict):
        raise BenchError("firmware build: expected a JSON object")
    run_cli(*bench.gw, "import", str(built["release"]), "--json")
    record.write_text(json.dumps({"release_id": built["release_id"]}))
    return str(built["release_id"])


def _rollback(bench: Bench) -> AttackReport:
    """Update a board of its own to 2.0.0, then reflash the dump it took on 1.0.0."""
    victim = bench.add_board(f"rb{secrets.token_hex(3)}")  # its fuse counters end up advanced
    home = bench.home(victim)
    _run_until_confirmed(bench, victim, 1)
    dump = bench.save(victim, "attacker-dump-1.0.0")  # flash (image, sealed lease) and fuses
    control = boot_offline(bench, victim)  # the dump's image and lease, while the counter is 1
    newer = newer_release(bench)
    run_cli(*bench.gw, "assign", victim, newer)
    _run_until_confirmed(bench, victim, NEWER_COUNTER)  # download, trial boot, confirm
    seen = bench.boot(victim)  # the gateway learns the advanced counters
    # In the model: the attacker rewrites flash, not fuses.
    shutil.copy2(dump / FLASH_FILE, home / FLASH_FILE)
    offline = boot_offline(bench, victim)
    healed = bench.boot(victim)
    # Outside the model (fuses glitched back too, as tests/test_e2e.py does): the gateway's memory.
    bench.restore(victim, "attacker-dump-1.0.0")
    glitched = bench.boot(victim)
    report = make_report(bench, ROLLBACK, glitched, [victim], "reflashed the dump with fuses too")
    return _rollback_report(bench, victim, report, control, offline, newer, seen, healed)


def _rollback_report(
    bench: Bench, victim: str, report: AttackReport, control: tuple[bool, str],
    offline: tuple[bool, str], newer: str, seen: DeviceRun, healed: DeviceRun,
) -> AttackReport:  # fmt: skip
    rolled = str(ReasonCode.COUNTER_ROLLBACK)
    where: list[Where] = []
    # The same image and sealed key booted offline at counter 1: only the counter refuses it.
    if control == (True, "ok") and offline == (False, "image_refused"):
        where.append(Where.DEVICE)
    glitched_released = bool(report.evidence["released"])
    if rolled in report.reasons and not glitched_released:
        where.append(Where.GATEWAY)
    if rolled in report.reasons and bench.ledger_mentions(victim, [rolled]):
        where.append(Where.LEDGER)
    healed_to = f"app.run release={newer[:16]}" in healed.log
    return dataclasses.replace(
        report,
        detected_at=tuple(where),
        what_happened=f"offline boot of the 1.0.0 dump: {offline[1]} (before the update: "
        f"{control[1]}); online: the gateway released {NEWER_VERSION} again "
        f"({'board back on it' if healed_to else 'board state ' + str(healed.state)}); "
        f"fuses glitched back too: {report.what_happened}",
        evidence={
            **report.evidence,
            "device": victim,
            "offline_before_update": control[1],
            "offline_after_update": offline[1],
            "updated_seen": [v.get("status") for v in seen.verdicts],
            "healed_to_newer": healed_to,
            "healed_released": healed.released,
            "app_counter": Fuses.in_home(bench.home(victim)).counter("app"),
        },
    )


ROLLBACK: Final = Attack(
    "rollback",
    "on a board updated to 2.0.0 (counter 2, confirmed), reflashed the dump taken on 1.0.0: the "
    "older genuine vendor-signed image and the sealed lease holding its key; booted it offline "
    "and online; then glitched the fuses back too (outside the model)",
    "the enclave refuses an image below the fuse app counter before decrypting it; the gateway "
    "releases only the assigned release at or above the epoch, and refuses counters below those "
    "it last saw (counter.rollback)",
    (Where.DEVICE, Where.GATEWAY, Where.LEDGER),
    _rollback,
)


# --- clock-rollback -------------------------------------------------------------------------------


def _lease_boots(bench: Bench) -> int:
    """The offline boots the gateway's policy grants with a key."""
    policy = run_json(*bench.gw, "policy", "show")
    if not isinstance(policy, dict) or not isinstance(policy.get("lease"), dict):
        raise BenchError("policy show: no lease in the policy")
    return int(policy["lease"]["offline_boots"])


def _clock_rollback(bench: Bench) -> AttackReport:
    """Attest once for a lease, then boot offline with the clock wound back further each time."""
    victim = bench.add_board(f"clk{secrets.token_hex(3)}")  # its offline boots end up spent
    home = bench.home(victim)
    boots = _lease_boots(bench)
    ran = _run_until_confirmed(bench, victim, 1)  # attested, key and lease granted, confirmed
    full_lease = _nv_blob(bench, victim)  # the attacker's copy of the sealed lease, unspent
    clock = BoardClock(home)
    now_s = int(time.time())
    outcomes: list[tuple[str, bool, str]] = []
    for n in range(1, boots + 2):
        clock.set_board_time(now_s - n * WIND_BACK_S)
        outcomes.append((f"clock -{10 * n} years", *boot_offline(bench, victim)))
    Flash.open(home / FLASH_FILE).write_blob(NV_PARTITION, full_lease)
    clock.set_board_time(0)
    outcomes.append(("NV store rolled back, clock at 1970", *boot_offline(bench, victim)))
    spent = _offline_boots(bench, victim)
    report = make_report(bench, CLOCK_ROLLBACK, ran, [victim], "attested once for a lease")
    expected = [(True, "ok")] * boots + [(False, "boots_spent")] * 2
    held = [(a, r) for _, a, r in outcomes] == expected and spent == boots
    return dataclasses.replace(
        report,
        detected_at=(Where.DEVICE,) if held else (),
        what_happened=f"lease of {boots} offline boots; "
        + "; ".join(f"{w}: {r}" for w, _, r in outcomes)
        + f"; fuse offline_boots {spent}",
        evidence={
            **report.evidence,
            "device": victim,
            "lease_boots": boots,
            "offline": [[w, a, r] for w, a, r in outcomes],
            "offline_boots_fuse": spent,
        },
    )


CLOCK_ROLLBACK: Final = Attack(
    "clock-rollback",
    "attested once for an offline lease, then cut the board off the network and booted it "
    "offline again and again with its clock wound back 10, 20, ... years, and once more after "
    "rolling the NV store back to the copy holding the full lease",
    "the enclave never reads the board's clock: expiry is judged in gateway time it has seen, "
    "and offline boots are counted in a fuse counter: beyond the lease's count, boots_spent",
    (Where.DEVICE,),
    _clock_rollback,
)


# --- nw-forged-evidence ---------------------------------------------------------------------------


def _resigned(token: bytes, claims: psa.PsaClaims) -> bytes:
    """``token`` with its claims replaced and its (now wrong) signature kept."""
    parsed = cose.sign1_parse_unverified(token)
    body = [parsed.protected_bytes, {}, psa.encode_claims(claims), parsed.signature]
    return cbor.dumps(cbor.tagged(cose.TAG_SIGN1, body))


class Forgery(StrEnum):
    """What the compromised NW does to the evidence (the genuine token comes from the door)."""

    #: The genuine token's claims, the nonce bound to the NW's X25519 key, signed with a P-256
    #: key the NW made.
    OWN_KEY = "own-key"
    #: The genuine token, its nonce rebound to the NW's X25519 key, the signature kept.
    REBIND = "rebind"
    #: The genuine token of a secure-boot-off board, ``secure_boot`` flipped on, signature kept.
    SECURE_BOOT = "secure-boot"


def _forge(
    bench: Bench, sniffer: Sniffer, device: str, attacker: x25519.X25519PrivateKey, kind: Forgery
) -> tuple[str, ...]:
    """One forged evidence of ``kind`` for ``device`` on a fresh challenge; the refusal codes."""
    session, challenge = request_challenge(bench, sniffer, device)
    token, enclave_key = enclave_attests(bench, device, session, challenge.nonce)
    genuine = psa.parse_unverified_token(token)
    mine = keys.x25519_raw(attacker.public_key())
    bound = dataclasses.replace(genuine, nonce=psa.bind_nonce(challenge.nonce, mine))
    if kind is Forgery.OWN_KEY:
        forged, key = psa.sign_token(bound, ec.generate_private_key(ec.SECP256R1())), mine
    elif kind is Forgery.REBIND:
        forged, key = _resigned(token, bound), mine
    else:
        if genuine.platform is None:
            raise BenchError("the genuine token carries no platform claims")
        flipped = dataclasses.replace(genuine.platform, secure_boot=True)
        forged, key = _resigned(token, dataclasses.replace(genuine, platform=flipped)), enclave_key
    evidence = messages.Evidence(session, forged, key, challenge)
    mark = len(sniffer.snapshot())
    sniffer.publish(topics.attest_up(device), evidence.encode())
    return refused_with(await_reply(sniffer, topics.attest_down(device), mark, session))


def _forged_evidence(bench: Bench) -> AttackReport:
    """Three forgeries by the NW: a token under its own key, two genuine tokens edited."""
    victim, devboard = bench.devices[0], bench.devboard
    bench.installed(victim)
    bench.restore(devboard)
    attacker = x25519.X25519PrivateKey.generate()
    before = {d: bench.gateway_sessions(d) for d in (victim, devboard)}
    sniffer = Sniffer(bench.url)
    sniffer.start()
    try:
        refusals = {
            str(kind): _forge(bench, sniffer, devboard if kind is Forgery.SECURE_BOOT else victim,
                              attacker, kind)
            for kind in Forgery
        }  # fmt: skip
        capture = sniffer.save(bench.root / "attacker" / "nw-forged-evidence.bin")
    finally:
        sniffer.stop()
        with contextlib.suppress(OSError):
            bench.restore(devboard)
    return _forged_report(bench, victim, devboard, before, refusals, capture)


def _forged_report(
    bench: Bench, victim: str, devboard: str, before: dict[str, frozenset[tuple[str, str]]],
    refusals: dict[str, tuple[str, ...]], capture: Path,
) -> AttackReport:  # fmt: skip
    invalid = str(ReasonCode.EVIDENCE_SIGNATURE_INVALID)
    verdicts: list[dict[str, object]] = []
    released = False
    for device in (victim, devboard):
        seen, got = bench.gateway_view(device, before[device])
        verdicts.extend(seen)
        released = released or got
    ran = DeviceRun("powered by the attacker", None, verdicts, released)
    report = _scanned(
        make_report(bench, NW_FORGED_EVIDENCE, ran, [victim, devboard], "forged 3 tokens"),
        bench,
        capture,
    )
    where: list[Where] = []
    if all(r == (invalid,) for r in refusals.values()) and not released:
        where.append(Where.GATEWAY)
    if all(bench.ledger_mentions(d, [invalid]) for d in (victim, devboard)):
        where.append(Where.LEDGER)
    return dataclasses.replace(
        report,
        detected_at=tuple(where),
        what_happened=f"gateway refusals {json.dumps({k: list(v) for k, v in refusals.items()})}; "
        f"{report.what_happened}",
        evidence={**report.evidence, "refusals": {k: list(v) for k, v in refusals.items()}},
    )


NW_FORGED_EVIDENCE: Final = Attack(
    "nw-forged-evidence",
    "as a compromised normal world: signed a token with its own key claiming the victim's "
    "identity and genuine measurements, bound to its own X25519 key; edited genuine tokens "
    "keeping their signature (nonce rebound to its key; secure_boot flipped on for a "
    "development board)",
    "only the RoT signs tokens, under the HUK-derived IAK the NW never sees; the gateway "
    "verifies every token under the enrolled IAK first: evidence.signature.invalid, no grant, "
    "the refusal recorded",
    (Where.GATEWAY, Where.LEDGER),
    _forged_evidence,
)


ATTACKS: Final[tuple[Attack, ...]] = (ROLLBACK, CLOCK_ROLLBACK, NW_FORGED_EVIDENCE)

__all__ = [
    "ATTACKS",
    "CLOCK_ROLLBACK",
    "NW_FORGED_EVIDENCE",
    "ROLLBACK",
    "boot_offline",
    "newer_release",
]
