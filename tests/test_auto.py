"""gear="auto" end to end: what it shifts to on real small workloads, and that nothing is lost or run twice."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import re
import threading
import time
import warnings
from collections import Counter

import pytest
from helpers import anap, nap, spin

import gearshift as gs
from gearshift._advisor.model import Machine

BUF = b"x" * (1 << 20)


def sha(x: int) -> str:
    return hashlib.sha256(BUF).hexdigest()


def _calibrated_spin(seconds: float) -> int:
    """The ``spin`` argument that takes about ``seconds`` on this machine (machines differ 3x)."""
    spin(20_000)
    start = time.perf_counter()
    spin(200_000)
    per_unit = (time.perf_counter() - start) / 200_000
    return max(10_000, int(seconds / per_unit))


#: About 3 ms of pure-Python CPU per call, whatever the machine: workloads sized in time, not in loops.
SPIN_3MS = _calibrated_spin(0.003)


def spin_pid(n: int) -> int:
    spin(n)
    return os.getpid()


#: What a report's gear says when the auto gear ran the work (it decided, or the run ended first).
AUTO_MADE = re.compile(r".+, chosen by auto|(serial gear|probe threads) \(auto: the run ended while probing\)")


def test_default_gear_is_auto() -> None:
    for front in (gs.map, gs.imap):
        assert inspect.signature(front).parameters["gear"].default == "auto"
    out = gs.map(lambda x: x + 1, range(10))
    assert out == list(range(1, 11))
    assert AUTO_MADE.fullmatch(out.report.gear), out.report.gear
    with gs.imap(lambda x: x + 1, range(10)) as it:
        assert list(it) == list(range(1, 11))
    assert AUTO_MADE.fullmatch(it.report.gear), it.report.gear
    # A fixed gear says nothing of auto: the match above is not one any report passes.
    assert AUTO_MADE.fullmatch(gs.map(lambda x: x + 1, range(10), gear="serial").report.gear) is None


def test_pure_python_cpu_shifts_to_processes() -> None:
    # ~1 s serial: long enough for a pool to pay on a busy machine, also where workers start by
    # forkserver (3.14), whose start-up the model counts (at 0.3 s it rightly chooses serial there)
    out = gs.map(spin, [SPIN_3MS] * 300)
    assert out == [spin(SPIN_3MS)] * 300
    report = out.report
    assert report.gear.startswith("process"), (report.gear, report.reasons)
    assert isinstance(report.advice, gs.Advice) and report.advice.gear == "process"
    assert report.succeeded == 300 and report.items == 300
    assert any("holds the GIL" in r for r in report.reasons), report.reasons


def test_blocking_waits_shift_to_many_threads() -> None:
    out = gs.map(nap, range(100))
    assert out == list(range(100))
    assert out.report.gear.startswith("thread"), (out.report.gear, out.report.reasons)
    assert out.report.workers >= 16
    assert any("waits" in r for r in out.report.reasons)


def test_coroutine_functions_go_to_the_async_gear() -> None:
    out = gs.map(anap, range(50))
    assert out == list(range(50))
    assert out.report.gear.startswith("async")
    assert out.report.reasons[0].startswith("a coroutine function")


def test_tiny_tasks_stay_serial() -> None:
    n = 200_000
    out = gs.map(lambda x: x + 1, range(n))
    assert out[:3] == [1, 2, 3] and len(out) == n and out[-1] == n
    assert out.report.gear.startswith("serial"), (out.report.gear, out.report.reasons)
    assert out.report.chunksize > 100  # big batches in the caller, not one loop turn per item


def test_tiny_tasks_from_an_endless_style_iterator_stay_serial() -> None:
    out = gs.map(lambda x: x * 2, iter(range(50_000)))
    assert out == [x * 2 for x in range(50_000)]
    assert out.report.gear.startswith("serial")


def test_gil_releasing_hashing_is_not_serial_or_async() -> None:
    out = gs.map(sha, range(150))
    assert out == [hashlib.sha256(BUF).hexdigest()] * 150
    # On a quiet machine this is "thread" (hashlib releases the GIL); on a loaded one the
    # pair test may not show the parallelism, and processes are a fair second choice.
    assert out.report.gear.startswith(("thread", "process")), (out.report.gear, out.report.reasons)


def test_unpicklable_closure_never_goes_to_processes() -> None:
    lock = threading.Lock()
    # ~0.6 s: enough for processes to be the choice but for the lock (as above, 3.14 counts start-up)
    out = gs.map(lambda n: (lock, spin(n))[1], [SPIN_3MS] * 200)
    assert out == [spin(SPIN_3MS)] * 200
    assert not out.report.gear.startswith("process"), out.report.reasons
    assert any("cannot be pickled" in r for r in out.report.reasons)


def test_free_threaded_build_runs_cpu_work_in_threads() -> None:
    """On a free-threaded interpreter (injected here) pure-Python CPU work goes to threads."""
    gear = gs.AutoGear(machine=Machine(cores=2, gil_enabled=False, start_method="fork"))
    out = gs.map(spin, [60_000] * 60, gear=gear)
    assert out == [spin(60_000)] * 60
    assert out.report.gear.startswith("thread"), out.report.reasons
    assert any("free-threaded" in r for r in out.report.reasons)


def test_few_heavy_items_lose_no_wave() -> None:
    """Four long CPU items: the first ones run in probe threads, the rest in processes; each once."""
    # ~0.4 s each (sized in time): long enough that even a forkserver start (3.14) pays
    out = gs.map(spin_pid, [_calibrated_spin(0.4)] * 4)
    assert len(out) == 4
    me = os.getpid()
    pids = Counter(out)
    assert pids[me] <= 2, out  # at most the probe's items ran here
    assert len(pids) >= 2, out  # the others went to worker processes
    assert out.report.gear.startswith("process")


def test_results_are_kept_in_order_across_the_shift() -> None:
    items = list(range(300))
    out = gs.map(nap, items)
    assert out == items
    assert out.report.succeeded == 300


def test_errors_raise_from_the_probe() -> None:
    def bad(x: int) -> int:
        if x == 0:
            raise KeyError("first item")
        return x

    with pytest.raises(KeyError, match="first item"):
        gs.map(bad, range(20))


def test_errors_collected_through_every_phase() -> None:
    def sometimes(x: int) -> int:
        time.sleep(0.002)
        if x % 7 == 3:
            raise ValueError(x)
        return x

    out = gs.map(sometimes, range(70), errors="collect")
    assert [r.item for r in out if isinstance(r, gs.Failure)] == [x for x in range(70) if x % 7 == 3]
    assert [r for r in out if not isinstance(r, gs.Failure)] == [x for x in range(70) if x % 7 != 3]


def test_timeout_on_a_probe_item() -> None:
    def slow_first(x: int) -> int:
        if x == 0:
            deadline = time.monotonic() + 30
            while not gs.cancelled() and time.monotonic() < deadline:
                time.sleep(0.005)
        return x

    out = gs.map(slow_first, range(10), timeout=0.5, errors="collect")
    assert isinstance(out[0], gs.Failure) and isinstance(out[0].exception, gs.TaskTimeout)
    assert out[1:] == list(range(1, 10))


def test_imap_break_early_leaves_nothing_running() -> None:
    with gs.imap(nap, range(10_000)) as results:
        first = [next(results) for _ in range(30)]
    assert first == list(range(30))


def test_choice_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gearshift"):
        gs.map(nap, range(30))
    assert any("auto" in rec.getMessage() and "thread" in rec.getMessage() for rec in caplog.records)


def test_auto_workers_are_passed_on() -> None:
    out = gs.map(nap, range(40), workers=3)
    assert out.report.gear.startswith("thread") and out.report.workers == 3


def test_run_that_ends_while_probing_still_reports() -> None:
    """Tiny items go to the caller's thread at once; three end the run before any decision."""
    out = gs.map(lambda x: x + 1, range(3))
    assert out == [1, 2, 3]
    report = out.report
    assert report.gear == "serial gear (auto: the run ended while probing)", (report.gear, report.reasons)
    assert report.reasons == ["the run ended before the measurements called for a shift"]
    assert report.advice is None
    assert (report.items, report.succeeded, report.failed) == (3, 3, 0)


