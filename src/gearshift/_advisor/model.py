"""Predicting each gear's speedup from measurements, and choosing one: pure functions.

Nothing here measures or runs anything, so tests inject the facts (GIL on or off, cores,
wait fraction, pickling cost, time per item) and check the decision.

No gear is known here by name but the baseline, serial (the caller's own thread), over
which every speedup is counted. The candidates come from the table of gears
(``gearshift._gears.advisable_gears``), each with its declared ``GearCosts``; measured
costs (``Measurements.round_trips``/``startups``, by gear name) replace the declared ones.

The model, per item of ``t`` seconds of which a share ``w`` waits (so ``c = t(1-w)`` is
CPU work): a gear pays a *serial part* ``s`` per item that cannot overlap (the engine's
own work, ``handoff_per_item``, pickling in the parent for a gear that ``pickles``, and
``handoff_per_batch`` shared by the items of a batch), and runs the rest on ``N`` workers,
whose CPU work spreads over at most ``L`` lanes (``min(N, cores)`` when the gear's
``cpu_parallel`` allows it here, else 1). Time per item is ``s + max(c/L, t/N)``; the
speedup over serial is ``t`` divided by that, and Amdahl's bound is the same with ``N``
unlimited: ``t / (s + c/L_max)``. Over a known number of remaining items the start-up is added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from gearshift._gears import BASELINE, GearCosts, advisable_gears

#: Two threads that can run the function this many times "at once" release the GIL.
SCALING_THRESHOLD = 1.6
#: A gear must promise this much over serial to be worth its start-up and complexity.
MIN_GAIN = 1.25
#: Gears within this share of the best speedup count as equal; the cheaper one wins.
TIE = 0.9
#: The engine's own caller-side work per item (outcome, order, release): serial in every gear
#: but the serial one, where the caller does it between calls anyway.
ENGINE_PER_ITEM = 2e-6
#: Extra start-up of worker processes that import the modules again (spawn, forkserver), seconds:
#: once and per worker (a gear with ``reimports``, on a machine that does not start them by fork).
REIMPORT_STARTUP = 0.04
REIMPORT_PER_WORKER = 0.03
MAX_CHUNK = 50_000
#: Most workers sized from a wait fraction (a gear's ``max_workers`` may cap them lower).
MAX_THREADS = 128
#: Below this wait fraction a call counts as CPU-bound (for the words and the kernel hint).
CPU_BOUND = 0.2
#: A compiled kernel is suggested when pure-Python CPU work can at best gain this little.
KERNEL_HINT_BOUND = 4.0


@dataclass(frozen=True, slots=True)
class Machine:
    """The facts about this machine and interpreter that the model needs."""

    cores: int
    gil_enabled: bool = True
    start_method: str = "fork"


@dataclass(slots=True)
class Measurements:
    """What the probes measured about one function on sample items."""

    per_item: float
    wait_fraction: float = 0.0
    is_coroutine: bool = False
    #: Calls two threads can run at once: 2 minus the share of its time a thread running the
    #: function holds the GIL (1: pure Python, 2: code that releases the GIL); None: not measured.
    thread_scaling: float | None = None
    #: Why the function cannot go to a process ("" when it can).
    pickle_error: str = ""
    #: Why the function cannot be sent by reference (plain pickle: a sub-interpreter), "" when it can.
    share_error: str = ""
    #: Seconds to pickle and unpickle one item and its result (both ends).
    pickle_per_item: float = 0.0
    #: Measured per gear (by name): the caller's time per batch handed over (a round trip), and the
    #: start-up of its workers; they replace the gear's declared costs. Absent: not measured.
    round_trips: dict[str, float] = field(default_factory=dict)
    startups: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    #: Seconds the measuring took.
    probe_time: float = 0.0

    @property
    def picklable(self) -> bool:
        return not self.pickle_error


@dataclass(frozen=True, slots=True)
class Prediction:
    """One gear's predicted speedup over serial with its settings, and Amdahl's bound."""

    gear: str
    workers: int
    chunksize: int
    speedup: float
    bound: float
    serial_part: float
    why_not: str = ""
    #: The gear's costs were measured here (else they are as the gear declares them).
    measured: bool = False

    @property
    def applicable(self) -> bool:
        return not self.why_not


@dataclass(slots=True)
class Decision:
    gear: str
    workers: int
    chunksize: int
    speedup: float
    bound: float
    predictions: dict[str, Prediction]
    reasons: list[str] = field(default_factory=list)
    consider_compiled: bool = False


def startup_cost(costs: GearCosts, machine: Machine, workers: int) -> float:
    """Declared seconds to start a gear with ``workers`` workers on this machine."""
    start = costs.startup + costs.startup_per_worker * workers
    if costs.reimports and machine.start_method != "fork":
        start += REIMPORT_STARTUP + REIMPORT_PER_WORKER * workers
    return start


def releases_gil(m: Measurements, machine: Machine) -> bool:
    """Threads run this function's CPU work in parallel: no GIL, or code that releases it."""
    if not machine.gil_enabled:
        return True
    if m.thread_scaling is None:
        return False
    return m.thread_scaling >= SCALING_THRESHOLD


