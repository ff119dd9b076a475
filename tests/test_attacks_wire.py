"""The attacks on what crosses MQTT (device/attacks/wire.py): real gateway, real mosquitto."""

from __future__ import annotations

from typing import Final

import pytest

from device.attacks.playbook import Bench, run_json
from device.attacks.report import AttackReport, Where
from protocol.reasons import ReasonCode
from tests.attack_reports import assert_defended_where_expected, report_of

pytestmark = [pytest.mark.slow, pytest.mark.broker]


#: (attack, where it must be detected): the parametrized cases of this module.
CASES: Final[list[tuple[str, tuple[Where, ...]]]] = [
    ("stale-challenge", (Where.GATEWAY, Where.LEDGER)),
    ("grant-mitm", (Where.GATEWAY, Where.LEDGER, Where.PREVENTED)),
    ("forged-command", (Where.DEVICE,)),
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


def test_stale_challenge_is_refused_as_expired_and_the_lifetime_is_restored(
    attack_bench: Bench, attack_reports: dict[str, AttackReport]
) -> None:
    """The refusal is exactly challenge.expired, no key; the bench's policy is as it was."""
    report = report_of(attack_bench, attack_reports, "stale-challenge")
    assert report.evidence["refusal"] == [ReasonCode.CHALLENGE_EXPIRED.value], report.to_json()
    assert report.reasons == (ReasonCode.CHALLENGE_EXPIRED.value,)
    assert report.evidence["released"] is False
    policy = run_json(*attack_bench.gw, "policy", "show")
    assert isinstance(policy, dict) and policy["challenge_ttl_s"] == 30


def test_grant_mitm_breaks_the_binding_and_the_captured_grant_stays_shut(
    attack_bench: Bench, attack_reports: dict[str, AttackReport]
) -> None:
    """The substituted key is refused as a binding mismatch; a sniffed grant does not open."""
    report = report_of(attack_bench, attack_reports, "grant-mitm")
    assert report.evidence["refusal"] == [ReasonCode.EVIDENCE_BINDING_MISMATCH.value]
    assert report.evidence["released"] is False
    assert report.evidence["genuine_board"] == "running"  # a real grant was on the wire
    assert report.evidence["captured_grant_opened"] is False


def test_forged_replayed_and_rolled_back_commands_are_refused_by_the_enclave(
    attack_bench: Bench, attack_reports: dict[str, AttackReport]
) -> None:
    """The NW logs each refusal; the enclave names the signature, then the replayed sequence."""
    report = report_of(attack_bench, attack_reports, "forged-command")
    assert report.error is None, report.error
    nw = report.evidence["nw"]
    assert nw == {
        "forged": "refused",
        "genuine": "applied",
        "replayed": "refused",
        "rolled_back": "refused",
    }, report.to_json()
    door = report.evidence["door"]
    assert isinstance(door, dict)
    assert door["forged"] == "command: signed command: signature does not verify"
    assert door["replayed"] == "command: signed command: replayed sequence number"
    assert door["rolled_back"] == "command: signed command: replayed sequence number"