def test_one_item_run_reports_the_decision() -> None:
    """One 10 ms wait: measured, no gear can beat serial on a single item, and the report says why."""
    out = gs.map(nap, [1])
    assert out == [1]
    report = out.report
    assert report.gear == "serial gear, 1 worker, chosen by auto", (report.gear, report.reasons)
    assert isinstance(report.advice, gs.Advice)
    assert (report.advice.gear, report.advice.workers) == ("serial", 1)
    assert report.reasons == report.advice.reasons
    assert any(r.startswith("each call waits") for r in report.reasons), report.reasons
    assert any(r.startswith("no gear promises") for r in report.reasons), report.reasons
    assert (report.items, report.succeeded, report.failed) == (1, 1, 0)


def test_executor_with_auto_routes_per_function() -> None:
    # (once refused; tests/test_executor_auto.py covers the routing)
    with gs.Executor(gear="auto") as ex:
        assert ex.submit(pow, 2, 5).result() == 32
        assert "auto" in repr(ex)


def test_amap_with_auto() -> None:
    async def main() -> tuple[list[int], list[int]]:
        coros = [x async for x in gs.amap(anap, range(30), gear="auto")]
        blocking = [x async for x in gs.amap(nap, range(30), gear="auto")]
        return coros, blocking

    coros, blocking = asyncio.run(main())
    assert coros == blocking == list(range(30))


