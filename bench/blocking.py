"""Blocking I/O in threads (issue 15): the thread gear's adaptive concurrency against fixed pools.

    python bench/blocking.py [--repeat N] [--items N]

Each call blocks 50 ms (``time.sleep``, as a blocking client waits on a remote service that
answers in 50 ms whatever the load), 3,000 calls by default. Contenders: ``gs.map(gear="thread")``
(threads found by measurement), the thread gear at the old fixed default (``min(32, 4 * cores + 4)``),
``ThreadPoolExecutor`` at its default (``min(32, cores + 4)``) and at 512 threads (what an expert who
knows the service would write), and ``gs.map`` under ``gear="auto"``. Second table: a service that
queues past 40 calls at once (each call takes 20 ms x max(1, in flight / 40); throughput capped at
2,000/s): throughput and mean latency against the cap and the unloaded 20 ms. Interleaved, medians.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import gearshift as gs


def wait(x: int) -> int:
    time.sleep(0.05)
    return x


class Queueing:
    """20 ms up to 40 at once; past that the calls share the service."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.latencies: list[float] = []

    def __call__(self, x: int) -> int:
        with self.lock:
            self.in_flight += 1
            crowd = self.in_flight
        start = time.perf_counter()
        time.sleep(0.02 * max(1.0, crowd / 40))
        with self.lock:
            self.in_flight -= 1
            self.latencies.append(time.perf_counter() - start)
        return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--items", type=int, default=3000)
    args = p.parse_args()
    items = list(range(args.items))
    fixed = min(32, 4 * (os.cpu_count() or 1) + 4)

    def tpe(n: int | None) -> Callable[[], object]:
        def run() -> object:
            with cf.ThreadPoolExecutor(n) as ex:
                return list(ex.map(wait, items))

        return run

    contenders: dict[str, Callable[[], object]] = {
        "gs.map(gear='thread'), adaptive": lambda: gs.map(wait, items, gear="thread"),
        "gs.map(gear='auto')": lambda: gs.map(wait, items),
        f"thread gear, fixed {fixed}": lambda: gs.map(wait, items, gear="thread", workers=fixed),
        "ThreadPoolExecutor() default": tpe(None),
        "ThreadPoolExecutor(512)": tpe(512),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(args.repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.items} calls of 50 ms; repeats {args.repeat}, interleaved")
    best = min(statistics.median(v) for v in times.values())
    for name in names:
        med = statistics.median(times[name])
        print(f"  {name:34} median {med:7.3f}s  {med / best:6.2f}x the best")
    print("\na service that queues past 40 at once (cap 2,000/s, 20 ms unloaded)")
    for label, workers in (("gs.map(gear='thread'), adaptive", None), ("ThreadPoolExecutor(512)", 512)):
        rates, lat = [], []
        for _ in range(args.repeat):
            service = Queueing()
            start = time.perf_counter()
            if workers is None:
                gs.map(service, range(4000), gear="thread")
            else:
                with cf.ThreadPoolExecutor(workers) as ex:
                    list(ex.map(service, range(4000)))
            rates.append(4000 / (time.perf_counter() - start))
            late = service.latencies[len(service.latencies) // 2 :]
            lat.append(statistics.mean(late))
        print(f"  {label:34} {statistics.median(rates):7,.0f}/s ({statistics.median(rates) / 2000:.2f}x the cap), "
              f"mean latency {statistics.median(lat) * 1e3:5.1f} ms ({statistics.median(lat) / 0.02:.1f}x unloaded)")


if __name__ == "__main__":
    sys.exit(main())
