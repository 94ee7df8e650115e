"""Shared fixtures: every test must leave no gearshift thread or process behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest


def _ours(proc: psutil.Process) -> bool:
    """Children that count as leftovers: not multiprocessing's own forkserver/resource tracker."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False
    return "forkserver" not in cmd and "resource_tracker" not in cmd


#: Processes a module-scoped fixture keeps for its tests (a LocalCluster's workers, a local Ray):
#: not a test's leftovers. The fixture adds them (``keep_children``), and when it stops them it
#: clears this set and checks ``leftover_children`` itself.
KEPT: set[int] = set()


def _kept(proc: psutil.Process) -> bool:
    """Kept, or started by a kept process (a local Ray's raylet starts its workers as needed)."""
    try:
        return proc.pid in KEPT or any(parent.pid in KEPT for parent in proc.parents())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def keep_children() -> None:
    """Count every live child now as kept by the running module fixture (see ``KEPT``)."""
    KEPT.update(p.pid for p in psutil.Process(os.getpid()).children(recursive=True))


def leftover_children(wait: float = 3.0) -> list[psutil.Process]:
    """Our live child processes, after giving exiting ones ``wait`` seconds to go."""
    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + wait
    while True:
        kids = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        kids = [p for p in kids if _ours(p) and not _kept(p)]
        if not kids or time.monotonic() > deadline:
            return kids
        time.sleep(0.02)


def leftover_threads(wait: float = 3.0) -> list[str]:
    deadline = time.monotonic() + wait
    while True:
        names = [t.name for t in threading.enumerate() if t.name.startswith("gearshift") and t.is_alive()]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.02)


@pytest.fixture(autouse=True, scope="module")
def _environment_restored() -> Iterator[None]:
    """Libraries some modules start (Ray, Dask) set variables in os.environ: they stay in their module."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_orphans(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no child process and no gearshift thread is left running."""
    yield
    if request.node.get_closest_marker("allow_leftover_threads"):
        return
    kids = leftover_children()
    assert not kids, f"orphan processes left: {[(p.pid, p.name()) for p in kids]}"
    threads = leftover_threads()
    assert not threads, f"gearshift threads left running: {threads}"
    shm = [name for name in os.listdir("/dev/shm") if name.startswith(f"gearshift-{os.getpid()}-")] if os.path.isdir(
        "/dev/shm"
    ) else []
    assert not shm, f"shared-memory files left in /dev/shm: {shm}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_leftover_threads: a test that deliberately strands a thread")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
