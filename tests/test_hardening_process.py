"""The process gear at the sizes users have: no pipe deadlock, big data through shared memory,
fork safety, nothing left in /dev/shm, nothing stale between runs.

Each case here hung or lost data before the transport was rebuilt (issue 12); each runs
under a timeout so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import pickle
import signal
import threading
from pathlib import Path

import faultlib as fl
import numpy as np
import psutil
import pytest

import gearshift as gs
from gearshift._gears import _wire
from gearshift._gears.process import _fn_bytes

MiB = 1 << 20


def shm_files(owner: int | None = None) -> list[str]:
    prefix = _wire.PREFIX + ("" if owner is None else f"{owner}-")
    return [name for name in os.listdir(_wire.SHM_DIR) if name.startswith(prefix)]


@pytest.fixture(autouse=True)
def clean_shm() -> object:
    yield
    assert shm_files(os.getpid()) == []


def grow(b: bytes) -> bytes:
    return b + b"x"


def head(b: bytes) -> bytes:
    return b[:8]


def make(n: int) -> bytes:
    return bytes(n)


def double_array(a: np.ndarray) -> np.ndarray:
    return a * 2


# -- the pipe deadlock ------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_a_million_tiny_items() -> None:
    for _ in range(2):
        out = gs.map(lambda x: x * 2, range(1_000_000), gear="process")
        assert len(out) == 1_000_000 and out[-1] == 1_999_998 and out[123_456] == 246_912


@pytest.mark.timeout(90)
def test_big_fixed_chunks_in_pool_and_executor() -> None:
    with gs.Pool(2) as pool:
        assert pool.map(fl.double, range(1_000_000))[-1] == 1_999_998
    with gs.Executor(gear="process", workers=2) as ex:
        out = list(ex.map(fl.double, range(300_000), chunksize=50_000))
    assert out[-1] == 599_998 and len(out) == 300_000


@pytest.mark.timeout(90)
def test_endless_source_in_flat_memory() -> None:
    pulled = [0]

    def source() -> itertools.count[int]:
        for i in itertools.count():
            pulled[0] = i + 1
            yield i

    got = 0
    for got, value in enumerate(itertools.islice(gs.imap(fl.double, source(), gear="process"), 1_000_000), 1):
        if got % 100_000 == 0:
            assert value == 2 * (got - 1)
            ahead = pulled[0] - got  # pulled from the source but not yet delivered
            assert ahead < 800_000, f"{ahead} items pulled ahead of delivery: memory is not bounded"
    assert got == 1_000_000


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_items_and_results_of_4_mib(workers: int) -> None:
    out = gs.map(grow, [bytes(4 * MiB)] * 8, gear="process", workers=workers)
    assert [len(b) for b in out] == [4 * MiB + 1] * 8


@pytest.mark.timeout(120)
def test_items_and_results_of_64_mib() -> None:
    blob = os.urandom(64 * MiB)
    assert gs.map(head, [blob] * 3, gear="process", workers=2) == [blob[:8]] * 3
    out = gs.map(make, [64 * MiB] * 3, gear="process", workers=2)
    assert [len(b) for b in out] == [64 * MiB] * 3 and not any(out[0][:: 1 << 16])


@pytest.mark.timeout(90)
def test_big_batch_of_medium_items_through_the_pipe() -> None:
    # 2,000 items of 64 KiB in chunks of 200: 12.5 MiB a batch, each item below the out-of-band size.
    items = [os.urandom(64 * 1024) for _ in range(20)] * 100
    out = gs.map(grow, items, gear="process", workers=2, chunksize=200)
    assert out == [b + b"x" for b in items]


@pytest.mark.timeout(90)
def test_numpy_arrays_round_trip_writable() -> None:
    arrays = [np.random.default_rng(i).random((1000, 1000)) for i in range(6)]  # 8 MB each
    out = gs.map(double_array, arrays, gear="process", workers=2)
    for a, b in zip(arrays, out, strict=True):
        assert np.array_equal(a * 2, b)
        b[0, 0] = -1.0  # results are writable (a private mapping)
    small = gs.map(double_array, [np.arange(10)] * 3, gear="process", workers=2)
    assert [list(x) for x in small] == [list(range(0, 20, 2))] * 3


# -- shared memory is cleaned up -------------------------------------------------------------
def big_or_crash(folder: str, x: int) -> bytes:
    if x == 3:
        fl.write_atomic(Path(folder) / "3.pid", str(os.getpid()))
        threading.Event().wait(300)
    return bytes(2 * MiB)


@pytest.mark.timeout(90)
def test_shared_memory_cleaned_after_sigkill_of_a_worker(tmp_path: Path) -> None:
    killer = fl.kill_when_parked(tmp_path)
    items = [bytes(2 * MiB)] * 2 + [3] + [bytes(2 * MiB)] * 5
    out = gs.map(lambda b: big_or_crash(str(tmp_path), 3 if b == 3 else 0), items, gear="process",
                 workers=2, errors="collect", chunksize=1)
    killer.join()
    assert isinstance(out[2], gs.Failure) and isinstance(out[2].exception, gs.WorkerCrashed)
    assert all(len(b) == 2 * MiB for i, b in enumerate(out) if i != 2)
    # (the autouse fixture checks /dev/shm)


CTRL_C_CHILD = r"""
import os, sys, threading
import gearshift as gs

