"""``gearshift bench``: the same work in each gear side by side, and the speedup plot.

CPU time counts this process and its worker processes (``os.times`` includes the
children once they are reaped, which every gear does when its run ends), so "CPU use"
shows how many cores a gear really kept busy.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

import gearshift as gs
from gearshift._cli.inputs import Format, Item, read_items
from gearshift._gears import cpu_count


@dataclass(frozen=True)
class Row:
    gear: str
    workers: int
    wall: float
    cpu: float
    failed: int
    speedup: float = 1.0

    @property
    def cpu_use(self) -> float:
        return self.cpu / self.wall if self.wall > 0 else 0.0


def default_workers() -> list[int]:
    """1, 2, 4... up to twice the cores (threads and async can use more than the cores)."""
    top = 2 * cpu_count()
    return [n for n in (2**k for k in range(12)) if n <= top]


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--plot needs matplotlib, which is not installed: pip install 'gearshift[plot]'"
        ) from None


def load_sample(path: str, fmt: Format, kwargs: bool, limit: int) -> list[Item]:
    """The first ``limit`` valid inputs (malformed lines are left out, and counted on stderr)."""
    bad = 0
    items: list[Item] = []
    for item in read_items(path, fmt, kwargs=kwargs):
        if item.error is not None:
            bad += 1
            continue
        items.append(item)
        if len(items) >= limit:
            break
    if bad:
        click.echo(f"gearshift: left out {bad} malformed input line(s)", err=True)
    return items


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(call: Callable[[Any], Any], items: list[Item], gear: str, workers: int | None) -> Row:
    cpu0, start = _cpu(), time.perf_counter()
    results = gs.map(call, items, gear=gear, workers=workers, errors="collect")
    wall = time.perf_counter() - start
    failed = sum(isinstance(r, gs.Failure) for r in results)
    return Row(gear, results.report.workers or (workers or 1), wall, _cpu() - cpu0, failed)


def run_bench(
    call: Callable[[Any], Any], items: list[Item], gears: list[str], workers: list[int],
    echo: Callable[[str], None] | None = None,
) -> list[Row]:
    """Serial first (the baseline), then every gear at every worker count."""
    say = echo or (lambda text: click.echo(text, err=True))
    runs = [("serial", 1)]
    for gear in gears:
        if gear == "serial":
            continue
        if gear == "auto":
            runs.append(("auto", 0))  # auto picks its own workers
            continue
        runs.extend((gear, n) for n in workers)
    rows: list[Row] = []
    for gear, n in runs:
        say(f"  {gear} gear, {n or 'auto'} worker(s)...")
        rows.append(measure(call, items, gear, n or None))
    base = rows[0].wall
    rows = [Row(r.gear, r.workers, r.wall, r.cpu, r.failed, base / r.wall if r.wall > 0 else 0.0) for r in rows]
    if "serial" not in gears:
        rows[0] = Row("serial", 1, rows[0].wall, rows[0].cpu, rows[0].failed, 1.0)  # shown as the baseline
    return rows


def table(rows: list[Row]) -> str:
    head = f"{'gear':<10}{'workers':>8}{'wall s':>10}{'speedup':>9}{'CPU s':>9}{'CPU use':>9}{'failed':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.gear:<10}{r.workers:>8}{r.wall:>10.3f}{r.speedup:>8.2f}x{r.cpu:>9.3f}{r.cpu_use:>8.1f}x{r.failed:>8}"
        )
    lines.append("speedup: serial wall / this wall; CPU use: CPU seconds per wall second (cores kept busy)")
    return "\n".join(lines)


def parallel_fraction(rows: list[Row]) -> tuple[float, Row | None]:
    """Amdahl's p fitted to the best speedup seen with more than one worker."""
    multi = [r for r in rows if r.workers > 1 and r.speedup > 0]
    if not multi:
        return 0.0, None
    best = max(multi, key=lambda r: r.speedup)
    if best.speedup <= 1:
        return 0.0, best
    p = (1 - 1 / best.speedup) / (1 - 1 / best.workers)
    return min(1.0, max(0.0, p)), best


def amdahl(p: float, n: float) -> float:
    return 1.0 / ((1 - p) + p / n)


def plot(rows: list[Row], path: str, title: str) -> None:
    """Speedup against workers for each gear, with the ideal line and the fitted Amdahl curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    top = max([r.workers for r in rows] + [2])
    xs = [1 + (top - 1) * i / 100 for i in range(101)]
    ax.plot(xs, xs, ":", color="grey", label="ideal (linear)")
    p, best = parallel_fraction(rows)
    if best is not None and p > 0:
        ax.plot(xs, [amdahl(p, x) for x in xs], "--", color="black",
                label=f"Amdahl, p={p:.2f} (fitted to {best.gear} x{best.workers})")
    markers = itertools.cycle("osD^v<>")
    for gear, group in itertools.groupby(sorted(rows, key=lambda r: (r.gear, r.workers)), key=lambda r: r.gear):
        pts = list(group)
        ax.plot([r.workers for r in pts], [r.speedup for r in pts], marker=next(markers), label=gear)
    ax.axvline(cpu_count(), color="tab:gray", alpha=0.25, linewidth=6, label=f"cores ({cpu_count()})")
    ax.set_xlabel("workers")
    ax.set_ylabel("speedup over serial")
    ax.set_title(title, fontsize=10)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.workers for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
