"""The engine under realistic use: streams, argument checks, rate, nested timeouts, gears held by two runs."""

from __future__ import annotations

import itertools
import math
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import square

import gearshift as gs

ALL_GEARS = ["serial", "thread", "async", "process", "auto"]


def slow_ok(seconds: int) -> pytest.MarkDecorator:
    """A per-test limit that does not use SIGALRM: the serial gear's timeouts leave a SIGALRM
    handler of someone else's (pytest-timeout's "signal" method is one) alone and fall back
    to a cooperative check, so the tests of its SIGALRM path need the thread method."""
    return pytest.mark.timeout(seconds, method="thread")


pytestmark = slow_ok(120)


def double(x: int) -> int:
    return 2 * x


def work_10ms(x: int) -> int:
    time.sleep(0.01)
    return x


def sleepy(x: float) -> float:
    """Sleep ``x`` seconds, returning early when cancelled (thread gears)."""
    token = gs.cancel_token()
    if token is not None:
        token.wait(x)
    else:
        time.sleep(x)
    return x


def from_queue(q: queue.SimpleQueue[Any]) -> Iterator[Any]:
    """A source that yields what the test puts, when it puts it (None ends it)."""
    while (item := q.get()) is not None:
        yield item


def raise_after(n: int) -> Iterator[int]:
    yield from range(n)
    raise LookupError(f"source broke after {n}")


# -- streams ------------------------------------------------------------------------------------
@slow_ok(90)
@pytest.mark.parametrize("gear", ALL_GEARS)
def test_slow_source_each_result_comes_back_soon_after_its_item(gear: str) -> None:
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    latencies = []
    with gs.imap(work_10ms, from_queue(q), gear=gear, workers=2) as results:
        for i in range(8):
            put_at = time.monotonic()
            q.put(i)
            assert next(results) == i
            latencies.append(time.monotonic() - put_at)
        q.put(None)
        assert list(results) == []
    # The first result may include starting workers; every later one comes back at once.
    assert latencies[0] < 10, latencies
    assert max(latencies[1:]) < 1.0, latencies


@slow_ok(90)
@pytest.mark.parametrize("gear", ["serial", "thread", "process", "auto"])
def test_timeout_is_enforced_while_the_source_blocks(gear: str) -> None:
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    q.put(60.0)  # one runaway item, then the source waits for the test
    with gs.imap(sleepy, from_queue(q), gear=gear, workers=2, timeout=0.3, errors="collect") as results:
        started = time.monotonic()
        failure = next(results)
        assert isinstance(failure, gs.Failure) and isinstance(failure.exception, gs.TaskTimeout)
        assert time.monotonic() - started < 15
        q.put(0.0)
        assert next(results) == 0.0
        q.put(None)
        assert list(results) == []


def _counting(counter: list[int]) -> Iterator[int]:
    for i in itertools.count():
        counter[0] = i + 1
        yield i


@slow_ok(120)
@pytest.mark.parametrize("gear", ["serial", "thread"])
def test_endless_source_is_read_no_further_ahead_than_a_bounded_window(gear: str) -> None:
    pulled = [0]
    lags = []
    window = gs.SerialGear().window(1000) if gear == "serial" else gs.ThreadGear(2).window(1000)
    results = gs.imap(double, _counting(pulled), gear=gear, workers=2, chunksize=1000)
    with results:
        for delivered, value in enumerate(itertools.islice(results, 300_000), 1):
            assert value == 2 * (delivered - 1)
            if delivered % 10_000 == 0:
                lags.append(pulled[0] - delivered)
    # Read ahead: a buffer of one window, one in flight, two waiting for release, at most,
    # however far the run got (a count of items, not bytes: flat memory on an endless source).
    assert max(lags) <= 4 * window + 1, (window, lags)


@slow_ok(120)
@pytest.mark.parametrize("gear", ALL_GEARS)
def test_items_before_the_source_raised_are_delivered_then_its_error(gear: str) -> None:
    got = []
    with pytest.raises(LookupError, match="source broke after 50") as info:
        for value in gs.imap(square, raise_after(50), gear=gear, workers=2):
            got.append(value)
    assert got == [x * x for x in range(50)]
    assert any("after 50 items" in note for note in info.value.__notes__)
    with pytest.raises(LookupError) as info2:
        gs.map(square, raise_after(50), gear=gear, workers=2)
    assert info2.value.partial_results == {x: x * x for x in range(50)}  # type: ignore[attr-defined]


@slow_ok(60)
def test_amap_delivers_items_before_the_source_raised() -> None:
    import asyncio

    async def main() -> list[int]:
        got = []
        with pytest.raises(LookupError):
            async for value in gs.amap(square, raise_after(50), gear="async", workers=4):
                got.append(value)
        return got

    assert asyncio.run(main()) == [x * x for x in range(50)]


