"""Predicting each gear's speedup from measurements, and choosing one: pure functions.

Nothing here measures or runs anything, so tests inject the facts (GIL on or off, cores,
wait fraction, pickling cost, time per item) and check the decision.

The model, per item of ``t`` seconds of which a share ``w`` waits (so ``c = t(1-w)`` is
CPU work): a gear pays a *serial part* ``s`` per item that cannot overlap (handing the
item over, pickling in the parent, a share of a round trip), and runs the rest on
``N`` workers, whose CPU work spreads over at most ``L`` lanes (``min(N, cores)``, or 1
when the GIL serialises it). Time per item is ``s + max(c/L, t/N)``; the speedup over
serial is ``t`` divided by that, and Amdahl's bound is the same with ``N`` unlimited:
``t / (s + c/L_max)``. Over a known number of remaining items the start-up is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Two threads that can run the function this many times "at once" release the GIL.
SCALING_THRESHOLD = 1.6
#: A gear must promise this much over serial to be worth its start-up and complexity.
MIN_GAIN = 1.25
#: Gears within this share of the best speedup count as equal; the cheaper one wins.
TIE = 0.9
#: The engine's own caller-side work per item (outcome, order, release): serial in every gear
#: but the serial one, where the caller does it between calls anyway.
ENGINE_PER_ITEM = 2e-6
#: Caller-side cost of handing a batch to a thread (queue, wake-up), seconds.
THREAD_HANDOFF = 30e-6
#: Per-item cost of the async gear (a task, a semaphore, a loop turn), seconds.
ASYNC_PER_ITEM = 40e-6
#: A process round trip per batch when not measured (pipe, wake-ups, framing), seconds.
DEFAULT_ROUND_TRIP = 300e-6
#: Work a batch should hold in each gear (matches the gears' chunk targets).
THREAD_CHUNK_TARGET = 0.002
PROCESS_CHUNK_TARGET = 0.02
MAX_CHUNK = 50_000
#: Most threads sized from a wait fraction; most tasks for the async gear.
MAX_THREADS = 128
MAX_TASKS = 1000
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
    #: Seconds to pickle and unpickle one item and its result (both ends).
    pickle_per_item: float = 0.0
    #: Process round trip per batch (measured), and the start-up of the pool; None: not measured.
    round_trip: float | None = None
    startup: float | None = None
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


def startup_cost(machine: Machine, workers: int) -> float:
    """Seconds to start a pool of worker processes (fork is cheap; spawn/forkserver import)."""
    if machine.start_method == "fork":
        return 0.01 + 0.01 * workers
    return 0.05 + 0.04 * workers


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


def predict(
    m: Measurements, machine: Machine, workers: int | None = None, remaining: int | None = None
) -> dict[str, Prediction]:
    """Each gear's predicted speedup over serial (and bound) on this machine."""
    t = max(m.per_item, 1e-9)
    w = min(max(m.wait_fraction, 0.0), 1.0)
    c = t * (1.0 - w)
    free = releases_gil(m, machine)
    cores = max(1, machine.cores)
    out: dict[str, Prediction] = {"serial": Prediction("serial", 1, 1, 1.0, 1.0, 0.0)}

    n = workers or thread_workers(w, cores)
    if remaining is not None:
        n = max(1, min(n, remaining))
    k = _chunk(THREAD_CHUNK_TARGET, t, remaining, n)
    s = ENGINE_PER_ITEM + THREAD_HANDOFF / k
    lanes = min(n, cores) if free else 1
    out["thread"] = Prediction(
        "thread", n, k,
        _speedup(t, s, c, lanes, n, remaining, 1e-4 * n),
        t / (s + c / (cores if free else 1)), s,
    )

    # Processes that also wait: more of them than cores keeps the cores busy (up to 4 per core).
    n = workers or min(thread_workers(w, cores), 4 * cores)
    if remaining is not None:
        n = max(1, min(n, remaining))
    pp = m.pickle_per_item / 2  # each end pays half
    rt = m.round_trip if m.round_trip is not None else DEFAULT_ROUND_TRIP
    k = _chunk(PROCESS_CHUNK_TARGET, t, remaining, n)
    s = ENGINE_PER_ITEM + pp + rt / k
    start = m.startup if m.startup is not None else startup_cost(machine, n)
    why = "" if m.picklable else f"the function cannot be pickled ({m.pickle_error})"
    out["process"] = Prediction(
        "process", n, k,
        _speedup(t + pp, s, c + pp, min(n, cores), n, remaining, start) * t / (t + pp),
        t / (s + (c + pp) / cores), s, why,
    )

    n = workers or min(MAX_TASKS, max(16, thread_workers(w, cores)))
    if remaining is not None:
        n = max(1, min(n, remaining))
    s = ENGINE_PER_ITEM + ASYNC_PER_ITEM
    why = "" if m.is_coroutine else "not a coroutine function (its blocking calls would run in threads)"
    out["async"] = Prediction("async", n, 1, _speedup(t, s, c, 1, n, remaining, 0.0), t / (s + c), s, why)
    return out


def _us(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def decide(
    m: Measurements, machine: Machine, workers: int | None = None, remaining: int | None = None
) -> Decision:
    """Choose the gear, workers and chunk size, with the reasons in plain words."""
    preds = predict(m, machine, workers, remaining)
    order = ["async", "thread", "process"] if m.is_coroutine else ["thread", "process", "async"]
    usable = [preds[g] for g in order if preds[g].applicable]
    best = max((p.speedup for p in usable), default=1.0)
    choice = preds["serial"]
    if best >= MIN_GAIN:
        choice = next(p for p in usable if p.speedup >= TIE * best)
    reasons = _reasons(m, machine, preds, choice, remaining)
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
    m: Measurements, machine: Machine, preds: dict[str, Prediction], choice: Prediction, remaining: int | None
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
        out.append(f"the function cannot be pickled, so no processes: {m.pickle_error}")
    elif choice.gear in ("process", "serial") and m.pickle_per_item > 0 and w < 0.5:
        share = m.pickle_per_item / max(t, 1e-9)
        out.append(f"pickling an item and its result costs {_us(m.pickle_per_item)} ({share:.0%} of a call)")
    g = choice.gear
    if g == "serial":
        best = max((p for p in preds.values() if p.applicable and p.gear != "serial"), key=lambda p: p.speedup,
                   default=None)
        if best is not None and t < preds["thread"].serial_part * 20 + 1e-4:
            out.append(
                f"each call ({_us(t)}) is too short to pay for a hand-off: "
                f"serial in the caller is fastest (best other: {best.gear} {best.speedup:.2f}x)"
            )
        elif best is not None:
            out.append(f"no gear promises {MIN_GAIN}x over serial (best: {best.gear} {best.speedup:.2f}x)")
    elif g == "thread":
        if w >= 0.5:
            out.append(f"threads, {choice.workers} workers (sized from the wait: cores / (1 - wait))")
        else:
            out.append(f"threads, {choice.workers} workers: parallel CPU work without pickling")
    elif g == "process":
        out.append(f"processes, {choice.workers} workers, {choice.chunksize} item(s) per batch")
    elif g == "async":
        out.append(f"the async gear, {choice.workers} tasks at once")
    if g != "serial":
        out.append(f"predicted {choice.speedup:.1f}x over serial; Amdahl bound on this machine {choice.bound:.1f}x")
    return out
