"""The lab's vocabulary: measurements with their noise, the verdict rule, findings, the registry.

One rule decides every verdict, so that no experiment can grade itself generously: an
effect *holds* when it goes the way the notes claim by more than the noise (the spread of
the repeats), *does not hold* when it goes the other way by more than the noise, and
*depends* when it stays within the noise. Experiments only measure and call the rule.
"""

from __future__ import annotations

import math
import multiprocessing
import platform
import statistics
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gearshift._gears import cpu_count

Verdict = Literal["holds", "does not hold", "depends", "not measurable here"]
VERDICTS: tuple[Verdict, ...] = ("holds", "does not hold", "depends", "not measurable here")
Direction = Literal["above", "below"]


@dataclass(frozen=True)
class Quantity:
    """One measured quantity: its repeats (or a single value) and its unit."""

    name: str
    unit: str
    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """Half the range of the repeats, relative to the median (0.05 is +-5%); 0 for one value."""
        if len(self.values) < 2 or self.median == 0:
            return 0.0
        return (max(self.values) - min(self.values)) / 2 / abs(self.median)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "unit": self.unit, "repeats": list(self.values),
                "spread": round(self.spread, 4)}


def q(name: str, unit: str, values: Sequence[float] | float) -> Quantity:
    """A Quantity from repeats or from one value."""
    vals = (float(values),) if isinstance(values, int | float) else tuple(float(v) for v in values)
    return Quantity(name, unit, vals)


@dataclass(frozen=True)
class Effect:
    """An effect in the notes' direction, with its noise: a speedup of 1.9 +- 0.1, or within [low, high]."""

    value: float
    noise: float
    values: tuple[float, ...] = ()  # the per-repeat ratios behind ``value``, when paired
    lo: float | None = None
    hi: float | None = None

    @property
    def low(self) -> float:
        return self.value - self.noise if self.lo is None else self.lo

    @property
    def high(self) -> float:
        return self.value + self.noise if self.hi is None else self.hi

    @property
    def relative_spread(self) -> float:
        return (self.high - self.low) / 2 / abs(self.value) if self.value else 0.0

    def q(self, name: str) -> Quantity:
        """The effect as a measured ratio ("x"), with its per-repeat values where there are some."""
        return Quantity(name, "x", self.values or (self.value,))

    @staticmethod
    def ratio(slow: Quantity, fast: Quantity) -> Effect:
        """How many times ``fast`` beats ``slow`` (both lower-is-better), per paired repeat.

        Repeats run side by side (repeat i of both under the same load), so the ratio is taken
        per repeat and its own spread is the noise. Ratios multiply, so the spread is taken on
        their logarithms: 10x, 100x and 1000x is "100x, within a factor of 10 either way", whose
        low end (10x) still beats 1x. Unpaired repeats fall back to the medians, with the two
        relative spreads added.
        """
        if len(slow.values) == len(fast.values) and len(slow.values) >= 2 and all(fast.values):
            ratios = [s / f for s, f in zip(slow.values, fast.values, strict=True)]
            med = statistics.median(ratios)
            if all(r > 0 for r in ratios):
                logs = [math.log(r) for r in ratios]
                factor = math.exp((max(logs) - min(logs)) / 2)
                low, high = med / factor, med * factor
                return Effect(med, (high - low) / 2, tuple(ratios), low, high)
            return Effect(med, (max(ratios) - min(ratios)) / 2, tuple(ratios))
        med = slow.median / fast.median if fast.median else float("inf")
        return Effect(med, med * (slow.spread + fast.spread))


def judge(effect: Effect, threshold: float, claimed: Direction) -> Verdict:
    """The one verdict rule: the effect against the notes' threshold, beyond its noise or not."""
    if effect.value != effect.value:  # nan: nothing to judge
        return "depends"
    above = effect.low > threshold
    below = effect.high < threshold
    if claimed == "above":
        return "holds" if above else "does not hold" if below else "depends"
    return "holds" if below else "does not hold" if above else "depends"


def judge_same(ratio: Effect, tolerance: float) -> Verdict:
    """Claims of "the same speed": holds when the whole noisy ratio stays within 1 +- tolerance.

    Does not hold when the whole of it lies outside (one side really is faster); depends when
    the noise straddles the tolerance.
    """
    top, bottom = 1 + tolerance, 1 / (1 + tolerance)
    if ratio.value != ratio.value:
        return "depends"
    if bottom <= ratio.low and ratio.high <= top:
        return "holds"
    if ratio.low > top or ratio.high < bottom:
        return "does not hold"
    return "depends"


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """Several parts of one claim: it holds only if every part holds; one part against it decides."""
    if not verdicts:
        return "not measurable here"
    if "does not hold" in verdicts:
        return "does not hold"
    measurable = [v for v in verdicts if v != "not measurable here"]
    if not measurable:
        return "not measurable here"
    return "holds" if all(v == "holds" for v in measurable) else "depends"


