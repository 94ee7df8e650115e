"""Module-level (so picklable by reference) functions the core tests run in every gear."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

GEARS = ["serial", "thread", "process", "async"]
#: Generous bound for anything that must happen "promptly" on a busy 2-core machine.
PATIENCE = 30.0


def square(x: int) -> int:
    return x * x


async def asquare(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def add_one(x: int) -> int:
    return x + 1


def pid(_: Any) -> int:
    return os.getpid()


def fail_on(x: int, bad: int = 3) -> int:
    """Raise ``KeyError`` (not a common type, so the test sees the original is kept) on ``bad``."""
    if x == bad:
        raise KeyError(f"bad item {x}")
    return x


def record(x: int, *, folder: str, bad: int | None = None) -> int:
    """Leave a file per item run (a counter every gear can share), then maybe fail."""
    Path(folder, str(x)).touch()
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def exit_on(x: int, bad: int = 2) -> int:
    """Kill the worker process outright on ``bad`` (as a segfault would)."""
    if x == bad:
        os._exit(7)
    return x


def wait_for(path: str, value: Any = None) -> Any:
    """Block until ``path`` exists (a cross-process event); give up after PATIENCE seconds."""
    deadline = time.monotonic() + PATIENCE
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return value


def add(x: int, y: int, z: int = 0) -> int:
    return x + y + z


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


def ran_files(folder: str) -> set[int]:
    return {int(name) for name in os.listdir(folder)}


def zero_free(never: str, x: int) -> int:
    """Item 0 returns at once; any other waits for ``never`` or for gs.cancelled()."""
    import gearshift as gs

    deadline = time.monotonic() + PATIENCE
    while x != 0 and not os.path.exists(never) and not gs.cancelled():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{never} never appeared")
        time.sleep(0.01)
    return x


def spin(n: int) -> int:
    """Pure-Python CPU work that holds the GIL: about 5 ms per 100k on this machine."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def nap(x: int) -> int:
    """A blocking wait of 10 ms (a stand-in for blocking I/O)."""
    time.sleep(0.01)
    return x


async def anap(x: int) -> int:
    """An awaited wait of 10 ms (a stand-in for async I/O)."""
    await asyncio.sleep(0.01)
    return x
