"""A tiny timing harness: best-of-N rates (alone or interleaved), printed as a rich table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured operation: its rate and, when it has one, the bound it is compared with."""

    name: str
    ops_per_s: float
    bound_ops_per_s: float | None = None
    target_ratio: float | None = None
    #: The ratio measured round by round (``Bursts.ratio``), when it was; else rate over bound.
    paired_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        """Measured rate over the bound."""
        if self.paired_ratio is not None:
            return self.paired_ratio
        return None if self.bound_ops_per_s is None else self.ops_per_s / self.bound_ops_per_s

    @property
    def meets_target(self) -> bool | None:
        """Whether the ratio meets the target (None when there is no target)."""
        ratio = self.ratio
        return None if ratio is None or self.target_ratio is None else ratio >= self.target_ratio


def rate(fn: Callable[[], object], *, min_time_s: float = 0.3, repeats: int = 5) -> float:
    """Operations per second of ``fn``: the best of ``repeats`` runs of at least ``min_time_s``."""
    fn()
    return max(_burst(fn, min_time_s) for _ in range(repeats))


def _burst(fn: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``fn`` called in a loop for at least ``seconds``."""
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


@dataclass(frozen=True, slots=True)
class Bursts:
    """The rates of interleaved bursts: ``by_name[name][r]`` is ``name``'s rate in round ``r``."""

    by_name: Mapping[str, list[float]]

    def rate(self, name: str) -> float:
        """The median of ``name``'s bursts."""
        return statistics.median(self.by_name[name])

    def ratio(self, name: str, bound_parts: tuple[str, ...]) -> float:
        """``name``'s rate over the bound of ``bound_parts`` (1 / Σ 1 / rate), round by round,
        and the median of those ratios.

        Each round's bursts are timed within a fraction of a second of each other, so a round's
        ratio compares the operation and its primitives on the machine as it was then; a ratio of
        medians may pair an operation's median from the VM's slow moments with primitives'
        medians from its fast ones (seen here: the same code read 0.78 to 0.86 that way).
        """
        rounds = len(self.by_name[name])
        return statistics.median(
            self.by_name[name][r] / combined(*(self.by_name[p][r] for p in bound_parts))
            for r in range(rounds)
        )


def bursts_interleaved(
    fns: Mapping[str, Callable[[], object]], *, rounds: int = 15, burst_s: float = 0.08
) -> Bursts:
    """``rounds`` bursts of each of ``fns``, taken in turn (a, b, c, a, b, c, …).

    An operation and the primitives it is compared with are then timed over the same seconds, so
    a drift of the machine (another process, a VM's neighbour, the clock's boost) moves both;
    timed one after the other, the ratio carries the drift. Medians, not the best burst: one
    lucky burst of either side would move the ratio.
    """
    for fn in fns.values():
        fn()
    bursts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            bursts[name].append(_burst(fn, burst_s))
    return Bursts(bursts)


def rates_interleaved(
    fns: Mapping[str, Callable[[], object]], *, rounds: int = 15, burst_s: float = 0.08
) -> dict[str, float]:
    """Operations per second of each of ``fns``: the median of its ``bursts_interleaved``."""
    bursts = bursts_interleaved(fns, rounds=rounds, burst_s=burst_s)
    return {name: bursts.rate(name) for name in fns}


def combined(*rates: float) -> float:
    """The rate of doing one operation of each rate in sequence: 1 / Σ (1 / rate)."""
    return 1.0 / sum(1.0 / r for r in rates)


def machine() -> str:
    """A one-line description of this machine."""
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{python}, {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"


def report(title: str, figures: list[Figure]) -> bool:
    """Print ``figures``; True when every target is met."""
    table = Table(title=title)
    for column in ("operation", "ops/s", "bound ops/s", "ratio", "target", "met"):
        table.add_column(column, justify="right" if column != "operation" else "left")
    for fig in figures:
        ratio, met = fig.ratio, fig.meets_target
        table.add_row(
            fig.name,
            f"{fig.ops_per_s:,.0f}",
            "" if fig.bound_ops_per_s is None else f"{fig.bound_ops_per_s:,.0f}",
            "" if ratio is None else f"{ratio:.2f}",
            "" if fig.target_ratio is None else f"≥ {fig.target_ratio:.2f}",
            "" if met is None else ("yes" if met else "NO"),
        )
    console = Console()
    console.print(table)
    if any(fig.paired_ratio is not None for fig in figures):
        console.print(
            "ops/s and bound: medians of interleaved bursts; ratio: the median of the rounds' "
            "own ratios (timing.Bursts.ratio)"
        )
    console.print(f"machine: {machine()}")
    return all(fig.meets_target is not False for fig in figures)
