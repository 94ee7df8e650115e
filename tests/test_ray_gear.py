"""The ray gear against one local Ray per module (2 CPUs), shut down after it."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from conftest import KEPT, keep_children, leftover_children

import gearshift as gs

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'gearshift[ray]'")

pytestmark = pytest.mark.timeout(120)


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


def victim(x: Any) -> Any:
    """The one item that is a queue tells the test its worker's pid there and waits to be killed."""
    if not isinstance(x, int):
        x.put(os.getpid())
        time.sleep(60)
    return x


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    assert not leftover_children()
    here = os.path.dirname(os.path.abspath(__file__))
    # The workers import this module's functions by name, as a process gear's workers would.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}})
    keep_children()
    try:
        yield
    finally:
        ray.shutdown()
        KEPT.clear()
    left = leftover_children(wait=15.0)
    assert not left, f"processes left by the local Ray: {[' '.join(p.cmdline())[:100] for p in left]}"


def test_without_ray_running_a_local_ray_is_started_and_shut_down() -> None:
    """First in the module, before the module's Ray: the gear starts its own and stops it."""
    assert not ray.is_initialized()
    g = gs.RayGear(2)
    assert gs.map(square, range(10), gear=g) == [x * x for x in range(10)]
    assert any("started a local Ray" in note for note in g.notes()), g.notes()
    assert not ray.is_initialized()
    # (the autouse no_orphans fixture checks that its processes are gone)


def test_results_equal_serial_cpu_and_io(local_ray: None) -> None:
    items = list(range(2000))
    assert gs.map(square, items, gear="ray") == [x * x for x in items]
    assert gs.map(cpu, [3000] * 10, gear="ray") == [cpu(3000)] * 10
    assert gs.map(wait_then, [0.01] * 10, gear="ray") == [0.01] * 10


def test_remote_traceback_and_collect(local_ray: None) -> None:
    with pytest.raises(ValueError, match="bad item 3") as info:
        gs.map(fails_on_three, range(8), gear="ray", chunksize=1)
    assert "fails_on_three" in str(info.value.__cause__)
    got = gs.map(fails_on_three, range(8), gear="ray", errors="collect")
    assert [g for g in got if not isinstance(g, gs.Failure)] == [0, 1, 2, 4, 5, 6, 7]
    assert isinstance(got[3], gs.Failure) and got[3].item == 3
    assert gs.map(square, range(5), gear="ray") == [0, 1, 4, 9, 16]  # Ray is still usable


def test_a_worker_killed_mid_run_fails_only_its_item(local_ray: None) -> None:
    from ray.util.queue import Queue

    pids = Queue()
    out: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            items = [*range(20), pids]
            out.extend(gs.map(victim, items, gear=gs.RayGear(max_retries=0), chunksize=1, errors="collect"))
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    pid = pids.get(timeout=60)
    assert pid in {p.pid for p in psutil.Process().children(recursive=True)}
    psutil.Process(pid).kill()
    assert done.wait(60)
    thread.join()
    assert out[:20] == list(range(20))
    failure = out[20]
    assert isinstance(failure, gs.Failure) and isinstance(failure.exception, gs.WorkerCrashed)
    assert "WorkerCrashedError" in "".join(getattr(failure.exception, "__notes__", []))
    pids.shutdown()
    assert gs.map(square, range(5), gear="ray") == [0, 1, 4, 9, 16]


def test_unordered_streaming_executor_pool_pipeline(local_ray: None) -> None:
    assert sorted(gs.imap(square, range(300), gear="ray", ordered=False)) == [x * x for x in range(300)]
    async def from_async_code() -> list[int]:
        return [x async for x in gs.amap(square, range(30), gear="ray")]

    assert asyncio.run(from_async_code()) == [x * x for x in range(30)]
    with gs.Executor(gear="ray") as ex:
        assert ex.submit(square, 7).result(timeout=60) == 49
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
    with gs.Pool(gear="ray") as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
    assert list(gs.Pipeline(range(20)).map(square, gear="ray")) == [x * x for x in range(20)]


def test_the_advisor_never_picks_a_cluster_on_its_own() -> None:
    advice = gs.advise(cpu, [20000] * 4)
    assert advice.gear != "ray"
    assert "asked for" in advice.predictions["ray"].why_not
