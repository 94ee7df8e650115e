"""``gs.Executor(gear="auto")``: each function routed to its own gear by its first call (issue 18).

The decisions are tested with injected measurements (``route_for``); the executor end to end
with functions whose kind is unmistakable: pure-Python loops (compute, hold the GIL), blocking
waits, coroutines.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import time
from typing import Any

import pytest

import gearshift as gs
from gearshift._advisor.route import Route, Sample, route_for

# -- the decisions, from injected measurements ----------------------------------------------------


def decide(sample: Sample, cores: int = 2, gil: bool = True, pickle_error: str = "") -> Route:
    return route_for(sample, cores=cores, gil_enabled=gil, pickle_error=pickle_error)


def test_a_call_that_waits_goes_to_threads() -> None:
    route = decide(Sample(wall=0.5, cpu=0.001))
    assert route.gear == "thread" and "blocking I/O" in route.why


def test_a_call_that_computes_holding_the_gil_goes_to_processes() -> None:
    route = decide(Sample(wall=0.05, cpu=0.049, gil_held=1.0, ended=False))
    assert route.gear == "process" and "holding the GIL 100%" in route.why and "so far" in route.why


def test_a_call_seen_holding_the_gil_computes_even_when_its_clocks_say_it_waited() -> None:
    # A loaded machine: 60% of the wall clock off the CPU, yet every ping found it running Python.
    assert decide(Sample(wall=0.1, cpu=0.04, gil_held=1.0)).gear == "process"
    assert decide(Sample(wall=0.1, cpu=0.01, gil_held=1.0)).gear == "thread"  # 90% waiting: I/O all the same


def test_a_call_that_computes_but_releases_the_gil_goes_to_threads() -> None:
    route = decide(Sample(wall=0.05, cpu=0.05, gil_held=0.0))
    assert route.gear == "thread" and "releases the GIL" in route.why


def test_without_a_gil_computing_calls_go_to_threads() -> None:
    route = decide(Sample(wall=0.05, cpu=0.05, gil_held=None), gil=False)
    assert route.gear == "thread" and "no GIL" in route.why


def test_one_core_or_an_unpicklable_function_keeps_computing_calls_on_threads() -> None:
    assert decide(Sample(wall=0.05, cpu=0.05, gil_held=1.0), cores=1).gear == "thread"
    route = decide(Sample(wall=0.05, cpu=0.05, gil_held=1.0), pickle_error="TypeError: cannot pickle '_thread.lock'")
    assert route.gear == "thread" and "cannot go to a process" in route.why


def test_a_tiny_call_stays_on_threads_and_run_queue_delay_is_not_counted_as_work() -> None:
    assert decide(Sample(wall=0.0001, cpu=0.0001)).gear == "thread"
    # 40 ms of wall, 30 ms of it queued for a CPU (a loaded machine), 9 ms computing: it computes.
    assert decide(Sample(wall=0.04, cpu=0.009, runq=0.03, gil_held=1.0)).gear == "process"


# -- the executor --------------------------------------------------------------------------------


def crunch(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def crunch_for(seconds: float) -> int:
    """Pure Python for about ``seconds`` (whatever the machine's speed)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += crunch(1000) > 0
    return n


def blocking(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def awaiting(x: int) -> int:
    await asyncio.sleep(0.001)
    return x * 2


def fails(x: int) -> int:
    raise KeyError(f"no {x}")


@pytest.mark.timeout(120)
def test_each_function_goes_to_its_own_gear() -> None:
    with gs.Executor(gear="auto") as ex:
        cpu = [ex.submit(crunch_for, 0.1) for _ in range(3)]
        coros = [ex.submit(awaiting, i) for i in range(4)]
        waits = [ex.submit(blocking, 0.2) for _ in range(2)]
        assert all(f.result() > 0 for f in cpu)
        assert [f.result() for f in coros] == [0, 2, 4, 6]
        assert [f.result() for f in waits] == [0.2, 0.2]
        routes = ex.routes
    assert routes["crunch_for"][0] == "process", routes
    assert routes["awaiting"][0] == "async", routes
    assert routes["blocking"][0] == "thread", routes


@pytest.mark.timeout(60)
def test_calls_held_while_the_first_is_judged_run_at_once_in_their_gear() -> None:
    # Four blocking calls that can only finish together: were the held ones run one after
    # another (or behind the first), the barrier would time out.
    barrier = threading.Barrier(4, timeout=20)

    def meet(i: int) -> int:
        barrier.wait()
        return i

    with gs.Executor(gear="auto") as ex:
        futures = [ex.submit(meet, i) for i in range(4)]
        assert [f.result(timeout=30) for f in futures] == [0, 1, 2, 3]
        assert ex.routes["test_calls_held_while_the_first_is_judged_run_at_once_in_their_gear.<locals>.meet"][0] == \
            "thread"


@pytest.mark.timeout(60)
def test_map_routes_by_the_first_call_and_keeps_order() -> None:
    with gs.Executor(gear="auto") as ex:
        assert list(ex.map(crunch, [10, 20, 30, 40])) == [crunch(n) for n in (10, 20, 30, 40)]
        assert ex.routes["crunch"][0] == "thread"  # microseconds a call: not worth a process
        assert all(n > 0 for n in ex.map(crunch_for, [0.05] * 4, timeout=60))
        assert ex.routes["crunch_for"][0] == "process", ex.routes
        assert list(ex.map(awaiting, range(5))) == [0, 2, 4, 6, 8]
        assert list(ex.map(crunch, [])) == []
        assert list(ex.map(pow, [2, 3], [10, 2])) == [1024, 9]


@pytest.mark.timeout(60)
def test_errors_come_back_from_the_judged_call_and_from_held_ones() -> None:
    with gs.Executor(gear="auto") as ex:
        futures = [ex.submit(fails, i) for i in range(3)]
        for i, f in enumerate(futures):
            with pytest.raises(KeyError, match=f"no {i}"):
                f.result(timeout=30)
        with pytest.raises(KeyError):
            list(ex.map(fails, [1, 2]))


@pytest.mark.timeout(60)
def test_a_computing_function_that_cannot_be_pickled_stays_on_threads() -> None:
    lock = threading.Lock()

    class Holder:
        def __init__(self) -> None:
            self.lock = lock

        def __call__(self, seconds: float) -> int:
            with self.lock:
                return crunch_for(seconds)

    with gs.Executor(gear="auto") as ex:
        assert ex.submit(Holder(), 0.08).result() > 0
        gear, why = ex.routes["test_a_computing_function_that_cannot_be_pickled_stays_on_threads.<locals>.Holder"]
    # Never processes; quiet, the reason is the pickling (a loaded machine may read it as waits).
    assert gear == "thread" and ("cannot go to a process" in why or "waits" in why), why


class Worker:
    def work(self, n: int) -> int:
        return crunch(n)


def test_methods_and_partials_are_routed_by_their_function() -> None:
    with gs.Executor(gear="auto") as ex:
        assert ex.submit(Worker().work, 10).result() == crunch(10)
        assert ex.submit(Worker().work, 20).result() == crunch(20)
        assert ex.submit(functools.partial(crunch, 30)).result() == crunch(30)
        # (a route is written as its first call is judged, which may end just after the call)
        assert ex.submit(functools.partial(crunch, 40)).result() == crunch(40)
        assert ex.submit(crunch, 50).result() == crunch(50)
        assert set(ex.routes) == {"Worker.work", "crunch"}


@pytest.mark.timeout(60)
def test_shutdown_with_cancel_futures_cancels_calls_held_for_a_verdict() -> None:
    started = threading.Event()
    release = threading.Event()

    def slow_first(i: int) -> int:
        started.set()
        release.wait(10)
        return i

    ex = gs.Executor(gear="auto")
    first = ex.submit(slow_first, 0)
    assert started.wait(10)
    later = [ex.submit(slow_first, i) for i in range(1, 4)]
    release.set()
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result() == 0
    assert all(f.done() for f in later)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(slow_first, 9)


@pytest.mark.timeout(60)
def test_an_auto_executor_dropped_without_shutdown_leaves_nothing_running() -> None:
    ex = gs.Executor(gear="auto")
    assert ex.submit(crunch_for, 0.05).result() > 0
    assert ex.submit(blocking, 0.01).result() == 0.01
    del ex
    gc.collect()
    # (the autouse fixture checks that no gearshift thread or process is left)


def test_repr_and_options_are_passed_to_every_gear() -> None:
    with gs.Executor(gear="auto", timeout=5, retries=1) as ex:
        assert "auto" in repr(ex)
        assert ex.submit(blocking, 0.0).result() == 0.0

    def raises_once(box: list[Any] = []) -> str:  # noqa: B006 - the state is the point
        box.append(1)
        if len(box) == 1:
            raise ConnectionError("first")
        return "second"

    with gs.Executor(gear="auto", retries=gs.Retry(attempts=2, backoff=0.0, on=(ConnectionError,))) as ex:
        assert ex.submit(raises_once).result() == "second"
