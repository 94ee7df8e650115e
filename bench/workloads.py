"""The benchmark workloads: module-level (so picklable) task functions and their inputs.

Each workload is sized so that one serial run takes roughly 0.5-3 s on a 2-core
machine in full mode; ``quick`` shrinks it about ten times for smoke runs. Sizes are
fixed iteration counts, not calibrated at run time, so runs stay comparable
across machines and days (the serial time in the report shows the real size).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Iterations of ``spin`` for one "few milliseconds" CPU task (~3-4 ms on a 2020s core).
CPU_ITERS = 40_000
#: How many times each hashing task runs sha256 over its 1 MB buffer (~1 ms each with SHA-NI).
HASH_ROUNDS = 4
HASH_SIZE = 1 << 20
BIG_SIZE = 3 << 20


# --- task functions (module level: every pool can pickle them by reference) ---------


def spin(n: int) -> int:
    """Pure-Python CPU work that holds the GIL: a loop summing squares."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def inc(x: int) -> int:
    """The tiniest task: far below any pool's dispatch cost."""
    return x + 1


def block(seconds: float) -> float:
    """A blocking wait (a stand-in for a blocking I/O call); releases the GIL."""
    time.sleep(seconds)
    return seconds


async def await_sleep(seconds: float) -> float:
    """An async wait (a stand-in for an awaited network call)."""
    await asyncio.sleep(seconds)
    return seconds


def hash_size(size: int) -> str:
    """sha256 over a buffer made inside the worker: only an int crosses to the worker."""
    buf = bytes(size)
    digest = hashlib.sha256()
    for _ in range(HASH_ROUNDS):
        digest.update(buf)
    return digest.hexdigest()


def hash_bytes(buf: bytes) -> str:
    """sha256 over a buffer passed in: the buffer is pickled to process workers."""
    digest = hashlib.sha256()
    for _ in range(HASH_ROUNDS):
        digest.update(buf)
    return digest.hexdigest()


def array_std(a: Any) -> float:
    """A cheap reduction over a NumPy array passed in: the cost is moving the array."""
    return float(a.std())


def first_byte(buf: bytes) -> int:
    """A cheap function of a large argument: the cost is moving the argument."""
    return buf[0]


def wait_then_spin(n: int) -> int:
    """Mixed: 5 ms of waiting, then ``n`` iterations of CPU work."""
    time.sleep(0.005)
    return spin(n)


# --- workloads ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal from the issues, checked on medians after the run.

    kind:
      "speedup":   ``contender`` at least ``bound`` times faster than the serial loop;
      "best_peer": ``contender`` no slower than ``bound`` x the best (non-gearshift) peer;
      "peer":      ``contender`` no slower than ``bound`` x the fastest peer whose key
                   starts with ``other``;
      "gear":      ``contender`` no slower than ``bound`` x the contender keyed ``other``;
      "manual":    ``contender`` (auto) no slower than ``bound`` x the best manual gear.
    Contenders are named by their keys (see peers.py), which do not change with --workers.
    """

    kind: str
    contender: str
    bound: float
    other: str = ""
    source: str = ""


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    fn: Callable[..., Any]
    make_items: Callable[[bool], list[Any]]
    families: frozenset[str]
    """Peer families that apply: "thread" (thread pools), "process" (process pools),
    "async" (raw asyncio.gather + Semaphore)."""
    gears: tuple[str, ...]
    """gearshift's manual gears that apply (``gear="auto"`` is always added)."""
    threads: int = 0
    """Threads for thread pools (and the concurrency of the async ones); 0: as many as
    the process pools' workers (one per core)."""
    serial: bool = True
    """Run the serial loop; when False (long waits) the serial time is ``ideal_serial``."""
    ideal_serial: Callable[[list[Any]], float] | None = None
    auto_workers: int | None = None
    """``workers`` given to ``gear="auto"``: only where it is a limit the user sets (the
    async workload's concurrency), never a tuning knob auto should find itself."""
    cpu_bound: bool = False
    """GIL-holding work: thread pools join in only on a free-threaded build."""
    targets: tuple[Target, ...] = field(default_factory=tuple)


