"""gs.ThreadPoolExecutor / gs.ProcessPoolExecutor behave as the running interpreter's stdlib pools."""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import multiprocessing as mp
import os
import sys
import threading
from concurrent.futures.process import BrokenProcessPool
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

import pytest

import gearshift as gs
from gearshift.dropins import ProcessPoolExecutor, ThreadPoolExecutor

EXTRAS = {"task_timeout", "retries"}
PAIRS = [(ThreadPoolExecutor, cf.ThreadPoolExecutor), (ProcessPoolExecutor, cf.ProcessPoolExecutor)]


def _params(fn: Any, drop: set[str] = frozenset()) -> list[tuple[str, Any, Any]]:  # type: ignore[assignment]
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name not in drop]


def _fail_init() -> None:
    raise RuntimeError("initializer failed on purpose")


def _start_method() -> str:
    return mp.get_start_method()


def _name() -> str:
    return threading.current_thread().name


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=["thread", "process"])
def test_signatures_are_the_stdlibs(ours: type, theirs: type) -> None:
    assert _params(ours, EXTRAS) == _params(theirs)
    extras = [p for p in inspect.signature(ours).parameters.values() if p.name in EXTRAS]
    assert {p.name for p in extras} == EXTRAS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)
    for method in ("submit", "map", "shutdown"):
        assert _params(getattr(ours, method)) == _params(getattr(theirs, method)), method
    for method in ("terminate_workers", "kill_workers"):
        assert hasattr(ours, method) == hasattr(theirs, method), method


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=["thread", "process"])
def test_are_executors_and_gs_executors(ours: type, theirs: type) -> None:
    assert issubclass(ours, cf.Executor)
    assert issubclass(ours, gs.Executor)


def _error(make: Any) -> tuple[type[BaseException], str]:
    with pytest.raises(Exception) as info:
        make()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=["thread", "process"])
@pytest.mark.parametrize(
    "kwargs",
    [{"max_workers": 0}, {"max_workers": -1}, {"initializer": 3}],
    ids=["zero", "negative", "initializer"],
)
def test_errors_are_the_stdlibs(ours: type, theirs: type, kwargs: dict[str, Any]) -> None:
    assert _error(lambda: ours(**kwargs)) == _error(lambda: theirs(**kwargs))


@pytest.mark.parametrize("value", [0, "3"])
def test_max_tasks_per_child_errors_are_the_stdlibs(value: Any) -> None:
    spawn = mp.get_context("spawn")
    assert _error(lambda: ProcessPoolExecutor(1, spawn, max_tasks_per_child=value)) == _error(
        lambda: cf.ProcessPoolExecutor(1, spawn, max_tasks_per_child=value)
    )


def test_max_tasks_per_child_refuses_fork_and_defaults_to_spawn() -> None:
    fork = mp.get_context("fork")
    ours = _error(lambda: ProcessPoolExecutor(1, fork, max_tasks_per_child=2))
    assert ours == _error(lambda: cf.ProcessPoolExecutor(1, fork, max_tasks_per_child=2))
    ex = ProcessPoolExecutor(1, max_tasks_per_child=2)
    try:
        assert ex._mp_context.get_start_method() == "spawn"
    finally:
        ex.shutdown()


def test_default_worker_counts_are_the_stdlibs() -> None:
    for ours, theirs in PAIRS:
        mine, stdlib = ours(), theirs()
        try:
            assert mine._max_workers == stdlib._max_workers
            assert mine.workers == stdlib._max_workers
        finally:
            mine.shutdown()
            stdlib.shutdown()


def test_submit_after_shutdown_is_the_stdlibs_error() -> None:
    for ours, theirs in PAIRS:
        mine, stdlib = ours(1), theirs(1)
        mine.shutdown()
        stdlib.shutdown()
        assert _error(lambda m=mine: m.submit(pow, 2, 3)) == _error(lambda s=stdlib: s.submit(pow, 2, 3))


def test_map_timeout_is_a_deadline_for_the_whole_map() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(2) as ex:
        results = ex.map(release.wait, [10, 10], timeout=0.2)
        with pytest.raises(cf.TimeoutError):
            next(results)
        release.set()


def test_result_timeout_zero_polls() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(1) as ex:
        future = ex.submit(release.wait, 10)
        with pytest.raises(cf.TimeoutError):
            future.result(timeout=0)
        release.set()
        assert future.result(timeout=10) is True
        assert future.result(timeout=0) is True


