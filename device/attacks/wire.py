"""The attacks on what crosses MQTT: challenges, key grants and commands (DESIGN §8, §9, §13).

The attacker holds the board and MQTT: it sniffs and injects on the broker (``Sniffer``), powers
the board and talks to the enclave's door as a compromised normal world would (``Board``), reads
and writes the flash file, and watches the gateway through its operator CLI. The gateway is never
imported: its replies are read off the wire and its view through ``edgeseal-gateway … --json``.

- ``stale-challenge``: a genuine challenge held past its lifetime, then signed by the genuine
  enclave and sent: the gateway refuses ``challenge.expired`` before it looks at the token.
- ``grant-mitm``: the attacker's X25519 key in place of the enclave's in genuine evidence: the
  token's nonce binds the enclave's key, the gateway refuses ``evidence.binding.mismatch``; and a
  genuine grant sniffed on the wire does not open with the attacker's key.
- ``forged-command``: a command signed with the attacker's key, a genuine revoke replayed, and
  the genuine revoke replayed after the board's NV store was rolled back to a copy taken before
  it: the enclave refuses all three (the last because the sequence number it accepted is held
  in a fuse counter, not only in flash).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from device.attacks.playbook import (
    Attack,
    Bench,
    BenchError,
    DeviceRun,
    Sniffer,
    make_report,
    run_cli,
    run_json,
)
from device.attacks.report import AttackReport, Where
from device.enclave.api import EnclaveDoor, EnclaveRefused
from device.enclave.nvstore import NV_PARTITION
from device.factory import read_certificates
from device.hardware.flash import FLASH_FILE, Flash
from device.hardware.power import Board
from protocol import ids, keys, messages, topics
from protocol.errors import InvalidGrant, MalformedMessage
from protocol.grant import open_grant
from protocol.ids import DeviceId, SessionId
from protocol.reasons import ReasonCode
from protocol.results import Command, CommandKind, sign_command

#: The gateway's challenge lifetime while ``stale-challenge`` runs (restored afterwards).
STALE_TTL_S: Final = 2
#: How long the attacker waits for one reply on the wire, or for the NW to act on a command.
REPLY_WAIT_S: Final = 10.0
#: What the NW logs for a command the enclave refused, and for one it applied.
NW_REFUSED: Final = "command.refused"
NW_APPLIED: Final = "command kind="


# --- the attacker's position on the wire and the door ---------------------------------------------


def await_reply(
    sniffer: Sniffer, topic: str, mark: int, session: SessionId
) -> messages.Challenge | messages.Verdict | messages.Refusal:
    """The first reply on ``topic`` after record ``mark`` for ``session``.

    Raises:
        BenchError: none came within ``REPLY_WAIT_S``.
    """
    found: list[messages.Challenge | messages.Verdict | messages.Refusal] = []

    def arrived() -> bool:
        for t, payload in sniffer.snapshot()[mark:]:
            if t != topic:
                continue
            with contextlib.suppress(MalformedMessage):
                reply = messages.decode_attest_down(payload)
                if reply.session_id == session:
                    found.append(reply)
                    return True
        return False

    Bench.poll(arrived, "a reply from the gateway", REPLY_WAIT_S)
    return found[0]


def request_challenge(
    bench: Bench, sniffer: Sniffer, device: str
) -> tuple[SessionId, messages.Challenge]:
    """Send a hello as the board (its public certificates, from flash); the challenge back."""
    session = SessionId(secrets.token_bytes(16))
    hello = messages.Hello(
        session_id=session,
        certificates=read_certificates(bench.home(device)),
        requested_release=None,
        state=messages.HelloState.BOOT,
    )
    mark = len(sniffer.snapshot())
    sniffer.publish(topics.attest_up(device), hello.encode())
    reply = await_reply(sniffer, topics.attest_down(device), mark, session)
    if not isinstance(reply, messages.Challenge):
        raise BenchError(f"the gateway answered the hello with {type(reply).__name__}")
    return session, reply


def enclave_attests(
    bench: Bench, device: str, session: SessionId, nonce: bytes
) -> tuple[bytes, bytes]:
    """Power the board and have its genuine enclave sign a token for ``nonce``: (token, key)."""
    board = Board(bench.home(device), door_timeout_s=REPLY_WAIT_S)
    try:
        door = board.power_on()
        door.boot()
        attestation = door.attest(session, nonce)
    finally:
        board.power_off()
    return attestation.token, attestation.enclave_key


def _send_evidence(
    sniffer: Sniffer, device: str, evidence: messages.Evidence
) -> messages.Challenge | messages.Verdict | messages.Refusal:
    """Publish evidence as the board; the gateway's reply."""
    mark = len(sniffer.snapshot())
    sniffer.publish(topics.attest_up(device), evidence.encode())
    return await_reply(sniffer, topics.attest_down(device), mark, evidence.session_id)


