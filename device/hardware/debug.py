"""The board's debug port (DESIGN §4): an unlock request that takes effect at the next reset.

No file of its own. ``request_unlock`` sets the ``debug_unlock_pending`` flag in ``fuses.bin``
(see ``fuses.py`` for its format); at the next reset the RoT calls ``apply_at_reset``, which clears
the flag and moves the lifecycle to NON_PSA_ROT_DEBUG (0x4000) for good, in one atomic write. From
then on every HUK-derived key is of the debug class, and the platform claim says the port is open.
"""

from __future__ import annotations

from pathlib import Path

from device.hardware.fuses import FUSES_FILE, Fuses, Lifecycle, lifecycle_class

#: Lifecycle classes in which the debug port is closed; every other class reports it open
#: (unknown, assembly and test, provisioning and the debug states).
_CLOSED_CLASSES = frozenset(
    lifecycle_class(state) for state in (Lifecycle.SECURED, Lifecycle.DECOMMISSIONED)
)


class DebugPort:
    """The physical debug connector of the board whose home directory is ``home``."""

    __slots__ = ("home",)

    def __init__(self, home: Path) -> None:
        self.home = home

    def request_unlock(self) -> None:
        """Ask for a debug unlock; it takes effect at the next reset.

        Raises:
            FuseFileError: the board has no readable fuse file.
        """
        Fuses.load(self.home / FUSES_FILE).request_debug_unlock()

    def is_open(self) -> bool:
        """Whether the port is open now (the lifecycle in force, not a pending request)."""
        return debug_port_open(Fuses.load(self.home / FUSES_FILE).lifecycle)


def apply_at_reset(fuses: Fuses) -> bool:
    """Apply a pending unlock at reset (the RoT calls this first thing). Returns whether it did."""
    return fuses.complete_debug_unlock()


def debug_port_open(lifecycle: int) -> bool:
    """The platform claim: is the debug port open in this lifecycle (``value >> 8`` class)?"""
    return lifecycle_class(lifecycle) not in _CLOSED_CLASSES
