"""The advisor: measure a function on sample items (probes), predict and decide (model), report (advice)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from gearshift._advisor.advice import Advice
from gearshift._advisor.model import Machine, Measurements, decide, predict
from gearshift._advisor.probes import (
    fn_pickle_error,
    fn_share_error,
    gear_round_trip,
    machine_facts,
    measure_scaling,
    pickle_cost,
    time_calls,
)
from gearshift._calls import fn_name, is_async_callable
from gearshift._gears import BASELINE, advisable_gears, gear_class
from gearshift._task import close_runner

__all__ = ["Advice", "Machine", "Measurements", "advise", "decide", "predict"]

#: Sample items taken from the caller's iterable.
MAX_SAMPLES = 8
#: Seconds of calls in the caller before the other probes.
CALL_BUDGET = 0.3


def advise(
    fn: Callable[[Any], Any], sample: Iterable[Any], *, workers: int | None = None, total: int | None = None
) -> Advice:
    """Measure ``fn`` on a few items of ``sample`` and advise a gear, workers and chunk size.

    Runs ``fn`` in the caller on up to 8 items (about 0.3 s at most, at least one call),
    then, for CPU-bound work, in two threads at once (does it release the GIL?), pickles
    the function, an item and its result, and times a round trip to one worker of each gear
    that allows it (``GearCosts.measure``: processes) when that gear is in question.
    ``total`` (the number of items of the real run) lets the prediction include start-up
    costs. ``print(advice)`` explains the choice.

    Every gear in the table is a candidate: the built-in ones, registered ones and installed
    ones (the ``gearshift.gears`` entry points, loaded here), each predicted from its declared
    ``GearCosts``; a gear that declares none is listed with that reason.
    """
    start = time.perf_counter()
    items = list(itertools.islice(iter(sample), MAX_SAMPLES))
    if not items:
        raise ValueError("advise() needs at least one sample item")
    machine = machine_facts()
    coro = is_async_callable(fn)
    try:
        times = time_calls(fn, items, CALL_BUDGET)
    finally:
        close_runner()
    m = Measurements(
        per_item=times.per_item, wait_fraction=times.wait_fraction, is_coroutine=coro, samples=times.calls
    )
    m.pickle_error = fn_pickle_error(fn)
    m.share_error = fn_share_error(fn)
    if m.picklable:
        m.pickle_per_item, error = pickle_cost(times.item, times.result)
        if error:
            m.pickle_error = f"an item or its result cannot be pickled ({error})"
    cpu_bound = m.wait_fraction < 0.5
    if machine.gil_enabled and cpu_bound and not coro:
        m.thread_scaling = measure_scaling(fn, items)
    gears = advisable_gears(load=True)
    if m.per_item > 20e-6:  # below that no worker can win, whatever a round trip costs
        decision = decide(m, machine, workers, total, gears)
        for name, costs in gears.items():
            # In question: chosen on declared costs, or the rival of serial. Measure this machine's.
            if costs and costs.measure and decision.predictions[name].applicable and decision.gear in (name, BASELINE):
                m.startups[name], m.round_trips[name] = gear_round_trip(gear_class(name), fn, items[0])
    m.probe_time = time.perf_counter() - start
    return Advice.from_decision(decide(m, machine, workers, total, gears), m, machine, fn_name(fn))
