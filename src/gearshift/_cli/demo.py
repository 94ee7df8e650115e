"""``gearshift demo``: five small workloads, each run in the gear auto picks, with why.

Serial time is measured on a small part of each workload and extrapolated, so the
whole demo stays short even where serial would take minutes (thousands of waits).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gearshift as gs

_BLOCK: bytes | None = None


def cpu_work(n: int) -> int:
    """Pure-Python arithmetic: holds the GIL the whole time."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def hash_work(rounds: int) -> str:
    """SHA-256 over a 4 MiB block: hashlib releases the GIL for large buffers."""
    global _BLOCK
    if _BLOCK is None:
        _BLOCK = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    digest = hashlib.sha256()
    for _ in range(rounds):
        digest.update(_BLOCK)
    return digest.hexdigest()


def sleep_work(seconds: float) -> float:
    """A blocking wait (a stand-in for a database or HTTP call without async)."""
    time.sleep(seconds)
    return seconds


async def async_work(seconds: float) -> float:
    """An awaited wait (a stand-in for an async HTTP call)."""
    await asyncio.sleep(seconds)
    return seconds


def tiny_work(x: int) -> int:
    """Far less work than any dispatch costs."""
    return x + 1


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    fn: Callable[[Any], Any]
    item: Any
    count: int
    serial_part: int  # items timed serially, to extrapolate the serial time


WORKLOADS = [
    Workload("cpu", "pure-Python arithmetic (holds the GIL)", cpu_work, 150_000, 120, 8),
    Workload("hash", "SHA-256 of 4 MiB blocks (releases the GIL)", hash_work, 2, 60, 4),
    Workload("sleep", "blocking waits of 50 ms (time.sleep)", sleep_work, 0.05, 400, 6),
    Workload("async", "awaited waits of 50 ms (asyncio.sleep)", async_work, 0.05, 2000, 6),
    Workload("tiny", "x + 1 (far below any dispatch cost)", tiny_work, None, 200_000, 200_000),
]


def names() -> list[str]:
    return [w.name for w in WORKLOADS]


def _items(w: Workload, count: int) -> list[Any]:
    return list(range(count)) if w.item is None else [w.item] * count


def run_one(w: Workload, scale: float, echo: Callable[[str], None]) -> None:
    count = max(2, int(w.count * scale))
    items = _items(w, count)
    part = min(count, max(1, int(w.serial_part * max(scale, 1.0))))
    start = time.perf_counter()
    gs.map(w.fn, items[:part], gear="serial")
    serial_est = (time.perf_counter() - start) * count / part
    start = time.perf_counter()
    results = gs.map(w.fn, items, gear="auto")
    wall = time.perf_counter() - start
    report = results.report
    estimated = "" if part == count else " (est.)"
    echo(f"{w.name:<6} {w.what}: {count:,} items")
    echo(f"       gear: {report.gear}")
    for reason in report.reasons:
        echo(f"       why: {reason}")
    echo(f"       {wall:.2f}s vs serial {serial_est:.2f}s{estimated}: speedup {serial_est / wall:.1f}x")


def run_demo(selected: list[str], scale: float, echo: Callable[[str], None]) -> None:
    from gearshift._gears import cpu_count

    echo(f"gearshift demo: {len(selected)} workloads on {cpu_count()} cores, each in the gear auto picks")
    start = time.perf_counter()
    for w in WORKLOADS:
        if w.name in selected:
            run_one(w, scale, echo)
    echo(f"demo done in {time.perf_counter() - start:.1f}s")
