"""A hostile user of the rewritten ``gs.Executor`` and ``gs.Pool`` (issue 13: fronts over the engine).

Each test is something a user switching from ``concurrent.futures`` or ``multiprocessing``
tries, at the sizes users have. Each break found (unbounded read-ahead of lazy streams, a
shutdown hung on a buffersize map, a dropped map that ran everything, odd BaseExceptions
breaking in-process executors, a callback waiting on a future with callbacks) was fixed
and its test kept here.
Synchronisation is by events, barriers and files, never by sleeps; the autouse fixture in
conftest.py checks that no gearshift thread, child process or /dev/shm file is left.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import os
import random
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import PATIENCE, add, square
from helpers import wait_for as wait_for_file

import gearshift as gs

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
IN_PROCESS = ["serial", "thread", "async"]
GEARS4 = ["serial", "thread", "process", "async"]


# -- functions the workers import by reference -------------------------------------------------
def ident(x: Any) -> Any:
    return x


def inc(x: int) -> int:
    return x + 1


def big_result(n: int) -> bytes:
    return b"r" * n


def nbytes(x: Any) -> int:
    return len(x) if isinstance(x, (bytes, bytearray)) else int(x.nbytes)


def double_array(a: Any) -> Any:
    return a * 2


class Odd(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt: the stdlib fails its future only."""


class TwoArgs(Exception):
    """Pickles but cannot be rebuilt (``__init__`` wants two arguments, ``args`` holds one)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


class HoldsLock(Exception):
    """Its argument (a lock) cannot be pickled at all."""


def raise_odd(x: int) -> int:
    raise Odd(f"odd {x}")


def raise_keyboard_interrupt(x: int) -> int:
    raise KeyboardInterrupt(f"ki {x}")


def raise_generator_exit(x: int) -> int:
    raise GeneratorExit(f"ge {x}")


def raise_system_exit(x: int) -> int:
    raise SystemExit(x)


def raise_two_args(x: int) -> int:
    raise TwoArgs(x, x + 1)


def raise_holds_lock(x: int) -> int:
    raise HoldsLock(threading.Lock())


def raise_group(x: int) -> int:
    raise ExceptionGroup(f"group {x}", [ValueError("v"), KeyError("k")])


def raise_base_group(x: int) -> int:
    raise BaseExceptionGroup(f"base group {x}", [ValueError("v"), Odd("o")])


def raise_cancelled(x: int) -> int:
    raise cf.CancelledError(f"cancelled {x}")


def wait_file_then(path: str, value: Any) -> Any:
    return wait_for_file(path, value)


def touch_then_wait(folder: str, gate: str, x: int) -> int:
    """Says it started (a file), then waits for ``gate``."""
    Path(folder, f"started-{x}").touch()
    return int(wait_for_file(gate, x))


def touch_then(folder: str, x: int) -> int:
    Path(folder, str(x)).touch()
    return x


def block_until_cancelled(x: int) -> int:
    """Waits for the cancel token (thread gear) for PATIENCE seconds at most."""
    deadline = time.monotonic() + PATIENCE
    while not gs.cancelled() and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def spin(x: int) -> int:
    """Never checks anything: only killing its process stops it."""
    if x == 1:
        while True:
            pass
    return x


# -- helpers ---------------------------------------------------------------------------------
class Endless:
    """An endless iterator that counts how far it was read."""

    def __init__(self) -> None:
        self.read = 0

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        self.read += 1
        return self.read - 1


def raising_after(n: int, exc: BaseException) -> Iterator[int]:
    yield from range(n)
    raise exc


class SayWhen(Exception):
    pass


def gearshift_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("gearshift")]


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


# -- 1. a million small items ----------------------------------------------------------------
@pytest.mark.parametrize("gear", ["serial", "thread", "process"])
def test_pool_map_over_a_million_items(gear: str) -> None:
    n = 1_000_000
    before = rss()
    with gs.Pool(2, gear=gear) as pool:
        t0 = time.perf_counter()
        out = pool.map(inc, range(n))
        wall = time.perf_counter() - t0
    assert len(out) == n and out[0] == 1 and out[-1] == n and out == list(range(1, n + 1))
    assert wall < 30, f"{gear}: 1M x+1 took {wall:.1f}s"
    grown = (rss() - before) / MiB
    assert grown < 400, f"{gear}: RSS grew {grown:.0f} MiB for 1M ints (the result list alone is ~40 MiB)"


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_pool_starmap_over_a_million_pairs(gear: str) -> None:
    n = 1_000_000
    with gs.Pool(2, gear=gear) as pool:
        out = pool.starmap(add, zip(range(n), range(n), strict=True))
    assert len(out) == n and out[::99_999] == [2 * i for i in range(0, n, 99_999)]


def test_executor_map_over_a_million_items() -> None:
    with gs.Executor("thread", max_workers=2) as ex:
        total = sum(ex.map(inc, range(1_000_000), chunksize=1000))
    assert total == sum(range(1, 1_000_001))


# -- 2. endless input: bounded read-ahead, nothing left after terminate -----------------------


def read_ahead_after_stall(source: Endless, consumed: int, bound: int) -> int:
    """How far past ``consumed`` the source was read once the consumer stalls; stops looking
    as soon as ``bound`` is passed, else after a second (a bounded reader stops well before)."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and source.read - consumed <= bound:
        time.sleep(0.01)
    return source.read - consumed


