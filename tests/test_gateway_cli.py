"""``edgeseal-gateway``: every command with good and bad input (click's CliRunner), plus the
installed console script as a real subprocess."""

from __future__ import annotations

import json
import queue
import random
import sqlite3
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from gateway import db
from gateway.broker import Broker
from gateway.cli import cli
from gateway.mqtt import MqttClient, parse_broker_url
from gateway.registry import Registry
from gateway.state import WorkspaceError, open_workspace
from protocol import bundles, ids, keys, messages, topics
from protocol.bundles import ComponentType
from protocol.errors import UsageError
from protocol.reasons import Status
from protocol.results import CommandKind, verify_command
from tests.scripted_fleet import PRODUCT, Fleet, FleetDevice, Release

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".venv" / "bin" / "edgeseal-gateway"


@dataclass
class Cli:
    """Runs the CLI against one workspace."""

    home: Path
    tmp: Path
    runner: CliRunner

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(cli, ["--home", str(self.home), *args])

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def write(self, name: str, data: bytes | str) -> str:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)


def _one_line_error(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def run(tmp_path: Path) -> Cli:
    """An initialized workspace and a way to run commands against it."""
    runner = Cli(tmp_path / "home", tmp_path, CliRunner())
    result = runner("init")
    assert result.exit_code == 0, result.output
    return runner


def _pem_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _enrollment(
    fleet: Fleet, made: list[FleetDevice], factory: ec.EllipticCurvePrivateKey
) -> bytes:
    bundle = bundles.EnrollmentBundle(
        product=PRODUCT,
        class_id=ids.class_id(PRODUCT),
        devices=tuple(
            bundles.EnrolledDevice(d.device_id, d.cert_der, d.debug_cert_der, (("app", 1),))
            for d in made
        ),
        reference_values=fleet.reference_values(),
        created_s=1_700_000_000,
    )
    return bundles.sign_bundle(bundle, factory)


def _release_bundle(fleet: Fleet, release: Release, hpke_pem: Path) -> bytes:
    hpke = serialization.load_pem_public_key(hpke_pem.read_bytes())
    assert isinstance(hpke, x25519.X25519PublicKey)
    digest = bytes.fromhex(release.release_id)
    bundle = bundles.ReleaseBundle(
        product=PRODUCT,
        image=release.image,
        reference_value=bundles.ReferenceValue(
            ComponentType.APP,
            digest,
            f"1.{release.counter}.0",
            keys.signer_id(fleet.vendor_key.public_key()),
            release.counter,
        ),
        wrapped_cek=bundles.wrap_release_cek(release.cek, hpke, digest),
        created_s=1_700_000_000,
    )
    return bundles.sign_bundle(bundle, fleet.vendor_key)


@dataclass
class Imported:
    """What ``_populate`` put in the registry."""

    fleet: Fleet
    devices: list[FleetDevice]
    release: Release
    factory: ec.EllipticCurvePrivateKey


def _populate(run: Cli, rng: random.Random) -> Imported:
    fleet = Fleet(rng)
    factory = ec.generate_private_key(ec.SECP256R1())
    ca_pem = fleet.ca_cert.public_bytes(serialization.Encoding.PEM)
    assert run("trust", "add", "manufacturer-ca", run.write("ca.pem", ca_pem)).exit_code == 0
    assert (
        run("trust", "add", "bundle-signer", run.write("f.pem", _pem_public(factory))).exit_code
        == 0
    )
    vendor_pem = run.write("vendor.pem", _pem_public(fleet.vendor_key))
    assert run("trust", "add", "vendor", vendor_pem, "--name", "acme").exit_code == 0
    made = [fleet.make_device(f"dev-{n}") for n in range(2)]
    result = run("import", run.write("enroll.cbor", _enrollment(fleet, made, factory)))
    assert result.exit_code == 0, result.output
    release = fleet.make_release(300)
    bundle = _release_bundle(fleet, release, run.home / "hpke-key.pem")
    result = run("import", run.write("release.cbor", bundle))
    assert result.exit_code == 0, result.output
    return Imported(fleet, made, release, factory)


# --- init ----------------------------------------------------------------------------------------


def test_init_creates_a_private_workspace(run: Cli) -> None:
    """``init`` writes the key file 0600, the secret, the policy and both public PEMs."""
    assert (run.home / "gateway.key").stat().st_mode & 0o077 == 0
    assert (run.home / "challenge.secret").stat().st_mode & 0o077 == 0
    assert len((run.home / "challenge.secret").read_bytes()) == 32
    for pem in ("result-key.pem", "hpke-key.pem"):
        assert b"BEGIN PUBLIC KEY" in (run.home / pem).read_bytes()
    assert json.loads(run("policy", "show").stdout)["version"] == 1


def test_init_refuses_an_existing_workspace(run: Cli) -> None:
    """A second ``init`` on the same home is a usage error in one line."""
    _one_line_error(run("init"))


def test_commands_without_a_workspace_fail_in_one_line(tmp_path: Path) -> None:
    """Any command before ``init`` says to run it."""
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "none"), "devices"])
    assert "edgeseal-gateway init" in _one_line_error(result)