def thread_workers(wait_fraction: float, cores: int) -> int:
    """Threads to keep ``cores`` CPUs busy when each call waits ``wait_fraction`` of its time."""
    running = max(1.0 - wait_fraction, 1.0 / MAX_THREADS)
    return max(1, min(MAX_THREADS, math.ceil(cores / running)))


def _chunk(target: float, per_item: float, remaining: int | None, workers: int) -> int:
    size = max(1, min(MAX_CHUNK, int(target / max(per_item, 1e-7))))
    if remaining is not None:
        size = min(size, max(1, math.ceil(remaining / (4 * workers))))
    return size


def _speedup(t: float, s: float, c: float, lanes: float, workers: int, remaining: int | None, start: float) -> float:
    """Serial time over the gear's time: ``s + max(c/L, t/N)`` per item, plus start-up over ``remaining``."""
    if remaining is not None:
        workers = max(1, min(workers, remaining))
        lanes = max(1.0, min(lanes, remaining))
    per_item = s + max(c / lanes, t / workers)
    if remaining is None:
        return t / per_item
    return (t * remaining) / (start + per_item * remaining)


def _lanes(costs: GearCosts, free: bool, workers: int, cores: int) -> int:
    """How many calls' CPU work runs at once in the gear."""
    if costs.cpu_parallel == "always" or (costs.cpu_parallel == "without_gil" and free):
        return min(workers, cores)
    return 1


def _workers(costs: GearCosts, wait: float, cores: int) -> int:
    """Workers sized from the wait, within the gear's declared bounds."""
    cap = costs.max_workers
    if costs.max_workers_per_core is not None:
        cap = min(cap, costs.max_workers_per_core * cores)
    return max(1, min(cap, max(costs.min_workers, thread_workers(wait, cores))))


def predict_gear(
    name: str, costs: GearCosts | None, m: Measurements, machine: Machine, workers: int | None = None,
    remaining: int | None = None,
) -> Prediction:
    """One gear's predicted speedup over serial (and bound), from its costs and the measurements."""
    if costs is None:
        return Prediction(name, 0, 0, 0.0, 0.0, 0.0, "it declares no costs (GearCosts): the advisor cannot predict it")
    t = max(m.per_item, 1e-9)
    w = min(max(m.wait_fraction, 0.0), 1.0)
    c = t * (1.0 - w)
    cores = max(1, machine.cores)
    free = releases_gil(m, machine)
    n = workers or _workers(costs, w, cores)
    if remaining is not None:
        n = max(1, min(n, remaining))
    k = _chunk(costs.batch_work, t, remaining, n) if costs.batch_work > 0 else 1
    pp = m.pickle_per_item / 2 if costs.pickles else 0.0  # each end pays half
    measured = name in m.round_trips or name in m.startups
    per_batch = m.round_trips.get(name, costs.handoff_per_batch)
    s = ENGINE_PER_ITEM + costs.handoff_per_item + pp + per_batch / k
    start = m.startups.get(name, startup_cost(costs, machine, n))
    lanes = _lanes(costs, free, n, cores)
    max_lanes = _lanes(costs, free, cores, cores)
    why = ""
    if costs.pickles and not m.picklable:
        why = f"the function cannot be pickled ({m.pickle_error})"
    elif costs.by_reference and m.share_error:
        why = f"the function cannot be shared by reference (lambdas, closures: cpython#125865): {m.share_error}"
    elif costs.on_request:
        why = f"used only when asked for (gear={name!r} or its gear object): never chosen on its own"
    elif costs.coroutines_only and not m.is_coroutine:
        why = "not a coroutine function (its blocking calls would run in threads)"
    # Pickling is work the workers do too (the other half): it counts with the call, not as speedup.
    speedup = _speedup(t + pp, s, c + pp, lanes, n, remaining, start) * t / (t + pp)
    return Prediction(name, n, k, speedup, t / (s + (c + pp) / max_lanes), s, why, measured)


def predict(
    m: Measurements, machine: Machine, workers: int | None = None, remaining: int | None = None,
    gears: Mapping[str, GearCosts | None] | None = None,
) -> dict[str, Prediction]:
    """Each gear's predicted speedup over serial (and bound) on this machine.

    ``gears``: the candidates with their costs; by default the table's (built-in,
    registered and installed gears already loaded).
    """
    table = advisable_gears() if gears is None else gears
    out: dict[str, Prediction] = {BASELINE: Prediction(BASELINE, 1, 1, 1.0, 1.0, 0.0)}
    for name, costs in table.items():
        out[name] = predict_gear(name, costs, m, machine, workers, remaining)
    return out