def _n(full: int, quick: bool) -> int:
    return max(4, full // 10) if quick else full


def _cpu_items(quick: bool) -> list[int]:
    return [CPU_ITERS] * _n(300, quick)


def _tiny_items(quick: bool) -> list[int]:
    return list(range(_n(200_000, quick)))


def _block_items(quick: bool) -> list[float]:
    return [0.01] * _n(500, quick)


def _async_items(quick: bool) -> list[float]:
    return [0.01] * _n(10_000, quick)


def _hash_size_items(quick: bool) -> list[int]:
    return [HASH_SIZE] * _n(200, quick)


def _hash_bytes_items(quick: bool) -> list[bytes]:
    # Distinct objects: pickle's memo would send one shared buffer only once per chunk.
    return [bytes([i % 256]) * HASH_SIZE for i in range(_n(200, quick))]


def _big_items(quick: bool) -> list[bytes]:
    return [bytes([i % 256]) * BIG_SIZE for i in range(_n(100, quick))]


def _hash_8mib_items(quick: bool) -> list[bytes]:
    return [bytes([i % 256]) * (8 << 20) for i in range(_n(24, quick))]


def _numpy_items(quick: bool) -> list[Any]:
    import numpy as np

    return [np.random.default_rng(i).random(1 << 20) for i in range(_n(16, quick))]  # 8 MB each


def _mixed_items(quick: bool) -> list[int]:
    return [CPU_ITERS] * _n(200, quick)


def _uneven_items(quick: bool) -> list[int]:
    # Harmonic sizes, heaviest first (inputs sorted by size): the first item is ~6% of
    # the total, the first eighth of the items ~60%, so static equal chunks leave one
    # worker with most of the work.
    top = 2_500_000 // (10 if quick else 1)
    return [max(1_000, top // (i + 1)) for i in range(_n(200, quick))]


def _few_heavy_items(quick: bool) -> list[int]:
    return [5_000_000 // (10 if quick else 1)] * 4


def _sum_waits(items: list[Any]) -> float:
    return float(sum(items))


def _cpu_targets(name: str) -> tuple[Target, ...]:
    gear = "gs-process"
    return (
        Target("speedup", gear, 1.8, source=f"issue 2: CPU tasks >= 1.8x serial ({name})"),
        Target("best_peer", gear, 1.0, source=f"issue 2: CPU tasks no slower than the best peer ({name})"),
    )


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "cpu", f"pure-Python CPU tasks of a few ms, spin({CPU_ITERS}) each", spin, _cpu_items,
        frozenset({"process"}), ("serial", "process"), cpu_bound=True, targets=_cpu_targets("cpu"),
    ),
    Workload(
        "tiny", "tiny tasks, x + 1", inc, _tiny_items,
        frozenset({"process"}), ("serial", "thread", "process"),
        targets=(Target("peer", "gs-process", 1.0, other="loky",
                        source="issue 2: process gear on tiny tasks no slower than joblib"),),
    ),
    Workload(
        "blocking", "blocking waits, time.sleep(0.01), 32 threads", block, _block_items,
        frozenset({"thread"}), ("thread", "async"), threads=32, serial=False, ideal_serial=_sum_waits,
    ),
    Workload(
        "async", "async waits, asyncio.sleep(0.01), at concurrency 500", await_sleep, _async_items,
        frozenset({"async"}), ("async",), threads=500, serial=False, ideal_serial=_sum_waits, auto_workers=500,
        targets=(Target("peer", "gs-async", 1.2, other="asyncio",
                        source="issue 2: async gear within 1.2x of raw asyncio.gather+Semaphore"),),
    ),
    Workload(
        "hashing", f"sha256 x{HASH_ROUNDS} over a 1 MB buffer made in the worker (GIL released)",
        hash_size, _hash_size_items, frozenset({"thread", "process"}), ("serial", "thread", "process"),
    ),
    Workload(
        "hashing-bytes", f"sha256 x{HASH_ROUNDS} over a 1 MB buffer passed in (GIL released)",
        hash_bytes, _hash_bytes_items, frozenset({"thread", "process"}), ("serial", "thread", "process"),
    ),
    Workload(
        "bigargs", f"arguments of {BIG_SIZE >> 20} MB bytes each, a cheap function (buf[0])",
        first_byte, _big_items, frozenset({"thread", "process"}), ("serial", "thread", "process"),
    ),
    Workload(
        "hash-8mib", f"sha256 x{HASH_ROUNDS} over 8 MiB buffers passed in (GIL released; big arguments)",
        hash_bytes, _hash_8mib_items, frozenset({"thread", "process"}), ("thread", "process"),
        targets=(Target("gear", "gs-process", 1.5, other="gs-thread",
                        source="issue 12: 8 MiB buffers hashed, process gear within 1.5x of the thread gear"),),
    ),
    Workload(
        "numpy", "16 NumPy arrays of 8 MB passed in, a cheap reduction (a.std())", array_std, _numpy_items,
        frozenset({"process"}), ("process",),
        targets=(Target("peer", "gs-process", 1.0, other="loky",
                        source="issue 12: 8 MB NumPy arrays in processes no slower than joblib"),),
    ),
    Workload(
        "mixed", f"wait and compute: 5 ms sleep + spin({CPU_ITERS}), 4 threads", wait_then_spin, _mixed_items,
        frozenset({"thread", "process"}), ("serial", "thread", "process"), threads=4,
    ),
    Workload(
        "uneven", "CPU tasks of harmonic sizes (~250 ms down to ~1 ms), heaviest first", spin,
        _uneven_items, frozenset({"process"}), ("serial", "process"), cpu_bound=True,
        targets=_cpu_targets("uneven"),
    ),
    Workload(
        "few-heavy", "4 CPU tasks of ~0.5 s each (start-up and probe cost)", spin, _few_heavy_items,
        frozenset({"process"}), ("serial", "process"), cpu_bound=True, targets=_cpu_targets("few-heavy"),
    ),
)

#: Every workload gets this target on top of its own.
AUTO_TARGET = Target("manual", "gs-auto", 1.1, source="issue 4: auto within 1.1x of the best manual gear")


def by_name(names: list[str]) -> list[Workload]:
    """The workloads named (all when ``names`` is empty), in suite order."""
    known = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [w for w in WORKLOADS if not names or w.name in names]
