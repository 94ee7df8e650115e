"""Fault injection: timeouts, worker crashes, initializers and many failures, in every gear.

Each test injects one fault deterministically (an item that sleeps, spins, exits,
segfaults or is SIGKILLed by the test) and checks that only that item fails, named,
that every other item's result is there exactly once, and (autouse fixture) that no
thread or process is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import faultlib as fl
import psutil
import pytest

import gearshift as gs

GEARS = ["serial", "thread", "process", "async"]
#: Generous bound for "promptly" on a busy 2-core machine.
PATIENCE = 30.0


def assert_only_failed(results: list[Any], bad: set[int], error: type[BaseException]) -> list[gs.Failure]:
    """Every item not in ``bad`` has its result (2x) in place; every item in ``bad`` is a Failure."""
    failures = []
    for i, value in enumerate(results):
        if i in bad:
            assert isinstance(value, gs.Failure), (i, value)
            assert isinstance(value.exception, error), value
            assert (value.index, value.item) == (i, i)
            failures.append(value)
        else:
            assert value == 2 * i, (i, value)
    return failures


# -- timeouts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("gear", GEARS)
def test_timeout_of_a_sleeping_item_fails_only_that_item(gear: str) -> None:
    fn = partial(fl.asleep_on if gear == "async" else fl.sleep_on, frozenset({2}))
    start = time.monotonic()
    results = gs.map(fn, range(6), gear=gear, workers=2, timeout=0.5, errors="collect", chunksize=1)
    assert time.monotonic() - start < PATIENCE
    (failure,) = assert_only_failed(results, {2}, gs.TaskTimeout)
    assert failure.exception.timeout == 0.5
    assert "#2" in str(failure.exception) and "timed out after 0.5s" in str(failure.exception)
    assert results.report.failed == 1 and results.report.succeeded == 5


@pytest.mark.parametrize("gear", GEARS)
def test_timeout_under_errors_raise_raises_task_timeout(gear: str) -> None:
    fn = partial(fl.asleep_on if gear == "async" else fl.sleep_on, frozenset({1}))
    with pytest.raises(gs.TaskTimeout) as info:
        gs.map(fn, range(3), gear=gear, workers=2, timeout=0.3, chunksize=1)
    assert info.value.index == 1 and info.value.item == 1


@pytest.mark.parametrize("chunksize", [1, 5])
def test_process_timeout_kills_a_cpu_loop_and_reruns_the_rest_of_its_batch(chunksize: int) -> None:
    """A loop that never checks anything: the worker is killed and replaced; nothing is lost."""
    fn = partial(fl.spin_on, frozenset({7}))
    results = gs.map(fn, range(20), gear="process", workers=2, timeout=1.0, errors="collect", chunksize=chunksize)
    assert len(results) == 20
    assert_only_failed(results, {7}, gs.TaskTimeout)
    assert results.report.succeeded == 19 and results.report.failed == 1


def test_process_timeout_replaces_the_killed_worker() -> None:
    """After the kill, the run still has ``workers`` workers: later items run in a new process."""
    spin = partial(fl.spin_on, frozenset({0}))
    with gs.Executor(gear="process", workers=1, timeout=0.5) as ex:
        first_pid = ex.submit(fl.pid_of, 0).result()
        with pytest.raises(gs.TaskTimeout):
            ex.submit(spin, 0).result(timeout=PATIENCE)
        second_pid = ex.submit(fl.pid_of, 0).result(timeout=PATIENCE)
    assert second_pid != first_pid
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE


# Thread gear: a timed-out item is reported at once, its token is set, its thread stays busy.
_gate = threading.Event()
_saw_cancel = threading.Event()
_returned = threading.Event()


def _gated(x: int) -> int:
    if x == 0:
        _gate.wait(PATIENCE)  # ignore the timeout until the test has seen it reported
        deadline = time.monotonic() + PATIENCE
        while not gs.cancelled() and time.monotonic() < deadline:
            time.sleep(0.005)
        if gs.cancelled():
            _saw_cancel.set()
        _returned.set()
        return -1
    return threading.get_ident()


def test_thread_timeout_is_reported_at_once_and_sets_the_cancel_token() -> None:
    for event in (_gate, _saw_cancel, _returned):
        event.clear()
    try:
        with gs.imap(_gated, [0, 1], gear="thread", workers=1, timeout=0.3, errors="collect", ordered=False) as it:
            first = next(it)
            # Reported while the function is still running: threads cannot be killed.
            assert isinstance(first, gs.Failure) and isinstance(first.exception, gs.TaskTimeout)
            assert first.index == 0 and not _returned.is_set()
            # The stuck thread counts as busy: item 1 ran on a new thread, not after item 0.
            other = next(it)
            assert isinstance(other, int) and other != threading.get_ident()
            assert not _returned.is_set()
            _gate.set()
            assert list(it) == []
        assert _saw_cancel.wait(PATIENCE), "the timed-out function never saw gs.cancelled()"
    finally:
        _gate.set()


def test_thread_timeout_cooperative_loop_exits_via_cancelled() -> None:
    fn = partial(fl.sleep_on, frozenset({0, 3}))
    results = gs.map(fn, range(5), gear="thread", workers=2, timeout=0.3, errors="collect", chunksize=1)
    assert_only_failed(results, {0, 3}, gs.TaskTimeout)


_release = threading.Event()


def _uncooperative(x: int) -> int:
    if x == 0:
        _release.wait(PATIENCE)  # never looks at gs.cancelled()
    return 2 * x


def test_thread_gear_warns_about_a_thread_that_outlives_cancellation() -> None:
    _release.clear()
    try:
        with pytest.warns(RuntimeWarning, match="ignore gs.cancelled"):
            results = gs.map(_uncooperative, range(3), gear="thread", workers=2, timeout=0.2, errors="collect")
        assert_only_failed(results, {0}, gs.TaskTimeout)
    finally:
        _release.set()


_async_cancelled = threading.Event()


async def _acancellable(x: int) -> int:
    if x == 1:
        try:
            await asyncio.sleep(fl.FOREVER)
        except asyncio.CancelledError:
            _async_cancelled.set()
            raise
    return 2 * x


def test_async_timeout_cancels_the_task() -> None:
    _async_cancelled.clear()
    results = gs.map(_acancellable, range(4), gear="async", timeout=0.3, errors="collect")
    assert_only_failed(results, {1}, gs.TaskTimeout)
    assert _async_cancelled.is_set()


def test_async_timeout_of_a_blocking_function_sets_its_cancel_token() -> None:
    """A plain function in the async gear runs in a thread: the timeout must reach it too."""
    fn = partial(fl.sleep_on, frozenset({1}))
    start = time.monotonic()
    results = gs.map(fn, range(4), gear="async", timeout=0.3, errors="collect")
    assert time.monotonic() - start < PATIENCE
    assert_only_failed(results, {1}, gs.TaskTimeout)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="SIGALRM needs POSIX")
def test_serial_timeout_interrupts_the_main_thread_and_restores_sigalrm() -> None:
    before = signal.getsignal(signal.SIGALRM)
    results = gs.map(partial(fl.sleep_on, frozenset({1})), range(3), gear="serial", timeout=0.2, errors="collect")
    assert_only_failed(results, {1}, gs.TaskTimeout)
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("gear", ["thread", "process", "async"])
def test_executor_timeout_matches_map(gear: str) -> None:
    stuck = {"thread": fl.sleep_on, "process": fl.spin_on, "async": fl.asleep_on}[gear]
    with gs.Executor(gear=gear, workers=2, timeout=0.5) as ex:
        spin = ex.submit(stuck, frozenset({1}), 1)
        fine = [ex.submit(fl.double, i) for i in range(6)]
        error = spin.exception(timeout=PATIENCE)
        assert [f.result(timeout=PATIENCE) for f in fine] == [2 * i for i in range(6)]
    assert isinstance(error, gs.TaskTimeout)


# -- worker crashes ----------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "exitcode", "words"), [("exit", 7, "exit code 7"), ("segv", -11, "SIGSEGV")])
@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_crashing_task_fails_only_its_own_item(kind: str, exitcode: int, words: str, chunksize: int) -> None:
    fn = partial(fl.crash_on, kind, frozenset({5}))
    results = gs.map(fn, range(12), gear="process", workers=2, errors="collect", chunksize=chunksize)
    (failure,) = assert_only_failed(results, {5}, gs.WorkerCrashed)
    error = failure.exception
    assert isinstance(error, gs.WorkerCrashed)
    assert error.exitcode == exitcode and (error.item, error.index) == (5, 5)
    assert words in str(error) and "#5" in str(error)


def test_sigkill_of_a_worker_mid_run_fails_only_its_item(tmp_path: Path) -> None:
    killer = fl.kill_when_parked(tmp_path)
    try:
        fn = partial(fl.park_on, str(tmp_path), frozenset({3}))
        results = gs.map(fn, range(10), gear="process", workers=2, errors="collect", chunksize=2)
    finally:
        killer.join(PATIENCE)
    (failure,) = assert_only_failed(results, {3}, gs.WorkerCrashed)
    assert failure.exception.exitcode == -signal.SIGKILL
    assert "SIGKILL" in str(failure.exception)


def test_a_crash_under_errors_raise_names_the_item() -> None:
    with pytest.raises(gs.WorkerCrashed, match=r"exit code 7\) while running item #2"):
        gs.map(partial(fl.crash_on, "exit", frozenset({2})), range(6), gear="process", workers=2, chunksize=1)


def test_executor_crash_fails_only_its_future() -> None:
    with gs.Executor(gear="process", workers=2) as ex:
        crash = ex.submit(fl.crash_on, "segv", frozenset({0}), 0)
        fine = [ex.submit(fl.double, i) for i in range(8)]
        assert isinstance(crash.exception(timeout=PATIENCE), gs.WorkerCrashed)
        assert [f.result(timeout=PATIENCE) for f in fine] == [2 * i for i in range(8)]


def _leave_on_3(x: int) -> int:
    if x == 3:
        raise SystemExit(3)
    return 2 * x


@pytest.mark.parametrize("gear", ["serial", "thread", "async"])
@pytest.mark.parametrize("errors", ["raise", "collect"])
def test_system_exit_in_an_in_process_task_reaches_the_caller(gear: str, errors: Any) -> None:
    """sys.exit() in a task that shares the caller's process means "stop": it is not collected."""
    start = time.monotonic()
    with pytest.raises(SystemExit):
        gs.map(_leave_on_3, range(10), gear=gear, workers=2, errors=errors, chunksize=1)
    assert time.monotonic() - start < PATIENCE


