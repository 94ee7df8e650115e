"""The pipeline benchmark (issue 14): download (async) -> parse (process, the bottleneck) -> store (thread).

    python bench/pipeline.py [--repeat N] [--items N]

300 items: the async stage waits 20 ms per item (100 at once), the process stage computes
~2.5 ms of pure Python per item (2 workers), the thread stage waits 5 ms (8 threads). The
reference is the process stage run alone (``gs.map`` over the same items, 2 workers): a
pipeline cannot beat its bottleneck, the goal is to lose little to it (>= 0.85x). Beside it:
gs.Pipeline ordered and unordered, pypeln (the closest peer: task -> process -> thread stages,
unordered), and one gear for all three steps (each item does all three in a process, 2
workers; in threads, 8). Contenders run interleaved, the order rotating each repeat; medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)

import gearshift as gs  # noqa: E402

DOWNLOAD_WAIT = 0.020
STORE_WAIT = 0.005
CPU_SECONDS = 0.0025
_ITERS = 0


def calibrate() -> int:
    """Loop count of ``parse`` that takes ``CPU_SECONDS`` here."""
    n = 200_000
    start = time.perf_counter()
    _spin(n)
    return max(1000, int(n * CPU_SECONDS / (time.perf_counter() - start)))


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


async def download(x: tuple[int, int]) -> tuple[int, int]:
    await asyncio.sleep(DOWNLOAD_WAIT)
    return x


def parse(x: tuple[int, int]) -> tuple[int, int]:
    i, iters = x
    _spin(iters)
    return i, iters


def store(x: tuple[int, int]) -> int:
    time.sleep(STORE_WAIT)
    return x[0]


def all_three(x: tuple[int, int]) -> int:
    time.sleep(DOWNLOAD_WAIT)
    parse(x)
    return store(x)


def process_alone(items: list[Any]) -> list[Any]:
    return gs.map(parse, items, gear="process", workers=2)


def gs_pipeline(ordered: bool) -> Callable[[list[Any]], list[Any]]:
    def run(items: list[Any]) -> list[Any]:
        pipe = (
            gs.Pipeline(items, ordered=ordered)
            .map(download, gear="async", concurrency=100)
            .map(parse, gear="process", workers=2)
            .map(store, gear="thread", workers=8)
        )
        return list(pipe)

    return run


def pypeln_pipeline(items: list[Any]) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pypeln as pl

    stage = pl.task.map(download, items, workers=100)
    stage = pl.process.map(parse, stage, workers=2)
    stage = pl.thread.map(store, stage, workers=8)
    return list(stage)


def one_gear(gear: str, workers: int) -> Callable[[list[Any]], list[Any]]:
    def run(items: list[Any]) -> list[Any]:
        return gs.map(all_three, items, gear=gear, workers=workers)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--items", type=int, default=300)
    args = p.parse_args()
    iters = calibrate()
    items = [(i, iters) for i in range(args.items)]
    contenders: dict[str, Callable[[list[Any]], list[Any]]] = {
        "process stage alone (gs.map)": process_alone,
        "gs.Pipeline ordered": gs_pipeline(True),
        "gs.Pipeline unordered": gs_pipeline(False),
        "one gear: process, 2": one_gear("process", 2),
        "one gear: thread, 8": one_gear("thread", 8),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pypeln  # noqa: F401
        contenders["pypeln (unordered)"] = pypeln_pipeline
    except ImportError:
        print("(pypeln not installed: pip install 'gearshift[bench]')")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    print(f"{args.items} items; parse ~{CPU_SECONDS * 1e3:.1f} ms CPU ({iters} loops); "
          f"download {DOWNLOAD_WAIT * 1e3:.0f} ms x100; store {STORE_WAIT * 1e3:.0f} ms x8; repeats {args.repeat}")
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    expected = sorted(range(args.items))
    for r in range(args.repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            out = contenders[name](items)
            times[name].append(time.perf_counter() - start)
            got = sorted(x if isinstance(x, int) else x[0] for x in out)
            assert got == expected, f"{name} lost or duplicated items"
    ref = statistics.median(times[names[0]])
    print(f"{'contender':32} {'median s':>9} {'min s':>7} {'vs process stage alone':>24}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:32} {med:9.3f} {min(times[name]):7.3f} {ref / med:23.2f}x")


if __name__ == "__main__":
    main()
