"""The lab: each claim of the course notes measured on this machine, with a verdict.

One module per family of claims (``cpu``, ``threads``, ``aio``, ``extras``), each claim one
experiment registered by id; ``_core`` holds the single verdict rule they all use and
``report`` turns findings into a table, JSON and an HTML page. ``gs.lab()`` and
``gearshift lab`` are the fronts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from gearshift._lab import aio, cpu, extras, threads  # noqa: F401  (importing them registers the experiments)
from gearshift._lab._core import REGISTRY, SIZES, VERDICTS, Context, Finding, Machine, Quantity, Verdict, this_machine
from gearshift._lab.report import table

#: The table's order: the issue's, which follows the notes.
ORDER = (
    "processes-for-cpu", "threads-for-io", "async-vs-threads", "free-threading", "upper-bound", "event-loop",
    "task-groups", "await-vs-task", "to-thread", "daemon-threads", "cancellation", "thread-pool", "locks",
    "fine-grained-locks", "process-pool", "compiled-kernel", "process-cost", "aiofiles", "http-clients",
)

LabSize = Literal["smallest", "quick", "full"]


def claim_ids() -> list[str]:
    """Every experiment's id, in the table's order."""
    known = [i for i in ORDER if i in REGISTRY]
    return known + sorted(set(REGISTRY) - set(known))


@dataclass
class LabReport:
    """The lab's findings on one machine: ``str()`` is the table, ``to_json()`` the full record."""

    machine: Machine
    size: str
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False  # set by a caller that caught Ctrl-C and keeps the findings so far

    def __str__(self) -> str:
        return table(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine.to_json(),
            "size": self.size,
            "seconds": round(self.seconds, 2),
            "interrupted": self.interrupted,
            "claims": [f.to_json() for f in self.findings],
        }

    def finding(self, claim_id: str) -> Finding:
        """The finding for one claim, by its id."""
        for f in self.findings:
            if f.id == claim_id:
                return f
        raise KeyError(claim_id)


def lab(only: Iterable[str] | None = None, size: LabSize = "quick", *,
        progress: Callable[[str], None] | None = None, on_finding: Callable[[Finding], None] | None = None,
        machine: Machine | None = None) -> LabReport:
    """Measure each claim of the course notes here and judge it; ``only`` picks claims by id.

    ``size``: "quick" (under 2 minutes on 2 cores), "full" (more repeats, bigger runs) or
    "smallest" (a smoke test: the numbers mean little). Ctrl-C stops it between or inside
    experiments, each of which joins its threads and closes its pools on the way out;
    ``on_finding`` sees each finding as it comes, so an interrupted caller keeps what was found.
    ``machine`` replaces the measured facts (cores, GIL...) the verdicts depend on.
    """
    ids = claim_ids() if only is None else list(only)
    unknown = [i for i in ids if i not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown claim id(s) {', '.join(unknown)}; choose from {', '.join(claim_ids())}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    say = progress or (lambda line: None)
    report = LabReport(machine or this_machine(), size)
    started = time.perf_counter()
    try:
        for i in ids:
            exp = REGISTRY[i]
            say(f"[{len(report.findings) + 1}/{len(ids)}] {i}: measuring...")
            ctx = Context(SIZES[size], report.machine, say, id=exp.id, claim=exp.claim)
            t0 = time.perf_counter()
            try:
                found = exp.run(ctx)
            except Exception as exc:  # one broken experiment must not hide the others' findings
                found = ctx.finding("not measurable here", [], f"the experiment failed: {type(exc).__name__}: {exc}",
                                    "a bug in the lab or an unusual machine: please report it")
            found.seconds = time.perf_counter() - t0
            report.findings.append(found)
            if on_finding is not None:
                on_finding(found)
    finally:
        report.seconds = time.perf_counter() - started
    return report


__all__ = ["VERDICTS", "Finding", "LabReport", "Machine", "Quantity", "Verdict", "claim_ids", "lab"]
