"""The dask gear against one LocalCluster per module (2 worker processes on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import copyreg
import importlib
import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from conftest import KEPT, keep_children, leftover_children

import gearshift as gs

if importlib.util.find_spec("distributed") is None:
    pytest.skip("needs the dask extra: pip install 'gearshift[dask]'", allow_module_level=True)

pytestmark = pytest.mark.timeout(90)


def square(x: int) -> int:
    return x * x


def cpu(n: int) -> int:
    return sum(i * i for i in range(n))


def wait_then(x: float) -> float:
    time.sleep(x)
    return x


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def init_boom(tag: str) -> None:
    raise RuntimeError(f"initializer {tag}")


def victim(x: int) -> int:
    """Item 99 tells the test its worker's pid and waits to be killed; the others return."""
    if x == 99:
        importlib.import_module("distributed").Queue("gearshift-victim").put(os.getpid())
        time.sleep(60)
    return x


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _names(procs: list[psutil.Process]) -> list[str]:
    return [" ".join(p.cmdline())[:100] for p in procs]


@pytest.fixture(scope="module", autouse=True)
def distributed() -> Iterator[Any]:
    """``distributed``, imported for this module only: importing it installs tblib's pickling of
    exceptions process-wide (``copyreg``), which changes how the process gear's exceptions travel
    (``SystemExit.code``, ``str`` of a ``UnicodeDecodeError``); the later modules get the table back."""
    before = dict(copyreg.dispatch_table)
    try:
        yield importlib.import_module("distributed")
    finally:
        copyreg.dispatch_table.clear()
        copyreg.dispatch_table.update(before)


@pytest.fixture(scope="module")
def client(distributed: Any) -> Iterator[Any]:
    import dask

    assert not leftover_children()
    # No retries of a task whose worker died: the crash test's item fails at its first death.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1"
        )
        client = distributed.Client(cluster, set_as_default=False)
    keep_children()
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        KEPT.clear()
    left = leftover_children(wait=10.0)
    assert not left, f"processes left by the LocalCluster: {_names(left)}"


def gear(client: Any) -> gs.DaskGear:
    return gs.DaskGear(client=client)


def test_results_equal_serial_cpu_and_io(client: Any) -> None:
    items = list(range(2000))
    assert gs.map(square, items, gear=gear(client)) == [x * x for x in items]
    assert gs.map(cpu, [3000] * 10, gear=gear(client)) == [cpu(3000)] * 10
    assert gs.map(wait_then, [0.01] * 10, gear=gear(client)) == [0.01] * 10


def test_remote_traceback_collect_and_the_cluster_stays_usable(client: Any) -> None:
    with pytest.raises(ValueError, match="bad item 3") as info:
        gs.map(fails_on_three, range(8), gear=gear(client), chunksize=1)
    assert "fails_on_three" in str(info.value.__cause__)
    got = gs.map(fails_on_three, range(8), gear=gear(client), errors="collect")
    assert [g for g in got if not isinstance(g, gs.Failure)] == [0, 1, 2, 4, 5, 6, 7]
    assert isinstance(got[3], gs.Failure) and got[3].item == 3
    assert gs.map(square, range(5), gear=gear(client)) == [0, 1, 4, 9, 16]


def test_timeout_fails_the_item_and_says_its_call_runs_on(client: Any) -> None:
    g = gear(client)
    got = gs.map(wait_then, [0.0, 5.0, 0.0], gear=g, timeout=0.5, errors="collect")
    assert got[0] == 0.0 and got[2] == 0.0
    assert isinstance(got[1], gs.Failure) and isinstance(got[1].exception, gs.TaskTimeout)
    assert any("could not be stopped" in note for note in g.notes())


def test_a_worker_killed_mid_run_fails_only_its_item(client: Any, distributed: Any) -> None:
    pids = distributed.Queue("gearshift-victim", client=client)
    out: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            out.extend(gs.map(victim, [*range(20), 99], gear=gear(client), chunksize=1, errors="collect"))
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    pid = pids.get(timeout=60)
    assert pid in _children()
    psutil.Process(pid).kill()
    assert done.wait(60)
    thread.join()
    assert out[:20] == list(range(20))
    failure = out[20]
    assert isinstance(failure, gs.Failure) and isinstance(failure.exception, gs.WorkerCrashed)
    assert "KilledWorker" in "".join(getattr(failure.exception, "__notes__", []))
    # The nanny restarts it: wait for its replacement (a condition, polled), then keep it for the module.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids_now = set(client.run(os.getpid).values())
        if len(pids_now) == 2 and pid not in pids_now:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the killed worker was not replaced within 60 s")
    keep_children()
    assert gs.map(square, range(5), gear=gear(client)) == [0, 1, 4, 9, 16]


def test_ctrl_c_while_iterating_cancels_the_run_and_the_cluster_stays_usable(client: Any) -> None:
    """KeyboardInterrupt reaching the caller mid-run (as Ctrl-C does): the run's queued tasks are
    cancelled, the given cluster keeps running and takes the next run."""
    results = gs.imap(wait_then, [0.05] * 200, gear=gear(client), chunksize=1)
    with pytest.raises(KeyboardInterrupt):
        for _ in results:
            raise KeyboardInterrupt
    assert gs.map(square, range(5), gear=gear(client)) == [0, 1, 4, 9, 16]
    # Nothing of the interrupted run is left queued on the cluster (running tasks end on their own).
    deadline = time.monotonic() + 30
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(client.processing().values())


def test_unordered_streaming_executor_pool_pipeline(client: Any) -> None:
    assert sorted(gs.imap(square, range(300), gear=gear(client), ordered=False)) == [x * x for x in range(300)]
    async def from_async_code() -> list[int]:
        return [x async for x in gs.amap(square, range(30), gear=gear(client))]

    assert asyncio.run(from_async_code()) == [x * x for x in range(30)]
    with gs.Executor(gear=gear(client)) as ex:
        assert ex.submit(square, 7).result(timeout=30) == 49
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
    with gs.Pool(gear=gear(client)) as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
    stage = gs.Pipeline(range(20)).map(square, gear=gear(client))
    assert list(stage) == [x * x for x in range(20)]


def test_address_connects_and_an_initializer_error_stops_the_run(client: Any) -> None:
    address = client.scheduler.address
    assert gs.map(square, range(10), gear=gs.DaskGear(address=address)) == [x * x for x in range(10)]
    with pytest.raises(gs.InitializerError, match="initializer boom"):
        gs.map(square, range(10), gear=gear(client), initializer=init_boom, initargs=("boom",))
    assert gs.map(square, range(3), gear=gear(client)) == [0, 1, 4]


def test_without_a_client_a_local_cluster_is_started_and_closed() -> None:
    g = gs.DaskGear(2)
    assert gs.map(square, range(10), gear=g) == [x * x for x in range(10)]
    assert any("LocalCluster" in note for note in g.notes())
    # (the autouse no_orphans fixture checks that its workers are gone)


def test_the_advisor_never_picks_a_cluster_on_its_own() -> None:
    advice = gs.advise(cpu, [20000] * 4)
    assert advice.gear != "dask"
    assert "asked for" in advice.predictions["dask"].why_not