def refused_with(
    reply: messages.Challenge | messages.Verdict | messages.Refusal,
) -> tuple[str, ...]:
    """The reason codes of a refusal (empty for anything else)."""
    return tuple(str(r) for r in reply.reasons) if isinstance(reply, messages.Refusal) else ()


@contextlib.contextmanager
def _challenge_ttl(bench: Bench, ttl_s: int) -> Iterator[None]:
    """Serve the gateway with challenges living ``ttl_s``; the policy in force is restored after.

    ``serve`` reads the lifetimes at start, so the gateway is restarted under the changed
    policy and again under the restored one. Nothing else in the policy changes.
    """
    current = run_json(*bench.gw, "policy", "show")
    if not isinstance(current, dict):
        raise BenchError("policy show: expected a JSON object")
    restore = int(current["challenge_ttl_s"])
    bench.stop_gateway()
    bench.set_policy(challenge_ttl_s=ttl_s)
    bench.start_gateway()
    try:
        yield
    finally:
        bench.stop_gateway()
        bench.set_policy(challenge_ttl_s=restore)
        bench.start_gateway()


def _finish(
    bench: Bench,
    attack: Attack,
    device: str,
    before: frozenset[tuple[str, str]],
    capture: Path,
    note: str,
) -> AttackReport:
    """The playbook's report for ``device`` since ``before``, with the capture leak-scanned."""
    verdicts, released = bench.gateway_view(device, before)
    ran = DeviceRun("powered by the attacker", None, verdicts, released)
    report = make_report(bench, attack, ran, [device], note)
    scan = bench.scanner().scan_file(capture)
    return dataclasses.replace(
        report,
        leaks=report.leaks + tuple(f.to_json() for f in scan.findings),
        scanned_bytes=report.scanned_bytes + scan.scanned_bytes,
    )


# --- stale-challenge ------------------------------------------------------------------------------


def _stale_challenge(bench: Bench) -> AttackReport:
    """Hold a genuine challenge past its lifetime, have the enclave sign for it, send it."""
    victim = bench.devices[0]
    bench.installed(victim)
    with _challenge_ttl(bench, STALE_TTL_S):
        sniffer = Sniffer(bench.url)
        sniffer.start()
        try:
            before = bench.gateway_sessions(victim)
            session, challenge = request_challenge(bench, sniffer, victim)
            # Gateway time: the challenge is stale once the gateway's clock is past its expiry.
            Bench.poll(lambda: time.time() >= challenge.expires_s + 1, "the challenge expires")
            token, key = enclave_attests(bench, victim, session, challenge.nonce)
            reply = _send_evidence(
                sniffer, victim, messages.Evidence(session, token, key, challenge)
            )
            capture = sniffer.save(bench.root / "attacker" / "stale-challenge.bin")
        finally:
            sniffer.stop()
    refusal = refused_with(reply)
    report = _finish(
        bench, STALE_CHALLENGE, victim, before, capture,
        f"held a challenge {STALE_TTL_S} s past its {STALE_TTL_S} s lifetime, then sent evidence",
    )  # fmt: skip
    expired = str(ReasonCode.CHALLENGE_EXPIRED)
    where: list[Where] = []
    if refusal == (expired,) and not report.evidence["released"]:
        where.append(Where.GATEWAY)
    if expired in report.reasons and bench.ledger_mentions(victim, [expired]):
        where.append(Where.LEDGER)
    return dataclasses.replace(
        report,
        detected_at=tuple(where),
        what_happened=f"gateway replied {type(reply).__name__} {list(refusal)}; "
        f"{report.what_happened}",
        evidence={**report.evidence, "refusal": list(refusal), "ttl_s": STALE_TTL_S},
    )


