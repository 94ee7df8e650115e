"""Issue #12, async gear: every item ends exactly once, and timeouts count from the item's start.

A coroutine that ends in a CancelledError of its own (it awaited a future someone else
cancelled) fails with gs.TaskCancelled instead of hanging the run; a cancellation of the run
itself (Ctrl-C, the caller's task cancelled, a timeout) still cancels. Blocking functions in
the async gear get their timeout from the moment they start in a thread, and items queued
behind stuck calls still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from helpers import PATIENCE

import gearshift as gs
from gearshift._gears._blocking import DaemonThreadPool
from gearshift._gears.aio import _Clock

pytestmark = pytest.mark.timeout(60)


async def cancelled_on(bad: frozenset[int], x: int) -> int:
    """Fail ``bad`` items the way a cancelled dependency does: await a cancelled future."""
    await asyncio.sleep(0)
    if x in bad:
        fut = asyncio.get_running_loop().create_future()
        fut.cancel()
        await fut
    return 2 * x


def every_third(x: int) -> bool:
    return x % 3 == 1


async def ends_cancelled(x: int) -> int:
    return await cancelled_on(frozenset(range(1, 10_000, 3)), x)


def run_sync(gear: str, fn: Callable[[Any], Any], items: Iterable[Any], **kw: Any) -> list[Any]:
    return gs.map(fn, items, gear=gear, workers=4, **kw)


def run_amap(fn: Callable[[Any], Any], items: Iterable[Any], **kw: Any) -> list[Any]:
    async def main() -> list[Any]:
        out = [r async for r in gs.amap(fn, items, concurrency=4, **kw)]
        assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
        return out

    return asyncio.run(main())


def run(mode: str, fn: Callable[[Any], Any], items: Iterable[Any], **kw: Any) -> list[Any]:
    """``mode``: gear="async" or "auto" from sync code, or gs.amap on the caller's loop."""
    return run_amap(fn, items, **kw) if mode == "amap" else run_sync(mode, fn, items, **kw)


MODES = ["async", "auto", "amap"]


# -- a coroutine's own CancelledError -------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_own_cancelled_error_is_collected_as_task_cancelled(mode: str) -> None:
    results = run(mode, ends_cancelled, range(12), errors="collect")
    assert len(results) == 12
    for i, result in enumerate(results):
        if every_third(i):
            assert isinstance(result, gs.Failure) and result.index == i and result.item == i
            error = result.exception
            assert isinstance(error, gs.TaskCancelled) and (error.item, error.index) == (i, i)
            assert isinstance(error.__cause__, asyncio.CancelledError)
            assert "CancelledError" in result.traceback
        else:
            assert result == 2 * i


@pytest.mark.parametrize("mode", MODES)
def test_own_cancelled_error_raises_task_cancelled(mode: str) -> None:
    with pytest.raises(gs.TaskCancelled) as info:
        run(mode, ends_cancelled, range(12))
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert info.value.index in (1, 4, 7, 10)


@pytest.mark.parametrize("mode", MODES)
def test_own_cancelled_error_is_skipped(mode: str) -> None:
    assert run(mode, ends_cancelled, range(12), errors="skip") == [2 * i for i in range(12) if not every_third(i)]


class CancelledOnce:
    """A coroutine function whose first attempt at each item ends in CancelledError."""

    def __init__(self) -> None:
        self.attempts: dict[int, int] = {}
        self.lock = threading.Lock()

    async def __call__(self, x: int) -> int:
        with self.lock:
            self.attempts[x] = self.attempts.get(x, 0) + 1
            first = self.attempts[x] == 1
        return await cancelled_on(frozenset({x}) if first and x % 2 else frozenset(), x)


@pytest.mark.parametrize("mode", MODES)
def test_task_cancelled_is_retried(mode: str) -> None:
    fn = CancelledOnce()
    assert run(mode, fn, range(10), retries=gs.Retry(attempts=2, backoff=0)) == [2 * i for i in range(10)]
    assert fn.attempts == {i: 2 if i % 2 else 1 for i in range(10)}