def test_queued_future_cancels_and_wait_sees_it() -> None:
    """As the stdlib's: a cancelled queued call never runs; ``wait`` sees it once a worker
    reaches it (it is then CANCELLED_AND_NOTIFIED), not before."""
    release = threading.Event()
    with ThreadPoolExecutor(1) as ex:
        running = ex.submit(release.wait, 10)
        queued = ex.submit(pow, 2, 3)
        assert queued.cancel()
        assert queued.cancelled() and not running.cancel()
        release.set()
        done, _ = cf.wait([queued], timeout=10)
        assert done == {queued}
        assert running.result(timeout=10) is True


def test_thread_name_prefix_names_the_workers() -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="crawler") as ex:
        assert ex.submit(_name).result() == "crawler_0"
    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(_name).result().startswith("ThreadPoolExecutor-")


def test_failing_initializer_breaks_the_thread_pool() -> None:
    with ThreadPoolExecutor(1, initializer=_fail_init) as ex:
        future = ex.submit(pow, 2, 3)
        with pytest.raises(BrokenThreadPool, match="A thread initializer failed"):
            future.result(timeout=30)
        with pytest.raises(BrokenThreadPool):
            ex.submit(pow, 2, 3)


def test_failing_initializer_breaks_the_process_pool() -> None:
    with ProcessPoolExecutor(1, initializer=_fail_init) as ex:
        future = ex.submit(pow, 2, 3)
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=60)
        with pytest.raises(BrokenProcessPool):
            ex.submit(pow, 2, 3)


def test_a_dead_worker_breaks_the_process_pool() -> None:
    with mp.Manager() as manager:
        release = manager.Event()
        with ProcessPoolExecutor(2) as ex:
            waiting = ex.submit(release.wait, 60)
            crashed = ex.submit(os._exit, 3)
            with pytest.raises(BrokenProcessPool, match="terminated abruptly") as info:
                crashed.result(timeout=60)
            assert isinstance(info.value.__cause__, gs.WorkerCrashed)
            with pytest.raises(BrokenProcessPool):
                waiting.result(timeout=60)
            with pytest.raises(BrokenProcessPool):
                ex.submit(pow, 2, 3)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_mp_context_is_honoured(method: str) -> None:
    with ProcessPoolExecutor(1, mp.get_context(method)) as ex:
        assert ex.submit(_start_method).result(timeout=60) == method
        assert ex._mp_context.get_start_method() == method


def test_process_map_chunks_and_lambdas() -> None:
    with ProcessPoolExecutor(2) as ex:
        assert list(ex.map(pow, range(10), range(10), chunksize=3)) == [pow(i, i) for i in range(10)]
        assert ex.submit(lambda: 42).result(timeout=60) == 42
        with pytest.raises(ValueError, match=r"chunksize must be >= 1\."):
            ex.map(pow, [1], [1], chunksize=0)


def test_task_timeout_is_an_extra() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(1, task_timeout=0.2) as ex:
        with pytest.raises(gs.TaskTimeout):
            ex.submit(release.wait, 10).result(timeout=30)
        release.set()
        assert ex.submit(pow, 2, 3).result(timeout=30) == 8


@pytest.mark.skipif(sys.version_info < (3, 14), reason="3.14 API")
def test_314_extras() -> None:
    with ThreadPoolExecutor(2) as ex:
        assert list(ex.map(pow, range(6), range(6), buffersize=2)) == [pow(i, i) for i in range(6)]
    ex2 = ProcessPoolExecutor(1)
    assert ex2.submit(pow, 2, 3).result(timeout=60) == 8
    ex2.terminate_workers()
    with pytest.raises(RuntimeError):
        ex2.submit(pow, 2, 3)
    with ProcessPoolExecutor(1) as ex3:
        assert ex3.submit(pow, 2, 4).result(timeout=60) == 16
        ex3.kill_workers()


def _raise_123() -> None:
    raise RuntimeError(123)


def test_process_traceback_is_the_stdlibs() -> None:
    with ProcessPoolExecutor(1) as ex, pytest.raises(RuntimeError) as info:
        ex.submit(_raise_123).result(timeout=60)
    cause = info.value.__cause__
    assert type(cause) is cf.process._RemoteTraceback
    assert "raise RuntimeError(123)" in cause.tb
