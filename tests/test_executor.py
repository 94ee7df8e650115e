"""gs.Executor behaves like the stdlib executors (several checks borrowed from CPython's own tests)."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import GEARS, PATIENCE, add, asquare, exit_on, fail_on, pid, raise_value_error, ran_files, record, square
from helpers import wait_for as wait_for_file

import gearshift as gs


def echo_kwargs(**kwargs: Any) -> dict[str, Any]:
    return kwargs


@pytest.fixture(params=GEARS)
def ex(request: pytest.FixtureRequest) -> Iterator[gs.Executor]:
    executor = gs.Executor(request.param, workers=2)
    yield executor
    executor.shutdown(wait=True)


def poll(condition: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_is_a_concurrent_futures_executor(ex: gs.Executor) -> None:
    assert isinstance(ex, cf.Executor)


def test_submit_result(ex: gs.Executor) -> None:
    assert ex.submit(add, 1, 2, z=3).result(timeout=PATIENCE) == 6
    assert ex.submit(asquare, 4).result(timeout=PATIENCE) == 16
    assert ex.submit(lambda: 5).result(timeout=PATIENCE) == 5


def test_submit_keyword_named_fn_and_self(ex: gs.Executor) -> None:
    assert ex.submit(echo_kwargs, fn=1, self=2).result(timeout=PATIENCE) == {"fn": 1, "self": 2}


def test_submit_requires_callable(ex: gs.Executor) -> None:
    with pytest.raises(TypeError):
        ex.submit(42)  # type: ignore[arg-type]


def test_exception_via_future(ex: gs.Executor) -> None:
    future = ex.submit(raise_value_error, "nope")
    exc = future.exception(timeout=PATIENCE)
    assert isinstance(exc, ValueError) and "nope" in str(exc)
    with pytest.raises(ValueError, match="nope"):
        future.result()
    assert future.done() and not future.cancelled()


def test_future_states(ex: gs.Executor, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    future = ex.submit(wait_for_file, gate, "done")
    poll(future.running, "the future to start running")
    assert not future.done() and not future.cancel(), "a running future cannot be cancelled"
    Path(gate).touch()
    assert future.result(timeout=PATIENCE) == "done"
    assert future.done() and not future.running()


def test_wait_and_as_completed(ex: gs.Executor) -> None:
    futures = [ex.submit(square, i) for i in range(10)]
    done, not_done = cf.wait(futures, timeout=PATIENCE)
    assert len(done) == 10 and not not_done
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=PATIENCE)) == [i * i for i in range(10)]


def test_wait_first_exception(ex: gs.Executor, tmp_path: Path) -> None:
    if ex.gear.name == "serial":
        pytest.skip("one call at a time: the blocked call would hold up the failing one")
    blocked = ex.submit(wait_for_file, str(tmp_path / "gate"))
    failing = ex.submit(raise_value_error, "first")
    done, not_done = cf.wait([blocked, failing], timeout=PATIENCE, return_when=cf.FIRST_EXCEPTION)
    assert done == {failing} and not_done == {blocked}
    (tmp_path / "gate").touch()
    blocked.result(timeout=PATIENCE)


def test_map_several_iterables(ex: gs.Executor) -> None:
    assert list(ex.map(add, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]
    assert list(ex.map(add, range(5), range(3))) == [0, 2, 4], "shortest iterable wins, as zip"
    assert list(ex.map(add, [], [])) == []


@pytest.mark.parametrize("chunksize", [1, 3, 50])
def test_map_chunksize(ex: gs.Executor, chunksize: int) -> None:
    assert list(ex.map(add, range(40), range(40), chunksize=chunksize)) == [2 * i for i in range(40)]


def test_map_bad_chunksize(ex: gs.Executor) -> None:
    with pytest.raises(ValueError):
        ex.map(square, range(3), chunksize=0)


def test_map_exception_raised_at_its_position(ex: gs.Executor) -> None:
    results = ex.map(fail_on, range(6))
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError):
        next(results)


def test_map_submits_without_iteration(ex: gs.Executor, tmp_path: Path) -> None:
    """As in CPython: map submits everything at once, whether or not results are read."""
    ex.map(functools.partial(record, folder=str(tmp_path)), range(5))
    ex.shutdown(wait=True)
    assert ran_files(str(tmp_path)) == set(range(5))


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_map_timeout(gear: str, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with gs.Executor(gear, workers=2) as ex:
        results = ex.map(wait_for_file, [gate, gate], timeout=0.2)
        with pytest.raises(TimeoutError):
            next(results)
        Path(gate).touch()


def test_shutdown_cancel_futures(ex: gs.Executor, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    futures = [ex.submit(wait_for_file, gate, i) for i in range(20)]
    ex.shutdown(wait=False, cancel_futures=True)
    Path(gate).touch()
    ex.shutdown(wait=True)
    cancelled = [f for f in futures if f.cancelled()]
    assert len(cancelled) >= 20 - ex.gear.max_inflight()
    for i, future in enumerate(futures):
        assert future.done()
        if not future.cancelled():
            assert future.result() == i


def test_cancel_pending_future(tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with gs.Executor("thread", workers=1) as ex:
        futures = [ex.submit(wait_for_file, gate, i) for i in range(6)]
        assert futures[-1].cancel(), "a future beyond the in-flight window is still pending"
        Path(gate).touch()
        assert [f.result(timeout=PATIENCE) for f in futures[:-1]] == list(range(5))
        assert futures[-1].cancelled()


def test_submit_after_shutdown(ex: gs.Executor) -> None:
    ex.submit(square, 2).result(timeout=PATIENCE)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(square, 2)
    ex.shutdown()  # twice is fine


def test_shutdown_unused_executor() -> None:
    ex = gs.Executor("process", workers=2)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


@pytest.mark.parametrize("gear", GEARS)
def test_context_manager_waits(gear: str) -> None:
    with gs.Executor(gear, workers=2) as ex:
        futures = [ex.submit(square, i) for i in range(10)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(10)]


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"workers": 0}, ValueError),
    ({"workers": -1}, ValueError),
    ({"gear": "warp"}, ValueError),
    ({"timeout": 0}, ValueError),
    ({"initializer": 3}, TypeError),
])
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        gs.Executor(**kwargs)


def test_worker_crash_fails_only_its_future() -> None:
    with gs.Executor("process", workers=2) as ex:
        futures = [ex.submit(exit_on, i) for i in range(6)]
        crash = futures[2].exception(timeout=PATIENCE)
        assert isinstance(crash, gs.WorkerCrashed) and crash.exitcode == 7
        assert [f.result(timeout=PATIENCE) for i, f in enumerate(futures) if i != 2] == [0, 1, 3, 4, 5]
        assert ex.submit(square, 3).result(timeout=PATIENCE) == 9, "the executor keeps working"
        assert list(ex.map(square, range(4))) == [0, 1, 4, 9]


def test_workers_reused_across_calls() -> None:
    with gs.Executor("process", workers=2) as ex:
        first = set(ex.map(pid, range(20)))
        second = set(ex.map(pid, range(20)))
    assert len(first | second) <= 2, "the second map must run on the same worker processes"


def test_lambdas_in_process_executor() -> None:
    offset = 3
    with gs.Executor("process", workers=2) as ex:
        assert list(ex.map(lambda x: x + offset, range(4))) == [3, 4, 5, 6]


def test_unpicklable_function_in_process_executor() -> None:
    import threading

    lock = threading.Lock()
    with gs.Executor("process", workers=2) as ex, pytest.raises(gs.UnpicklableError, match="thread"):
        ex.submit(lambda: lock)


def test_no_stale_reference_to_arguments() -> None:
    """CPython's test_free_reference: a finished call keeps no reference to its argument."""

    class Payload:
        pass

    with gs.Executor("thread", workers=2) as ex:
        payload = Payload()
        ref = weakref.ref(payload)
        ex.submit(id, payload).result(timeout=PATIENCE)
        del payload
        deadline = time.monotonic() + PATIENCE
        while ref() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert ref() is None


