"""Overhead per item of the interpreter, dask and ray gears next to the process gear (issue 16).

    python bench/gears.py [--repeat N] [--tiny N] [--cpu N] [--json FILE]

Two workloads: ``tiny`` (``x + 1``: the gear's cost per item, nothing else) and ``cpu``
(``spin`` of ~5 ms each: does the work pay for the hand-off). Contenders run interleaved
in one process, repeat 1 of each, then repeat 2 of each, the order rotating by one each
repeat, so machine noise spreads over all of them; medians are reported. Start-up is timed
apart, once: a cluster gear is given one client (or Ray) started before the timed runs, as
a user who maps again and again would keep one; the process and interpreter gears start
their workers inside each run, as ``gs.map`` does. Run it on 3.14 to include the interpreter
gear; dask and ray need their extras.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Workers started by spawn/forkserver (dask's, ray's, 3.14's default) must import `workloads` too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)

import workloads as wl  # noqa: E402

import gearshift as gs  # noqa: E402

WORKERS = 2


def add_one(x: int) -> int:
    return x + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tiny", type=int, default=20_000, help="items of the tiny workload")
    parser.add_argument("--cpu", type=int, default=40, help="items of ~5 ms of the cpu workload")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    spin_n = calibrate(0.005)
    workloads: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
        "tiny": (add_one, list(range(args.tiny))),
        "cpu": (wl.spin, [spin_n] * args.cpu),
    }
    startups: dict[str, float] = {}
    gears: dict[str, Callable[[], Any]] = {"process": lambda: "process"}
    closers: list[Callable[[], None]] = []
    if not gs.InterpreterGear.unavailable():
        gears["interpreter"] = lambda: "interpreter"
    if not gs.DaskGear.unavailable():
        import distributed

        start = time.perf_counter()
        cluster = distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, dashboard_address=":0", host="127.0.0.1"
        )
        client = distributed.Client(cluster, set_as_default=False)
        startups["dask (LocalCluster, 2 workers)"] = time.perf_counter() - start
        gears["dask"] = lambda: gs.DaskGear(client=client)
        closers += [client.close, cluster.close]
    if not gs.RayGear.unavailable():
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
        startups["ray (local ray.init, 2 CPUs)"] = time.perf_counter() - start
        gears["ray"] = lambda: "ray"
        closers.append(ray.shutdown)

    times: dict[tuple[str, str], list[float]] = {}
    serial: dict[str, float] = {}
    try:
        for name, (fn, items) in workloads.items():
            start = time.perf_counter()
            expected = [fn(x) for x in items]
            serial[name] = time.perf_counter() - start
            for gear in gears:  # warm up (imports in workers, the cluster's first tasks)
                assert gs.map(fn, items[:50], gear=gears[gear](), workers=WORKERS) == expected[:50]
            order = list(gears)
            for rep in range(args.repeat):
                for gear in order[rep % len(order):] + order[: rep % len(order)]:
                    start = time.perf_counter()
                    got = gs.map(fn, items, gear=gears[gear](), workers=WORKERS)
                    times.setdefault((name, gear), []).append(time.perf_counter() - start)
                    assert got == expected, f"{gear} gave wrong results on {name}"
    finally:
        for close in closers:
            close()

    load = os.getloadavg()
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} "
          f"(a machine shared with others: expect noise), {args.repeat} interleaved repeats, medians")
    for what, seconds in startups.items():
        print(f"start-up {what}: {seconds:.2f} s")
    rows: list[dict[str, Any]] = []
    for name, (_, items) in workloads.items():
        base = statistics.median(times[(name, "process")])
        print(f"\n{name}: {len(items)} items, serial {serial[name] * 1e3:.0f} ms")
        print(f"  {'gear':<12} {'median':>9} {'per item':>10} {'vs process':>11}")
        for gear in gears:
            med = statistics.median(times[(name, gear)])
            per = med / len(items)
            print(f"  {gear:<12} {med * 1e3:7.0f} ms {per * 1e6:8.1f} µs {med / base:10.2f}x")
            rows.append({"workload": name, "gear": gear, "median": med, "per_item": per, "vs_process": med / base,
                         "runs": times[(name, gear)]})
    if args.json:
        args.json.write_text(json.dumps({"python": sys.version, "load": load, "startups": startups,
                                         "serial": serial, "rows": rows}, indent=1))


def calibrate(target: float) -> int:
    """The ``spin`` size that takes about ``target`` seconds here."""
    n = 1000
    while True:
        start = time.perf_counter()
        wl.spin(n)
        took = time.perf_counter() - start
        if took > 0.002:
            return max(1, int(n * target / took))
        n *= 4


if __name__ == "__main__":
    main()
