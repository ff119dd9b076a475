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

    @property
    def ratio(self) -> float | None:
        """Measured rate over the bound."""
        return None if self.bound_ops_per_s is None else self.ops_per_s / self.bound_ops_per_s

    @property
    def meets_target(self) -> bool | None:
        """Whether the ratio meets the target (None when there is no target)."""
        ratio = self.ratio
        return None if ratio is None or self.target_ratio is None else ratio >= self.target_ratio


def rate(fn: Callable[[], object], *, min_time_s: float = 0.3, repeats: int = 5) -> float:
    """Operations per second of ``fn``: the best of ``repeats`` runs of at least ``min_time_s``."""
    fn()
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            fn()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time_s:
                break
        best = max(best, count / elapsed)
    return best


def rates_interleaved(
    fns: Mapping[str, Callable[[], object]], *, rounds: int = 15, burst_s: float = 0.08
) -> dict[str, float]:
    """Operations per second of each of ``fns``: the median of ``rounds`` bursts each, the bursts
    taken in turn (a, b, c, a, b, c, …).

    An operation and the primitives it is compared with are then timed over the same minutes, so
    a drift of the machine (another process, a VM's neighbour, the clock's boost) moves both and
    leaves their ratio alone; timed one after the other, the ratio carries the drift. The median,
    not the best burst: one lucky burst of either side would move the ratio.
    """
    for fn in fns.values():
        fn()
    bursts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            count, start = 0, time.perf_counter()
            while True:
                fn()
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= burst_s:
                    break
            bursts[name].append(count / elapsed)
    return {name: statistics.median(rates) for name, rates in bursts.items()}


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
    console.print(f"machine: {machine()}")
    return all(fig.meets_target is not False for fig in figures)
