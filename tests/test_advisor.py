"""The advisor: decisions from injected measurements (table-driven), then gs.advise on real functions."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from typing import Any

import pytest
from helpers import anap, nap, spin

import gearshift as gs
from gearshift._advisor.model import MAX_THREADS, Machine, Measurements, decide, predict, thread_workers
from gearshift._advisor.probes import ThreadClock, gil_pings, measure_scaling, scaling_from_gil, wait_fraction

TWO = Machine(cores=2, gil_enabled=True, start_method="fork")
TWO_FREE = Machine(cores=2, gil_enabled=False, start_method="fork")
SIXTEEN = Machine(cores=16, gil_enabled=True, start_method="fork")


def M(**kw: Any) -> Measurements:
    base = {"per_item": 0.005, "wait_fraction": 0.0, "pickle_per_item": 20e-6, "samples": 8}
    base.update(kw)
    return Measurements(**base)


# name, measurements, machine, remaining, expected gear
CASES = [
    ("pure-Python CPU, GIL held", M(thread_scaling=1.0), TWO, None, "process"),
    ("pure-Python CPU, not yet tested for the GIL", M(), TWO, None, "process"),
    ("pure-Python CPU, free-threaded build", M(), TWO_FREE, None, "thread"),
    ("CPU work that releases the GIL", M(thread_scaling=2.0), TWO, None, "thread"),
    ("CPU work, GIL held, 16 cores", M(thread_scaling=1.0), SIXTEEN, None, "process"),
    ("blocking waits", M(per_item=0.01, wait_fraction=0.97), TWO, None, "thread"),
    ("blocking waits, free-threaded", M(per_item=0.01, wait_fraction=0.97), TWO_FREE, None, "thread"),
    ("coroutine waits", M(per_item=0.01, wait_fraction=0.99, is_coroutine=True), TWO, None, "async"),
    ("tiny task (x + 1)", M(per_item=1e-7, thread_scaling=1.0), TWO, None, "serial"),
    ("tiny task, free-threaded", M(per_item=1e-7), TWO_FREE, None, "serial"),
    ("tiny task, 16 cores", M(per_item=2e-6), SIXTEEN, None, "serial"),
    ("unpicklable CPU work, GIL held", M(thread_scaling=1.0, pickle_error="cannot pickle lock"), TWO, None, "serial"),
    ("unpicklable CPU work, free-threaded", M(pickle_error="cannot pickle lock"), TWO_FREE, None, "thread"),
    ("arguments costlier to pickle than the work", M(per_item=1e-3, pickle_per_item=3e-3, thread_scaling=1.0),
     TWO, None, "serial"),
    ("two short items cannot pay for a pool", M(thread_scaling=1.0), TWO, 2, "serial"),
    ("four long items pay for a pool", M(per_item=1.0, thread_scaling=1.0), TWO, 4, "process"),
    ("one long item: nothing to overlap", M(per_item=1.0, thread_scaling=1.0), TWO, 1, "serial"),
    ("half waiting, half GIL-held CPU", M(per_item=0.01, wait_fraction=0.5, thread_scaling=1.0), TWO, None,
     "process"),
    ("slow process start (forkserver), short run", M(thread_scaling=1.0),
     Machine(cores=2, gil_enabled=True, start_method="forkserver"), 20, "serial"),
]


@pytest.mark.parametrize(("name", "m", "machine", "remaining", "gear"), CASES, ids=[c[0] for c in CASES])
def test_decision_table(name: str, m: Measurements, machine: Machine, remaining: int | None, gear: str) -> None:
    decision = decide(m, machine, remaining=remaining)
    assert decision.gear == gear, (name, decision.reasons, decision.predictions)
    assert decision.reasons
    if gear != "serial":
        assert decision.speedup >= 1.25
        assert decision.speedup <= decision.bound + 1e-9 or remaining is not None


def test_waiting_work_gets_many_threads_sized_from_the_wait() -> None:
    decision = decide(M(per_item=0.01, wait_fraction=0.97), TWO)
    assert decision.workers == thread_workers(0.97, 2) == 67
    assert any("waits 97%" in r and "threads, 67 workers" in r for r in [" ".join(decision.reasons)])
    assert thread_workers(1.0, 2) == MAX_THREADS
    assert thread_workers(0.0, 4) == 4


def test_user_workers_are_kept() -> None:
    assert decide(M(per_item=0.01, wait_fraction=0.97), TWO, workers=5).workers == 5
    assert decide(M(thread_scaling=1.0), TWO, workers=3).workers == 3


def test_workers_never_exceed_the_items_left() -> None:
    assert decide(M(per_item=0.01, wait_fraction=0.99), TWO, remaining=7).workers == 7


def test_amdahl_bounds() -> None:
    preds = predict(M(per_item=0.01, wait_fraction=0.5, thread_scaling=1.0), TWO)
    # GIL held: half of each call is serial, so threads can at best double the speed.
    assert preds["thread"].bound == pytest.approx(2.0, rel=0.01)
    # Pure CPU on two cores: processes at best 2x, less the pickling and round trips.
    preds = predict(M(thread_scaling=1.0), TWO)
    assert 1.8 < preds["process"].bound <= 2.0
    assert preds["process"].speedup <= preds["process"].bound
    assert preds["async"].why_not and not preds["async"].applicable


def test_process_chunks_grow_as_items_shrink() -> None:
    small = decide(M(per_item=1e-4, thread_scaling=1.0, pickle_per_item=1e-6), SIXTEEN)
    large = decide(M(per_item=0.05, thread_scaling=1.0), SIXTEEN)
    assert small.gear == large.gear == "process"
    assert small.chunksize > 50 and large.chunksize == 1


def test_compiled_kernel_hint() -> None:
    cpu = decide(M(thread_scaling=1.0), TWO)
    assert cpu.consider_compiled and any("compiled kernel" in r for r in cpu.reasons)
    assert not decide(M(per_item=0.01, wait_fraction=0.9), TWO).consider_compiled
    assert not decide(M(thread_scaling=2.0), TWO).consider_compiled
    assert not decide(M(), TWO_FREE).consider_compiled


def test_advice_report_reads_well() -> None:
    advice = gs.Advice.decide(M(per_item=0.01, wait_fraction=0.97, samples=6), TWO, fn_name="fetch")
    text = str(advice)
    assert text.splitlines()[0] == "gearshift advice for fetch: thread gear, 67 workers"
    assert "predicted speedup" in text and "Amdahl bound" in text
    assert "each call waits 97% of its time" in text
    assert "2 cores, GIL enabled" in text
    assert advice.gear_options() == {"gear": "thread", "workers": 67, "chunksize": 1}
    serial = str(gs.Advice.decide(M(per_item=1e-7), TWO))
    assert "serial gear" in serial and "cannot pay" in serial and "compiled kernel" in serial
    unpicklable = str(gs.Advice.decide(M(pickle_error="TypeError: cannot pickle 'lock'"), TWO))
    assert "cannot be pickled" in unpicklable


def test_measurements_are_plain_data() -> None:
    m = M(thread_scaling=1.0)
    assert dataclasses.replace(m, per_item=1.0).per_item == 1.0
    assert m.picklable and not M(pickle_error="x").picklable


# -- probes -----------------------------------------------------------------------------------
def test_wait_fraction_leaves_out_time_queued_for_a_cpu() -> None:
    assert wait_fraction(1.0, 0.5, 0.5) == 0.0  # busy machine: half the time queued, the rest computing
    assert wait_fraction(1.0, 0.1, 0.0) == pytest.approx(0.9)
    assert wait_fraction(0.0, 0.0, 0.0) == 0.0


def test_scaling_from_gil_share() -> None:
    assert scaling_from_gil(1.0) == 1.0
    assert scaling_from_gil(0.0) == 2.0
    assert scaling_from_gil(1.5) == 1.0


def test_gil_pings_need_a_busy_thread() -> None:
    assert gil_pings(lambda: False, lambda: 0.0) is None


def test_gil_pings_tell_held_from_released() -> None:
    """A thread spinning in Python holds the GIL; one hashing a large buffer (hashlib releases it) does not."""
    stop = threading.Event()

    def python_spin(_: int) -> int:
        x = 0
        while not stop.is_set():
            x += 1
        return x

    buffer = b"x" * (1 << 20)

    def hashing(_: int) -> bytes:
        return hashlib.sha256(buffer).digest()

    released = 2.0 - measure_scaling(hashing, [0], budget=3.0)  # generous: the machine may be busy
    spinner = threading.Thread(target=python_spin, args=(0,), name="gearshift-test-spin")
    spinner.start()
    try:
        held = gil_pings(spinner.is_alive, ThreadClock(spinner).cpu, budget=3.0)
    finally:
        stop.set()
        spinner.join()
    assert held is not None and released < 0.4 and held > released + 0.2, (held, released)


def test_thread_clock_reads_another_threads_cpu() -> None:
    started, stop = threading.Event(), threading.Event()

    def sleeper() -> None:
        started.set()
        stop.wait()

    thread = threading.Thread(target=sleeper)
    thread.start()
    started.wait()
    clock = ThreadClock(thread)
    before = clock.cpu()
    time.sleep(0.05)
    idle_cpu = clock.cpu() - before
    stop.set()
    thread.join()
    assert idle_cpu < 0.03  # a blocked thread's CPU clock hardly moves
    mine = ThreadClock()
    c0 = mine.cpu()
    deadline = time.thread_time() + 0.02
    while time.thread_time() < deadline:
        pass
    assert mine.cpu() - c0 >= 0.015


# -- gs.advise on real functions -----------------------------------------------------------------
def test_advise_pure_python_cpu_picks_processes() -> None:
    advice = gs.advise(spin, [60_000] * 6)
    m = advice.measurements
    assert advice.gear == "process", str(advice)
    assert m.wait_fraction < 0.5 and m.thread_scaling is not None and m.thread_scaling < 1.75
    assert m.round_trips["process"] > 0 and "process" in m.startups
    assert "process gear measured: round trip" in str(advice)
    assert advice.consider_compiled


def test_advise_sleep_picks_many_threads() -> None:
    advice = gs.advise(nap, range(6))
    assert advice.gear == "thread", str(advice)
    assert advice.workers >= 16
    assert advice.measurements.wait_fraction > 0.8
    assert "waits" in str(advice)


def test_advise_coroutine_picks_async() -> None:
    advice = gs.advise(anap, range(6))
    assert advice.gear == "async", str(advice)
    assert advice.measurements.is_coroutine


def test_advise_tiny_task_picks_serial() -> None:
    advice = gs.advise(lambda x: x + 1, range(8))
    assert advice.gear == "serial", str(advice)
    assert advice.measurements.per_item < 1e-4


def test_advise_unpicklable_closure_never_picks_processes() -> None:
    lock = threading.Lock()

    def locked_spin(n: int) -> int:
        with lock:
            return spin(n)

    advice = gs.advise(locked_spin, [60_000] * 4)
    assert advice.gear != "process", str(advice)
    assert not advice.measurements.picklable
    assert "cannot be pickled" in str(advice)


def test_advise_is_bounded_in_time() -> None:
    start = time.perf_counter()
    gs.advise(nap, range(100))
    assert time.perf_counter() - start < 10  # 0.3 s of calls and a few probes, with a generous margin


def test_advise_needs_a_sample() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        gs.advise(nap, [])


def test_advise_lets_the_functions_error_through() -> None:
    def broken(x: int) -> int:
        raise KeyError(x)

    with pytest.raises(KeyError):
        gs.advise(broken, [1, 2])
