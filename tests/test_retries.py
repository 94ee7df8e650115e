"""Retries in every gear: attempts are counted in files, so they survive worker processes."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import faultlib as fl
import pytest

import gearshift as gs

GEARS = ["serial", "thread", "process", "async"]
PATIENCE = 30.0


@pytest.mark.parametrize("gear", GEARS)
@pytest.mark.parametrize(
    "retries", [2, gs.Retry(attempts=3, backoff=0.01, on=(ValueError,))], ids=["int", "Retry"]
)
def test_an_item_failing_twice_succeeds_on_the_third_attempt(
    gear: str, retries: int | gs.Retry, tmp_path: Path
) -> None:
    fn = partial(fl.flaky, str(tmp_path), 2, ValueError)
    results = gs.map(fn, range(6), gear=gear, workers=2, retries=retries, chunksize=1)
    assert results == [2 * i for i in range(6)]
    assert [fl.attempts(str(tmp_path), i) for i in range(6)] == [3] * 6
    assert results.report.succeeded == 6 and results.report.failed == 0
    assert results.report.retried == 12


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_retries_exhausted_fail_with_the_attempt_count(gear: str, tmp_path: Path) -> None:
    fn = partial(fl.flaky, str(tmp_path), 5, ValueError)
    results = gs.map(fn, range(3), gear=gear, workers=2, retries=2, errors="collect")
    assert all(isinstance(r, gs.Failure) and r.attempts == 3 for r in results)
    assert [fl.attempts(str(tmp_path), i) for i in range(3)] == [3, 3, 3]
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError) as info:
        gs.map(partial(fl.flaky, str(tmp_path / "x"), 5, ValueError), [7], gear=gear, retries=1)
    assert "after 2 attempts" in "".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("gear", GEARS)
def test_an_exception_not_in_on_is_not_retried(gear: str, tmp_path: Path) -> None:
    fn = partial(fl.flaky, str(tmp_path), 2, TypeError)
    policy = gs.Retry(attempts=3, backoff=0.01, on=(ValueError,))
    results = gs.map(fn, range(4), gear=gear, workers=2, retries=policy, errors="collect")
    assert all(isinstance(r, gs.Failure) and isinstance(r.exception, TypeError) for r in results)
    assert [fl.attempts(str(tmp_path), i) for i in range(4)] == [1] * 4
    assert results.report.retried == 0


def test_a_worker_crash_is_retried(tmp_path: Path) -> None:
    fn = partial(fl.fault_once, str(tmp_path), "exit")
    results = gs.map(fn, range(4), gear="process", workers=2, retries=1, chunksize=1)
    assert results == [0, 2, 4, 6]
    assert [fl.attempts(str(tmp_path), i) for i in range(4)] == [2] * 4


def test_a_task_timeout_is_retried(tmp_path: Path) -> None:
    fn = partial(fl.fault_once, str(tmp_path), "spin")
    results = gs.map(fn, range(3), gear="process", workers=2, timeout=0.5, retries=gs.Retry(2, backoff=0.01))
    assert results == [0, 2, 4]
    assert results.report.retried == 3


def test_retry_on_only_crashes_leaves_other_errors_alone(tmp_path: Path) -> None:
    policy = gs.Retry(attempts=2, backoff=0.0, on=(gs.WorkerCrashed,))
    (tmp_path / "a").mkdir()
    crashes = gs.map(partial(fl.fault_once, str(tmp_path / "a"), "exit"), [1], gear="process", retries=policy)
    assert crashes == [2]
    (tmp_path / "b").mkdir()
    errors = gs.map(partial(fl.flaky, str(tmp_path / "b"), 1, ValueError), [1], gear="process", retries=policy,
                    errors="collect")
    assert isinstance(errors[0], gs.Failure) and errors[0].attempts == 1


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_executor_retries_match_map(gear: str, tmp_path: Path) -> None:
    with gs.Executor(gear=gear, workers=2, retries=gs.Retry(3, backoff=0.01, on=(ValueError,))) as ex:
        futures = [ex.submit(fl.flaky, str(tmp_path), 2, ValueError, i) for i in range(4)]
        assert [f.result(timeout=PATIENCE) for f in futures] == [0, 2, 4, 6]
        refused = ex.submit(fl.flaky, str(tmp_path), 1, TypeError, 99)
        assert isinstance(refused.exception(timeout=PATIENCE), TypeError)
    assert [fl.attempts(str(tmp_path), i) for i in range(4)] == [3] * 4
    assert fl.attempts(str(tmp_path), 99) == 1


def test_executor_retries_a_crash_and_a_timeout(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "t").mkdir()
    with gs.Executor(gear="process", workers=2, timeout=0.5, retries=1) as ex:
        crash = ex.submit(fl.fault_once, str(tmp_path / "c"), "exit", 5)
        spin = ex.submit(fl.fault_once, str(tmp_path / "t"), "spin", 6)
        assert crash.result(timeout=PATIENCE) == 10
        assert spin.result(timeout=PATIENCE) == 12


def test_retry_validation() -> None:
    with pytest.raises(ValueError):
        gs.Retry(attempts=0)
    with pytest.raises(ValueError):
        gs.Retry(backoff=-1)
    with pytest.raises(ValueError):
        gs.map(fl.double, [1], retries=-1)
    assert gs.Retry(on=ValueError).on == (ValueError,)  # type: ignore[arg-type]