@pytest.mark.parametrize("gear", GEARS4)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_pool_imap_over_an_endless_generator_stops_reading_while_the_consumer_stalls(gear: str, method: str) -> None:
    source = Endless()
    with gs.Pool(2, gear=gear) as pool:
        it = getattr(pool, method)(inc, source, 4)
        assert len([next(it) for _ in range(100)]) == 100
        ahead = read_ahead_after_stall(source, 100, 2000)
        it.close()
    assert ahead <= 2000, f"{gear} {method}: read {ahead} items ahead of a stalled consumer"


@pytest.mark.parametrize("gear", GEARS4)
def test_executor_map_buffersize_stops_reading_while_the_consumer_stalls(gear: str) -> None:
    source = Endless()
    with gs.Executor(gear, max_workers=2) as ex:
        it = ex.map(inc, source, buffersize=8)
        assert [next(it) for _ in range(10)] == list(range(1, 11))
        ahead = read_ahead_after_stall(source, 10, 100)
        it.close()  # type: ignore[attr-defined]
    assert ahead <= 100, f"{gear}: buffersize=8, yet {ahead} items read ahead of a stalled consumer"


@pytest.mark.parametrize("gear", GEARS4)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("end", ["close", "drop", "terminate"])
def test_imap_over_an_endless_generator_consumed_then_abandoned(gear: str, method: str, end: str) -> None:
    source = Endless()
    pool = gs.Pool(2, gear=gear)
    try:
        it = getattr(pool, method)(inc, source, chunksize=4)
        got = [next(it) for _ in range(2000)]
        if method == "imap":
            assert got == list(range(1, 2001))
        else:
            assert len(set(got)) == 2000 and set(got) <= set(range(1, source.read + 1))
        if end == "close":
            it.close()
        elif end == "drop":
            del it
            gc.collect()
        if end != "terminate":
            assert pool.map(inc, [1, 2, 3]) == [2, 3, 4], "the pool goes on after one stream is abandoned"
            stopped_at = source.read
            assert pool.apply(inc, (1,)) == 2
            assert source.read - stopped_at < 200, "an abandoned stream was read on"
    finally:
        pool.terminate()


@pytest.mark.parametrize("gear", GEARS4)
def test_executor_map_buffersize_over_an_endless_generator_closed(gear: str) -> None:
    source = Endless()
    with gs.Executor(gear, max_workers=2) as ex:
        it = ex.map(inc, source, buffersize=8)
        assert [next(it) for _ in range(500)] == list(range(1, 501))
        it.close()  # type: ignore[attr-defined]
        assert ex.submit(inc, 1).result(timeout=PATIENCE) == 2


def shutdown_on_a_thread(ex: gs.Executor) -> tuple[threading.Thread, threading.Event]:
    """``ex.shutdown(wait=True)`` on a helper thread, and the event it sets once it returned."""
    returned = threading.Event()

    def shut() -> None:
        ex.shutdown(wait=True)
        returned.set()

    helper = threading.Thread(target=shut, name="test-shutdown")
    helper.start()
    return helper, returned


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_shutdown_with_a_live_buffersize_map_over_endless_input_returns(gear: str) -> None:
    ex = gs.Executor(gear, max_workers=2)
    it = ex.map(inc, itertools.count(), buffersize=8)
    assert next(it) == 1
    helper, returned = shutdown_on_a_thread(ex)
    in_time = returned.wait(5.0)
    it.close()  # type: ignore[attr-defined]  # unblocks a hung shutdown, so the test ends cleanly
    helper.join(PATIENCE)
    assert returned.is_set(), "shutdown(wait=True) never returned, even after the map was closed"
    assert in_time, "shutdown(wait=True) did not return in 5 s"


