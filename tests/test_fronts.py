"""gs.Executor and gs.Pool are thin fronts over the one engine (issue 13): the same options
mean the same there as in gs.map (rate per item, retries, per-call timeouts), and neither
front schedules anything itself."""

from __future__ import annotations

import ast
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import PATIENCE, square

import gearshift as gs

pytestmark = pytest.mark.timeout(120, method="thread")

SRC = Path(__file__).parent.parent / "src" / "gearshift"


class Stamps:
    """Start times of every call (attempts included), recorded by the function itself."""

    def __init__(self, fail_first: bool = False) -> None:
        self.times: list[float] = []
        self.tried: set[int] = set()
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, x: int) -> int:
        with self.lock:
            self.times.append(time.monotonic())
            first = x not in self.tried
            self.tried.add(x)
        if self.fail_first and first:
            raise ConnectionError(f"try {x} again")
        return x


def most_in_any_window(stamps: list[float], width: float) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps[i:] if t < start + width) for i, start in enumerate(stamps))


def assert_paced(times: list[float], n: int, per_second: float = 20.0) -> None:
    """``n`` calls at ``per_second``: never more than the rate (plus its small burst) in any
    half second, and spread over at least the time the rate needs."""
    burst = per_second / 10
    assert len(times) == n
    assert most_in_any_window(times, 0.5) <= per_second * 0.5 + burst + 1
    assert max(times) - min(times) >= (n - burst) / per_second - 0.1


@pytest.mark.parametrize("gear", ["thread", "serial", "async"])
def test_rate_per_call_in_the_executor(gear: str) -> None:
    stamps = Stamps()
    with gs.Executor(gear, workers=4, rate="20/s") as ex:
        futures = [ex.submit(stamps, i) for i in range(30)]
        assert [f.result(timeout=PATIENCE) for f in futures] == list(range(30))
    assert_paced(stamps.times, 30)


def test_rate_per_item_in_executor_map_with_chunks() -> None:
    """A chunk of ten is ten tokens, not one: the rate counts calls, however they are batched."""
    stamps = Stamps()
    with gs.Executor("thread", workers=4, rate="20/s") as ex:
        assert list(ex.map(stamps, range(30), chunksize=10)) == list(range(30))
    assert_paced(stamps.times, 30)


@pytest.mark.parametrize("method", ["map", "imap", "apply_async"])
def test_rate_per_item_in_the_pool(method: str) -> None:
    stamps = Stamps()
    with gs.Pool(4, gear="thread", rate="20/s") as pool:
        if method == "map":
            out = pool.map(stamps, range(30), chunksize=10)
        elif method == "imap":
            out = list(pool.imap(stamps, range(30), 5))
        else:
            out = [r.get(PATIENCE) for r in [pool.apply_async(stamps, (i,)) for i in range(30)]]
    assert out == list(range(30))
    assert_paced(stamps.times, 30)


def test_retries_in_the_executor_and_the_pool() -> None:
    stamps = Stamps(fail_first=True)
    with gs.Executor("thread", workers=2, retries=gs.Retry(attempts=2, backoff=0)) as ex:
        assert [f.result(timeout=PATIENCE) for f in [ex.submit(stamps, i) for i in range(5)]] == list(range(5))
    assert len(stamps.times) == 10
    stamps = Stamps(fail_first=True)
    with gs.Pool(2, gear="thread", retries=gs.Retry(attempts=2, backoff=0)) as pool:
        assert pool.map(stamps, range(5), chunksize=2) == list(range(5))
    assert len(stamps.times) == 10


def sleep_then(x: float) -> float:
    """Sleeps ``x`` seconds unless cancelled (a thread that times out is told so, not killed)."""
    deadline = time.monotonic() + x
    while time.monotonic() < deadline and not gs.cancelled():
        time.sleep(0.01)
    return x


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_task_timeout_in_the_pool(gear: str) -> None:
    with gs.Pool(2, gear=gear, task_timeout=0.5) as pool:
        slow = pool.apply_async(sleep_then, (30,))
        fast = pool.apply_async(sleep_then, (0.01,))
        with pytest.raises(gs.TaskTimeout):
            slow.get(PATIENCE)
        assert fast.get(PATIENCE) == 0.01
        assert pool.map(square, range(4)) == [0, 1, 4, 9], "the pool goes on"


def test_pool_takes_a_multiprocessing_context() -> None:
    ctx = multiprocessing.get_context("spawn")
    with gs.Pool(1, None, (), None, ctx) as pool:
        assert pool.map(square, range(3)) == [0, 1, 4]
        assert pool._executor.gear.mp_context is ctx  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="context"):
        gs.Pool(1, context=ctx, gear="thread")


def test_pool_arguments_are_the_stdlibs() -> None:
    with pytest.raises(ValueError, match="Number of processes must be at least 1"):
        gs.Pool(0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        gs.Pool(1, initializer=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same setting"):
        gs.Pool(2, workers=3)


# -- one engine: the fronts schedule nothing themselves --------------------------------------------
SCHEDULING = {"heapq", "RateLimiter", "Retry.should_retry", "should_retry", "chunk_size", "max_inflight", "window"}


@pytest.mark.parametrize("front", ["executor.py", "pool.py"])
def test_fronts_have_no_scheduling_code(front: str) -> None:
    """No retry heap, rate limiter, window or chunk sizing in a front: those are the engine's."""
    tree = ast.parse((SRC / front).read_text())
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names}
    assert not (used | imported) & SCHEDULING, f"{front} schedules: {sorted((used | imported) & SCHEDULING)}"


def test_executor_runs_on_the_engine() -> None:
    """The Executor's calls go through the engine's Scheduler (one driver), not a loop of its own."""
    from gearshift import _engine

    seen: list[Any] = []
    original = _engine.Scheduler.take_batches

    def spy(self: _engine.Scheduler, now: float) -> Any:
        batches = original(self, now)
        seen.extend(batches)
        return batches

    _engine.Scheduler.take_batches = spy  # type: ignore[method-assign]
    try:
        with gs.Executor("thread", workers=2) as ex:
            assert ex.submit(square, 3).result(timeout=PATIENCE) == 9
        with gs.Pool(2, gear="thread") as pool:
            assert pool.map(square, range(10), chunksize=5) == [x * x for x in range(10)]
    finally:
        _engine.Scheduler.take_batches = original  # type: ignore[method-assign]
    assert sum(len(b) for b in seen) == 11
    assert sorted(len(b) for b in seen) == [1, 5, 5], "Pool.map's chunksize is the engine's batch size"
