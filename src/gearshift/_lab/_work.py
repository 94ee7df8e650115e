"""Workloads the experiments run, at module level so that worker processes can import them."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import signal
import threading
import time


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


def ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle; it then closes its pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every experiment cleans up the same way on either."""


def start_mp_pool(workers: int) -> multiprocessing.pool.Pool:
    """``multiprocessing.Pool(workers)``, with Ctrl-C (and SIGTERM) held until it has started.

    A Ctrl-C inside ``Pool()`` leaves a half-made pool nobody can close: at exit its workers
    are killed while its own thread still replaces exited workers, and the replacement,
    forked too late, is stranded without a parent. So the signal waits for the pool to
    exist, which is then closed here, and the signal delivered again.
    """
    held: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(s, lambda signum, frame: held.append(signum)) for s in signums] if main else []
    try:
        pool = multiprocessing.Pool(workers, initializer=ignore_sigint)
    finally:
        for s, handler in zip(signums, previous, strict=False):
            signal.signal(s, handler)
    if held:
        pool.terminate()
        pool.join()
        signal.raise_signal(held[0])  # its own handler runs now (KeyboardInterrupt, Terminated...)
        raise KeyboardInterrupt  # if that handler did not raise, stop anyway: we were asked to
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