@dataclass
class Finding:
    """What one experiment found: the claim, the numbers, the verdict, and what it means."""

    id: str
    claim: str
    verdict: Verdict
    measured: list[Quantity]
    explanation: str
    meaning: str
    repeats: int
    noise: str = ""
    seconds: float = 0.0
    plot: dict[str, Any] = field(default_factory=dict)

    def value(self, name: str) -> Quantity:
        for item in self.measured:
            if item.name == name:
                return item
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "claim": self.claim,
            "verdict": self.verdict,
            "measured": {m.name: m.to_json() for m in self.measured},
            "explanation": self.explanation,
            "meaning": self.meaning,
            "repeats": self.repeats,
            "noise": self.noise,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Size:
    """How big and how often: ``smallest`` for the test suite, ``quick``, ``full``."""

    name: str
    factor: float
    repeats: int

    def n(self, base: int, minimum: int = 1) -> int:
        return max(minimum, int(base * self.factor))


SIZES = {"smallest": Size("smallest", 0.05, 2), "quick": Size("quick", 1.0, 5), "full": Size("full", 3.0, 7)}


@dataclass(frozen=True)
class Machine:
    """The facts a verdict may depend on; injectable, so the verdict logic is testable anywhere."""

    cores: int
    python: str
    implementation: str
    free_threaded_build: bool
    gil_enabled: bool
    loop: str
    uvloop: str | None
    start_method: str
    platform: str

    def to_json(self) -> dict[str, Any]:
        return {
            "cores": self.cores, "python": self.python, "implementation": self.implementation,
            "free_threaded_build": self.free_threaded_build, "gil_enabled": self.gil_enabled,
            "loop": self.loop, "uvloop": self.uvloop, "start_method": self.start_method,
            "platform": self.platform,
        }


def uvloop_version() -> str | None:
    try:
        import uvloop
    except ImportError:
        return None
    return str(getattr(uvloop, "__version__", "?"))


def this_machine() -> Machine:
    gil_check: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)  # absent before 3.13: GIL on
    uv = uvloop_version()
    return Machine(
        cores=cpu_count(),
        python=platform.python_version(),
        implementation=platform.python_implementation(),
        free_threaded_build=bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
        gil_enabled=True if gil_check is None else bool(gil_check()),
        loop=f"uvloop {uv}" if uv else "asyncio",
        uvloop=uv,
        start_method=multiprocessing.get_context().get_start_method(),
        platform=platform.platform(),
    )


@dataclass
class Context:
    """What an experiment is given: its size, the machine, and a line of progress to say."""

    size: Size
    machine: Machine
    say: Callable[[str], None] = lambda line: None
    id: str = ""
    claim: str = ""

    @property
    def repeats(self) -> int:
        return self.size.repeats

    @property
    def workers(self) -> int:
        """Workers for the parallel runs: the cores, at least 2 (so one core shows no gain, not no run)."""
        return max(2, self.machine.cores)


    def finding(self, verdict: Verdict, measured: list[Quantity], explanation: str, meaning: str,
                *effects: Effect, plot: dict[str, Any] | None = None, repeats: int | None = None) -> Finding:
        """This experiment's Finding: its id, claim and repeats filled in, the noise from its effects."""
        n = self.repeats if repeats is None else repeats
        return Finding(id=self.id, claim=self.claim, verdict=verdict, measured=measured, explanation=explanation,
                       meaning=meaning, repeats=n, noise=noise_text(n, *effects), plot=plot or {})


@dataclass(frozen=True)
class Experiment:
    id: str
    claim: str
    run: Callable[[Context], Finding]


REGISTRY: dict[str, Experiment] = {}


def experiment(claim_id: str, claim: str) -> Callable[[Callable[[Context], Finding]], Callable[[Context], Finding]]:
    """Register the decorated function as the experiment for ``claim_id``, a claim in the notes' words."""

    def register(fn: Callable[[Context], Finding]) -> Callable[[Context], Finding]:
        if claim_id in REGISTRY:
            raise ValueError(f"experiment {claim_id!r} registered twice")
        REGISTRY[claim_id] = Experiment(claim_id, claim, fn)
        return fn

    return register


def noise_text(repeats: int, *effects: Effect) -> str:
    """The repeats and the widest spread among the judged effects (as a factor when it is that wide)."""
    if not effects:
        return f"{repeats} repeats"
    worst = max(effects, key=lambda e: e.relative_spread)
    if worst.relative_spread < 1 or worst.low <= 0:
        return f"{repeats} repeats, spread +-{worst.relative_spread:.0%}"
    return f"{repeats} repeats, spread a factor of {(worst.high / worst.low) ** 0.5:.1f} either way"


def fmt(x: float, unit: str = "") -> str:
    """A number in 3 significant figures with its unit."""
    if x != x:
        return "n/a"
    if x == int(x) and abs(x) < 1e12:
        text = f"{int(x):,}"
    else:
        text = f"{x:.3g}" if abs(x) < 1e5 else f"{x:,.0f}"
    return f"{text} {unit}".strip() if unit else text

