"""The interpreter gear: real work in sub-interpreters on Python 3.14+, a clear error before."""

from __future__ import annotations

import sys
import threading

import pytest

import gearshift as gs
from gearshift._advisor.model import Machine, Measurements, decide

pytestmark = pytest.mark.timeout(60)
NEW = sys.version_info >= (3, 14)
needs_314 = pytest.mark.skipif(not NEW, reason="sub-interpreters (concurrent.interpreters) need Python 3.14")


def square(x: int) -> int:
    return x * x


def cpu(n: int) -> int:
    return sum(i * i for i in range(n))


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def sleep_then(x: float) -> float:
    import time

    time.sleep(x)
    return x


class LockedError(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raises_unpicklable(x: int) -> int:
    raise LockedError()


def _initializer(tag: str) -> None:
    if tag == "boom":
        raise RuntimeError("initializer boom")


@pytest.mark.skipif(NEW, reason="the error is for Python 3.11-3.13")
def test_old_python_names_the_version_needed() -> None:
    with pytest.raises(RuntimeError, match=r"Python 3\.14"):
        gs.map(square, [1, 2], gear="interpreter")
    assert "interpreter" not in gs.advise(square, [1, 2]).predictions


@needs_314
def test_results_equal_serial_cpu_and_io() -> None:
    items = list(range(200))
    assert gs.map(square, items, gear="interpreter", workers=2) == [x * x for x in items]
    assert gs.map(cpu, [2000] * 8, gear="interpreter", workers=2) == [cpu(2000)] * 8
    assert gs.map(sleep_then, [0.01] * 6, gear="interpreter", workers=2) == [0.01] * 6


@needs_314
def test_lambda_and_closure_refused_before_anything_runs() -> None:
    ran = threading.Event()
    k = 3

    def closure(x: int) -> int:
        ran.set()
        return x + k

    for fn in (lambda x: x, closure):
        with pytest.raises(gs.UnpicklableError, match="cannot be shared"):
            gs.map(fn, [1, 2], gear="interpreter")
    assert not ran.is_set()


@needs_314
def test_remote_traceback_and_collect() -> None:
    with pytest.raises(ValueError, match="bad item 3") as info:
        gs.map(fails_on_three, range(6), gear="interpreter", workers=2)
    assert "fails_on_three" in str(info.value.__cause__)
    got = gs.map(fails_on_three, range(6), gear="interpreter", workers=2, errors="collect")
    assert [g for g in got if not isinstance(g, gs.Failure)] == [0, 1, 2, 4, 5]
    failure = got[3]
    assert isinstance(failure, gs.Failure) and failure.item == 3


@needs_314
def test_an_exception_that_cannot_travel_comes_back_as_remote_error() -> None:
    got = gs.map(raises_unpicklable, [1], gear="interpreter", errors="collect")
    error = got[0].exception
    assert isinstance(error, gs.RemoteError) and error.type_name.endswith("LockedError"), error
    assert "holds a lock" in str(error)


@needs_314
def test_timeout_fails_the_item_at_its_deadline() -> None:
    with pytest.warns(RuntimeWarning, match="did not stop"):
        got = gs.map(sleep_then, [0.0, 3.0, 0.0], gear="interpreter", workers=2, timeout=0.5, errors="collect")
    assert got[0] == 0.0 and got[2] == 0.0
    assert isinstance(got[1], gs.Failure) and isinstance(got[1].exception, gs.TaskTimeout)


@needs_314
def test_initializer_runs_inside_and_its_error_stops_the_run() -> None:
    assert gs.map(square, [1, 2], gear="interpreter", initializer=_initializer, initargs=("ok",)) == [1, 4]
    with pytest.raises(gs.InitializerError, match="initializer boom"):
        gs.map(square, [1, 2], gear="interpreter", initializer=_initializer, initargs=("boom",))


@needs_314
def test_unordered_executor_pool_pipeline() -> None:
    assert sorted(gs.imap(square, range(50), gear="interpreter", ordered=False)) == [x * x for x in range(50)]
    with gs.Executor(gear="interpreter", max_workers=2) as ex:
        assert ex.submit(square, 7).result(timeout=30) == 49
    with gs.Pool(2, gear="interpreter") as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
    assert list(gs.Pipeline(range(10)).map(square, gear="interpreter", workers=2)) == [x * x for x in range(10)]


def test_advisor_never_picks_it_for_a_function_it_cannot_share() -> None:
    m = Measurements(per_item=0.005, share_error="PicklingError: a lambda")
    gears = {"interpreter": gs.InterpreterGear.costs, "process": gs.ProcessGear.costs}
    decision = decide(m, Machine(cores=8), gears=gears)
    assert not decision.predictions["interpreter"].applicable
    assert "cpython#125865" in decision.predictions["interpreter"].why_not
    # Never on its own (it gives up crash isolation): even where the model predicts it as fast.
    decision = decide(Measurements(per_item=0.005), Machine(cores=8), gears=gears)
    assert decision.gear == "process"
    assert "asked for" in decision.predictions["interpreter"].why_not
    decision = decide(Measurements(per_item=0.005), Machine(cores=8), gears={"interpreter": gs.InterpreterGear.costs})
    assert decision.gear == "serial"
