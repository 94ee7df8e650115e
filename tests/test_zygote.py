"""The process gear's zygote: replacement workers forked by a clean process started at ``open``.

Replacements (after a crash, a timeout kill, ``max_tasks_per_worker``) must neither be
forked from the busy parent (its threads may hold locks) nor pay a fork server's import
of the function's module (this module imports NumPy on purpose). Only where fork is the
start method.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import faultlib as fl
import helpers
import numpy as np
import psutil
import pytest

import gearshift as gs
from gearshift._gears.process import default_start_method
from gearshift.errors import TaskTimeout, WorkerCrashed

pytestmark = pytest.mark.skipif(default_start_method() != "fork", reason="the zygote serves the fork start method")

TEST_PID = os.getpid()  # forked workers inherit it: "am I the test process?"
#: "Promptly" on a busy 2-core machine (a quiet one takes well under a second).
PROMPT = 5.0
_calls = 0
_lock = threading.Lock()


def whoami(bad: frozenset[int], how: str, x: int) -> tuple[int, int, int]:
    """(2x, pid, ppid); an item in ``bad`` crashes its worker (``exit``) or spins forever (``spin``)."""
    if x in bad and os.getpid() != TEST_PID:
        if how == "exit":
            os._exit(7)
        while True:
            pass
    return 2 * x, os.getpid(), os.getppid()


def numpy_once(x: int) -> tuple[int, int, int]:
    """(x doubled by NumPy, pid, calls of this function in this process)."""
    global _calls
    _calls += 1
    return int(np.int64(x) * 2), os.getpid(), _calls


def locked(bad: frozenset[int], n: int, x: int) -> int:
    """Work under a module-level lock; crash the worker on ``bad`` items (never in the test process)."""
    with _lock:
        total = sum(range(n))
    if x in bad and os.getpid() != TEST_PID:
        os._exit(3)
    return total + x


def park_until_go(folder: str, x: int) -> int:
    """Item 3 leaves its pid in ``folder`` and waits for ``folder/go``."""
    if x == 3:
        fl.write_atomic(Path(folder) / "3.pid", str(os.getpid()))
        fl.wait_for(lambda: (Path(folder) / "go").exists(), 60, "the go file")
    return 2 * x


def _zygote_pid(gear: gs.ProcessGear) -> int:
    zygote = gear._zygote
    assert zygote is not None and zygote.alive, "no zygote under the fork start method"
    pid = zygote.pid
    assert pid is not None
    return pid


def _run_watching(gear: gs.ProcessGear, fn: Any, items: range, **options: Any) -> tuple[list[Any], int]:
    """Run ``fn`` lazily through ``gear``; (results, the zygote's pid read mid-run)."""
    it = gs.imap(fn, items, gear=gear, errors="collect", chunksize=1, **options)
    with closing(it):  # (a failed assertion must not leave the run open)
        first = next(it)
        zygote = _zygote_pid(gear)
        assert "forkserver" not in " ".join(psutil.Process(zygote).cmdline())
        return [first, *it], zygote


@pytest.mark.timeout(60)
def test_replacements_after_crashes_are_forked_by_the_zygote() -> None:
    bad = frozenset({3, 7})
    out, zygote = _run_watching(gs.ProcessGear(1), partial(whoami, bad, "exit"), range(12))
    for x, value in enumerate(out):
        if x in bad:
            assert isinstance(value, gs.Failure) and isinstance(value.exception, WorkerCrashed), value
            assert value.exception.exitcode == 7  # the zygote reported its child's exit code
        else:
            assert value[0] == 2 * x
    parents = {value[2] for x, value in enumerate(out) if x not in bad}
    # One worker: item 0 runs in the first (forked by us), items after each crash in a replacement.
    assert parents == {os.getpid(), zygote}
    assert {value[2] for value in out[8:]} == {zygote}


@pytest.mark.timeout(60)
def test_replacement_after_a_timeout_kill_is_forked_by_the_zygote() -> None:
    out, zygote = _run_watching(gs.ProcessGear(1), partial(whoami, frozenset({2}), "spin"), range(6), timeout=1.0)
    assert isinstance(out[2], gs.Failure) and isinstance(out[2].exception, TaskTimeout), out[2]
    assert [value[0] for x, value in enumerate(out) if x != 2] == [0, 2, 6, 8, 10]
    assert {value[2] for value in out[3:]} == {zygote}


@pytest.mark.timeout(120)
def test_max_tasks_per_worker_1_starts_each_worker_at_fork_speed() -> None:
    """Each replacement inherits NumPy from the zygote (a fork server's would import it: ~150 ms each)."""
    start = time.perf_counter()
    out = gs.map(numpy_once, range(200), gear="process", workers=2, max_tasks_per_worker=1, chunksize=1)
    took = time.perf_counter() - start
    print(f"max_tasks_per_worker=1, 200 items, a NumPy module: {took:.2f} s")
    assert [value for value, _, _ in out] == [2 * x for x in range(200)]
    assert all(calls == 1 for _, _, calls in out), "a worker ran more than one item"
    assert len({pid for _, pid, _ in out}) == 200
    assert took < 20, f"{took:.1f} s for 200 replacements"


SCRIPT = """
import json, os, sys
import gearshift as gs

if __name__ == "__main__":
    OFFSET = 1000  # defined under the guard too: a fork server's worker would never see it

    def shifted(x):
        return x + OFFSET, os.getppid()

    out = gs.map(shifted, range(12), gear="process", workers=2, max_tasks_per_worker=1, chunksize=1)
    print(json.dumps({"me": os.getpid(), "out": out}))
"""


@pytest.mark.timeout(60)
def test_a_function_defined_under_the_main_guard_runs_in_replacements(tmp_path: Path) -> None:
    script = tmp_path / "guarded.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [value for value, _ in report["out"]] == [x + 1000 for x in range(12)]
    parents = {ppid for _, ppid in report["out"]}
    assert len(parents) == 2 and report["me"] in parents  # the first two workers, then the zygote's


@pytest.mark.timeout(90)
def test_the_run_finishes_when_the_zygote_is_killed() -> None:
    """Its children finish their items (the owner drives them); later ones come from the fork server."""
    gear = gs.ProcessGear(2)
    it = gs.imap(helpers.square, range(24), gear=gear, max_tasks_per_worker=1, chunksize=1)
    with closing(it):
        out = [next(it) for _ in range(6)]
        zygote = _zygote_pid(gear)
        os.kill(zygote, signal.SIGKILL)
        out += list(it)
    assert out == [x * x for x in range(24)]
    assert not psutil.pid_exists(zygote) or psutil.Process(zygote).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(90)
def test_a_killed_zygotes_children_finish_their_items(tmp_path: Path) -> None:
    """The owner, not the zygote, decides when they leave: its death fails no innocent item."""
    gear = gs.ProcessGear(2)
    results: list[Any] = []
    fn = partial(park_until_go, str(tmp_path))
    run = threading.Thread(  # drives the run (and the gear) while this thread kills the zygote
        target=lambda: results.extend(gs.map(fn, range(6), gear=gear, max_tasks_per_worker=1, chunksize=1))
    )
    run.start()
    try:
        (parked,) = fl.pids_in(tmp_path, 1)
        worker = psutil.Process(parked)
        zygote = worker.ppid()
        assert zygote != os.getpid() and psutil.Process(zygote).ppid() == os.getpid()  # not a first worker
        os.kill(zygote, signal.SIGKILL)
        fl.wait_for(lambda: worker.ppid() != zygote, 10, "the parked worker to be re-parented")
        time.sleep(1.5)  # three watchdog periods: a worker that followed its dead parent would be gone
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    finally:
        (tmp_path / "go").touch()
        run.join(60)
    assert results == [2 * x for x in range(6)]


PARKED = """
import sys
from functools import partial
import faultlib as fl
import gearshift as gs

folder = sys.argv[1]
try:
    gs.map(partial(fl.park_on, folder, frozenset(range(8, 100))), range(100),
           gear="process", workers=2, max_tasks_per_worker=1, chunksize=1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def _start_parked(tmp_path: Path) -> tuple[fl.Child, list[psutil.Process], psutil.Process]:
    """A child python whose two replacement workers are parked; (child, its descendants, the zygote)."""
    child = fl.Child(PARKED, str(tmp_path))
    try:
        pids = fl.pids_in(tmp_path, 2, timeout=60)
        family = psutil.Process(child.pid).children(recursive=True)
        workers = [p for p in family if p.pid in pids]
        assert len(workers) == 2
        zygotes = {p.ppid() for p in workers}
        assert len(zygotes) == 1 and child.pid not in zygotes, "parked workers not forked by one zygote"
        zygote = psutil.Process(zygotes.pop())
        assert zygote.ppid() == child.pid and "forkserver" not in " ".join(zygote.cmdline())
    except BaseException:
        child.close()
        raise
    return child, family, zygote


def _all_gone(family: list[psutil.Process], timeout: float) -> None:
    _, alive = psutil.wait_procs(family, timeout=timeout)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"


@pytest.mark.timeout(90)
def test_zygote_and_its_workers_leave_when_the_owner_is_killed(tmp_path: Path) -> None:
    child, family, _ = _start_parked(tmp_path)
    try:
        os.kill(child.pid, signal.SIGKILL)
        _all_gone(family, PROMPT)  # the owner is a zombie until reaped: that must not fool anyone
        child.proc.wait(timeout=30)
    finally:
        child.close()
    leftovers = [name for name in os.listdir("/dev/shm") if name.startswith(f"gearshift-{child.pid}-")]
    assert not leftovers


@pytest.mark.timeout(90)
def test_ctrl_c_leaves_neither_zygote_nor_workers(tmp_path: Path) -> None:
    child, family, _ = _start_parked(tmp_path)
    try:
        sent = time.monotonic()
        os.kill(child.pid, signal.SIGINT)
        child.expect("interrupted", timeout=60)
        took = time.monotonic() - sent
        code, _, err = child.finish()
    finally:
        child.close()
    assert took < PROMPT, f"KeyboardInterrupt took {took:.1f}s"
    assert code == 130, err
    _all_gone(family, PROMPT)


@pytest.mark.timeout(60)
def test_replacements_start_while_the_parent_holds_a_module_lock() -> None:
    """A replacement forked from the parent now would inherit ``_lock`` taken, and hang."""
    bad = frozenset({3, 6})
    it = gs.imap(partial(locked, bad, 20_000), range(10), gear="process", workers=2, chunksize=1, errors="collect")
    with closing(it):
        out = [next(it)]  # (the run opens here: its workers and zygote are forked now)
        with _lock:  # held by the parent from here to the end of the run
            out += list(it)
    for x, value in enumerate(out):
        if x in bad:
            assert isinstance(value, gs.Failure) and isinstance(value.exception, WorkerCrashed), value
        else:
            assert value == sum(range(20_000)) + x


@pytest.mark.timeout(60)
def test_auto_with_a_module_lock_and_crashes() -> None:
    """Auto's probe threads hold ``_lock`` at times; its workers and zygote were forked before them."""
    bad = frozenset({9, 14})
    out = gs.map(partial(locked, bad, 1_000_000), range(24), errors="collect")
    for x, value in enumerate(out):
        if isinstance(value, gs.Failure):
            assert x in bad and isinstance(value.exception, WorkerCrashed), value
        else:
            assert value == sum(range(1_000_000)) + x