def test_system_exit_in_a_process_task_fails_only_its_item() -> None:
    results = gs.map(_leave_on_3, range(6), gear="process", workers=2, errors="collect")
    assert isinstance(results[3], gs.Failure) and isinstance(results[3].exception, SystemExit)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 2, 4, 8, 10]


# -- recycling and initializers -------------------------------------------------------------
def test_max_tasks_per_worker_recycles_processes() -> None:
    results = gs.map(fl.pid_of, range(24), gear="process", workers=2, max_tasks_per_worker=3, chunksize=1)
    assert len(results) == 24
    assert len(set(results)) >= 24 // 3 > 2
    assert all(n <= 3 for n in (results.count(p) for p in set(results)))


def test_initializer_runs_once_per_process_worker_even_when_recycled() -> None:
    results = gs.map(
        fl.read_mark, range(20), gear="process", workers=2, chunksize=1,
        initializer=fl.init_mark, initargs=("ready",), max_tasks_per_worker=5,
    )
    assert {value for _, _, value, _ in results} == {"ready"}
    assert {calls for _, _, _, calls in results} == {1}  # once in each process
    assert len({pid for pid, _, _, _ in results}) >= 4


def test_initializer_runs_once_per_thread() -> None:
    fl._init_calls.clear()
    results = gs.map(fl.read_mark, range(50), gear="thread", workers=3, initializer=fl.init_mark, initargs=("t",))
    assert {value for _, _, value, _ in results} == {"t"}
    threads = {tid for _, tid, _, _ in results}
    assert 1 <= len(threads) <= 3 and len(fl._init_calls) <= 3 and len(fl._init_calls) >= len(threads)