@pytest.mark.parametrize("mode", ["async", "amap"])
def test_cancelled_error_of_a_blocking_function_is_task_cancelled(mode: str) -> None:
    def blocking(x: int) -> int:
        if x == 2:
            raise asyncio.CancelledError
        return x

    results = run(mode, blocking, range(5), errors="collect")
    assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4]
    assert isinstance(results[2], gs.Failure) and isinstance(results[2].exception, gs.TaskCancelled)


def test_a_task_cancelled_by_someone_else_ends_as_task_cancelled() -> None:
    """An item's own task cancelled from outside the run (here: by itself) still ends once."""

    async def cancel_me(x: int) -> int:
        if x == 3:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        return x

    results = run_amap(cancel_me, range(6), errors="collect")
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], gs.Failure) and isinstance(results[3].exception, gs.TaskCancelled)


def test_many_items_each_end_exactly_once_in_order() -> None:
    bad = frozenset(range(7, 10_000, 10))
    fn = CancelledAt(bad)
    results = gs.map(fn, range(10_000), gear="async", errors="collect")
    assert len(results) == 10_000
    failures = [r for r in results if isinstance(r, gs.Failure)]
    assert len(failures) == 1_000 and [f.index for f in failures] == sorted(bad)
    assert all(isinstance(f.exception, gs.TaskCancelled) for f in failures)
    assert [r for r in results if not isinstance(r, gs.Failure)] == [2 * i for i in range(10_000) if i not in bad]


class CancelledAt:
    def __init__(self, bad: frozenset[int]) -> None:
        self.bad = bad

    async def __call__(self, x: int) -> int:
        return await cancelled_on(self.bad, x)


