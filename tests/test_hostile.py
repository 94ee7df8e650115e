"""A hostile user's tries at issue 12's process transport, forking, streams and gear reuse.

Each test is something a user tried at realistic sizes. Tests of what held up are plain;
each bug found is an ``xfail(strict=False)`` test named for it, which starts passing once
the bug is fixed. Every test runs under a timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gearshift as gs
from gearshift._gears import _wire

MiB = 1 << 20


def shm_files() -> list[str]:
    return [n for n in os.listdir(_wire.SHM_DIR) if n.startswith(f"{_wire.PREFIX}{os.getpid()}-")]


@pytest.fixture(autouse=True)
def clean_shm() -> Iterator[None]:
    yield
    assert shm_files() == []


# -- functions the workers import by reference ---------------------------------------------------
def ident(x: Any) -> Any:
    return x


def first_byte(x: Any) -> Any:
    return x[:1]


def small_bytes_list(n: int) -> list[bytes]:
    return [bytes([i % 256]) * 20 for i in range(n)]


def repeated(n: int) -> list[bytes]:
    b = bytes(n)
    return [b] * 4


def boom(x: Any) -> Any:
    raise ValueError("boom")


def sleep_on_1(item: tuple[int, bytes]) -> int:
    if item[0] == 1:
        time.sleep(60)
    return len(item[1])


def bad_init() -> None:
    raise ValueError("init boom")


class TwoArg(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")
        self.a, self.b = a, b


def raise_group(x: int) -> int:
    raise ExceptionGroup("grp", [ValueError("v"), TwoArg(3, 4)])


def nested_map(n: int) -> int:
    return sum(gs.map(ident, range(n), gear="process", workers=2))


def slowish(x: int) -> int:
    time.sleep(0.005)
    return x


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and (a == b).all())
    return type(a) is type(b) and a == b


# -- big buffers of every kind -----------------------------------------------------------------
BIG = np.arange(4 * MiB, dtype=np.float64)  # 32 MiB


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "item",
    [
        bytearray(b"x" * 16 * MiB),
        BIG[::2],  # not contiguous
        BIG[1000 : 1000 + MiB],  # a view of a bigger array
        np.asfortranarray(BIG.reshape(2048, -1)),
        BIG.reshape(1024, -1).T,
        np.array(3.5),  # 0-d
        np.zeros(MiB, dtype=[("a", "i4"), ("b", "f8")]),  # structured
        np.array([b"x" * 1000] * 20_000, dtype=object),
    ],
    ids=["bytearray", "strided", "view", "fortran", "transposed", "0-d", "structured", "object"],
)
def test_big_buffers_of_every_kind_round_trip(item: Any) -> None:
    (back,) = gs.map(ident, [item], gear="process", workers=1)
    assert same(item, back) if not isinstance(item, np.ndarray) or item.dtype != object else list(back) == list(item)


@pytest.mark.timeout(60)
def test_memoryview_casts_come_back_as_their_bytes() -> None:
    # memoryviews travel as their bytes (as cloudpickle sends small ones), whatever the size
    views = [memoryview(bytearray(16 * MiB)).cast("B", (4 * MiB, 4)), memoryview(bytearray(b"ab" * 8 * MiB)).cast("i")]
    out = gs.map(ident, views, gear="process", workers=1)
    for v, b in zip(views, out, strict=True):
        assert type(b) is bytes and b == v.tobytes()


@pytest.mark.timeout(60)
def test_dicts_and_tuples_of_several_big_buffers() -> None:
    item = {"a": bytes(16 * MiB), "b": np.ones(2 * MiB), "c": (bytearray(16 * MiB), b"small")}
    (back,) = gs.map(ident, [item], gear="process", workers=1)
    assert back["a"] == item["a"] and (back["b"] == item["b"]).all() and back["c"] == item["c"]


@pytest.mark.timeout(60)
def test_results_that_are_huge_lists_of_small_bytes() -> None:
    out = gs.map(small_bytes_list, [400_000] * 3, gear="process", workers=2)
    assert [len(x) for x in out] == [400_000] * 3 and out[0][257] == bytes([1]) * 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("errors", ["collect", "skip"])
def test_big_and_unpicklable_items_mixed(errors: str) -> None:
    items = [bytes(16 * MiB), threading.Lock(), bytes(16 * MiB), b"abc"]
    out = gs.map(first_byte, items, gear="process", workers=2, errors=errors)  # type: ignore[arg-type]
    if errors == "collect":
        assert out[0] == b"\x00" and isinstance(out[1], gs.Failure) and out[2:] == [b"\x00", b"a"]
    else:
        assert out == [b"\x00", b"\x00", b"a"]


@pytest.mark.timeout(60)
def test_big_and_unpicklable_items_mixed_raise_names_the_item() -> None:
    with pytest.raises(TypeError) as info:
        gs.map(first_byte, [bytes(16 * MiB), threading.Lock(), bytes(16 * MiB)], gear="process", workers=2)
    assert any("item #1" in note for note in info.value.__notes__)


# -- bug: the same big object referenced many times is copied once per reference -----------------
@pytest.mark.timeout(60)
def test_one_big_bytes_referenced_many_times_is_written_once() -> None:
    x = bytes(16 * MiB)
    data, path = _wire.dumps([x] * 8, os.getpid(), [x] * 8)
    try:
        size = os.path.getsize(path) if path else 0
    finally:
        back = _wire.loads(data)
    assert size <= 2 * 16 * MiB, f"{size // MiB} MiB in /dev/shm for one 16 MiB object"
    assert id(back[0]) == id(back[7])  # plain pickle keeps the identity


@pytest.mark.timeout(60)
def test_a_result_repeating_one_big_bytes_keeps_its_identity() -> None:
    (out,) = gs.map(repeated, [16 * MiB], gear="process", workers=1)
    assert id(out[0]) == id(out[3])


# -- bug: error messages repr the whole item ----------------------------------------------------
def _peak_while(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.timeout(60)
def test_a_failure_on_a_big_item_does_not_repr_it_whole() -> None:
    item = bytes(8 * MiB)

    def run() -> None:
        with pytest.raises(ValueError):
            gs.map(boom, [item], gear="serial")

    assert _peak_while(run) < 4 * MiB  # the full repr is 32 MiB of text


@pytest.mark.timeout(60)
def test_worker_crashed_on_a_big_item_does_not_repr_it_whole() -> None:
    item = bytearray(8 * MiB)
    assert _peak_while(lambda: gs.WorkerCrashed(-9, item, 0)) < 4 * MiB


# -- odd exceptions --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_exception_group_with_a_two_argument_member_comes_back_as_a_group() -> None:
    (failure,) = gs.map(raise_group, [0], gear="process", workers=1, errors="collect")
    assert isinstance(failure.exception, ExceptionGroup)
    assert [type(e) for e in failure.exception.exceptions] == [ValueError, TwoArg]


# -- deaths, timeouts and shutdowns with big data in flight: /dev/shm stays clean --------------------
@pytest.mark.timeout(60)
def test_timeout_kills_a_worker_holding_64_mib() -> None:
    items = [(i, bytes(64 * MiB)) for i in range(3)]
    out = gs.map(sleep_on_1, items, gear="process", workers=2, timeout=1, errors="collect")
    assert out[0] == out[2] == 64 * MiB
    assert isinstance(out[1], gs.Failure) and isinstance(out[1].exception, gs.TaskTimeout)


@pytest.mark.timeout(60)
def test_max_tasks_per_worker_1_with_big_items() -> None:
    out = gs.map(ident, [bytes(16 * MiB)] * 6, gear="process", workers=2, max_tasks_per_worker=1)
    assert [len(x) for x in out] == [16 * MiB] * 6


@pytest.mark.timeout(60)
def test_max_tasks_per_worker_1_over_60_items() -> None:
    # Every worker after the first two comes from the fork server: ~10 ms each for a script,
    # more under pytest (run with -m, the fork server's workers each import pytest again).
    out = gs.map(ident, range(60), gear="process", workers=2, max_tasks_per_worker=1)
    assert out == list(range(60))


@pytest.mark.timeout(60)
def test_an_initializer_that_raises_with_big_items_queued() -> None:
    with pytest.raises(gs.InitializerError, match="init boom"):
        gs.map(ident, [bytes(16 * MiB)] * 4, gear="process", workers=2, initializer=bad_init)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gear", ["process", "auto"])
def test_keyboard_interrupt_in_the_loop_body_then_close(gear: str) -> None:
    it = gs.imap(ident, (bytes(16 * MiB) for _ in range(100)), gear=gear)
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(it):
            if i == 3:
                raise KeyboardInterrupt
    it.close()


@pytest.mark.timeout(60)
def test_breaking_out_of_imap_with_big_items() -> None:
    for i, r in enumerate(gs.imap(ident, (bytes(16 * MiB) for _ in range(50)), gear="process", workers=2)):
        assert len(r) == 16 * MiB
        if i == 2:
            break


# -- gear objects, nesting ----------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [gs.ProcessGear, gs.ThreadGear])
def test_one_gear_two_threads_one_refused_clearly(make: Any) -> None:
    gear = make(2)
    barrier = threading.Barrier(2)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(len(gs.map(slowish, range(200), gear=gear)))
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] and len(errors) == 1 and "already running" in str(errors[0])
    assert gs.map(ident, range(50), gear=gear) == list(range(50))  # and usable afterwards


@pytest.mark.timeout(60)
def test_a_gear_survives_failed_starts() -> None:
    gear = gs.ProcessGear(2)
    with pytest.raises(gs.InitializerError):
        gs.map(ident, range(10), gear=gear, initializer=bad_init)
    with pytest.raises(ValueError):
        gs.map(ident, range(10), gear=gear, timeout=-1)
    for n in range(20):
        assert gs.map(ident, range(n), gear=gear) == list(range(n))


@pytest.mark.timeout(60)
def test_nested_process_map_inside_a_process_worker() -> None:
    assert gs.map(nested_map, [10, 1000], gear="process", workers=2) == [45, 499500]


# -- streams -------------------------------------------------------------------------------------
def _blocks_after(n: int, release: threading.Event) -> Iterator[int]:
    yield from range(n)
    release.wait()  # a source that does not answer again (until the test lets its thread go)


@pytest.mark.timeout(60)
def test_closing_imap_over_a_source_that_blocks_forever_is_bounded() -> None:
    release = threading.Event()
    it = gs.imap(ident, _blocks_after(3, release), gear="thread")
    try:
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="pull='caller'"):
            it.close()
        assert time.monotonic() - start < 30
    finally:
        release.set()  # the stranded source thread ends, so no thread is left behind


# -- Pool and Executor drive the same gear ----------------------------------------------------------
@pytest.mark.timeout(60)
def test_pool_and_executor_with_big_items() -> None:
    with gs.Pool(2) as pool:
        assert pool.map(len, [bytes(32 * MiB)] * 4) == [32 * MiB] * 4
        assert len(pool.apply_async(bytes, (64 * MiB,)).get(30)) == 64 * MiB
    with gs.Executor(gear="process", workers=2) as ex:
        assert [f.result(30) for f in [ex.submit(len, bytes(64 * MiB)) for _ in range(3)]] == [64 * MiB] * 3


# -- a script without a main guard (documented caveat: the fork server imports __main__) ------------
@pytest.mark.timeout(90)
def test_a_script_without_main_guard_whose_worker_crashes_once(tmp_path: Path) -> None:
    """What the user sees: the replacement worker imports the script, which runs the whole job again
    (its output printed twice), but the run ends with the right results."""
    flag = tmp_path / "crashed"
    script = tmp_path / "noguard.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, gearshift as gs
            def f(x):
                if x == 5 and not os.path.exists({str(flag)!r}):
                    open({str(flag)!r}, "w").close()
                    os._exit(1)
                return x * 2
            out = gs.map(f, range(10), gear="process", errors="collect", chunksize=1, workers=2)
            print("RESULT", out[6:], flush=True)
            """
        )
    )
    env = {**os.environ, "GEARSHIFT_START_METHOD": "fork"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=80, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "RESULT [12, 14, 16, 18]"


# -- bug: an item or function that cannot be loaded in the worker crashes it; innocents are blamed --
def _explode() -> None:
    raise RuntimeError("cannot rebuild me in the worker")


class Unloadable:
    """Pickles fine in the parent; rebuilding it in the worker raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


@pytest.mark.timeout(60)
def test_an_item_that_cannot_be_rebuilt_in_the_worker_fails_alone() -> None:
    out = gs.map(ident, [1, Unloadable(), 3, 4], gear="process", workers=1, errors="collect", chunksize=4)
    assert out[0] == 1 and out[2:] == [3, 4]
    assert isinstance(out[1], gs.Failure) and "cannot rebuild me" in repr(out[1].exception)


@pytest.mark.timeout(90)
def test_a_function_defined_under_the_main_guard_with_replacements(tmp_path: Path) -> None:
    script = tmp_path / "inguard.py"
    script.write_text(
        textwrap.dedent(
            """
            import gearshift as gs
            if __name__ == "__main__":
                def f(x):
                    return x * 2
                out = gs.map(f, range(10), gear="process", chunksize=1, workers=2, max_tasks_per_worker=1)
                print("RESULT", out, flush=True)
            """
        )
    )
    env = {**os.environ, "GEARSHIFT_START_METHOD": "fork"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=80, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == f"RESULT {[x * 2 for x in range(10)]}"


# -- was a bug: big memoryviews with a format memoryview.cast cannot make ---------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "array",
    [np.ones(MiB, dtype=">f8"), np.zeros(MiB // 2, dtype=[("a", "i4"), ("b", "f8")])],
    ids=["big-endian", "structured"],
)
def test_big_memoryviews_of_any_format_round_trip(array: np.ndarray) -> None:
    view = memoryview(array)  # type: ignore[arg-type]
    (back,) = gs.map(ident, [view], gear="process", workers=1, errors="collect")
    assert type(back) is bytes and back == view.tobytes()


@pytest.mark.timeout(60)
def test_a_memoryview_comes_back_as_the_same_type_whatever_its_size() -> None:
    out = gs.map(ident, [memoryview(b"abc"), memoryview(bytes(_wire.OOB_MIN))], gear="process", workers=1)
    assert type(out[0]) is type(out[1])


# -- SIGTERM to a program mapping big data ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigterm_during_a_big_data_run_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "term.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, time, gearshift as gs
            def work(b):
                time.sleep(0.05)
                return bytes(len(b))
            if __name__ == "__main__":
                print(os.getpid(), flush=True)
                gs.map(work, (bytes(32 << 20) for _ in range(400)), gear="process", workers=2)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    deadline = time.monotonic() + 30  # wait until data is in flight
    while not [n for n in os.listdir(_wire.SHM_DIR) if n.startswith(f"{_wire.PREFIX}{pid}-")]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.terminate()
    assert proc.wait(30) != 0
    deadline = time.monotonic() + 10  # workers notice their parent is gone within 0.5 s
    while [n for n in os.listdir(_wire.SHM_DIR) if n.startswith(f"{_wire.PREFIX}{pid}-")]:
        assert time.monotonic() < deadline, "shared-memory files left after SIGTERM"
        time.sleep(0.05)


# -- bug: max_tasks_per_worker counts batches' items only after the whole batch ------------------------
def worker_pid(x: int) -> int:
    return os.getpid()


@pytest.mark.timeout(60)
def test_max_tasks_per_worker_is_a_cap_on_items() -> None:
    pids = gs.map(worker_pid, range(400), gear="process", workers=2, max_tasks_per_worker=10)
    most = max(pids.count(p) for p in set(pids))
    assert most <= 10, f"a worker ran {most} items with max_tasks_per_worker=10"