STALE_CHALLENGE: Final = Attack(
    "stale-challenge",
    "held a genuine challenge past its lifetime, then had the enclave sign for it and sent it",
    "the challenge's expiry is under the gateway's MAC and checked in gateway time: "
    "challenge.expired, no key",
    (Where.GATEWAY, Where.LEDGER),
    _stale_challenge,
)


# --- grant-mitm -----------------------------------------------------------------------------------


def _genuine_grant(sniffer: Sniffer, device: str) -> messages.Verdict:
    """The last verdict carrying a grant captured on ``device``'s down topic."""
    granted: list[messages.Verdict] = []
    for topic, payload in sniffer.snapshot():
        if topic != topics.attest_down(device):
            continue
        with contextlib.suppress(MalformedMessage):
            reply = messages.decode_attest_down(payload)
            if isinstance(reply, messages.Verdict) and reply.grant is not None:
                granted.append(reply)
    if not granted:
        raise BenchError("no genuine grant captured on the wire")
    return granted[-1]


def _opens(verdict: messages.Verdict, device: str, key: x25519.X25519PrivateKey) -> bool:
    """Whether the captured grant opens with ``key``."""
    if verdict.grant is None or verdict.release_id is None:
        raise BenchError("the captured verdict carries no grant")
    try:
        open_grant(
            verdict.grant,
            key,
            device_id=DeviceId(device),
            session_id=verdict.session_id,
            manifest_digest=bytes.fromhex(verdict.release_id),
        )
    except InvalidGrant:
        return False
    return True


def _grant_mitm(bench: Bench) -> AttackReport:
    """Swap the attacker's key into genuine evidence; try the attacker's key on a real grant."""
    victim = bench.devices[0]
    bench.installed(victim)
    attacker = x25519.X25519PrivateKey.generate()
    sniffer = Sniffer(bench.url)
    sniffer.start()
    try:
        ran = bench.boot(victim)  # a genuine attestation, sniffed: its grant is on the wire
        captured = _genuine_grant(sniffer, victim)
        before = bench.gateway_sessions(victim)
        session, challenge = request_challenge(bench, sniffer, victim)
        token, _enclave_key = enclave_attests(bench, victim, session, challenge.nonce)
        forged = messages.Evidence(
            session, token, keys.x25519_raw(attacker.public_key()), challenge
        )
        reply = _send_evidence(sniffer, victim, forged)
        capture = sniffer.save(bench.root / "attacker" / "grant-mitm.bin")
    finally:
        sniffer.stop()
    opened = _opens(captured, victim, attacker)
    refusal = refused_with(reply)
    report = _finish(
        bench, GRANT_MITM, victim, before, capture,
        "substituted its X25519 key for the enclave's in genuine evidence",
    )  # fmt: skip
    binding = str(ReasonCode.EVIDENCE_BINDING_MISMATCH)
    where: list[Where] = []
    if refusal == (binding,) and not report.evidence["released"]:
        where.append(Where.GATEWAY)
    if binding in report.reasons and bench.ledger_mentions(victim, [binding]):
        where.append(Where.LEDGER)
    if not opened and ran.state == "running":
        where.append(Where.PREVENTED)
    return dataclasses.replace(
        report,
        detected_at=tuple(where),
        what_happened=f"gateway replied {type(reply).__name__} {list(refusal)}; "
        f"captured genuine grant opened with the attacker's key: {opened}; "
        f"{report.what_happened}",
        evidence={
            **report.evidence,
            "refusal": list(refusal),
            "captured_grant_opened": opened,
            "genuine_board": ran.state,
        },
    )