# --- trust ---------------------------------------------------------------------------------------


def test_trust_add_list_remove(run: Cli, rng: random.Random) -> None:
    """Anchors are added, listed as JSON and removed by a unique id prefix."""
    key = ec.generate_private_key(ec.SECP256R1())
    assert run("trust", "add", "vendor", run.write("v.pem", _pem_public(key))).exit_code == 0
    anchors = run.json("trust", "list")
    assert isinstance(anchors, list)
    assert [(a["kind"], a["id"]) for a in anchors] == [
        ("vendor", keys.signer_id(key.public_key()).hex())
    ]
    assert run("trust", "remove", anchors[0]["id"][:12]).exit_code == 0
    assert run.json("trust", "list") == []


def test_trust_add_refuses_bad_input(run: Cli) -> None:
    """A missing file, a non-certificate for a CA, a duplicate and an unknown kind are refused."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = run.write("k.pem", _pem_public(key))
    _one_line_error(run("trust", "add", "vendor", str(run.tmp / "missing.pem")))
    _one_line_error(run("trust", "add", "manufacturer-ca", pem))
    _one_line_error(run("trust", "add", "vendor", run.write("junk.pem", b"junk")))
    assert run("trust", "add", "vendor", pem).exit_code == 0
    _one_line_error(run("trust", "add", "vendor", pem))
    _one_line_error(run("trust", "add", "nobody", pem))
    _one_line_error(run("trust", "remove", "ffff"))


# --- import --------------------------------------------------------------------------------------


def test_import_enrollment_and_release_bundles(run: Cli, rng: random.Random) -> None:
    """Trusted bundles enroll devices and store the release; re-importing changes nothing."""
    imported = _populate(run, rng)
    rows = run.json("devices")
    assert isinstance(rows, list)
    assert [r["device"] for r in rows] == ["dev-0", "dev-1"]
    bundle = _enrollment(imported.fleet, imported.devices, imported.factory)
    again = run.json("import", run.write("again.cbor", bundle))
    assert again == {
        "type": "enrollment",
        "product": PRODUCT,
        "devices": 0,
        "already_enrolled": 2,
        "reference_values": 2,
    }
    assert run("assign", "dev-0", imported.release.release_id[:10]).exit_code == 0
    device = run.json("device", "dev-0")
    assert isinstance(device, dict)
    assert device["assigned"] == imported.release.release_id


def test_import_refuses_untrusted_malformed_and_missing_bundles(
    run: Cli, rng: random.Random
) -> None:
    """An untrusted signer exits 1; garbage and a missing file exit 2; each in one line."""
    fleet = Fleet(rng)
    stranger = ec.generate_private_key(ec.SECP256R1())
    bundle = _enrollment(fleet, [fleet.make_device("dev-9")], stranger)
    assert "not trusted" in _one_line_error(run("import", run.write("b.cbor", bundle)), code=1)
    _one_line_error(run("import", run.write("junk.cbor", b"\xd2\x84junk")))
    _one_line_error(run("import", str(run.tmp / "missing.cbor")))
    assert run.json("devices") == []


def test_import_revocation_revokes(run: Cli, rng: random.Random) -> None:
    """A revocation bundle signed by the trusted manufacturer CA revokes its devices, and the
    ledger records it."""
    imported = _populate(run, rng)
    revocation = bundles.RevocationBundle((imported.devices[0].device_id,), "lost", 1_700_000_000)
    signed = bundles.sign_bundle(revocation, imported.fleet.ca_key)
    assert run("import", run.write("rev.cbor", signed)).exit_code == 0
    device = run.json("device", "dev-0")
    assert isinstance(device, dict)
    assert device["status"] == "revoked"
    kinds = [e["kind"] for e in run.json("ledger", "show", "--device", "dev-0")]
    assert "revocation" in kinds


# --- reference values, assignment, epochs, revocation -----------------------------------------


def test_refval_add_reads_the_documented_format(run: Cli) -> None:
    """A refval file (docs/refval.md) is accepted; a malformed one is a usage error."""
    document = {
        "v": 1,
        "product": "sensor",
        "components": [
            {
                "component": "BL2",
                "measurement": "11" * 32,
                "version": "2.1.0",
                "signer_id": "22" * 32,
                "security_counter": 3,
            }
        ],
    }
    result = run("refval", "add", run.write("rv.json", json.dumps(document)))
    assert result.exit_code == 0, result.output
    document["components"][0]["measurement"] = "11"  # type: ignore[index]
    _one_line_error(run("refval", "add", run.write("bad.json", json.dumps(document))))
    _one_line_error(run("refval", "add", run.write("notjson.json", "{")))
    _one_line_error(run("refval", "add", run.write("v2.json", json.dumps({"v": 2}))))


def test_assign_and_epoch_refuse_bad_input(run: Cli, rng: random.Random) -> None:
    """Unknown devices or releases, and a lowered epoch, are usage errors."""
    imported = _populate(run, rng)
    _one_line_error(run("assign", "dev-0", "ffff"))
    _one_line_error(run("assign", "nobody", imported.release.release_id))
    _one_line_error(run("assign", "bad/id", imported.release.release_id))
    assert run("epoch", "set", PRODUCT, "1").exit_code == 0
    _one_line_error(run("epoch", "set", PRODUCT, "0"))
    _one_line_error(run("epoch", "set", PRODUCT, "-1"))


def test_device_timeline_explains_verdicts(run: Cli, rng: random.Random) -> None:
    """``device ID`` shows recorded verdicts with their explanations; unknown ids exit 2."""
    _populate(run, rng)
    registry = Registry.open(db.open_engine(f"sqlite:///{run.home / 'registry.db'}"))
    registry.record_verdict(
        ids.device_id("dev-1"),
        session_id=ids.session_id(bytes(16)),
        status=Status.CONTRAINDICATED,
        reasons=["lifecycle.debug"],
        policy_version=1,
        explanation_json='{"findings":[{"cause":"c","claim":"configuration","code":'
        '"lifecycle.debug","expected":"e","fix":"f","got":"g"}],"v":1}',
        now_s=5,
    )
    device = run.json("device", "dev-1")
    assert isinstance(device, dict)
    timeline = device["timeline"]
    assert timeline[0]["reasons"] == ["lifecycle.debug"]
    assert timeline[0]["explanation"][0]["fix"] == "f"
    text = run("device", "dev-1").stdout
    assert "lifecycle.debug: expected e; got g; fix: f" in text
    _one_line_error(run("device", "nobody"))


@pytest.mark.parametrize("kind", [CommandKind.REVOKE, CommandKind.UPDATE, CommandKind.REATTEST])
def test_commands_are_published_signed(
    run: Cli, rng: random.Random, broker: Broker, kind: CommandKind
) -> None:
    """``revoke|assign|reattest … --broker`` publish a signed command the device verifies."""
    imported = _populate(run, rng)
    inbox: queue.Queue[bytes] = queue.Queue()
    device = MqttClient(
        parse_broker_url(broker.url),
        client_id=f"dev-{uuid.uuid4().hex[:6]}",
        subscriptions=(topics.cmd_down("dev-0"),),
        on_message=lambda _t, p: inbox.put(p),
    )
    argv = {
        CommandKind.REVOKE: ["revoke", "dev-0"],
        CommandKind.UPDATE: ["assign", "dev-0", imported.release.release_id],
        CommandKind.REATTEST: ["reattest", "dev-0"],
    }[kind]
    device.start()
    try:
        result = run(*argv, "--broker", broker.url)
        assert result.exit_code == 0, result.output
        assert f"published {kind.value} command 1 to dev-0" in result.output
        envelope = messages.CommandEnvelope.decode(inbox.get(timeout=10))
    finally:
        device.stop()
    key = serialization.load_pem_public_key((run.home / "result-key.pem").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    command = verify_command(
        envelope.command, key, device_id=imported.devices[0].device_id, now_s=0, last_seq=0
    )
    assert command.kind is kind and command.seq == 1
    assert command.release_id == (
        imported.release.release_id if kind is CommandKind.UPDATE else None
    )
    ledger = run.json("ledger", "show")
    assert isinstance(ledger, list)
    assert any(e.get("kind") == "command" for e in ledger), ledger
    _one_line_error(run(*argv[:1], "nobody", *argv[2:], "--broker", broker.url))
    _one_line_error(run(*argv, "--broker", "http://nope"))


# --- policy and ledger ---------------------------------------------------------------------------


def test_policy_set_and_show(run: Cli) -> None:
    """A newer policy is stored and shown; an older version or a bad document is refused."""
    document = json.loads(run("policy", "show").stdout)
    document["version"] = 2
    document["forbid_smt"] = True
    assert run("policy", "set", run.write("p.json", json.dumps(document))).exit_code == 0
    assert json.loads(run("policy", "show").stdout)["forbid_smt"] is True
    _one_line_error(run("policy", "set", run.write("p.json", json.dumps(document))))
    _one_line_error(
        run("policy", "set", run.write("q.json", '{"format": 1, "version": 3, "x": 1}'))
    )


def test_ledger_verify_passes_then_finds_a_deleted_tail(run: Cli, rng: random.Random) -> None:
    """The ledger verifies after changes; deleting its last entry exits 1 naming the problem."""
    _populate(run, rng)
    report = run.json("ledger", "verify")
    assert isinstance(report, dict)
    assert report["ok"] is True
    assert report["entries"] > 3
    entries = run.json("ledger", "show")
    assert isinstance(entries, list)
    assert entries[-1]["seq"] == report["entries"]
    with sqlite3.connect(run.home / "registry.db") as conn:
        conn.execute("DELETE FROM ledger_entries WHERE seq = (SELECT max(seq) FROM ledger_entries)")
    line = _one_line_error(run("ledger", "verify"), code=1)
    assert "ledger.checkpoint" in line
    failed = run("ledger", "verify", "--json")
    assert failed.exit_code == 1
    assert json.loads(failed.stdout)["problems"][0]["kind"].startswith("ledger.")


# --- token verify --------------------------------------------------------------------------------


def test_token_verify_accepts_the_rfc9783_example(vectors: Path) -> None:
    """The RFC 9783 example verifies with the TF-M IAK; its dummy instance id is only info."""
    folder = vectors / "psa-rfc9783"
    args = [
        "token",
        "verify",
        str(folder / "psa-sign1.cbor"),
        "--key",
        str(folder / "tfm-es-iak.pem"),
    ]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["valid"] is True and report["signature"] == "valid"
    assert report["claims"]["profile"] == "tag:psacertified.org,2023:psa#tfm"
    assert report["info"] and not report["findings"]


def test_token_verify_reports_a_flipped_bit(vectors: Path, tmp_path: Path) -> None:
    """One flipped payload bit fails the signature: it says so and exits 1."""
    folder = vectors / "psa-rfc9783"
    token = bytearray((folder / "psa-sign1.cbor").read_bytes())
    token[len(token) // 2] ^= 0x01
    path = tmp_path / "flipped.cbor"
    path.write_bytes(bytes(token))
    result = CliRunner().invoke(
        cli, ["token", "verify", str(path), "--key", str(folder / "tfm-es-iak.pem")]
    )
    assert result.exit_code == 1
    assert "signature: does not verify" in result.stdout
    assert "token INVALID" in result.stdout


def test_token_verify_checks_the_nonce_and_the_key(vectors: Path, tmp_path: Path) -> None:
    """A wrong --nonce or another key exits 1; a missing file or bad hex exits 2 in one line."""
    folder = vectors / "psa-rfc9783"
    token, pem = str(folder / "psa-sign1.cbor"), str(folder / "tfm-es-iak.pem")
    runner = CliRunner()
    assert (
        runner.invoke(cli, ["token", "verify", token, "--key", pem, "--nonce", "00"]).exit_code == 1
    )
    good_nonce = "01" * 32
    assert (
        runner.invoke(
            cli, ["token", "verify", token, "--key", pem, "--nonce", good_nonce]
        ).exit_code
        == 0
    )
    other = tmp_path / "other.pem"
    other.write_bytes(_pem_public(ec.generate_private_key(ec.SECP256R1())))
    assert runner.invoke(cli, ["token", "verify", token, "--key", str(other)]).exit_code == 1
    _one_line_error(runner.invoke(cli, ["token", "verify", str(tmp_path / "none"), "--key", pem]))
    _one_line_error(runner.invoke(cli, ["token", "verify", token, "--key", pem, "--nonce", "zz"]))
    _one_line_error(runner.invoke(cli, ["token", "verify", token]))


def test_token_verify_reports_truncated_and_trailing_bytes(vectors: Path, tmp_path: Path) -> None:
    """A truncated token or one with trailing bytes is structurally invalid: exit 1."""
    folder = vectors / "psa-rfc9783"
    token = (folder / "psa-sign1.cbor").read_bytes()
    for name, data in (("short", token[:-5]), ("long", token + b"\x00")):
        path = tmp_path / name
        path.write_bytes(data)
        result = CliRunner().invoke(
            cli, ["token", "verify", str(path), "--key", str(folder / "tfm-es-iak.pem")]
        )
        assert result.exit_code == 1
        assert "structure:" in result.stdout


# --- the console script --------------------------------------------------------------------------


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed ``edgeseal-gateway`` prints help and initializes a workspace."""
    shown = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and "serve" in shown.stdout
    home = tmp_path / "gw"
    made = subprocess.run(
        [str(SCRIPT), "--home", str(home), "init", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["home"] == str(home)
    again = subprocess.run(
        [str(SCRIPT), "--home", str(home), "init"], capture_output=True, text=True, check=False
    )
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr


def test_python_dash_m_gateway_is_the_cli() -> None:
    """``python -m gateway`` is the same command line."""
    shown = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "gateway", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert shown.returncode == 0 and "token" in shown.stdout


def test_init_takes_its_home_from_the_option_or_the_environment(tmp_path: Path) -> None:
    """``init --home`` and ``$EDGESEAL_GATEWAY_HOME`` both pick the workspace directory."""
    runner = CliRunner()
    assert runner.invoke(cli, ["init", "--home", str(tmp_path / "a")]).exit_code == 0
    assert (tmp_path / "a" / "workspace.json").exists()
    env = {"EDGESEAL_GATEWAY_HOME": str(tmp_path / "b")}
    assert runner.invoke(cli, ["init"], env=env).exit_code == 0
    assert runner.invoke(cli, ["devices", "--json"], env=env).stdout.strip() == "[]"


def test_init_with_a_passphrase_protected_key_file(tmp_path: Path) -> None:
    """A ``file:`` spec with a passphrase works when the variable is set, else exits 2."""
    home = tmp_path / "p"
    spec = f"file:{tmp_path / 'k.key'};passphrase-env=GW_PASS"
    runner = CliRunner()
    _one_line_error(runner.invoke(cli, ["--home", str(home), "init", "--kms", spec]))
    result = runner.invoke(
        cli, ["--home", str(tmp_path / "q"), "init", "--kms", spec], env={"GW_PASS": "s3cret"}
    )
    assert result.exit_code == 0, result.output
    _one_line_error(runner.invoke(cli, ["--home", str(tmp_path / "r"), "init", "--kms", "nope:"]))


def test_challenge_secret_comes_from_the_environment_when_set(run: Cli) -> None:
    """``$EDGESEAL_GATEWAY_SECRET`` (hex) overrides the file; a short or non-hex one is refused."""
    workspace = open_workspace(run.home)
    assert workspace.challenge_secret({}) == (run.home / "challenge.secret").read_bytes()
    assert workspace.challenge_secret({"EDGESEAL_GATEWAY_SECRET": "ab" * 32}) == b"\xab" * 32
    for bad in ("ab" * 8, "zz"):
        with pytest.raises(WorkspaceError):
            workspace.challenge_secret({"EDGESEAL_GATEWAY_SECRET": bad})


def test_broker_urls_are_parsed_strictly() -> None:
    """mqtt://, tcp:// and bare host:port parse; other schemes, paths and bad ports do not."""
    assert parse_broker_url("mqtt://127.0.0.1:1884").port == 1884
    assert parse_broker_url("tcp://broker").port == 1883
    assert parse_broker_url("localhost:2000").host == "localhost"
    for bad in ("http://h", "mqtt://", "mqtt://h:99999", "mqtt://h/x", "mqtt://u@h"):
        with pytest.raises(UsageError):
            parse_broker_url(bad)
