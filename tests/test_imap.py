"""gs.imap: laziness, bounded admission on long and endless input, early exit without orphans."""

from __future__ import annotations

import functools
import gc
import itertools
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from conftest import leftover_children, leftover_threads
from helpers import GEARS, add_one, asquare, fail_on, square, zero_free
from helpers import wait_for as wait_for_file

import gearshift as gs


class Counted:
    """An iterable that counts how far it has been consumed (endless when ``n`` is None)."""

    def __init__(self, n: int | None = None) -> None:
        self.n = n
        self.taken = 0

    def __iter__(self) -> Iterator[int]:
        source = itertools.count() if self.n is None else iter(range(self.n))
        for x in source:
            self.taken += 1
            yield x


def assert_all_stopped() -> None:
    """The run's workers are gone now, not merely at the end of the test."""
    assert leftover_children() == []
    assert leftover_threads() == []


@pytest.mark.parametrize("gear", GEARS)
@pytest.mark.parametrize("ordered", [True, False])
def test_imap_yields_every_result(gear: str, ordered: bool) -> None:
    it = gs.imap(square, range(50), gear=gear, workers=2, ordered=ordered)
    assert isinstance(it, gs.ResultIterator)
    out = list(it)
    assert (out if ordered else sorted(out)) == [x * x for x in range(50)]
    assert it.report.succeeded == 50


@pytest.mark.parametrize("gear", GEARS)
def test_imap_async_function(gear: str) -> None:
    assert list(gs.imap(asquare, range(10), gear=gear, workers=2)) == [x * x for x in range(10)]


def test_imap_is_lazy() -> None:
    source = Counted(100)
    it = gs.imap(square, source, gear="thread", workers=2)
    assert source.taken == 0, "nothing may run before the first result is asked for"
    assert next(it) == 0
    it.close()
    assert_all_stopped()


@pytest.mark.parametrize("gear", GEARS)
def test_endless_generator_with_early_break(gear: str) -> None:
    source = Counted()
    got = []
    for value in gs.imap(add_one, source, gear=gear, workers=2):
        got.append(value)
        if len(got) == 50:
            break
    assert got == list(range(1, 51))
    gc.collect()
    assert_all_stopped()
    # Bounded, not small: automatic chunks of tiny items grow to thousands (MAX_CHUNK is 50k), and a
    # window of them plus one read ahead may be taken before the break stops the run.
    assert 50 <= source.taken < 500_000, "an endless input is admitted a window at a time"


@pytest.mark.parametrize("gear", GEARS)
def test_break_stops_blocked_work(gear: str, tmp_path: Any) -> None:
    """Item 0 returns; every later item blocks until cancelled: leaving must not wait for them."""
    fn = functools.partial(zero_free, str(tmp_path / "never"))
    with gs.imap(fn, Counted(1000), gear=gear, workers=2) as it:
        assert next(it) == 0
    assert_all_stopped()


@pytest.mark.parametrize("gear", GEARS)
def test_exception_in_callers_loop_stops_the_run(gear: str) -> None:
    source = Counted()
    with pytest.raises(ZeroDivisionError):
        for value in gs.imap(add_one, source, gear=gear, workers=2):
            if value == 10:
                _ = 1 / 0
    gc.collect()
    assert_all_stopped()


@pytest.mark.parametrize("gear", GEARS)
def test_exception_in_loop_over_a_named_iterator(gear: str) -> None:
    """The usual shape: ``results = gs.imap(...)`` in a function whose loop raises; the caller handles it."""

    def consume() -> None:
        results = gs.imap(add_one, Counted(), gear=gear, workers=2)
        for value in results:
            if value == 10:
                raise LookupError("caller's bug")

    try:
        consume()
    except LookupError:
        pass
    else:
        raise AssertionError("the caller's exception was lost")
    assert_all_stopped()


def fail_after(flag: str, x: int) -> int:
    """Item 5 fails once the caller holds item 4's result (``flag`` appears); the others return."""
    if x == 5:
        wait_for_file(flag)  # TimeoutError after PATIENCE: the test then fails on the wrong exception
        raise KeyError(f"bad item {x}")
    return x


@pytest.mark.parametrize("gear", GEARS)
def test_error_in_task_stops_imap(gear: str, tmp_path: Any) -> None:
    """Every result before the failure reaches the caller, then the failure; nothing after it."""
    flag = tmp_path / "got-4"
    got = []
    with pytest.raises(KeyError, match="bad item 5"):
        for value in gs.imap(functools.partial(fail_after, str(flag)), Counted(), gear=gear, workers=2, chunksize=1):
            got.append(value)
            if value == 4:
                flag.touch()
    assert got == [0, 1, 2, 3, 4]
    assert_all_stopped()


@pytest.mark.parametrize("gear", GEARS)
def test_error_in_task_stops_imap_with_auto_chunks(gear: str) -> None:
    """With chunks the failure may overtake results of its own chunk: in order, none past it."""
    got = []
    with pytest.raises(KeyError):
        for value in gs.imap(functools.partial(fail_on, bad=5), Counted(), gear=gear, workers=2):
            got.append(value)
    assert got == list(range(len(got))) and len(got) <= 5, "results in order, none past the failure"
    assert_all_stopped()


def test_close_is_idempotent_and_context_manager() -> None:
    with gs.imap(square, Counted(), gear="process", workers=2) as it:
        assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    assert_all_stopped()
    it.close()
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize(("gear", "n"), [(gs.ThreadGear, 1_000_000), (gs.SerialGear, 1_000_000)])
def test_bounded_admission_on_long_input(gear: type[gs.Gear], n: int) -> None:
    """How far the input runs ahead of the results stays a window, not the whole input."""
    source = Counted(n)
    rss_before = psutil.Process().memory_info().rss
    lag = 0
    yielded = 0
    the_gear = gear(2)
    it = gs.imap(add_one, source, gear=the_gear)
    for _ in it:
        yielded += 1
        lag = max(lag, source.taken - yielded)
    assert yielded == n and source.taken == n
    # The engine's promise: at most 2*max_inflight batches admitted beyond the in-flight ones.
    assert lag <= 3 * the_gear.max_inflight() * it.report.chunksize
    assert lag < n // 5, f"input ran {lag} items ahead of the results"
    growth = psutil.Process().memory_info().rss - rss_before
    assert growth < 50 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB"