def _sqlite_rows(n: int) -> tuple[sqlite3.Connection, sqlite3.Cursor]:
    db = sqlite3.connect(":memory:")
    db.execute("create table t (x integer)")
    db.executemany("insert into t values (?)", [(i,) for i in range(n)])
    return db, db.execute("select x from t order by x")


def first_column(row: tuple[int]) -> int:
    return row[0]


@pytest.mark.parametrize("gear", ["serial", "thread", "process"])
def test_sqlite_cursor_is_read_on_the_calling_thread(gear: str) -> None:
    db, cursor = _sqlite_rows(2000)
    with db:
        assert gs.map(first_column, cursor, gear=gear, workers=2) == list(range(2000))
    db.close()


def test_a_thread_bound_source_read_on_a_thread_names_the_option_that_fixes_it() -> None:
    db, cursor = _sqlite_rows(10)
    with pytest.raises(sqlite3.ProgrammingError) as info:
        gs.map(first_column, cursor, gear="thread", pull="thread")
    assert any("pull='caller'" in note for note in info.value.__notes__)
    assert gs.map(first_column, cursor, gear="thread", pull="caller") == list(range(10))
    db.close()


def test_pull_is_checked() -> None:
    with pytest.raises(ValueError, match="pull"):
        gs.map(square, [1], pull="later")  # type: ignore[arg-type]


@slow_ok(120)
@pytest.mark.parametrize("gear", ["serial", "thread"])
def test_a_million_item_range_through_imap(gear: str) -> None:
    total = sum(gs.imap(double, range(1_000_000), gear=gear, workers=2))
    assert total == 999_999 * 1_000_000


@pytest.mark.parametrize("gear", ["serial", "thread"])
def test_a_range_too_long_for_len(gear: str) -> None:
    with gs.imap(double, range(10**20), gear=gear, workers=2) as results:
        assert list(itertools.islice(results, 1000)) == [2 * x for x in range(1000)]


# -- arguments checked at the call ------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, math.nan, -math.inf])
def test_nonsense_timeouts_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        gs.map(square, [1], timeout=bad)


def test_infinite_timeout_means_none() -> None:
    assert gs.map(square, range(20), timeout=math.inf) == [x * x for x in range(20)]
    assert gs.map(square, range(20), gear="thread", timeout=math.inf) == [x * x for x in range(20)]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"on": [ValueError]}, TypeError),
        ({"on": ValueError()}, TypeError),
        ({"on": (ValueError, 3)}, TypeError),
        ({"on": int}, TypeError),
        ({"attempts": 0}, ValueError),
        ({"attempts": 2.5}, ValueError),
        ({"backoff": math.nan}, ValueError),
        ({"backoff": -1}, ValueError),
        ({"max_backoff": math.inf}, ValueError),
        ({"jitter": "yes"}, TypeError),
    ],
)
def test_retry_policy_is_checked_when_made(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="Retry"):
        gs.Retry(**kwargs)


def test_retry_on_a_tuple_or_a_class_works() -> None:
    assert gs.Retry(on=ValueError).on == (ValueError,)
    assert gs.Retry(on=(ValueError, KeyError)).on == (ValueError, KeyError)


# -- rate ---------------------------------------------------------------------------------------
def _max_in_any_window(stamps: list[float], width: float) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps[i:] if t < start + width) for i, start in enumerate(stamps))


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


@slow_ok(60)
@pytest.mark.parametrize("gear", ["thread", "serial", "async"])
def test_rate_counts_items_not_batches(gear: str) -> None:
    stamps = Stamps()
    out = gs.map(stamps, range(40), gear=gear, workers=4, chunksize=10, rate="20/s")
    assert out == list(range(40))
    burst = 2  # a tenth of a second's worth of 20/s
    assert _max_in_any_window(stamps.times, 0.5) <= 20 * 0.5 + burst + 1
    assert max(stamps.times) - min(stamps.times) >= (40 - burst) / 20 - 0.1


@slow_ok(60)
def test_retries_take_their_own_tokens() -> None:
    stamps = Stamps(fail_first=True)
    out = gs.map(stamps, range(20), gear="thread", workers=4, retries=gs.Retry(attempts=2, backoff=0), rate="20/s")
    assert out == list(range(20))
    assert len(stamps.times) == 40
    assert _max_in_any_window(stamps.times, 0.5) <= 20 * 0.5 + 2 + 1
    assert max(stamps.times) - min(stamps.times) >= (40 - 2) / 20 - 0.1


# -- nested timeouts ------------------------------------------------------------------------------
def inner_quick_then_stall(x: int) -> int:
    assert gs.map(square, range(3), gear="serial", timeout=5) == [0, 1, 4]
    time.sleep(30)  # the outer run's deadline must still interrupt this
    return x


def inner_stalls(x: int) -> int:
    gs.map(time.sleep, [30], gear="serial", timeout=5)  # the outer deadline comes first
    return x


def inner_times_out(x: int) -> list[Any]:
    return list(gs.map(time.sleep, [0, 30], gear="serial", timeout=0.2, errors="collect"))