@pytest.mark.parametrize("gear", ["serial", "async"])
def test_initializer_runs_once_in_caller_side_gears(gear: str) -> None:
    fl._init_calls.clear()
    gs.map(fl.read_mark, range(10), gear=gear, initializer=fl.init_mark, initargs=("c",))
    assert fl._init_calls == ["c"]


@pytest.mark.parametrize("gear", GEARS)
def test_initializer_error_raises_promptly(gear: str) -> None:
    start = time.monotonic()
    with pytest.raises(gs.InitializerError) as info:
        gs.map(fl.double, range(100), gear=gear, workers=2, initializer=fl.init_fail, initargs=("no db",))
    assert time.monotonic() - start < PATIENCE
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(isinstance(e, RuntimeError) and "no db" in str(e) for e in chain), chain


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_executor_initializer_error_fails_the_futures(gear: str) -> None:
    with gs.Executor(gear=gear, workers=2, initializer=fl.init_fail, initargs=("no db",)) as ex:
        future = ex.submit(fl.double, 1)
        # the executor cannot run calls at all: it is broken, as the stdlib's is (issue 13)
        with pytest.raises(gs.BrokenExecutor) as info:
            future.result(timeout=PATIENCE)
        assert isinstance(info.value.__cause__, gs.InitializerError)


