"""Typed results of an attack, and their JSON (DESIGN §13)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Where(StrEnum):
    """Where an attack was detected (or stopped)."""

    DEVICE = "device"
    GATEWAY = "gateway"
    LEDGER = "ledger"
    PREVENTED = "prevented"  # nothing to detect: the data the attacker got is useless


class Outcome(StrEnum):
    """How the attack ended for the defender."""

    DEFENDED = "defended"
    BREACHED = "breached"  # detected at the wrong point, or a leak found
    ERROR = "error"  # the harness could not run the attack


@dataclass(frozen=True, slots=True)
class AttackReport:
    """What the attacker did, the defence expected, what happened, where, and the leak scan."""

    name: str
    attacker_did: str
    defence_expected: str
    what_happened: str
    expected_at: tuple[Where, ...]
    detected_at: tuple[Where, ...]
    reasons: tuple[str, ...] = ()
    leaks: tuple[dict[str, object], ...] = ()
    scanned_bytes: int = 0
    evidence: dict[str, object] = field(default_factory=dict)
    error: str | None = None

    @property
    def outcome(self) -> Outcome:
        """Defended when detected at every expected point and no leak was found."""
        if self.error is not None:
            return Outcome.ERROR
        if self.leaks or not set(self.expected_at) <= set(self.detected_at):
            return Outcome.BREACHED
        return Outcome.DEFENDED

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (no secret bytes: findings carry names and offsets only)."""
        return {
            "name": self.name,
            "outcome": self.outcome.value,
            "attacker_did": self.attacker_did,
            "defence_expected": self.defence_expected,
            "what_happened": self.what_happened,
            "expected_at": [w.value for w in self.expected_at],
            "detected_at": [w.value for w in self.detected_at],
            "reasons": list(self.reasons),
            "leaks": list(self.leaks),
            "scanned_bytes": self.scanned_bytes,
            "evidence": self.evidence,
            "error": self.error,
        }