# -- the run's own cancellation still cancels -------------------------------------------------
class Forever:
    """Items wait forever; each records how its wait ended. ``ready`` is set once ``n`` wait."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.waiting = 0
        self.cancelled: list[int] = []  # cancelling() seen by each task as its cancellation arrived
        self.ready = asyncio.Event()

    async def __call__(self, x: int) -> int:
        self.waiting += 1
        if self.waiting == self.n:
            self.ready.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            self.cancelled.append(task.cancelling())
            raise
        return x


def test_cancelling_the_amap_consumer_cancels_the_run() -> None:
    async def main() -> tuple[Forever, asyncio.Task[None]]:
        fn = Forever(4)

        async def consume() -> None:
            async with contextlib.aclosing(gs.amap(fn, range(10), concurrency=4, errors="collect")) as results:
                async for _ in results:
                    pass

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(fn.ready.wait(), PATIENCE)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
        return fn, consumer

    fn, consumer = asyncio.run(main())
    assert consumer.cancelled()
    assert len(fn.cancelled) == 4 and all(n > 0 for n in fn.cancelled)


def test_a_timeout_scope_around_amap_raises_timeout_error_not_task_cancelled() -> None:
    async def main() -> Forever:
        fn = Forever(4)
        with pytest.raises(TimeoutError) as info:
            async with asyncio.timeout(0.3):
                async with contextlib.aclosing(gs.amap(fn, range(10), concurrency=4, errors="collect")) as results:
                    async for _ in results:
                        pass
        assert not isinstance(info.value, gs.TaskCancelled)
        return fn

    assert len(asyncio.run(main()).cancelled) == 4


@pytest.mark.parametrize("mode", MODES)
def test_item_timeout_is_task_timeout_not_task_cancelled(mode: str) -> None:
    async def slow(x: int) -> int:
        if x == 1:
            await asyncio.Event().wait()
        return x

    results = run(mode, slow, range(4), timeout=0.2, errors="collect")
    assert isinstance(results[1], gs.Failure) and type(results[1].exception) is gs.TaskTimeout
    assert [r for i, r in enumerate(results) if i != 1] == [0, 2, 3]


@pytest.mark.parametrize("gear", ["async", "auto"])
def test_ctrl_c_during_a_run_still_cancels_its_tasks(gear: str) -> None:
    """SIGINT in the caller (here simulated once every task waits) cancels the tasks, as before."""
    seen: list[int] = []

    class Interrupting(Forever):
        async def __call__(self, x: int) -> int:
            if self.waiting == self.n - 1:
                main = threading.main_thread().ident
                assert main is not None
                # A real signal (interrupt_main only sets a flag): it must wake the caller's wait.
                asyncio.get_running_loop().call_soon(signal.pthread_kill, main, signal.SIGINT)
            try:
                return await super().__call__(x)
            finally:
                seen.append(x)

    fn = Interrupting(4)
    with pytest.raises(KeyboardInterrupt):
        gs.map(fn, range(10), gear=gear, workers=4, errors="collect")
    assert sorted(seen) == [0, 1, 2, 3]
    assert len(fn.cancelled) == 4 and all(n > 0 for n in fn.cancelled)


# -- blocking functions: the clock starts in the thread ---------------------------------------
@pytest.mark.parametrize("mode", ["async", "amap"])
def test_quick_items_behind_stuck_blocking_calls_still_run(mode: str) -> None:
    release = threading.Event()
    ran_beside_stuck: list[bool] = []

    def work(x: int) -> int:
        if x < 2:
            release.wait(5)  # ignores gs.cancelled(): its thread stays stuck after the timeout
            return -1
        ran_beside_stuck.append(not release.is_set())
        return x

    def consume(results: Iterable[Any]) -> list[Any]:
        out = []
        for r in results:
            out.append(r)
            if len(out) == 22:
                release.set()  # before the run closes, so it need not wait out a grace period
        return out

    if mode == "async":
        out = consume(gs.imap(work, range(22), gear="async", workers=2, timeout=0.3, errors="collect"))
    else:

        async def main() -> list[Any]:
            out: list[Any] = []
            async for r in gs.amap(work, range(22), concurrency=2, timeout=0.3, errors="collect"):
                out.append(r)
                if len(out) == 22:
                    release.set()
            return out

        out = asyncio.run(main())
    assert [type(r.exception) for r in out[:2]] == [gs.TaskTimeout, gs.TaskTimeout]
    assert out[2:] == list(range(2, 22))
    assert ran_beside_stuck == [True] * 20


def test_the_thread_pool_replaces_a_thread_stuck_in_an_abandoned_call() -> None:
    pool = DaemonThreadPool(1, "gearshift-test-pool")
    started, gate = threading.Event(), threading.Event()

    def stuck() -> str:
        started.set()
        gate.wait(PATIENCE)
        return "late"

    try:
        slow = pool.submit(stuck)
        assert started.wait(PATIENCE)
        quick = pool.submit(lambda: "quick")  # queued: the pool's one thread is busy
        pool.abandon(slow)
        assert quick.result(timeout=PATIENCE) == "quick"
        assert pool.stuck == 1
        pool.abandon(quick)  # already done: nothing to abandon
        assert pool.stuck == 1
    finally:
        gate.set()
    assert slow.result(timeout=PATIENCE) == "late"
    pool.shutdown(wait=True)
    assert pool.stuck == 0


def test_a_call_that_waits_for_a_thread_gets_its_whole_limit_from_its_start() -> None:
    """The clock's first check finds the call not started yet: it waits a full limit more."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        begin = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as scope:
                clock = _Clock(loop, scope, 0.2)

                def start() -> None:  # as a thread does once one is free
                    clock.started = time.monotonic()

                loop.call_later(0.3, start)
                await asyncio.sleep(PATIENCE)
        return time.monotonic() - begin

    assert 0.5 - 0.02 <= asyncio.run(main()) < PATIENCE