# -- 3. an iterable that raises mid-way -------------------------------------------------------
@pytest.mark.parametrize("gear", GEARS4)
@pytest.mark.parametrize(("n", "at", "chunk", "before"), [(10, 3, 1, 3), (20, 7, 2, 6), (20, 7, 4, 4)])
def test_pool_imap_iterable_raises_cpython_semantics(gear: str, n: int, at: int, chunk: int, before: int) -> None:
    """CPython's test_imap_handle_iterable_exception: the chunk it raised in is dropped, the
    error raised, then StopIteration."""
    def gen() -> Iterator[int]:
        for i in range(n):
            if i == at:
                raise SayWhen("somebody said when")
            yield i

    with gs.Pool(2, gear=gear) as pool:
        it = pool.imap(square, gen(), chunk)
        assert [next(it) for _ in range(before)] == [i * i for i in range(before)]
        with pytest.raises(SayWhen):
            next(it)
        with pytest.raises(StopIteration):
            next(it)


@pytest.mark.parametrize("gear", GEARS4)
def test_pool_imap_unordered_iterable_raises(gear: str) -> None:
    with gs.Pool(2, gear=gear) as pool:
        it = pool.imap_unordered(square, raising_after(10, SayWhen("x")), 1)
        got = []
        with pytest.raises(SayWhen):
            for value in it:
                got.append(value)
        assert sorted(got) == [i * i for i in range(10)]
        with pytest.raises(StopIteration):
            next(it)


@pytest.mark.parametrize("gear", GEARS4)
def test_executor_map_iterable_raises(gear: str) -> None:
    with gs.Executor(gear, max_workers=2) as ex:
        # Without buffersize the iterables are read at once, as the stdlib's map does.
        with pytest.raises(SayWhen):
            ex.map(inc, raising_after(5, SayWhen("eager")))
        it = ex.map(inc, raising_after(5, SayWhen("lazy")), buffersize=2)
        got = []
        with pytest.raises(SayWhen):
            for value in it:
                got.append(value)
        assert got == [1, 2, 3, 4, 5]
        assert ex.submit(inc, 1).result(timeout=PATIENCE) == 2


# -- 4. Executor.map: deadline, dropped mid-iteration ----------------------------------------------
@pytest.mark.parametrize("gear", ["thread", "process", "async"])
def test_executor_map_timeout_is_a_deadline_for_the_whole_map(gear: str, tmp_path: Path) -> None:
    never = str(tmp_path / "never")
    with gs.Executor(gear, max_workers=2) as ex:
        items = [(None if i < 3 else never) for i in range(6)]
        t0 = time.monotonic()
        it = ex.map(lambda p: p if p is None else wait_for_file(p, 1), items, timeout=1.0)
        assert [next(it) for _ in range(3)] == [None, None, None]
        with pytest.raises(TimeoutError):
            next(it)
        waited = time.monotonic() - t0
        assert waited < 1.0 + 5, f"the deadline was 1 s after map(), TimeoutError came after {waited:.1f}s"
        Path(never).touch()  # let the blocked calls finish so the shutdown is prompt


