"""Shared by the tests/test_attacks*.py modules: an attack run once, and what defended means."""

from __future__ import annotations

from device.attacks.catalog import ATTACKS_BY_NAME, run_attack
from device.attacks.playbook import Bench
from device.attacks.report import AttackReport, Outcome, Where


def report_of(bench: Bench, reports: dict[str, AttackReport], name: str) -> AttackReport:
    """The report of ``name``, running it on first use (attacks take seconds each)."""
    if name not in reports:
        reports[name] = run_attack(bench, name)
    return reports[name]


def assert_defended(report: AttackReport, *where: Where) -> None:
    """Defended, detected at each of ``where``, zero leaks, something scanned."""
    assert report.error is None, report.error
    assert report.leaks == (), report.leaks
    assert report.scanned_bytes > 0
    for point in where:
        assert point in report.detected_at, report.to_json()
    assert report.outcome is Outcome.DEFENDED, report.to_json()


def assert_defended_where_expected(report: AttackReport, name: str, *where: Where) -> None:
    """``report`` is ``name``'s, expected where the catalog says, and defended at ``where``."""
    assert report.name == name and report.expected_at == ATTACKS_BY_NAME[name].expected_at
    assert_defended(report, *where)
