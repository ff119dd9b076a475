"""The attacks on the board's image history, clock and normal world (device/attacks/board.py):
real gateway, real mosquitto, real device processes."""

from __future__ import annotations

from typing import Final

import pytest

from device.attacks.board import NEWER_VERSION
from device.attacks.playbook import Bench, run_json
from device.attacks.report import AttackReport, Where
from protocol.reasons import ReasonCode
from tests.attack_reports import assert_defended_where_expected, report_of

pytestmark = [pytest.mark.slow, pytest.mark.broker]


#: (attack, where it must be detected): the parametrized cases of this module.
CASES: Final[list[tuple[str, tuple[Where, ...]]]] = [
    ("rollback", (Where.DEVICE, Where.GATEWAY, Where.LEDGER)),
    ("clock-rollback", (Where.DEVICE,)),
    ("nw-forged-evidence", (Where.GATEWAY, Where.LEDGER)),
]


@pytest.mark.parametrize(("name", "where"), CASES)
def test_attack_is_defended_where_expected(
    attack_bench: Bench,
    attack_reports: dict[str, AttackReport],
    name: str,
    where: tuple[Where, ...],
) -> None:
    """The attack is stopped at its expected point and the leak scan finds nothing."""
    report = report_of(attack_bench, attack_reports, name)
    assert_defended_where_expected(report, name, *where)


def test_rollback_is_refused_below_the_fuse_counter_and_as_counter_rollback(
    attack_bench: Bench, attack_reports: dict[str, AttackReport]
) -> None:
    """The reflashed 1.0.0 image and its sealed key, which booted offline at counter 1, are
    refused at counter 2; online the board is put back on 2.0.0; with the fuses glitched back
    the gateway refuses exactly counter.rollback and releases nothing."""
    report = report_of(attack_bench, attack_reports, "rollback")
    evidence = report.evidence
    assert evidence["offline_before_update"] == "ok", report.to_json()
    assert evidence["offline_after_update"] == "image_refused", report.to_json()
    assert evidence["updated_seen"] == ["affirming"]
    assert evidence["healed_to_newer"] is True and evidence["healed_released"] is True
    assert report.reasons == (ReasonCode.COUNTER_ROLLBACK.value,)
    assert evidence["released"] is False
    device = str(evidence["device"])
    timeline = run_json(*attack_bench.gw, "device", device, "--json")
    assert isinstance(timeline, dict)
    last = [t for t in timeline["timeline"] if t["event"] == "verdict"][-1]
    assert (last["status"], last["reasons"]) == ("contraindicated", ["counter.rollback"])
    assert NEWER_VERSION in report.what_happened
    # The attack spent a board of its own: the bench's shared boards still run.
    attack_bench.installed(attack_bench.devices[0])
    assert attack_bench.boot(attack_bench.devices[0]).state == "running"


def test_clock_rollback_gets_exactly_the_leases_boots(
    attack_bench: Bench, attack_reports: dict[str, AttackReport]
) -> None:
    """Whatever the board's clock says, the lease's N offline boots run and no more; a rolled
    back NV store does not give boots back (they are counted in a fuse)."""
    report = report_of(attack_bench, attack_reports, "clock-rollback")
    boots = report.evidence["lease_boots"]
    assert isinstance(boots, int) and boots >= 1
    outcomes = report.evidence["offline"]
    assert isinstance(outcomes, list)
    assert [(allowed, reason) for _, allowed, reason in outcomes] == [(True, "ok")] * boots + [
        (False, "boots_spent"),
        (False, "boots_spent"),
    ], report.to_json()
    assert report.evidence["offline_boots_fuse"] == boots
    assert report.reasons == ()  # offline: the gateway saw nothing after the genuine attestation


def test_forged_and_edited_tokens_are_refused_as_bad_signatures(
    attack_bench: Bench, attack_reports: dict[str, AttackReport]
) -> None:
    """A token under the NW's own key and two genuine tokens with edited claims are each refused
    exactly evidence.signature.invalid; no key is released."""
    report = report_of(attack_bench, attack_reports, "nw-forged-evidence")
    invalid = [ReasonCode.EVIDENCE_SIGNATURE_INVALID.value]
    assert report.evidence["refusals"] == {
        "own-key": invalid,
        "rebind": invalid,
        "secure-boot": invalid,
    }, report.to_json()
    assert report.reasons == tuple(invalid)
    assert report.evidence["released"] is False