_seen: list[str] = []


def _init(tag: str) -> None:
    _seen.append(f"{tag}:{threading.current_thread().name}")


def test_initializer_runs_where_items_run() -> None:
    _seen.clear()
    out = gs.map(nap, range(40), initializer=_init, initargs=("x",))
    assert out == list(range(40))
    assert _seen and all(s.startswith("x:") for s in _seen)
    assert any("probe" in s for s in _seen)  # the probe thread ran it before its first item


def test_retries_across_the_shift() -> None:
    attempts: Counter[int] = Counter()
    lock = threading.Lock()

    def flaky(x: int) -> int:
        with lock:
            attempts[x] += 1
            first = attempts[x] == 1
        time.sleep(0.005)
        if first and x % 5 == 0:
            raise ConnectionError(x)
        return x

    out = gs.map(flaky, range(60), retries=2)
    assert out == list(range(60))
    assert out.report.retried == 12


def test_serial_phase_waits_instead_of_spinning_during_retry_backoff() -> None:
    failed: set[int] = set()

    def once(x: int) -> int:
        if x == 5 and x not in failed:
            failed.add(x)
            raise ConnectionError(x)
        return x + 1

    start, wall = time.process_time(), time.monotonic()
    out = gs.map(once, range(10), retries=gs.Retry(attempts=2, backoff=0.5, jitter=False))
    assert out == list(range(1, 11))
    assert out.report.retried == 1
    assert time.monotonic() - wall >= 0.5, "the retry did not wait its backoff: the CPU bound below proves nothing"
    assert time.process_time() - start < 0.4  # half a second of backoff, not spent spinning


def test_timeout_on_an_uncooperative_probe_item_does_not_stall_the_run() -> None:
    ran_at: dict[int, float] = {}
    start = time.monotonic()

    def stuck_first(x: int) -> int:
        if x == 0:  # computes for 2.5 s, ignoring gs.cancelled(): its thread is stuck until it returns
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                pass
        ran_at[x] = time.monotonic() - start
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "did not stop within ..." if close comes first
        # Two items: one long call is not enough work to shift for, so the auto gear keeps probing.
        out = gs.map(stuck_first, range(2), timeout=0.3, errors="collect")
    assert isinstance(out[0], gs.Failure) and isinstance(out[0].exception, gs.TaskTimeout)
    assert out[1:] == [1]
    # The second item ran in a fresh thread once the first timed out, not after the stuck call.
    assert ran_at[1] < 2.0, ran_at
