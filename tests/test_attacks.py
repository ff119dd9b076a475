"""The attack playbook against the real gateway on mosquitto: every attack defended, no leak."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Final

import pytest

from device.attacks.catalog import ATTACKS, ATTACKS_BY_NAME, run_attack
from device.attacks.playbook import Bench, exfil_attempt
from device.attacks.report import Outcome, Where
from gateway.broker import running_mosquitto
from protocol.errors import UsageError
from tests.attack_reports import assert_defended_where_expected

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_genuine_board_runs_and_leaks_nothing(attack_bench: Bench) -> None:
    """Control: the untouched board attests, gets its key and runs; the scan stays clean."""
    attack_bench.installed(
        attack_bench.devices[0]
    )  # as it was once it confirmed its image, whatever ran before
    ran = attack_bench.boot(attack_bench.devices[0])
    assert ran.state == "running" and ran.released, ran.log[-800:]
    scan = attack_bench.scanner().scan_paths(attack_bench.haystacks(attack_bench.devices[0]))
    assert scan.clean and scan.scanned_bytes > 0


#: (attack, where it must be detected): the parametrized cases of this module.
CASES: Final[list[tuple[str, tuple[Where, ...]]]] = [
    ("flash-dump", (Where.PREVENTED,)),
    ("ciphertext-bitflip", (Where.DEVICE,)),
    ("manifest-tamper", (Where.DEVICE,)),
    ("bl2-tamper", (Where.DEVICE,)),
    ("debug-unlock", (Where.GATEWAY, Where.LEDGER)),
    ("flash-clone", (Where.GATEWAY, Where.LEDGER)),
    ("nw-memory", (Where.PREVENTED,)),
    ("revoked", (Where.GATEWAY, Where.LEDGER)),
    ("exfil-runtime", (Where.GATEWAY, Where.LEDGER)),
    ("power-cut", (Where.DEVICE,)),
    ("malformed-frames", (Where.DEVICE,)),
    ("evidence-replay", (Where.GATEWAY,)),
    ("image-swap", (Where.DEVICE,)),
    ("stage-rollback", (Where.DEVICE,)),
]


@pytest.mark.parametrize(("name", "where"), CASES)
def test_attack_is_defended_where_expected(
    attack_bench: Bench, name: str, where: tuple[Where, ...]
) -> None:
    """The attack is stopped at its expected point and the leak scan finds nothing."""
    assert_defended_where_expected(run_attack(attack_bench, name), name, *where)


def test_negative_control_weakened_policy_lets_the_exfiltration_through(
    attack_bench: Bench,
) -> None:
    """With skip_measurement_checks the exfiltrating runtime gets the key; the scanner sees it."""
    report = exfil_attempt(attack_bench, weakened=True)
    assert report.error is None, report.error
    assert report.evidence["released"] is True
    assert report.outcome is Outcome.BREACHED
    leaked_into = {str(leak["haystack"]).rsplit("/", 1)[-1] for leak in report.leaks}
    assert "exfil.bin" in leaked_into, report.leaks
    assert "exfil-capture.bin" in leaked_into, report.leaks  # it sent them out over MQTT too
    assert any("secret_filter" in str(leak["secret"]) for leak in report.leaks)
    assert any(str(leak["secret"]).startswith("canary:") for leak in report.leaks)
    restored = run_attack(attack_bench, "exfil-runtime")  # the policy is back: refused again
    assert restored.outcome is Outcome.DEFENDED and not restored.leaks


def test_power_cut_covers_100_cut_points(attack_bench: Bench) -> None:
    """The power-cut attack really cuts at 100 distinct points."""
    report = run_attack(attack_bench, "power-cut")
    assert report.evidence["cuts"] == 100 and report.evidence["failures"] == []


def test_every_playbook_attack_is_tested() -> None:
    """Each attack of the catalog is a case of ``CASES`` in one of the tests/test_attacks*.py."""
    tested: set[str] = set()
    for path in sorted(Path(__file__).parent.glob("test_attacks*.py")):
        module = importlib.import_module(f"tests.{path.stem}")
        tested |= {name for name, _ in getattr(module, "CASES", [])}
    assert {a.name for a in ATTACKS} == tested


def test_reports_are_json_ready(attack_bench: Bench) -> None:
    """A report serialises to JSON with its outcome and detection points."""
    report = run_attack(attack_bench, "flash-dump")
    data = json.loads(json.dumps(report.to_json()))
    assert data["outcome"] == "defended" and data["detected_at"] == ["prevented"]
    with pytest.raises(UsageError):
        run_attack(attack_bench, "no-such-attack")


def test_attack_cli_lists_and_runs_one_attack(tmp_path: Path) -> None:
    """``attack list --json`` names every attack; ``attack flash-dump --json`` reports defended.

    On a private mosquitto: two benches' gateways on one broker would both answer its devices.
    """
    from click.testing import CliRunner

    from device.attacks.cli import attack

    runner = CliRunner()
    listed = runner.invoke(attack, ["list", "--json"])
    assert listed.exit_code == 0
    assert {a["name"] for a in json.loads(listed.output)["attacks"]} == set(ATTACKS_BY_NAME)
    home = tmp_path / "attack_bench"
    with running_mosquitto() as private:
        argv = ["flash-dump", "--home", str(home), "--broker", private.url]
        ran = runner.invoke(attack, [*argv, "--json"])
        busy = runner.invoke(attack, argv)
    assert ran.exit_code == 0, ran.output
    (report,) = json.loads(ran.output)
    assert report["name"] == "flash-dump" and report["outcome"] == "defended"
    assert busy.exit_code != 0  # the bench never reuses a non-empty directory


def test_attack_all_reports_every_attack_defended_where_expected(tmp_path: Path) -> None:
    """``edgeseal-device attack all --json``, the console script in a subprocess, on a bench of
    its own: every attack of the catalog reported defended, detected at each of its expected
    points, with zero leaks; exit 0."""
    import subprocess
    import sys

    with running_mosquitto() as private:
        argv = [sys.executable, "-m", "device", "attack", "all", "--json"]
        argv += ["--home", str(tmp_path / "attack_bench"), "--broker", private.url]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    reports = json.loads(proc.stdout)
    assert [r["name"] for r in reports] == [a.name for a in ATTACKS]
    for report in reports:
        assert report["outcome"] == "defended", report
        assert set(report["expected_at"]) <= set(report["detected_at"]), report
        assert report["leaks"] == [] and report["scanned_bytes"] > 0, report
