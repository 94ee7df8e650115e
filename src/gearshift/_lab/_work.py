"""Workloads the experiments run, at module level so that worker processes can import them."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def cpu_work(n: int) -> int:
    """Pure-Python arithmetic: holds the GIL the whole time."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def xorshift(n: int) -> int:
    """The compiled kernel's loop in Python (64-bit xorshift), to check both compute the same."""
    mask = 0xFFFFFFFFFFFFFFFF
    x = 88172645463325252
    for _ in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
    return x


def noop() -> None:
    """A process or thread that does nothing: what remains is the cost of starting it."""


_STOPS = {signal.SIGINT, signal.SIGTERM}


def ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it then closes its pool); SIGTERM kills.

    A worker is forked with its parent's Python handlers, and maybe with these signals
    blocked (``start_mp_pool``): reset the handlers first, then unblock.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every experiment cleans up the same way on either."""


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while processes are forked, and deliver them when the block ends.

    Forking is where an interrupt does harm. A KeyboardInterrupt raised in an at-fork hook
    is printed and dropped by CPython (the Ctrl-C is lost); one raised inside ``Pool()``
    leaves a half-made pool nobody can close, whose own thread forks a replacement worker
    after atexit killed the others, and strands it. The signals are also blocked, so that a
    child forked meanwhile cannot take one into the recording handler (which would swallow
    it): the child resets its handlers, then unblocks (``ignore_sigint``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(s, lambda signum, frame: held.append(signum)) for s in signums]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal lands in ``held`` now
        for s, handler in zip(signums, previous, strict=True):
            signal.signal(s, handler)
    if held:
        signal.raise_signal(held[0])  # its own handler runs now (KeyboardInterrupt, Terminated...)
        raise KeyboardInterrupt  # if that handler did not raise, stop anyway: we were asked to


def start_mp_pool(workers: int) -> multiprocessing.pool.Pool:
    """``multiprocessing.Pool(workers)``, started with signals held; closed again if one came meanwhile."""
    pool: multiprocessing.pool.Pool | None = None
    try:
        with signals_held():
            pool = multiprocessing.Pool(workers, initializer=ignore_sigint)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    return pool


def calibrate(seconds: float) -> int:
    """Rounds of ``cpu_work`` that take about ``seconds`` here (measured, so sizes fit the machine)."""
    n = 20_000
    while True:
        start = time.perf_counter()
        cpu_work(n)
        took = time.perf_counter() - start
        if took > 0.01:
            return max(1000, int(n * seconds / took))
        n *= 4