@pytest.mark.parametrize(
    "gear", ["thread", "async", "process"]
)
def test_executor_map_dropped_mid_iteration_cancels_pending_calls(gear: str, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    ran = tmp_path / "ran"
    ran.mkdir()
    with gs.Executor(gear, max_workers=2) as ex:
        it = ex.map(lambda x: touch_then(str(ran), wait_for_file(gate, x)) if x else 0, range(200))
        assert next(it) == 0
        del it
        gc.collect()
        Path(gate).touch()
    count = len(os.listdir(ran))
    assert count < 50, f"{count} of 199 calls still ran after the map's iterator was dropped"


# -- 5. items and results of tens of MiB in the process gear -------------------------------------
@pytest.mark.timeout(60)
def test_big_bytes_through_executor_submit_and_pool_map() -> None:
    item = os.urandom(1024) * (30 * 1024)  # 30 MiB
    with gs.Executor("process", max_workers=2) as ex:
        assert ex.submit(nbytes, item).result(timeout=PATIENCE) == 30 * MiB
        back = ex.submit(big_result, 40 * MiB).result(timeout=PATIENCE)
        assert len(back) == 40 * MiB and back[:1] == b"r" and back[-1:] == b"r"
        del back
        assert ex.submit(ident, item).result(timeout=PATIENCE) == item
    with gs.Pool(2) as pool:
        assert pool.map(nbytes, [item, item[: 20 * MiB], item[: 25 * MiB]]) == [30 * MiB, 20 * MiB, 25 * MiB]
        out = pool.map(big_result, [20 * MiB, 25 * MiB])
        assert [len(b) for b in out] == [20 * MiB, 25 * MiB]


@pytest.mark.timeout(60)
def test_big_numpy_arrays_through_executor_submit_and_pool_map() -> None:
    np = pytest.importorskip("numpy")
    a = np.arange(4 * MiB, dtype=np.float64)  # 32 MiB
    with gs.Executor("process", max_workers=2) as ex:
        back = ex.submit(double_array, a).result(timeout=PATIENCE)
        assert back.dtype == a.dtype and back.shape == a.shape and bool((back == a * 2).all())
        assert ex.submit(nbytes, a[::2]).result(timeout=PATIENCE) == 16 * MiB
    with gs.Pool(2) as pool:
        out = pool.map(double_array, [a, a[: 3 * MiB]])
        assert [o.shape for o in out] == [(4 * MiB,), (3 * MiB,)] and float(out[0][-1]) == 2 * (4 * MiB - 1)
        it = pool.imap(double_array, (a for _ in range(4)))
        assert sum(float(o[1]) for o in it) == 8.0


# -- 6. done-callbacks ------------------------------------------------------------------------
@pytest.mark.parametrize("gear", GEARS4)
def test_done_callback_that_submits_and_waits_on_the_same_executor(gear: str) -> None:
    got: list[int] = []
    done = threading.Event()
    with gs.Executor(gear, max_workers=2) as ex:

        def callback(f: cf.Future[int]) -> None:
            got.append(ex.submit(square, f.result()).result(timeout=PATIENCE))
            done.set()

        ex.submit(square, 3).add_done_callback(callback)
        assert done.wait(PATIENCE), "the callback's own call never finished"
    assert got == [81]


@pytest.mark.parametrize("gear", GEARS4)
def test_a_callback_that_waits_on_a_future_with_a_callback(gear: str, tmp_path: Path) -> None:
    got: list[int] = []
    done = threading.Event()
    inner_called = threading.Event()
    gate = str(tmp_path / "gate")
    with gs.Executor(gear, max_workers=2) as ex:

        def callback(f: cf.Future[int]) -> None:
            inner = ex.submit(wait_file_then, gate, f.result() ** 2)
            inner.add_done_callback(lambda _: inner_called.set())  # before the call can finish
            Path(gate).touch()
            try:
                got.append(inner.result(timeout=3))
            finally:
                done.set()

        outer = ex.submit(wait_file_then, str(tmp_path / "go"), 3)
        outer.add_done_callback(callback)  # before the call can finish: it runs on the callback thread
        Path(tmp_path / "go").touch()
        assert done.wait(PATIENCE)
    assert got == [9], "the inner future never completed while the outer callback waited on it"
    assert inner_called.is_set()


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_pool_callback_that_applies_with_a_callback_and_gets(gear: str, tmp_path: Path) -> None:
    got: list[Any] = []
    done = threading.Event()
    gate = str(tmp_path / "gate")
    with gs.Pool(2, gear=gear) as pool:

        def callback(value: int) -> None:
            try:
                inner = pool.apply_async(wait_file_then, (gate, value**2), callback=lambda _: None)
                Path(gate).touch()
                got.append(inner.get(timeout=3))
            except BaseException as exc:
                got.append(exc)
            finally:
                done.set()

        pool.apply_async(wait_file_then, (str(tmp_path / "go"), 3), callback=callback)
        Path(tmp_path / "go").touch()
        assert done.wait(PATIENCE)
    assert got == [9]


@pytest.mark.parametrize("gear", GEARS4)
def test_a_raising_callback_is_logged_and_the_rest_go_on(gear: str, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    done = threading.Event()
    with gs.Executor(gear, max_workers=2) as ex:
        f = ex.submit(square, 2)

        def bad(_: cf.Future[int]) -> None:
            seen.append("bad")
            raise RuntimeError("callback boom")

        def good(_: cf.Future[int]) -> None:
            seen.append("good")
            done.set()

        f.add_done_callback(bad)
        f.add_done_callback(good)
        assert done.wait(PATIENCE)
        assert f.result() == 4 and seen == ["bad", "good"]
        assert ex.submit(square, 5).result(timeout=PATIENCE) == 25, "the executor goes on after a bad callback"
    assert "callback boom" in caplog.text or "exception calling callback" in caplog.text


@pytest.mark.parametrize("gear", GEARS4)
def test_a_callback_that_shuts_the_executor_down(gear: str) -> None:
    ex = gs.Executor(gear, max_workers=2)
    called = threading.Event()

    def stop(_: cf.Future[int]) -> None:
        ex.shutdown(wait=False)
        called.set()

    f = ex.submit(square, 2)
    f.add_done_callback(stop)
    assert called.wait(PATIENCE)
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(square, 3)
    ex.shutdown(wait=True)


@pytest.mark.parametrize("gear", GEARS4)
def test_a_callback_that_shuts_down_and_waits(gear: str) -> None:
    """shutdown(wait=True) from a callback: the stdlib's thread pool would wait on itself; gearshift's
    callback thread must not join itself."""
    ex = gs.Executor(gear, max_workers=2)
    called = threading.Event()
    later = ex.submit(square, 7)

    def stop(_: cf.Future[int]) -> None:
        ex.shutdown(wait=True)
        called.set()

    ex.submit(square, 2).add_done_callback(stop)
    assert called.wait(PATIENCE), "shutdown(wait=True) in a callback never returned"
    assert later.result(timeout=PATIENCE) == 49
    ex.shutdown(wait=True)


# -- 7. calls that use the executor, locks and threads ------------------------------------------
def test_a_call_that_submits_and_waits_on_the_same_thread_executor() -> None:
    with gs.Executor("thread", max_workers=2) as ex:

        def outer(x: int) -> int:
            return int(ex.submit(square, x).result(timeout=PATIENCE)) + 1

        assert ex.submit(outer, 4).result(timeout=PATIENCE) == 17
        assert [f.result(timeout=PATIENCE) for f in [ex.submit(outer, i) for i in range(1)]] == [1]


def test_nested_submissions_while_the_other_worker_is_free_many_times() -> None:
    """With 2 workers and 1 outer call at a time, an inner call always has a free worker
    (ThreadPoolExecutor(2) runs this at once)."""
    with gs.Executor("thread", max_workers=2) as ex:

        def outer(x: int) -> int:
            return int(ex.submit(square, x).result(timeout=PATIENCE))

        for i in range(50):
            assert ex.submit(outer, i).result(timeout=PATIENCE) == i * i


@pytest.mark.parametrize("gear", ["thread", "async"])
def test_a_call_that_takes_a_lock_the_caller_holds(gear: str) -> None:
    lock = threading.Lock()
    started = threading.Event()

    def locked(x: int) -> int:
        started.set()
        with lock:
            return x + 1

    with gs.Executor(gear, max_workers=2) as ex:
        with lock:
            f = ex.submit(locked, 1) if gear == "thread" else ex.submit(_to_thread(locked), 1)
            assert started.wait(PATIENCE)
            others = [ex.submit(square, i) for i in range(5)]
            assert [o.result(timeout=PATIENCE) for o in others] == [0, 1, 4, 9, 16], "one blocked call stalls the rest"
            assert not f.done()
        assert f.result(timeout=PATIENCE) == 2


def _to_thread(fn: Any) -> Any:
    import asyncio

    async def wrapper(x: int) -> Any:
        return await asyncio.to_thread(fn, x)

    return wrapper


@pytest.mark.parametrize("gear", ["serial", "thread", "async"])
def test_calls_that_start_their_own_threads(gear: str) -> None:
    release = threading.Event()
    started: list[threading.Thread] = []

    def spawn(x: int) -> int:
        t = threading.Thread(target=release.wait, args=(PATIENCE,), name=f"user-{x}")
        t.start()
        started.append(t)
        return x

    with gs.Executor(gear, max_workers=2) as ex:
        assert [f.result(timeout=PATIENCE) for f in [ex.submit(spawn, i) for i in range(6)]] == list(range(6))
    assert all(t.is_alive() for t in started), "the user's threads are the user's business"
    release.set()
    for t in started:
        t.join(PATIENCE)


def spawn_process_thread(x: int) -> int:
    threading.Thread(target=time.sleep, args=(0.05,), daemon=False).start()
    return x


def test_process_calls_that_start_non_daemon_threads() -> None:
    with gs.Executor("process", max_workers=2) as ex:
        assert [f.result(timeout=PATIENCE) for f in [ex.submit(spawn_process_thread, i) for i in range(6)]] == list(
            range(6)
        )


# -- 8. calls raising odd exceptions --------------------------------------------------------------
ODD = [
    (raise_odd, Odd),
    (raise_keyboard_interrupt, KeyboardInterrupt),
    (raise_system_exit, SystemExit),
    (raise_generator_exit, GeneratorExit),
    (raise_group, ExceptionGroup),
    (raise_base_group, BaseExceptionGroup),
    (raise_cancelled, cf.CancelledError),
]


def odd_cases() -> list[Any]:
    cases = []
    for gear in GEARS4:
        for fn, kind in ODD:
            cases.append(pytest.param(gear, fn, kind, id=f"{kind.__name__}-{gear}"))
    return cases


def expected(gear: str, kind: type[BaseException]) -> tuple[type[BaseException], ...]:
    """A coroutine that ends in CancelledError is reported as gs.TaskCancelled by the async gear."""
    if gear == "async" and kind is cf.CancelledError:
        return (cf.CancelledError, gs.TaskCancelled)
    return (kind,)


@pytest.mark.parametrize(("gear", "fn", "kind"), odd_cases())
def test_an_odd_exception_fails_only_its_own_future(gear: str, fn: Any, kind: type[BaseException]) -> None:
    """ThreadPoolExecutor and ProcessPoolExecutor catch BaseException in the worker: the call's
    future fails with it (result() raises it), the pool goes on."""
    with gs.Executor(gear, max_workers=2) as ex:
        f = ex.submit(fn, 3)
        with pytest.raises(BaseException) as caught:
            f.result(timeout=PATIENCE)
        assert isinstance(caught.value, expected(gear, kind)), f"{gear}: {fn.__name__} gave {caught.value!r}"
        assert ex.submit(square, 4).result(timeout=PATIENCE) == 16, "the executor goes on serving"
        assert list(ex.map(square, range(3))) == [0, 1, 4]


@pytest.mark.parametrize(("gear", "fn", "kind"), odd_cases())
def test_an_odd_exception_in_pool_map_is_raised_and_the_pool_goes_on(
    gear: str, fn: Any, kind: type[BaseException]
) -> None:
    with gs.Pool(2, gear=gear) as pool:
        with pytest.raises(expected(gear, kind)):
            pool.map(fn, [1, 2, 3])
        assert pool.map(square, [1, 2, 3]) == [1, 4, 9]


@pytest.mark.parametrize("fn", [raise_two_args, raise_holds_lock])
def test_an_exception_that_cannot_cross_back_fails_its_future_named(fn: Any) -> None:
    with gs.Executor("process", max_workers=2) as ex:
        exc = ex.submit(fn, 3).exception(timeout=PATIENCE)
        assert exc is not None
        text = f"{type(exc).__name__}: {exc}"
        assert ("TwoArgs" in text) or ("HoldsLock" in text), f"the original exception is not named: {text}"
        assert ex.submit(square, 4).result(timeout=PATIENCE) == 16
    with gs.Pool(2) as pool:
        with pytest.raises(BaseException) as caught:
            pool.map(fn, [1, 2])
        assert "TwoArgs" in repr(caught.value) or "HoldsLock" in repr(caught.value) or "TwoArgs" in str(
            caught.value
        ) or "HoldsLock" in str(caught.value)
        assert pool.map(square, [2]) == [4]


# -- 9. cancellation, shutdown, many futures, many threads -------------------------------------
@pytest.mark.parametrize("gear", GEARS4)
def test_cancel_races_with_starting(gear: str, tmp_path: Path) -> None:
    """Cancel each of 300 calls from another thread while they start: a future whose cancel()
    returned True never ran; every future ends exactly one way; none is left PENDING."""
    ran = tmp_path / "ran"
    ran.mkdir()
    rng = random.Random(13)
    with gs.Executor(gear, max_workers=2) as ex:
        futures = [ex.submit(touch_then, str(ran), i) for i in range(300)]
        order = list(range(300))
        rng.shuffle(order)
        cancelled: set[int] = set()

        def canceller() -> None:
            for i in order:
                if futures[i].cancel():
                    cancelled.add(i)

        t = threading.Thread(target=canceller)
        t.start()
        t.join(PATIENCE)
        _, pending = cf.wait(futures, timeout=PATIENCE)
    assert not pending, f"{len(pending)} futures never finished"
    ran_ids = {int(n) for n in os.listdir(ran)}
    assert not (cancelled & ran_ids), f"cancel() returned True for calls that ran: {sorted(cancelled & ran_ids)[:5]}"
    for i, f in enumerate(futures):
        assert f.cancelled() == (i in cancelled)
        if not f.cancelled():
            assert f.result() == i and i in ran_ids


@pytest.mark.parametrize("gear", GEARS4)
def test_shutdown_cancel_futures_with_thousands_queued(gear: str, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    ex = gs.Executor(gear, max_workers=2)
    blockers = [ex.submit(touch_then_wait, str(tmp_path), gate, i) for i in range(ex.workers)]
    for i in range(ex.workers):
        wait_for_file(str(tmp_path / f"started-{i}"))
    queued = [ex.submit(square, i) for i in range(5000)]
    shut = threading.Thread(target=lambda: ex.shutdown(wait=True, cancel_futures=True))
    shut.start()
    # Wait until shutdown has cancelled the queue (not for a fixed time).
    deadline = time.monotonic() + PATIENCE
    while not queued[-1].cancelled() and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(gate).touch()
    shut.join(PATIENCE)
    assert not shut.is_alive(), "shutdown(cancel_futures=True) did not return"
    assert [b.result(timeout=PATIENCE) for b in blockers] == list(range(len(blockers))), "running calls finish"
    states = Counter("cancelled" if f.cancelled() else "done" if f.done() else "pending" for f in queued)
    assert states["pending"] == 0, states
    assert states["cancelled"] >= 4900, f"most queued calls should be cancelled: {states}"
    for i, f in enumerate(queued):
        if not f.cancelled():
            assert f.result() == i * i


@pytest.mark.parametrize("gear", ["serial", "thread", "process", "async"])
def test_as_completed_and_wait_over_ten_thousand_futures(gear: str) -> None:
    n = 10_000
    with gs.Executor(gear, max_workers=2) as ex:
        t0 = time.monotonic()
        futures = [ex.submit(inc, i) for i in range(n)]
        seen = Counter(f.result() for f in cf.as_completed(futures, timeout=60))
        assert seen == Counter(range(1, n + 1))
        done, pending = cf.wait(futures, timeout=PATIENCE)
        assert len(done) == n and not pending
        more = [ex.submit(inc, i) for i in range(n)]
        done, pending = cf.wait(more, timeout=60, return_when=cf.FIRST_COMPLETED)
        assert done
        done, pending = cf.wait(more, timeout=60)
        assert len(done) == n and not pending
        wall = time.monotonic() - t0
    assert wall < 60, f"{gear}: 20k single calls took {wall:.1f}s"


@pytest.mark.parametrize("gear", GEARS4)
def test_submit_from_eight_threads_at_once(gear: str) -> None:
    per_thread = 500
    barrier = threading.Barrier(8)
    callbacks: Counter[int] = Counter()
    lock = threading.Lock()
    futures: dict[int, cf.Future[int]] = {}

    def on_done(key: int) -> Any:
        def callback(f: cf.Future[int]) -> None:
            with lock:
                callbacks[key] += 1

        return callback

    with gs.Executor(gear, max_workers=2) as ex:

        def submitter(t: int) -> None:
            barrier.wait(PATIENCE)
            for i in range(per_thread):
                key = t * per_thread + i
                f = ex.submit(inc, key)
                f.add_done_callback(on_done(key))
                with lock:
                    futures[key] = f

        threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(PATIENCE)
        _, pending = cf.wait(list(futures.values()), timeout=60)
    assert not pending and len(futures) == 8 * per_thread
    assert all(f.result() == k + 1 for k, f in futures.items())
    deadline = time.monotonic() + PATIENCE
    while sum(callbacks.values()) < 8 * per_thread and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(callbacks.values()) == {1} and len(callbacks) == 8 * per_thread, "each callback once"


@pytest.mark.parametrize("gear", GEARS4)
def test_an_executor_dropped_with_work_pending_finishes_it(gear: str, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    ex = gs.Executor(gear, max_workers=2)
    futures = [ex.submit(wait_file_then, gate, i) for i in range(20)]
    ref = weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None, "a dropped executor is collected (its threads hold only its core)"
    Path(gate).touch()
    assert [f.result(timeout=PATIENCE) for f in futures] == list(range(20))


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_pool_after_close_or_terminate_says_so(gear: str) -> None:
    pool = gs.Pool(2, gear=gear)
    assert pool.map(inc, [1]) == [2]
    pool.close()
    for call in (
        lambda: pool.apply(inc, (1,)),
        lambda: pool.apply_async(inc, (1,)),
        lambda: pool.map(inc, [1]),
        lambda: pool.starmap(add, [(1, 2)]),
        lambda: pool.imap(inc, [1]),
        lambda: pool.imap_unordered(inc, [1]),
        lambda: pool.map_async(inc, [1]),
    ):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    pool.join()
    pool2 = gs.Pool(2, gear=gear)
    pool2.terminate()
    with pytest.raises(ValueError, match="Pool not running"):
        pool2.map(inc, [1])
    with pytest.raises(ValueError, match="Pool not running"), pool2:
        pass
    pool2.join()


def test_executor_after_shutdown_says_so() -> None:
    ex = gs.Executor("thread", max_workers=2)
    assert ex.submit(inc, 1).result(timeout=PATIENCE) == 2
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(inc, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(inc, [1])
    ex.shutdown()  # twice is fine


# -- 10. retries, rate, per-call timeout ---------------------------------------------------------
def flaky(folder: str, x: int, fails: int = 2) -> int:
    marks = Path(folder, f"{x}.{len(list(Path(folder).glob(f'{x}.*')))}")
    marks.touch()
    if len(list(Path(folder).glob(f"{x}.*"))) <= fails:
        raise ConnectionError(f"flaky {x}")
    return x


@pytest.mark.parametrize("gear", GEARS4)
def test_retries_on_the_executor(gear: str, tmp_path: Path) -> None:
    with gs.Executor(gear, max_workers=2, retries=gs.Retry(3, backoff=0.01)) as ex:
        futures = [ex.submit(flaky, str(tmp_path), i) for i in range(5)]
        assert [f.result(timeout=PATIENCE) for f in futures] == list(range(5))
        assert list(ex.map(flaky, [str(tmp_path)] * 3, range(10, 13))) == [10, 11, 12]
    with gs.Executor(gear, max_workers=2, retries=1) as ex, pytest.raises(ConnectionError):
        ex.submit(flaky, str(tmp_path), 99).result(timeout=PATIENCE)


@pytest.mark.parametrize("gear", GEARS4)
def test_rate_per_call_on_the_executor(gear: str) -> None:
    with gs.Executor(gear, max_workers=4, rate="20/s") as ex:
        ex.submit(inc, 0).result(timeout=PATIENCE)  # workers up before timing
        t0 = time.monotonic()
        futures = [ex.submit(inc, i) for i in range(21)]
        assert [f.result(timeout=PATIENCE) for f in futures] == list(range(1, 22))
        wall = time.monotonic() - t0
    assert 0.7 <= wall <= 10, f"{gear}: 21 calls at 20/s took {wall:.2f}s"


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_rate_per_item_in_executor_map_and_pool_map(gear: str) -> None:
    with gs.Executor(gear, max_workers=4, rate="20/s") as ex:
        ex.submit(inc, 0).result(timeout=PATIENCE)
        t0 = time.monotonic()
        assert list(ex.map(inc, range(21), chunksize=10)) == list(range(1, 22))
        wall = time.monotonic() - t0
    assert 0.7 <= wall <= 10, f"{gear}: Executor.map of 21 at 20/s took {wall:.2f}s"
    with gs.Pool(4, gear=gear, rate="20/s") as pool:
        pool.apply(inc, (0,))
        t0 = time.monotonic()
        assert pool.map(inc, range(21), chunksize=21) == list(range(1, 22))
        wall = time.monotonic() - t0
    assert 0.7 <= wall <= 10, f"{gear}: Pool.map of 21 at 20/s (one chunk) took {wall:.2f}s"


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_timeout_per_call(gear: str) -> None:
    fn = block_until_cancelled if gear == "thread" else spin
    with gs.Executor(gear, max_workers=2, timeout=0.5) as ex:
        t0 = time.monotonic()
        slow = ex.submit(fn, 1)
        fast = [ex.submit(inc, i) for i in range(10)]
        with pytest.raises(gs.TaskTimeout):
            slow.result(timeout=PATIENCE)
        took = time.monotonic() - t0
        assert [f.result(timeout=PATIENCE) for f in fast] == list(range(1, 11))
        assert ex.submit(inc, 5).result(timeout=PATIENCE) == 6, "a replaced worker serves on"
    assert took < 10, f"a 0.5 s per-call timeout fired after {took:.1f}s"


@pytest.mark.parametrize("gear", ["thread", "async", "process"])
def test_executor_map_past_its_deadline_cancels_what_has_not_started(gear: str, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    ran = tmp_path / "ran"
    ran.mkdir()
    with gs.Executor(gear, max_workers=2) as ex:
        it = ex.map(lambda x: touch_then(str(ran), wait_file_then(gate, x)), range(100), timeout=0.5)
        with pytest.raises(TimeoutError):
            next(it)
        Path(gate).touch()
    count = len(os.listdir(ran))
    assert count < 50, f"{count} of 100 calls still ran after the map's deadline passed"


async def sleep_forever_async(x: int) -> int:
    import asyncio

    if x == 1:
        await asyncio.sleep(PATIENCE)
    return x


def test_timeout_per_call_in_the_async_gear() -> None:
    with gs.Executor("async", max_workers=4, timeout=0.5) as ex:
        t0 = time.monotonic()
        slow = ex.submit(sleep_forever_async, 1)
        fast = [ex.submit(sleep_forever_async, i) for i in (2, 3)]
        with pytest.raises(gs.TaskTimeout):
            slow.result(timeout=PATIENCE)
        assert time.monotonic() - t0 < 10
        assert [f.result(timeout=PATIENCE) for f in fast] == [2, 3]


def test_timeout_and_retries_together_in_the_process_gear(tmp_path: Path) -> None:
    """Each attempt gets its own deadline; a call that always times out fails after its retries."""
    retry = gs.Retry(1, backoff=0.01, on=(gs.TaskTimeout,))
    with gs.Executor("process", max_workers=2, timeout=0.5, retries=retry) as ex:
        t0 = time.monotonic()
        with pytest.raises(gs.TaskTimeout):
            ex.submit(spin, 1).result(timeout=PATIENCE)
        assert time.monotonic() - t0 < 15
        assert ex.submit(flaky, str(tmp_path), 7, 0).result(timeout=PATIENCE) == 7