def _us(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def decide(
    m: Measurements, machine: Machine, workers: int | None = None, remaining: int | None = None,
    gears: Mapping[str, GearCosts | None] | None = None,
) -> Decision:
    """Choose the gear, workers and chunk size, with the reasons in plain words.

    The best predicted speedup wins if it reaches ``MIN_GAIN``; among gears within ``TIE``
    of it, coroutine gears first for a coroutine function, then the lowest ``tie_rank``.
    """
    table = advisable_gears() if gears is None else gears
    preds = predict(m, machine, workers, remaining, table)

    def rank(name: str) -> tuple[bool, int]:
        costs = table[name]
        assert costs is not None  # only applicable gears are ranked
        return (not (m.is_coroutine and costs.coroutines_only), costs.tie_rank)

    usable = sorted((p for name, p in preds.items() if name != BASELINE and p.applicable), key=lambda p: rank(p.gear))
    best = max((p.speedup for p in usable), default=1.0)
    choice = preds[BASELINE]
    if best >= MIN_GAIN:
        choice = next(p for p in usable if p.speedup >= TIE * best)
    reasons = _reasons(m, machine, preds, choice, table.get(choice.gear))
    free = releases_gil(m, machine)
    cpu_bound = m.wait_fraction < CPU_BOUND
    top_bound = max((p.bound for p in usable), default=1.0)
    kernel = cpu_bound and not m.is_coroutine and (machine.gil_enabled and not free) and top_bound <= KERNEL_HINT_BOUND
    if kernel:
        reasons.append(
            f"CPU work that holds the GIL: concurrency can at best give {top_bound:.1f}x here ({machine.cores} cores); "
            "a compiled kernel that releases it (Cython with nogil, NumPy, numba) could make each call many times "
            "faster and let threads run it in parallel"
        )
    return Decision(choice.gear, choice.workers, choice.chunksize, choice.speedup, choice.bound, preds, reasons, kernel)


def _reasons(
    m: Measurements, machine: Machine, preds: dict[str, Prediction], choice: Prediction, costs: GearCosts | None
) -> list[str]:
    w = m.wait_fraction
    t = m.per_item
    out: list[str] = []
    if m.is_coroutine:
        out.append("a coroutine function: async when you can")
    if w >= CPU_BOUND:
        out.append(f"each call waits {w:.0%} of its time ({_us(t)} per call)")
    else:
        out.append(f"each call computes for {1 - w:.0%} of its time ({_us(t)} per call): CPU-bound")
    if not machine.gil_enabled:
        out.append("the interpreter is free-threaded (no GIL): threads run Python code in parallel, without pickling")
    elif m.thread_scaling is not None and w < 0.5:
        if releases_gil(m, machine):
            out.append(
                f"it holds the GIL only {2 - m.thread_scaling:.0%} of its time (compiled code releases it): "
                "threads run it in parallel, without pickling"
            )
        else:
            out.append(f"it holds the GIL {2 - m.thread_scaling:.0%} of its time, so threads would take turns")
    if not m.picklable:
        ruled_out = [p.gear for p in preds.values() if p.why_not.startswith("the function cannot be pickled")]
        out.append(f"the function cannot be pickled, so not {' or '.join(ruled_out) or 'a gear that pickles'}: "
                   f"{m.pickle_error}")
    elif (costs is None or costs.pickles) and m.pickle_per_item > 0 and w < 0.5:
        share = m.pickle_per_item / max(t, 1e-9)
        out.append(f"pickling an item and its result costs {_us(m.pickle_per_item)} ({share:.0%} of a call)")
    if costs is None:  # the baseline
        others = [p for p in preds.values() if p.applicable and p.gear != choice.gear]
        best = max(others, key=lambda p: p.speedup, default=None)
        cheapest = min((p.serial_part for p in others), default=0.0)
        if best is not None and t < cheapest * 20 + 1e-4:
            out.append(
                f"each call ({_us(t)}) is too short to pay for a hand-off: "
                f"serial in the caller is fastest (best other: {best.gear} {best.speedup:.2f}x)"
            )
        elif best is not None:
            out.append(f"no gear promises {MIN_GAIN}x over serial (best: {best.gear} {best.speedup:.2f}x)")
        return out
    out.append(_chosen(choice, costs, machine, m))
    out.append(f"predicted {choice.speedup:.1f}x over serial; Amdahl bound on this machine {choice.bound:.1f}x")
    return out


def _chosen(choice: Prediction, costs: GearCosts, machine: Machine, m: Measurements) -> str:
    """The chosen gear and its settings in words."""
    label = costs.label or f"the {choice.gear} gear"
    if costs.coroutines_only:
        return f"{label}, {choice.workers} tasks at once"
    if costs.pickles:
        return f"{label}, {choice.workers} workers, {choice.chunksize} item(s) per batch"
    if m.wait_fraction >= 0.5:
        return f"{label}, {choice.workers} workers (sized from the wait: cores / (1 - wait))"
    if _lanes(costs, releases_gil(m, machine), choice.workers, max(1, machine.cores)) > 1:
        return f"{label}, {choice.workers} workers: parallel CPU work without pickling"
    return f"{label}, {choice.workers} workers"
