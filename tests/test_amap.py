"""gs.amap: async iteration in every gear; the async gear runs tasks on the caller's own loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from typing import Any

import pytest
from conftest import leftover_children, leftover_threads
from helpers import GEARS, PATIENCE, asquare, fail_on, square

import gearshift as gs


async def collect(results: Any) -> list[Any]:
    return [x async for x in results]


@pytest.mark.parametrize("gear", GEARS)
@pytest.mark.parametrize("fn", [square, asquare])
def test_amap_every_gear(gear: str, fn: Any) -> None:
    out = asyncio.run(collect(gs.amap(fn, range(30), gear=gear, workers=2)))
    assert out == [x * x for x in range(30)]


def test_amap_unordered() -> None:
    out = asyncio.run(collect(gs.amap(asquare, range(30), concurrency=8, ordered=False)))
    assert sorted(out) == [x * x for x in range(30)]


def test_amap_runs_on_the_callers_loop() -> None:
    """An asyncio.Event made in the caller's loop works in the tasks: they share that loop."""

    async def main() -> list[int]:
        caller = asyncio.get_running_loop()
        opened = asyncio.Event()  # bound to the caller's loop on first use
        loops: set[int] = set()

        async def task(i: int) -> int:
            loops.add(id(asyncio.get_running_loop()))
            if i == 4:
                opened.set()
            await opened.wait()
            return i

        out = [x async for x in gs.amap(task, range(5), concurrency=5)]
        assert loops == {id(caller)}
        return out

    assert asyncio.run(main()) == list(range(5))


def test_amap_concurrency_is_bounded() -> None:
    """Each task of a wave waits until the limit is running at once: that proves >= 2 (4 in fact),
    and a gear that admitted more would start the 5th while the first four wait."""
    limit, n = 4, 40

    async def main() -> int:
        running = 0
        peak = 0
        full = asyncio.Event()

        async def task(i: int) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running == limit:
                full.set()
            await full.wait()  # the first wave holds here until all four of it run
            for _ in range(3):
                await asyncio.sleep(0)
            running -= 1
            return i

        try:
            async with asyncio.timeout(PATIENCE):
                assert [x async for x in gs.amap(task, range(n), concurrency=limit)] == list(range(n))
        except TimeoutError:
            raise AssertionError(f"never {limit} tasks at once (peak {peak})") from None
        return peak

    assert asyncio.run(main()) == limit


@pytest.mark.parametrize("gear", GEARS)
def test_amap_error_keeps_type_and_item(gear: str) -> None:
    with pytest.raises(KeyError) as info:
        asyncio.run(collect(gs.amap(fail_on, range(10), gear=gear, workers=2)))
    assert "item #3" in "\n".join(info.value.__notes__)


def test_amap_collect_and_skip() -> None:
    out = asyncio.run(collect(gs.amap(fail_on, range(6), errors="collect")))
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5] and len(out) == 6
    assert isinstance(out[3], gs.Failure) and out[3].item == 3 and isinstance(out[3].exception, KeyError)
    out = asyncio.run(collect(gs.amap(functools.partial(fail_on, bad=0), range(6), errors="skip")))
    assert out == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("gear", GEARS)
def test_amap_early_break_with_aclosing(gear: str) -> None:
    async def main() -> list[int]:
        got: list[int] = []
        async with contextlib.aclosing(gs.amap(square, itertools.count(), gear=gear, workers=2)) as results:
            async for value in results:
                got.append(value)
                if len(got) == 10:
                    break
        return got

    assert asyncio.run(main()) == [x * x for x in range(10)]
    assert leftover_children() == [] and leftover_threads() == []


def test_amap_cancelled_from_outside_leaves_no_task() -> None:
    """Cancelling the consuming task (a timeout) cancels the tasks it started, on the same loop."""

    async def main() -> tuple[list[int], list[int], set[asyncio.Task[Any]]]:
        started: list[int] = []
        cancelled: list[int] = []
        all_started = asyncio.Event()

        async def forever(i: int) -> int:
            started.append(i)
            if len(started) == 4:
                all_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise
            return i

        async def consume() -> None:
            async with contextlib.aclosing(gs.amap(forever, range(10), concurrency=4)) as results:
                async for _ in results:
                    pass

        async def expire_when_all_started(deadline: asyncio.Timeout) -> None:
            await all_started.wait()
            deadline.reschedule(asyncio.get_running_loop().time())

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(PATIENCE) as deadline:
                trigger = asyncio.create_task(expire_when_all_started(deadline))
                await consume()
        trigger.cancel()
        await asyncio.gather(trigger, return_exceptions=True)
        assert all_started.is_set(), f"only {started} started before the timeout"
        return started, cancelled, {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    started, cancelled, left = asyncio.run(main())
    assert sorted(started) == [0, 1, 2, 3], "the limit of 4 at once, and nothing more"
    assert sorted(cancelled) == [0, 1, 2, 3], "each started task was cancelled, not abandoned"
    assert left == set()
