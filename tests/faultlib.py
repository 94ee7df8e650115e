"""Fault injection for the reliability tests: picklable faulty functions and a child runner.

Every fault is a module-level function, bound to its parameters with ``functools.partial``
so it pickles by reference into worker processes under fork, spawn and forkserver. State
that must survive a worker's death (attempt counts, pids) lives in files under a
directory the test owns, never in memory.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import gearshift as gs

TESTS = Path(__file__).resolve().parent
#: Long enough that a test never waits for it: the fault must be stopped, not outlived.
FOREVER = 300.0


# -- plain behaviours ----------------------------------------------------------------------
def double(x: int) -> int:
    return 2 * x


def pid_of(x: int) -> int:
    return os.getpid()


def fail_multiples(n: int, x: int) -> int:
    """Raise ValueError on every multiple of ``n``: a known, countable failure rate."""
    if x % n == 0:
        raise ValueError(f"injected failure on {x}")
    return 2 * x


# -- timeouts ------------------------------------------------------------------------------
def sleep_on(bad: frozenset[int], x: int) -> int:
    """Sleep (cooperatively: it checks gs.cancelled() between slices) on the items in ``bad``."""
    if x in bad:
        deadline = time.monotonic() + FOREVER
        while time.monotonic() < deadline and not gs.cancelled():
            time.sleep(0.01)
    return 2 * x


def spin_on(bad: frozenset[int], x: int) -> int:
    """A pure-CPU infinite loop that checks nothing: only killing its process stops it."""
    if x in bad:
        while True:
            pass
    return 2 * x


async def asleep_on(bad: frozenset[int], x: int) -> int:
    if x in bad:
        await asyncio.sleep(FOREVER)
    return 2 * x


# -- crashes -------------------------------------------------------------------------------
def crash_on(kind: str, bad: frozenset[int], x: int) -> int:
    """Kill the worker running an item in ``bad``: ``exit`` (os._exit(7)) or ``segv`` (ctypes)."""
    if x in bad:
        if kind == "exit":
            os._exit(7)
        if kind == "segv":
            faulthandler.disable()  # the crash is the point: no fatal-error dump in the test log
            ctypes.string_at(0)
        raise AssertionError(f"unknown crash {kind!r}")
    return 2 * x


def park_on(folder: str, bad: frozenset[int], x: int) -> int:
    """Write this worker's pid to ``folder/<x>.pid`` and block (the test kills the worker)."""
    if x in bad:
        write_atomic(Path(folder) / f"{x}.pid", str(os.getpid()))
        deadline = time.monotonic() + FOREVER
        while time.monotonic() < deadline and not gs.cancelled():
            time.sleep(0.01)
    return 2 * x


# -- retries -------------------------------------------------------------------------------
def attempt(folder: str, x: int) -> int:
    """Count this call in ``folder/<x>.n`` (one line per attempt); return the attempt number."""
    with open(Path(folder) / f"{x}.n", "a") as f:
        f.write(".\n")
    return len((Path(folder) / f"{x}.n").read_text().splitlines())


def attempts(folder: str, x: int) -> int:
    path = Path(folder) / f"{x}.n"
    return len(path.read_text().splitlines()) if path.exists() else 0


def flaky(folder: str, fails: int, error: type[BaseException], x: int) -> int:
    """Raise ``error`` on the first ``fails`` attempts at each item, then succeed."""
    if attempt(folder, x) <= fails:
        raise error(f"attempt at {x} failed on purpose")
    return 2 * x


def fault_once(folder: str, kind: str, x: int) -> int:
    """The first attempt at each item crashes its worker (``exit``) or spins (``spin``)."""
    if attempt(folder, x) == 1:
        if kind == "exit":
            os._exit(9)
        while True:
            pass
    return 2 * x


# -- initializers --------------------------------------------------------------------------
_init_calls: list[Any] = []
_local = threading.local()


def init_mark(value: str) -> None:
    """Initializer: remember ``value`` in this worker (process global and thread-local)."""
    _init_calls.append(value)
    _local.value = value


def read_mark(x: int) -> tuple[int, int, str, int]:
    """(pid, thread id, the initializer's value for this thread, initializer calls in this process)."""
    return os.getpid(), threading.get_ident(), getattr(_local, "value", "unset"), len(_init_calls)


def init_fail(message: str) -> None:
    raise RuntimeError(message)


# -- files and child interpreters -----------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def pids_in(folder: Path, count: int, timeout: float = 30.0) -> list[int]:
    """Wait for ``count`` ``*.pid`` files in ``folder``; return the pids they hold."""

    def found() -> list[int] | None:
        files = sorted(folder.glob("*.pid"))
        return [int(f.read_text()) for f in files] if len(files) >= count else None

    pids: list[int] = wait_for(found, timeout, f"{count} pid files in {folder}")
    return pids


def kill_when_parked(folder: Path, count: int = 1, sig: int = signal.SIGKILL) -> threading.Thread:
    """A thread that kills each worker as soon as it writes its pid file (``park_on``)."""

    def run() -> None:
        for pid in pids_in(folder, count):
            os.kill(pid, sig)

    thread = threading.Thread(target=run, name="test-killer")
    thread.start()
    return thread


class Child:
    """A child interpreter running a script, with line-by-line access to its stdout."""

    def __init__(self, script: str, *args: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, prefix: str, timeout: float = 60.0) -> str:
        """The next stdout line starting with ``prefix`` (earlier lines are kept in ``lines``)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child printed no {prefix!r} within {timeout}s; got {self.lines}")
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
            if not readable:
                continue
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"child ended before {prefix!r}; stdout {self.lines}, stderr:\n{err}")
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        """Wait for the exit; return (returncode, rest of stdout, stderr)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"child did not exit within {timeout}s; stderr:\n{err}") from None
        return self.proc.returncode, out, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def park_spin(folder: str, x: int) -> int:
    """Write this worker's pid to ``folder/<x>.pid``, then spin the CPU without ever checking."""
    write_atomic(Path(folder) / f"{x}.pid", str(os.getpid()))
    while True:
        pass


async def apark_on(folder: str, bad: frozenset[int], x: int) -> int:
    """``park_on`` for the async gear: the pid file, then an await that only cancellation ends."""
    if x in bad:
        write_atomic(Path(folder) / f"{x}.pid", str(os.getpid()))
        await asyncio.sleep(FOREVER)
    return 2 * x


def sigterm_is_default(x: int) -> bool:
    """In a worker: does SIGTERM still kill at once (so the parent can stop it without a grace)?"""
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def park_stubborn(folder: str, bad: frozenset[int], x: int) -> int:
    """``park_on`` that never checks gs.cancelled(): a thread nobody can stop."""
    if x in bad:
        write_atomic(Path(folder) / f"{x}.pid", str(os.getpid()))
        time.sleep(FOREVER)
    return 2 * x


def init_exit(code: int) -> None:
    """An initializer that kills its worker process outright."""
    os._exit(code)
