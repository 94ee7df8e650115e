"""``Advice``: the choice, what it rests on, and a short report for humans."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from gearshift._advisor.model import Decision, Machine, Measurements, Prediction, _us, decide


@dataclass(slots=True)
class Advice:
    """Which gear to run a function in, with how many workers and what chunk size, and why.

    ``speedup`` is the predicted speedup over serial on this machine, ``bound`` Amdahl's
    upper bound for that gear given the measured serial part; ``predictions`` has both
    for every gear. ``print(advice)`` gives the short report.
    """

    gear: str
    workers: int
    chunksize: int
    speedup: float
    bound: float
    measurements: Measurements
    machine: Machine
    predictions: dict[str, Prediction] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    consider_compiled: bool = False
    fn_name: str = ""

    @classmethod
    def from_decision(cls, decision: Decision, m: Measurements, machine: Machine, fn_name: str = "") -> Advice:
        return cls(
            decision.gear, decision.workers, decision.chunksize, decision.speedup, decision.bound, m, machine,
            decision.predictions, decision.reasons, decision.consider_compiled, fn_name,
        )

    @classmethod
    def decide(
        cls, m: Measurements, machine: Machine, *, workers: int | None = None, remaining: int | None = None,
        fn_name: str = "",
    ) -> Advice:
        """The advice for injected measurements and machine facts (no measuring)."""
        return cls.from_decision(decide(m, machine, workers, remaining), m, machine, fn_name)

    def gear_options(self) -> dict[str, object]:
        """Keyword arguments for ``gs.map`` that follow this advice."""
        return {"gear": self.gear, "workers": self.workers, "chunksize": self.chunksize}

    def __str__(self) -> str:
        m, mc = self.measurements, self.machine
        name = f" for {self.fn_name}" if self.fn_name else ""
        head = f"gearshift advice{name}: {self.gear} gear"
        if self.gear != "serial":
            head += f", {self.workers} worker{'s' if self.workers != 1 else ''}"
            if self.chunksize > 1:
                head += f", chunksize {self.chunksize}"
        lines = [head]
        if self.gear == "serial":
            lines.append("  expected speedup: none (1.0x); concurrency cannot pay here")
        elif not self.speedup:
            lines.append("  predicted speedup: not measured (coroutine functions go straight to the async gear)")
        else:
            lines.append(f"  predicted speedup {self.speedup:.1f}x over serial (Amdahl bound on this machine: "
                         f"{self.bound:.1f}x)")
        gil = "GIL enabled" if mc.gil_enabled else "free-threaded (no GIL)"
        py = ".".join(map(str, sys.version_info[:3]))
        lines.append(f"  machine: {mc.cores} cores, {gil}, Python {py}, processes start by {mc.start_method}")
        calls = f"{m.samples} call{'s' if m.samples != 1 else ''}"
        measured = f"  measured on {calls}: {_us(m.per_item)} per call, waits {m.wait_fraction:.0%}"
        if m.is_coroutine:
            measured += ", coroutine function"
        if m.thread_scaling is not None:
            measured += f", holds the GIL {2 - m.thread_scaling:.0%} of the time"
        lines.append(measured)
        if not m.picklable:
            lines.append(f"  pickling: the function cannot be pickled ({m.pickle_error})")
        else:
            lines.append(f"  pickling item + result: {_us(m.pickle_per_item)}")
        for name in sorted(m.round_trips.keys() | m.startups.keys()):
            pairs = (("round trip", m.round_trips), ("start-up", m.startups))
            found = [(what, d[name]) for what, d in pairs if name in d]
            lines.append(f"  {name} gear measured: " + ", ".join(f"{what} {_us(value)}" for what, value in found))
        gears = []
        for p in self.predictions.values():
            gears.append(f"{p.gear} {p.speedup:.2f}x (bound {p.bound:.1f}x)" if p.applicable else f"{p.gear} n/a")
        lines.append("  gears: " + " | ".join(gears))
        for p in self.predictions.values():
            if not p.applicable and p.gear not in m.round_trips:
                lines.append(f"  {p.gear} n/a: {p.why_not}")
        lines.append("  why:")
        lines.extend(f"    - {reason}" for reason in self.reasons)
        if m.probe_time:
            lines.append(f"  (measuring took {_us(m.probe_time)})")
        return "\n".join(lines)