# -- many failures -------------------------------------------------------------------------
@pytest.mark.parametrize("gear", ["thread", "process"])
def test_ten_thousand_items_with_one_percent_failures(gear: str) -> None:
    results = gs.map(partial(fl.fail_multiples, 100), range(10_000), gear=gear, workers=2, errors="collect")
    assert len(results) == 10_000
    failures = [r for r in results if isinstance(r, gs.Failure)]
    assert len(failures) == 100
    assert [f.index for f in failures] == list(range(0, 10_000, 100))
    assert all(results[f.index] is f and f.item == f.index for f in failures)
    assert all(isinstance(f.exception, ValueError) and "injected" in f.traceback for f in failures)
    assert sum(1 for r in results if not isinstance(r, gs.Failure)) == 9_900
    assert results.report.succeeded == 9_900 and results.report.failed == 100


def _mp_helper(proc: psutil.Process) -> bool:
    """multiprocessing's own long-lived helpers (3.14's forkserver, the resource tracker)."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return True
    return "forkserver" in cmd or "resource_tracker" in cmd


def test_no_worker_survives_a_fault_run() -> None:
    """Belt and braces beside the autouse fixture: psutil sees no child after a crashy run."""
    gs.map(partial(fl.crash_on, "exit", frozenset({1, 4})), range(8), gear="process", workers=2, errors="skip")
    me = psutil.Process(os.getpid())
    _, alive = psutil.wait_procs(
        [p for p in me.children(recursive=True) if not _mp_helper(p)], timeout=5
    )
    assert not alive


@pytest.mark.parametrize("gear", ["async", "thread"])
def test_pool_map_awaits_a_coroutine_function_in_chunks(gear: str) -> None:
    """Regression: chunked calls of an async function returned unawaited coroutines."""
    with gs.Pool(2, gear=gear) as pool:
        assert pool.map(partial(fl.asleep_on, frozenset()), range(10), chunksize=3) == [2 * i for i in range(10)]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="SIGALRM needs POSIX")
def test_serial_timeout_stops_a_pure_python_cpu_loop() -> None:
    results = gs.map(partial(fl.spin_on, frozenset({0})), range(3), gear="serial", timeout=0.3, errors="collect")
    assert_only_failed(results, {0}, gs.TaskTimeout)


def test_amap_timeout_cancels_tasks_on_the_callers_loop() -> None:
    _async_cancelled.clear()

    async def main() -> list[Any]:
        return [r async for r in gs.amap(_acancellable, range(4), timeout=0.3, errors="collect")]

    results = asyncio.run(main())
    assert_only_failed(results, {1}, gs.TaskTimeout)
    assert _async_cancelled.is_set()


def test_amap_system_exit_in_a_task_reaches_the_caller() -> None:
    async def leave(x: int) -> int:
        if x == 2:
            raise SystemExit(2)
        return x

    async def main() -> list[Any]:
        return [r async for r in gs.amap(leave, range(5), errors="collect")]

    with pytest.raises(SystemExit):
        asyncio.run(main())


def test_process_workers_die_on_sigterm_even_when_the_parent_handles_it() -> None:
    """The engine turns SIGTERM into SystemExit in the caller; a forked worker must not inherit
    that handler, or stopping it would fail an item and wait out the kill grace instead."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        assert gs.map(fl.sigterm_is_default, range(4), gear="process", workers=2) == [True] * 4
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert gs.map(fl.sigterm_is_default, range(4), gear="process", workers=2) == [True] * 4


def test_async_gear_warns_about_a_blocking_call_that_outlives_its_timeout() -> None:
    _release.clear()
    try:
        with pytest.warns(RuntimeWarning, match="ignore gs.cancelled"):
            results = gs.map(_uncooperative, range(3), gear="async", timeout=0.2, errors="collect")
        assert_only_failed(results, {0}, gs.TaskTimeout)
    finally:
        _release.set()


def test_an_initializer_that_kills_its_worker_raises_initializer_error() -> None:
    start = time.monotonic()
    with pytest.raises(gs.InitializerError, match="exit code 5"):
        gs.map(fl.double, range(50), gear="process", workers=2, initializer=fl.init_exit, initargs=(5,))
    assert time.monotonic() - start < PATIENCE


@pytest.mark.parametrize("bad", [0, 5])
def test_auto_gear_times_out_an_item_whichever_gear_it_chose(bad: int) -> None:
    """The probe item (0) or a later one (5): either way only that item fails."""
    fn = partial(fl.sleep_on, frozenset({bad}))
    results = gs.map(fn, range(8), gear="auto", timeout=0.5, errors="collect")
    assert_only_failed(results, {bad}, gs.TaskTimeout)