def slow_big(b):
    threading.Event().wait(300)
    return b

def announce():
    import psutil, time
    me = psutil.Process()
    mine = f"gearshift-{os.getpid()}-"
    while len(me.children()) < 2 or not [n for n in os.listdir("/dev/shm") if n.startswith(mine)]:
        time.sleep(0.01)
    print("ready", flush=True)

threading.Thread(target=announce, daemon=True).start()
try:
    gs.map(slow_big, [bytes(8 << 20)] * 8, gear="process", workers=2, chunksize=1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.timeout(90)
def test_shared_memory_cleaned_after_ctrl_c() -> None:
    child = fl.Child(CTRL_C_CHILD)
    try:
        child.expect("ready")
        kids = psutil.Process(child.pid).children(recursive=True)
        os.kill(child.pid, signal.SIGINT)
        _, out, err = child.finish()
        assert "interrupted" in out, err
        psutil.wait_procs(kids, timeout=5)
        assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        assert shm_files(child.pid) == []
    finally:
        child.close()


SIGKILL_PARENT_CHILD = r"""
import threading
import gearshift as gs

def slow_big(b):
    print("running", flush=True)
    threading.Event().wait(300)
    return b

gs.map(slow_big, [bytes(8 << 20)] * 8, gear="process", workers=2, chunksize=1)
"""


@pytest.mark.timeout(90)
def test_workers_sweep_shared_memory_when_the_parent_is_killed() -> None:
    child = fl.Child(SIGKILL_PARENT_CHILD)
    try:
        child.expect("running")
        fl.wait_for(lambda: shm_files(child.pid), 30, "a shared-memory file of the child's")
        kids = psutil.Process(child.pid).children(recursive=True)
        os.kill(child.pid, signal.SIGKILL)
        child.finish()
        psutil.wait_procs(kids, timeout=10)
        fl.wait_for(lambda: not shm_files(child.pid), 10, "the workers to sweep /dev/shm")
    finally:
        child.close()


# -- fork safety -----------------------------------------------------------------------------
_lock = threading.Lock()


def crunch(n: int) -> int:
    with _lock:
        return sum(range(n))


@pytest.mark.timeout(60)
def test_default_gear_with_a_function_that_takes_a_lock() -> None:
    out = gs.map(crunch, [2_000_000] * 6)
    assert out == [sum(range(2_000_000))] * 6


def parent_pid(x: int) -> int:
    return os.getppid()


def die_once(folder: str, x: int) -> int:
    marker = Path(folder) / f"{x}.died"
    if x == 1 and not marker.exists():
        marker.write_text("")
        os._exit(3)
    return os.getppid()


@pytest.mark.timeout(60)
def test_replacement_workers_are_not_forked_from_the_busy_parent(tmp_path: Path) -> None:
    from functools import partial

    gear = gs.ProcessGear(1, start_method="fork")
    out = gs.map(partial(die_once, str(tmp_path)), range(4), gear=gear, chunksize=1, errors="collect")
    assert out[0] == os.getpid()  # the first worker: forked from us, in open()
    assert isinstance(out[1], gs.Failure) and isinstance(out[1].exception, gs.WorkerCrashed)
    assert all(ppid != os.getpid() for ppid in out[2:])  # its replacement: from the fork server


# -- nothing stale, BLAS capped, functions by reference ----------------------------------------
CONFIG = {"factor": 1}


def test_a_reused_gear_runs_the_current_function() -> None:
    gear = gs.ProcessGear(2)
    assert gs.map(lambda x: x * CONFIG["factor"], [1, 2], gear=gear) == [1, 2]
    CONFIG["factor"] = 10
    try:
        assert gs.map(lambda x: x * CONFIG["factor"], [1, 2], gear=gear) == [10, 20]
    finally:
        CONFIG["factor"] = 1


def blas_env(_: int) -> tuple[str | None, int]:
    from threadpoolctl import threadpool_info

    threads = [info["num_threads"] for info in threadpool_info()]
    return os.environ.get("OMP_NUM_THREADS"), max(threads, default=1)


def test_blas_threads_are_capped_per_worker() -> None:
    cores = gs.ProcessGear.default_workers()
    env, threads = gs.map(blas_env, [0], gear=gs.ProcessGear(2))[0]
    assert env == str(max(1, cores // 2)) and threads <= max(1, cores // 2)
    env, _ = gs.map(blas_env, [0], gear=gs.ProcessGear(1, blas_threads=None))[0]
    # Left as a plain child of the same start method finds it (a forkserver started before an
    # earlier test changed os.environ, Ray's or Dask's, hands its children its own environment).
    with cf.ProcessPoolExecutor(1) as plain:
        assert env == plain.submit(blas_env, 0).result()[0]
    with pytest.raises(ValueError, match="blas_threads"):
        gs.ProcessGear(1, blas_threads=0)


def test_functions_go_by_reference_when_importable() -> None:
    payload, by_value = _fn_bytes(fl.double)
    assert pickle.loads(payload) is fl.double and not by_value
    assert len(payload) < 100  # a reference, not the code
    payload, by_value = _fn_bytes(lambda x: x + 1)
    assert pickle.loads(payload)(1) == 2 and by_value


# -- the wire format itself --------------------------------------------------------------------
def test_wire_round_trips_and_leaves_nothing() -> None:
    me = os.getpid()
    cases = [
        None,
        [bytes(3 * MiB)] * 2,
        (bytearray(b"y" * MiB), "s"),
        memoryview(bytes(MiB)),
        np.arange(1_000_000),
        [np.ones(3)] * 50_000,
        list(range(200_000)),
    ]
    for obj in cases:
        data, path = _wire.dumps(obj, me, obj if isinstance(obj, list) else None)
        back = _wire.loads(data)
        if isinstance(obj, np.ndarray):
            assert np.array_equal(back, obj)
        elif isinstance(obj, memoryview):
            assert bytes(back) == bytes(obj)
        elif isinstance(obj, list) and obj and isinstance(obj[0], np.ndarray):
            assert len(back) == len(obj) and np.array_equal(back[-1], obj[-1])
        else:
            assert back == obj
        assert shm_files(me) == []
    big_in_pipe, path = _wire.dumps([bytes(MiB)], me)
    assert path is not None and len(big_in_pipe) < 4096
    _wire.unlink(path)