GRANT_MITM: Final = Attack(
    "grant-mitm",
    "put its own X25519 key in place of the enclave's in genuine evidence; tried its key on a "
    "genuine grant sniffed on the wire",
    "the token's nonce binds the enclave's key (evidence.binding.mismatch, no grant); a grant is "
    "HPKE-sealed to the enclave's key and opens nowhere else",
    (Where.GATEWAY, Where.LEDGER, Where.PREVENTED),
    _grant_mitm,
)


# --- forged-command -------------------------------------------------------------------------------


@dataclasses.dataclass
class _CommandProbe:
    """Injects commands on a running board's command topic and reads what its NW did."""

    bench: Bench
    sniffer: Sniffer
    device: str

    def counts(self) -> tuple[int, int]:
        """(commands refused, commands applied) in the NW's log so far."""
        log = self.bench.log(self.device)
        return log.count(NW_REFUSED), log.count(NW_APPLIED)

    def inject(self, payload: bytes) -> str:
        """Publish ``payload`` on the command topic; "refused" or "applied" per the NW's log."""
        before = self.counts()
        self.sniffer.publish(topics.cmd_down(self.device), payload)
        return self.outcome(before)

    def outcome(self, before: tuple[int, int]) -> str:
        """Wait for the NW's log to move from ``before``; what it says.

        Raises:
            BenchError: the NW logged nothing within ``REPLY_WAIT_S``.
        """
        Bench.poll(lambda: self.counts() != before, "the NW acts on the command", REPLY_WAIT_S)
        refused, applied = self.counts()
        return "applied" if applied > before[1] else "refused" if refused > before[0] else "?"

    def genuine_revoke(self) -> tuple[bytes, str]:
        """Have the operator revoke the board with ``--broker``; the command sniffed, and what
        the NW did with it."""
        before = self.counts()
        mark = len(self.sniffer.snapshot())
        run_cli(*self.bench.gw, "revoke", self.device, "--broker", self.bench.url)
        topic = topics.cmd_down(self.device)

        def sniffed() -> list[bytes]:
            return [p for t, p in self.sniffer.snapshot()[mark:] if t == topic]

        Bench.poll(lambda: bool(sniffed()), "the genuine command on the wire", REPLY_WAIT_S)
        return sniffed()[0], self.outcome(before)


def _attacker_command(device: str, seq: int) -> bytes:
    """A revoke for ``device`` signed with a key the attacker made (not the result key)."""
    now_s = int(time.time())
    command = Command(ids.device_id(device), seq, CommandKind.REVOKE, now_s, now_s + 3600)
    signed = sign_command(command, ec.generate_private_key(ec.SECP256R1()))
    return messages.CommandEnvelope(command=signed).encode()


def _nv_blob(bench: Bench, device: str) -> bytes:
    return Flash.open(bench.home(device) / FLASH_FILE).read_blob(NV_PARTITION)


def _roll_back_nv(bench: Bench, device: str, blob: bytes) -> None:
    Flash.open(bench.home(device) / FLASH_FILE).write_blob(NV_PARTITION, blob)


def _door_refusal(door: EnclaveDoor, payload: bytes) -> str:
    """What the enclave says to a command passed on the door: its refusal, or "applied"."""
    command = messages.CommandEnvelope.decode(payload).command
    try:
        outcome = door.command(command)
    except EnclaveRefused as err:
        return f"{err.kind}: {err}"
    return f"applied {outcome.kind} seq {outcome.seq}"


