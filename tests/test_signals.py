"""Signals through real child interpreters: Ctrl-C, SIGTERM and a SIGKILLed parent.

Each child runs a gearshift map whose last items block (cooperatively in threads, in a
sleep or a CPU loop elsewhere). When every blocking item has started, and the fast items'
results are in, the child prints ``ready``; the test then collects the child's
descendants with psutil, sends the signal, and checks how and how fast the child ends,
that it reports the finished results, and that none of its descendants survive it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import faultlib as fl
import psutil
import pytest

GEARS = ["serial", "thread", "process", "async"]
#: "Within ~2 s" on a quiet machine; this one is busy, so the assertion is looser.
PROMPT = 5.0
FAST = 4

CHILD = r"""
import json, sys, threading
from functools import partial
from pathlib import Path

import faultlib as fl
import gearshift as gs
import gearshift._engine as engine

gear, folder, mode, fast, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
# More blocking items than workers: a process worker may hold one queued behind its own.
blocking = frozenset(range(fast, fast + 3 * workers))
items = range(fast + 3 * workers)
if mode == "stubborn":  # a blocking function that ignores gs.cancelled()
    fn, mode = partial(fl.park_stubborn, folder, blocking), "map"
else:
    fn = partial(fl.apark_on if gear == "async" else fl.park_on, folder, blocking)

# "ready" needs the fast items' results in the scheduler, so partial_results is deterministic.
fast_done = threading.Event()
if mode == "map":
    complete = engine.Scheduler.complete

    def counting(self, outcomes, now):
        complete(self, outcomes, now)
        if self.report.succeeded >= fast:
            fast_done.set()

    engine.Scheduler.complete = counting
else:
    fast_done.set()


def report_threads():
    # The child's last word on its threads: gearshift's own still alive, printed before the exit line.
    names = sorted(t.name for t in threading.enumerate() if t.name.startswith("gearshift") and t.is_alive())
    print("threads", json.dumps(names), flush=True)


def announce():
    pids = fl.pids_in(Path(folder), workers, timeout=120)
    fast_done.wait(120)
    print("ready", json.dumps(pids), flush=True)


threading.Thread(target=announce, daemon=True).start()
try:
    if mode == "map":
        gs.map(fn, items, gear=gear, workers=workers, chunksize=1)
    elif mode == "imap":
        for _ in gs.imap(fn, items, gear=gear, workers=workers, chunksize=1):
            pass
    elif mode == "amap":
        import asyncio

        async def consume():
            async for _ in gs.amap(fn, items, gear=gear, workers=workers, chunksize=1):
                pass

        asyncio.run(consume())
    elif mode == "executor":
        with gs.Executor(gear=gear, workers=workers) as ex:
            futures = [ex.submit(fn, i) for i in items]
            [f.result() for f in futures]
    elif mode == "pool":
        with gs.Pool(workers, gear=gear) as pool:
            pool.map(fn, items)
    elif mode == "shutdown":
        ex = gs.Executor(gear=gear, workers=workers)
        futures = [ex.submit(fn, i) for i in items]
        ex.shutdown(wait=True)
except KeyboardInterrupt as exc:
    partial_results = getattr(exc, "partial_results", None)
    report_threads()
    print("interrupted", json.dumps(partial_results), flush=True)
    sys.exit(130)
except SystemExit as exc:
    report_threads()
    print("exiting", exc.code, json.dumps(getattr(exc, "partial_results", None)), flush=True)
    raise
report_threads()
print("finished", flush=True)
"""


def workers_for(gear: str) -> int:
    return 1 if gear == "serial" else 2


def start(tmp_path: Path, gear: str, mode: str = "map") -> tuple[fl.Child, list[psutil.Process]]:
    """Start the child, wait for ``ready``; return it with its descendants at that moment."""
    child = fl.Child(CHILD, gear, str(tmp_path), mode, str(FAST), str(workers_for(gear)))
    try:
        child.expect("ready")
        family = psutil.Process(child.pid).children(recursive=True)
    except BaseException:
        child.close()
        raise
    if gear == "process":
        assert family, "a process-gear child with no worker processes?"
    return child, family


def interrupt(child: fl.Child, sig: int, expect: str) -> tuple[str, float, int, str]:
    """Send ``sig``; return the child's ``expect`` line, seconds until it came, exit code, stderr."""
    try:
        sent = time.monotonic()
        os.kill(child.pid, sig)
        line = child.expect(expect, timeout=60)
        took = time.monotonic() - sent
        code, _, err = child.finish()
    finally:
        child.close()
    return line, took, code, err


def threads_at_exit(child: fl.Child) -> list[str]:
    """The gearshift threads the child still had when it reported its end (see ``report_threads``)."""
    lines = [line for line in child.lines if line.startswith("threads ")]
    assert len(lines) == 1, f"the child reported its threads {len(lines)} times: {child.lines}"
    names: list[str] = json.loads(lines[0].split(" ", 1)[1])
    return names