def test_process_exception_carries_worker_traceback() -> None:
    with gs.Executor("process", workers=2) as ex:
        exc = ex.submit(fail_on, 3).exception(timeout=PATIENCE)
    assert isinstance(exc, KeyError)
    assert isinstance(exc.__cause__, gs.RemoteTraceback) and "fail_on" in exc.__cause__.tb


def test_unpicklable_argument_fails_only_its_future() -> None:
    import threading

    with gs.Executor("process", workers=2) as ex:
        bad = ex.submit(repr, threading.Lock())
        good = ex.submit(square, 4)
        assert isinstance(bad.exception(timeout=PATIENCE), TypeError)  # pickle's own error, the item noted
        assert good.result(timeout=PATIENCE) == 16


@pytest.mark.parametrize("gear", GEARS)
def test_work_submitted_before_exit_still_runs(gear: str, tmp_path: Path) -> None:
    """CPython's test_interpreter_shutdown: no shutdown() call, yet the submitted call completes."""
    import subprocess
    import sys

    script = (
        "import functools, gearshift as gs, helpers\n"
        f"ex = gs.Executor({gear!r}, workers=2)\n"
        f"ex.submit(functools.partial(helpers.record, folder={str(tmp_path)!r}), 1)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=PATIENCE)
    assert ran_files(str(tmp_path)) == {1}


def test_process_workers_leave_promptly_when_forked_under_the_executor_lock() -> None:
    """A worker forked while the caller held the executor's lock (mid-submit) must not run the
    executor's exit hook on that inherited, locked state at its own exit: it would hang until the
    gear SIGKILLs it after a 5 s grace. Deterministic: hold the lock while a crashed worker is replaced."""
    ex = gs.Executor("process", workers=2)
    crashed = ex.submit(exit_on, 2)
    with ex._core.lock:  # the replacement worker is forked before `crashed` is settled
        assert isinstance(crashed.exception(timeout=PATIENCE), gs.WorkerCrashed)
    assert ex.submit(square, 3).result(timeout=PATIENCE) == 9
    start = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - start < 4.0, "workers were killed after the grace period instead of leaving"


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_interrupted_shutdown_does_not_wait_again_at_exit(gear: str, tmp_path: Path) -> None:
    """Ctrl-C during shutdown(wait=True) on a call that never ends: the interpreter still exits."""
    import os
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal, threading, gearshift as gs, helpers\n"
        f"ex = gs.Executor({gear!r}, workers=2)\n"
        f"ex.submit(helpers.zero_free, {str(tmp_path / 'never')!r}, 1)\n"
        "threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "ex.shutdown(wait=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", script], env=env, timeout=PATIENCE, capture_output=True, text=True)
    assert out.returncode in (-signal.SIGINT, 130) and "KeyboardInterrupt" in out.stderr