@slow_ok(60)
def test_outer_timeout_still_fires_after_an_inner_run_with_its_own() -> None:
    started = time.monotonic()
    out = gs.map(inner_quick_then_stall, [1], gear="serial", timeout=0.5, errors="collect")
    assert isinstance(out[0], gs.Failure) and isinstance(out[0].exception, gs.TaskTimeout)
    assert time.monotonic() - started < 10


@slow_ok(60)
def test_outer_deadline_unwinds_an_inner_run_with_a_longer_one() -> None:
    started = time.monotonic()
    out = gs.map(inner_stalls, [1], gear="serial", timeout=0.5, errors="collect")
    assert isinstance(out[0], gs.Failure) and isinstance(out[0].exception, gs.TaskTimeout)
    assert time.monotonic() - started < 10


@slow_ok(60)
def test_inner_timeout_fires_inside_an_outer_run() -> None:
    out = gs.map(inner_times_out, [1], gear="serial", timeout=20)
    first, second = out[0]
    assert first is None
    assert isinstance(second, gs.Failure) and isinstance(second.exception, gs.TaskTimeout)
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@slow_ok(60)
def test_a_users_sigalrm_handler_and_timer_are_left_alone() -> None:
    calls = []

    def handler(signum: int, frame: Any) -> None:
        calls.append(signum)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        out = gs.map(sleepy, [0.0, 0.4], gear="serial", timeout=0.2, errors="collect")
        assert out[0] == 0.0
        assert isinstance(out[1], gs.Failure) and isinstance(out[1].exception, gs.TaskTimeout)  # cooperative
        assert signal.getsignal(signal.SIGALRM) is handler
        assert calls == []
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, 100.0)  # a timer of the user's, default handler
        try:
            gs.map(square, range(5), gear="serial", timeout=1)
            left, _ = signal.getitimer(signal.ITIMER_REAL)
            assert 90 < left <= 100
            assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


# -- gears held by two runs -------------------------------------------------------------------------
def _make(name: str) -> gs.Gear:
    return {"thread": gs.ThreadGear, "process": gs.ProcessGear, "serial": gs.SerialGear, "async": gs.AsyncGear}[
        name
    ](2)


@slow_ok(90)
@pytest.mark.parametrize("name", ["thread", "process", "serial", "async"])
def test_a_gear_object_runs_run_after_run_and_refuses_a_second_at_once(name: str) -> None:
    gear = _make(name)
    for _ in range(3):
        assert gs.map(square, range(50), gear=gear) == [x * x for x in range(50)]
    first = gs.imap(square, range(1000), gear=gear)
    assert next(first) == 0
    with pytest.raises(RuntimeError, match="already running"):
        gs.map(square, range(5), gear=gear)
    second = gs.imap(square, range(5), gear=gear)
    with pytest.raises(RuntimeError, match="own gear object"):
        next(second)
    assert list(first) == [x * x for x in range(1, 1000)]
    assert gs.map(square, range(50), gear=gear) == [x * x for x in range(50)]


@slow_ok(60)
def test_thread_gear_reused_after_timeouts_and_a_cancelled_run() -> None:
    gear = gs.ThreadGear(2)
    out = gs.map(sleepy, [5.0, 5.0, 0.0], gear=gear, timeout=0.2, errors="collect")
    assert [isinstance(r, gs.Failure) for r in out] == [True, True, False]
    with pytest.raises(KeyError):
        gs.map(_fail_on_3, range(20), gear=gear)
    started = time.monotonic()
    assert gs.map(square, range(2000), gear=gear) == [x * x for x in range(2000)]
    assert time.monotonic() - started < 10
    out = gs.map(sleepy, [0.0, 5.0], gear=gear, timeout=0.3, errors="collect")
    assert out[0] == 0.0 and isinstance(out[1], gs.Failure)


def _fail_on_3(x: int) -> int:
    if x == 3:
        raise KeyError(x)
    time.sleep(0.01)
    return x


# -- async iterables in amap --------------------------------------------------------------------------
async def _aitems(n: int, fail: bool = False) -> Any:
    import asyncio

    for i in range(n):
        await asyncio.sleep(0)
        yield i
    if fail:
        raise LookupError(f"source broke after {n}")


@pytest.mark.parametrize("gear", ["async", "thread"])
def test_amap_reads_an_async_iterable(gear: str) -> None:
    import asyncio

    async def main() -> tuple[list[int], list[int]]:
        whole = [r async for r in gs.amap(square, _aitems(500), gear=gear, workers=4)]
        got = []
        with pytest.raises(LookupError):
            async for value in gs.amap(square, _aitems(50, fail=True), gear=gear, workers=4):
                got.append(value)
        return whole, got

    whole, got = asyncio.run(main())
    assert whole == [x * x for x in range(500)]
    assert got == [x * x for x in range(50)]


def test_an_async_iterable_outside_amap_is_refused() -> None:
    with pytest.raises(TypeError, match="amap"):
        gs.imap(square, _aitems(3))
