"""Every attack of the playbook, by name, and running one (DESIGN §13).

``playbook`` holds the bench and the attacks on the board's storage and boot; ``wire`` the
attacks on what crosses MQTT (challenges, grants, commands); ``board`` those on the board's
image history, clock and normal world. This module joins them; the CLI and the tests read it.
"""

from __future__ import annotations

from typing import Final

from device.attacks import board, playbook, wire
from device.attacks.playbook import Attack, Bench, BenchError
from device.attacks.report import AttackReport
from protocol.errors import UsageError

ATTACKS: Final[tuple[Attack, ...]] = (*playbook.ATTACKS, *wire.ATTACKS, *board.ATTACKS)
ATTACKS_BY_NAME: Final = {a.name: a for a in ATTACKS}


def run_attack(bench: Bench, name: str) -> AttackReport:
    """Run one attack by name; a harness failure becomes a report with ``error``.

    Raises:
        UsageError: no attack has that name.
    """
    attack = ATTACKS_BY_NAME.get(name)
    if attack is None:
        raise UsageError(f"no attack named {name!r}; see 'attack list'")
    try:
        return attack.run(bench)
    except (BenchError, OSError, ValueError) as err:
        return AttackReport(
            name=name,
            attacker_did=attack.attacker_did,
            defence_expected=attack.defence,
            what_happened="the harness failed",
            expected_at=attack.expected_at,
            detected_at=(),
            error=str(err)[:300],
        )
