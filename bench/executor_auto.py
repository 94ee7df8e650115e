"""The mixed-calls benchmark (issue 18): ``gs.Executor(gear="auto")`` against routing by hand.

    python bench/executor_auto.py [--repeat N]

Nine calls of three kinds in one scope: three CPU calls of pure Python (~0.2 s each here),
four coroutines that each await 1 ms a thousand times, two blocking 0.5 s calls. Routed by
hand: a ProcessPoolExecutor(cores) for the CPU calls, one event loop (asyncio.gather, in a
thread) for the coroutines, a ThreadPoolExecutor for the blocking calls, all started and shut
down inside the timed call, as gs.Executor's are. Interleaved, the order rotating each repeat;
medians; the ratio is auto's time over by-hand's (goal: <= 1.15).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import gearshift as gs

CPU_N = 2_000_000


def crunch(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


async def awaits(k: int) -> int:
    for _ in range(1000):
        await asyncio.sleep(0.001)
    return k


def blocks(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def by_auto() -> list[Any]:
    with gs.Executor(gear="auto") as ex:
        futures = ([ex.submit(crunch, CPU_N) for _ in range(3)] + [ex.submit(awaits, k) for k in range(4)]
                   + [ex.submit(blocks, 0.5) for _ in range(2)])
        return [f.result() for f in futures]


def by_hand() -> list[Any]:
    def loop() -> list[int]:
        async def main() -> list[int]:
            return list(await asyncio.gather(*(awaits(k) for k in range(4))))

        return asyncio.run(main())

    with cf.ProcessPoolExecutor(os.cpu_count() or 1) as processes, cf.ThreadPoolExecutor(4) as threads:
        cpu = [processes.submit(crunch, CPU_N) for _ in range(3)]
        coros = threads.submit(loop)
        waits = [threads.submit(blocks, 0.5) for _ in range(2)]
        return [f.result() for f in cpu] + coros.result() + [f.result() for f in waits]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    contenders: dict[str, Callable[[], list[Any]]] = {"routed by hand": by_hand, "gs.Executor(gear='auto')": by_auto}
    expected = by_hand()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.repeat):
        for name in names[r % 2:] + names[: r % 2]:
            start = time.perf_counter()
            out = contenders[name]()
            times[name].append(time.perf_counter() - start)
            assert out == expected, name
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"repeats {args.repeat}, interleaved")
    ref = statistics.median(times["routed by hand"])
    for name in names:
        med = statistics.median(times[name])
        print(f"  {name:28} median {med:6.3f}s  (min {min(times[name]):.3f}, max {max(times[name]):.3f})  "
              f"{med / ref:5.2f}x by hand")


if __name__ == "__main__":
    sys.exit(main())
