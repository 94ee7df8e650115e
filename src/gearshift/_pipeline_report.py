"""What a pipeline run did, stage by stage, and which stage limits the whole.

Read by people (``str(report)`` is a table with the bottleneck and what would lift it) and by
code (``report.stages``, ``report.bottleneck``). ``report.plot()`` draws the throughput of each
stage and the queue in front of it over time (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageReport:
    """One stage: what went in and out, how busy its workers were, how long its queue was."""

    name: str
    kind: str  # "map", "filter" or "flat_map"
    gear: str  # the gear's description, e.g. "process gear, 2 workers"
    gear_name: str  # its name in the gear table ("process"), for the advice
    workers: int
    items_in: int = 0
    items_out: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    passed: int = 0  # earlier failures passed through untouched (errors="collect")
    busy: float = 0.0  # seconds its calls took, summed
    wall: float = 0.0
    active: float = 0.0  # seconds from its first item in to its last item out (0: unknown, use wall)
    mean_queue: float = 0.0  # items waiting in front of it, time-averaged
    buffer: int = 0  # the most that may wait in front of it
    chunksize: int = 1  # the largest batch it handed its gear
    reasons: list[str] = field(default_factory=list)

    @property
    def busy_share(self) -> float:
        """Share of its workers' time in calls while it had work to do (1.0: every worker always busy).

        Counted over its active span, not the whole run: a pipeline fills and drains, and a
        stage cannot be busy before its first item reaches it."""
        slots = (self.active or self.wall) * max(1, self.workers)
        return min(1.0, self.busy / slots) if slots > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Items out per second over the run."""
        return self.items_out / self.wall if self.wall > 0 else 0.0

    @property
    def capacity(self) -> float:
        """Items per second this stage could take with every worker busy: the bound it sets."""
        calls = self.items_in - self.passed
        if self.busy <= 0 or calls <= 0:
            return float("inf")
        return calls * max(1, self.workers) / self.busy


@dataclass
class PipelineReport:
    """A pipeline run: one ``StageReport`` per stage, the output count, the wall time, the bottleneck."""

    stages: list[StageReport]
    items: int = 0  # results out of the last stage
    wall: float = 0.0
    ordered: bool = True
    cores: int = 1
    #: (seconds since start, queue length in front of each stage, items out of each stage so far)
    samples: list[tuple[float, list[int], list[int]]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.items / self.wall if self.wall > 0 else 0.0

    @property
    def bottleneck(self) -> StageReport | None:
        """The stage that limits the whole: the lowest ``capacity`` (the items per second it can
        take with every worker busy, from its measured call times); None when no stage did work."""
        worked = [s for s in self.stages if s.busy > 0 and s.capacity != float("inf")]
        if not worked:
            return None
        return min(worked, key=lambda s: s.capacity)

    def lift(self) -> str:
        """What would lift the bottleneck, in words."""
        stage = self.bottleneck
        if stage is None:
            return ""
        return _lift(stage, self.cores)

    def __str__(self) -> str:
        head = ("stage", "gear", "in", "out", "failed", "busy", "items/s", "queue")
        rows = [head]
        for s in self.stages:
            queue = f"{s.mean_queue:.1f}/{s.buffer}" if s.buffer else "(source)"
            rows.append((
                s.name, s.gear, str(s.items_in), str(s.items_out), str(s.failed),
                f"{s.busy_share:.0%}", f"{s.throughput:,.1f}", queue,
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            f"pipeline: {self.items} items out in {self.wall:.3f}s ({self.throughput:,.1f}/s), "
            f"{'ordered' if self.ordered else 'unordered'}, {len(self.stages)} stages"
        ]
        for r in rows:
            cells = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            lines.append("  " + "  ".join(cells))
        b = self.bottleneck
        if b is not None:
            bound = "" if b.capacity == float("inf") else f", which bounds the whole at about {b.capacity:,.1f} items/s"
            lines.append(f"bottleneck: {b.name} ({b.gear}, busy {b.busy_share:.0%} while it had work){bound}")
            lines.append(f"to lift it: {self.lift()}")
        for s in self.stages:
            lines.extend(f"{s.name}: {reason}" for reason in s.reasons)
        return "\n".join(lines)

    def plot(self, path: str | None = None) -> Any:
        """Throughput of each stage and the queue in front of it, over time; saved to ``path`` if given.

        Returns the matplotlib Figure. Needs matplotlib (``pip install 'gearshift[plot]'``).
        """
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("report.plot() needs matplotlib: pip install 'gearshift[plot]'") from None
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
        samples = self.samples
        times = [t for t, _, _ in samples]
        for k, stage in enumerate(self.stages):
            rates = [0.0]
            for (t0, _, out0), (t1, _, out1) in itertools.pairwise(samples):
                rates.append((out1[k] - out0[k]) / (t1 - t0) if t1 > t0 else 0.0)
            top.plot(times, rates[: len(times)], label=stage.name)
            bottom.plot(times, [q[k] for _, q, _ in samples], label=stage.name)
        top.set_ylabel("items/s out")
        bottom.set_ylabel("queue in front")
        bottom.set_xlabel("seconds")
        top.legend(loc="upper right")
        b = self.bottleneck
        top.set_title(f"pipeline: {self.throughput:,.1f} items/s" + (f", bottleneck {b.name}" if b else ""))
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def _lift(stage: StageReport, cores: int) -> str:
    n = max(1, stage.workers)
    gear = stage.gear_name
    if gear == "serial":
        return (f"run {stage.name} concurrently: gear='thread' if it waits (I/O), gear='process' if it "
                "computes in pure Python")
    if gear == "process":
        if n < cores:
            return f"more workers for {stage.name} (workers={min(cores, 2 * n)}; this machine has {cores} cores)"
        return (f"{stage.name} has a process per core already: a faster function (a compiled kernel), "
                "fewer or lighter items to pickle, or a cluster gear when one machine is not enough")
    if gear in ("thread", "async"):
        more = "concurrency" if gear == "async" else "workers"
        return (f"more {more} for {stage.name} ({more}={2 * n}) if it waits on I/O; if it computes "
                "while holding the GIL, gear='process'")
    return f"more workers for {stage.name} (workers={2 * n}), or another gear"