def _on_the_door(
    bench: Bench, device: str, forged: bytes, genuine: bytes, old_nv: bytes
) -> dict[str, str]:
    """The enclave's own refusals, on the door of the powered board (the NW logs only that it
    refused): the forged command, the replay, and the replay after an NV rollback."""
    board = Board(bench.home(device), door_timeout_s=REPLY_WAIT_S)
    try:
        door = board.power_on()
        door.boot()
        said = {"forged": _door_refusal(door, forged), "replayed": _door_refusal(door, genuine)}
        _roll_back_nv(bench, device, old_nv)  # the enclave reads its state from flash each time
        said["rolled_back"] = _door_refusal(door, genuine)
    finally:
        board.power_off()
    return said


def _forged_command(bench: Bench) -> AttackReport:
    """Forge, replay, and replay after an NV-store rollback, on a board of its own."""
    device = bench.add_board(f"wire{secrets.token_hex(3)}")  # it ends up revoked
    sniffer = Sniffer(bench.url)
    sniffer.start()
    try:
        nw: dict[str, str] = {}
        ran = bench.boot(device, keep_running=True)
        if ran.state != "running":
            raise BenchError(f"{device} did not come up: {ran.state} {ran.detail}")
        probe = _CommandProbe(bench, sniffer, device)
        old_nv = _nv_blob(bench, device)  # the attacker's copy, before any command
        forged = _attacker_command(device, 1)
        nw["forged"] = probe.inject(forged)
        genuine, nw["genuine"] = probe.genuine_revoke()
        nw["replayed"] = probe.inject(genuine)
        bench.stop_device(device)
        _roll_back_nv(bench, device, old_nv)
        again = bench.boot(device, keep_running=True)  # the NW still relays commands
        nw["rolled_back"] = probe.inject(genuine)
        bench.stop_device(device)
        door = _on_the_door(bench, device, forged, genuine, old_nv)
        capture = sniffer.save(bench.root / "attacker" / "forged-command.bin")
    finally:
        sniffer.stop()
        bench.stop_device(device)
    return _command_report(bench, device, nw, door, capture, again.state)


def _command_report(
    bench: Bench, device: str, nw: dict[str, str], door: dict[str, str], capture: Path,
    state: str | None,
) -> AttackReport:  # fmt: skip
    attacks = ("forged", "replayed", "rolled_back")
    refused = all(nw[a] == "refused" for a in attacks) and nw["genuine"] == "applied"
    refused = refused and all(door[a].startswith("command:") for a in attacks)
    scan = bench.scanner().scan_paths([*bench.haystacks(device), capture])
    return AttackReport(
        name=FORGED_COMMAND.name,
        attacker_did=FORGED_COMMAND.attacker_did,
        defence_expected=FORGED_COMMAND.defence,
        what_happened=f"NW: {json.dumps(nw, sort_keys=True)}; enclave on the door: "
        f"{json.dumps(door, sort_keys=True)}; board after the rollback reboot: {state}",
        expected_at=FORGED_COMMAND.expected_at,
        detected_at=(Where.DEVICE,) if refused else (),
        leaks=tuple(f.to_json() for f in scan.findings),
        scanned_bytes=scan.scanned_bytes,
        evidence={"device": device, "nw": nw, "door": door},
    )


FORGED_COMMAND: Final = Attack(
    "forged-command",
    "sent a revoke signed with its own key; replayed a genuine revoke sniffed on the wire; "
    "rolled the NV store back to a copy taken before it and replayed it again",
    "commands are signed by the gateway result key (anchored in the runtime stage); the "
    "highest sequence number accepted is kept in a fuse counter, so a rollback of flash "
    "cannot make a seen command new",
    (Where.DEVICE,),
    _forged_command,
)


ATTACKS: Final[tuple[Attack, ...]] = (STALE_CHALLENGE, GRANT_MITM, FORGED_COMMAND)

__all__ = ["ATTACKS", "FORGED_COMMAND", "GRANT_MITM", "STALE_CHALLENGE"]
