"""gs.Pool behaves like multiprocessing.Pool (process and thread gears)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PATIENCE, add, fail_on, pid, square
from helpers import wait_for as wait_for_file

import gearshift as gs


@pytest.fixture(params=["process", "thread"])
def pool(request: pytest.FixtureRequest) -> Iterator[gs.Pool]:
    with gs.Pool(2, gear=request.param) as p:
        yield p


def test_apply(pool: gs.Pool) -> None:
    assert pool.apply(add, (1, 2), {"z": 3}) == 6


def test_apply_async_get(pool: gs.Pool) -> None:
    result = pool.apply_async(square, (7,))
    assert result.get(timeout=PATIENCE) == 49
    assert result.ready() and result.successful()


def test_apply_async_get_timeout(pool: gs.Pool, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    result = pool.apply_async(wait_for_file, (gate, "late"))
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.1)
    assert not result.ready()
    with pytest.raises(ValueError):
        result.successful()
    Path(gate).touch()
    assert result.get(timeout=PATIENCE) == "late"


def test_apply_async_error(pool: gs.Pool) -> None:
    result = pool.apply_async(fail_on, (3,))
    with pytest.raises(KeyError):
        result.get(timeout=PATIENCE)
    assert not result.successful()


def test_callbacks(pool: gs.Pool) -> None:
    """Callbacks run on one result thread, as in multiprocessing: they must not block it."""
    got: list[object] = []
    errors: list[BaseException] = []
    both = threading.Event()

    def arrived() -> None:
        if len(got) + len(errors) == 2:
            both.set()

    def on_value(value: object) -> None:
        got.append(value)
        arrived()

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        arrived()

    pool.apply_async(square, (5,), callback=on_value, error_callback=on_error)
    pool.apply_async(fail_on, (3,), callback=on_value, error_callback=on_error)
    assert both.wait(PATIENCE)
    assert got == [25]
    assert len(errors) == 1 and isinstance(errors[0], KeyError)


def test_map_async_callback(pool: gs.Pool) -> None:
    seen: list[object] = []
    done = threading.Event()

    def on_value(value: object) -> None:
        seen.append(value)
        done.set()

    result = pool.map_async(square, range(10), callback=on_value)
    assert result.get(timeout=PATIENCE) == [x * x for x in range(10)]
    assert done.wait(PATIENCE) and seen == [[x * x for x in range(10)]]


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_map(pool: gs.Pool, chunksize: int | None) -> None:
    assert pool.map(square, range(30), chunksize) == [x * x for x in range(30)]
    assert pool.map(square, []) == []


def test_map_error(pool: gs.Pool) -> None:
    with pytest.raises(KeyError):
        pool.map(fail_on, range(10))


def test_starmap(pool: gs.Pool) -> None:
    assert pool.starmap(add, [(1, 2), (3, 4), (5, 6)]) == [3, 7, 11]
    assert pool.starmap_async(add, [(1, 1, 1)]).get(timeout=PATIENCE) == [3]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_and_imap_unordered(pool: gs.Pool, chunksize: int) -> None:
    assert list(pool.imap(square, range(20), chunksize)) == [x * x for x in range(20)]
    assert sorted(pool.imap_unordered(square, range(20), chunksize)) == [x * x for x in range(20)]


def test_imap_on_generator(pool: gs.Pool) -> None:
    assert list(pool.imap(square, (x for x in range(10)))) == [x * x for x in range(10)]


def test_close_then_join(tmp_path: Path) -> None:
    pool = gs.Pool(2)
    result = pool.map_async(square, range(10))
    pool.close()
    with pytest.raises(ValueError):
        pool.apply_async(square, (1,))
    pool.join()
    assert result.get(timeout=0) == [x * x for x in range(10)]


def test_join_before_close_raises() -> None:
    pool = gs.Pool(2)
    try:
        with pytest.raises(ValueError):
            pool.join()
    finally:
        pool.terminate()


def test_terminate_stops_running_work(tmp_path: Path) -> None:
    """A call that is running (and never checks for cancellation) is killed with its worker."""
    import faultlib as fl
    import psutil

    pool = gs.Pool(2)
    try:
        running = pool.apply_async(fl.park_spin, (str(tmp_path), 0))  # writes 0.pid, then spins forever
        (worker,) = fl.pids_in(tmp_path, 1, timeout=PATIENCE)  # the call has started in that worker
        other = pool.apply_async(wait_for_file, (str(tmp_path / "never"),))
        started = time.monotonic()
        pool.terminate()
    except BaseException:
        pool.terminate()
        raise

    def alive() -> bool:
        try:
            return psutil.Process(worker).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = started + 10.0  # a kill is immediate; generous for a loaded machine
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(), f"worker {worker} still running its call {time.monotonic() - started:.1f}s after terminate"
    for result in (running, other):
        assert result.ready()
        with pytest.raises(Exception):  # noqa: B017 - any failure: the call was stopped
            result.get(timeout=0)
    with pytest.raises(ValueError):
        pool.apply_async(square, (1,))


def test_context_manager_terminates() -> None:
    with gs.Pool(2) as pool:
        assert pool.map(square, range(4)) == [0, 1, 4, 9]
    with pytest.raises(ValueError):
        pool.map(square, range(4))


def test_processes_alias_and_workers_reused() -> None:
    with gs.Pool(processes=2) as pool:
        assert pool.workers == 2
        pids = set(pool.map(pid, range(20), 1)) | set(pool.map(pid, range(20), 1))
    assert len(pids) <= 2


def test_lambda_in_process_pool() -> None:
    with gs.Pool(2) as pool:
        assert pool.map(lambda x: x - 1, range(4)) == [-1, 0, 1, 2]


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_worker_count(bad: int) -> None:
    with pytest.raises(ValueError):
        gs.Pool(bad)


def test_imap_early_break_cancels_the_rest(tmp_path: Path) -> None:
    with gs.Pool(2) as pool:
        for value in pool.imap(square, range(10_000)):
            if value == 16:
                break
        assert pool.apply(square, (3,)) == 9, "the pool is still usable after an abandoned imap"


def test_unclosed_pool_terminates_at_exit() -> None:
    """As multiprocessing.Pool's finalizer does: an endless call does not hold up interpreter exit."""
    import json
    import os
    import subprocess
    import sys

    import psutil

    script = (
        "import json, gearshift as gs, helpers\n"
        "pool = gs.Pool(2)\n"
        "workers = sorted(set(pool.map(helpers.pid, range(8), 1)))\n"
        "pool.apply_async(helpers.wait_for, ('/nonexistent/never',))\n"
        "print(json.dumps(workers))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=PATIENCE,
                         capture_output=True, text=True)
    workers = json.loads(out.stdout)
    assert 1 <= len(workers) <= 2

    def alive() -> list[int]:
        return [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 3
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alive() == []