def assert_all_gone(child: fl.Child, family: list[psutil.Process], timeout: float = 10.0) -> None:
    """The child has exited, its descendants follow, and no gearshift thread was left at its last report."""
    assert child.proc.returncode is not None, "the child is still running"
    assert_descendants_gone(family, timeout)
    assert threads_at_exit(child) == [], "gearshift threads still alive when the child reported its end"


def assert_descendants_gone(family: list[psutil.Process], timeout: float = 10.0) -> None:
    _, alive = psutil.wait_procs(family, timeout=timeout)
    assert not alive, f"left running after the child ended: {[(p.pid, p.name()) for p in alive]}"


@pytest.mark.parametrize("gear", GEARS)
def test_ctrl_c_during_map_raises_keyboard_interrupt_promptly(gear: str, tmp_path: Path) -> None:
    child, family = start(tmp_path, gear)
    line, took, code, err = interrupt(child, signal.SIGINT, "interrupted")
    assert took < PROMPT, f"KeyboardInterrupt took {took:.1f}s"
    assert code == 130, err
    partial = json.loads(line.split(" ", 1)[1])
    assert partial == {str(i): 2 * i for i in range(FAST)}
    assert_all_gone(child, family)


@pytest.mark.parametrize("gear", GEARS)
def test_sigterm_during_map_exits_cleanly(gear: str, tmp_path: Path) -> None:
    child, family = start(tmp_path, gear)
    line, took, code, err = interrupt(child, signal.SIGTERM, "exiting")
    assert took < PROMPT, f"SystemExit took {took:.1f}s"
    assert line.startswith("exiting 143 ")
    assert code == 143, err
    assert json.loads(line.split(" ", 2)[2]) == {str(i): 2 * i for i in range(FAST)}
    assert_all_gone(child, family)


@pytest.mark.parametrize("mode", ["executor", "pool", "shutdown"])
@pytest.mark.parametrize("gear", ["thread", "process", "async"])
def test_ctrl_c_in_executor_and_pool_leaves_no_orphans(gear: str, mode: str, tmp_path: Path) -> None:
    child, family = start(tmp_path, gear, mode)
    _, took, code, err = interrupt(child, signal.SIGINT, "interrupted")
    assert took < PROMPT, f"KeyboardInterrupt took {took:.1f}s"
    assert code == 130, err
    assert_all_gone(child, family)


ORPHAN = r"""
import sys
from functools import partial
import faultlib as fl
import gearshift as gs

folder = sys.argv[1]
gs.map(partial(fl.park_spin, folder), range(8), gear="process", workers=2, chunksize=1)
"""


def test_workers_leave_when_their_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no chance to clean up: the workers' watchdog threads must notice."""
    child = fl.Child(ORPHAN, str(tmp_path))
    try:
        pids = fl.pids_in(tmp_path, 2, timeout=60)
        family = psutil.Process(child.pid).children(recursive=True)
        workers = [p for p in family if p.pid in pids]
        assert len(workers) == 2
        os.kill(child.pid, signal.SIGKILL)
        # Not reaped yet: the dead parent is a zombie, which must not fool the watchdog.
        assert_descendants_gone(workers)
        child.proc.wait(timeout=30)
        assert_descendants_gone(family)  # the forkserver and resource tracker (3.14) follow
    finally:
        child.close()


@pytest.mark.parametrize("gear", ["thread", "async"])
def test_ctrl_c_with_a_thread_that_ignores_cancellation_still_exits(gear: str, tmp_path: Path) -> None:
    """The stuck thread is waited for briefly, warned about, and does not keep the child alive."""
    child, family = start(tmp_path, gear, "stubborn")
    _, took, code, err = interrupt(child, signal.SIGINT, "interrupted")
    assert took < PROMPT, f"KeyboardInterrupt took {took:.1f}s"
    assert code == 130, err
    assert_descendants_gone(family)
    # Only the workers stuck in the stubborn calls may outlive the run, none of its other threads.
    left = threads_at_exit(child)
    assert len(left) <= workers_for(gear), left
    assert all(re.fullmatch(rf"gearshift-{gear}-\d+", name) for name in left), left


@pytest.mark.parametrize("mode", ["imap", "amap"])
@pytest.mark.parametrize("gear", GEARS)
def test_ctrl_c_during_imap_and_amap(gear: str, mode: str, tmp_path: Path) -> None:
    child, family = start(tmp_path, gear, mode)
    _, took, code, err = interrupt(child, signal.SIGINT, "interrupted")
    assert took < PROMPT, f"KeyboardInterrupt took {took:.1f}s"
    assert code == 130, err
    assert_all_gone(child, family)


@pytest.mark.parametrize("gear", ["thread", "process"])
def test_sigterm_in_executor_use_kills_the_program_and_its_workers_follow(gear: str, tmp_path: Path) -> None:
    """Outside gs.map SIGTERM keeps its default action; the process workers' watchdogs clean up."""
    child, family = start(tmp_path, gear, "executor")
    try:
        os.kill(child.pid, signal.SIGTERM)
        assert child.proc.wait(timeout=30) == -signal.SIGTERM  # gone, and its threads with it
    finally:
        child.close()
    assert_descendants_gone(family)
