"""The transition-table engine both attestation sessions share (h11 style)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Generic, NoReturn, TypeVar

from protocol.errors import LocalProtocolError, ProtocolViolation, RemoteProtocolError

StateT = TypeVar("StateT", bound=Enum)
StepT = TypeVar("StepT", bound=Enum)


class Machine(Generic[StateT, StepT]):
    """A state, a table of legal (state, step) → state rows, and ERROR for everything else."""

    __slots__ = ("_error", "_local", "_name", "_table", "state")

    def __init__(
        self,
        name: str,
        table: Mapping[tuple[StateT, StepT], StateT],
        *,
        initial: StateT,
        error: StateT,
        local_steps: frozenset[StepT],
    ) -> None:
        self._name = name
        self._table = table
        self._error = error
        self._local = local_steps
        self.state = initial

    def step(self, step: StepT) -> StateT:
        """Take ``step``; raises ``ProtocolViolation`` (and moves to ERROR) when it is not legal."""
        following = self._table.get((self.state, step))
        if following is None:
            kind = LocalProtocolError if step in self._local else RemoteProtocolError
            self.violate(kind, f"{step.name} is not legal in state {self.state.name}")
        self.state = following
        return following

    def violate(
        self, kind: type[ProtocolViolation], detail: str, cause: Exception | None = None
    ) -> NoReturn:
        """Move to ERROR for good and raise ``kind``."""
        self.state = self._error
        raise kind(f"{self._name}: {detail}") from cause
