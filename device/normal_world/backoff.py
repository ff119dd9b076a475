"""Retry delays: capped exponential backoff with full jitter, from an injected RNG.

Delay n (counting from 0) is uniform in ``[floor_s, min(cap_s, base_s · 2ⁿ))`` ("full jitter",
so a fleet that lost its broker at the same moment does not come back in lockstep). The RNG is a
parameter — a ``random.Random`` in tests, ``random.SystemRandom`` in the agent — so a test can
predict every delay. Nothing here sleeps: the caller waits on its own clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol

#: The largest exponent used, so ``2 ** attempt`` never grows without bound.
_MAX_EXPONENT: Final = 32


class UniformRng(Protocol):
    """What the backoff needs of an RNG: ``random.Random.random`` (a float in [0, 1))."""

    def random(self) -> float:
        """A float in [0, 1)."""
        ...


@dataclass(slots=True)
class Backoff:
    """Successive retry delays for one kind of failure; ``reset`` after a success."""

    rng: UniformRng
    base_s: float = 0.5
    cap_s: float = 30.0
    floor_s: float = 0.05
    attempt: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.floor_s <= self.base_s <= self.cap_s:
            raise ValueError("backoff: expected 0 <= floor_s <= base_s <= cap_s")

    def next_delay_s(self) -> float:
        """The delay before the next retry; each call counts one more failed attempt."""
        ceiling = min(self.cap_s, self.base_s * float(1 << min(self.attempt, _MAX_EXPONENT)))
        self.attempt += 1
        return self.floor_s + (ceiling - self.floor_s) * self.rng.random()

    def reset(self) -> None:
        """Start again from the base delay (after a success)."""
        self.attempt = 0
