"""A three-stage pipeline: download (async I/O) -> parse (CPU, processes) -> store (blocking I/O, threads).

    python examples/pipeline.py

Each stage runs in its own gear, all at once, with bounded queues between them; the report
names the stage that limits the whole and what would lift it.
"""

from __future__ import annotations

import asyncio
import time

import gearshift as gs


async def download(i: int) -> bytes:
    await asyncio.sleep(0.02)  # stands for an HTTP request
    return str(i).encode() * 100


def parse(page: bytes) -> int:
    total = 0
    for b in page * 200:  # ~2 ms of pure-Python CPU: the GIL is held, so processes
        total += b
    return total


def store(value: int) -> int:
    time.sleep(0.005)  # stands for a blocking database write
    return value


if __name__ == "__main__":
    pipe = (
        gs.Pipeline(range(300))
        .map(download, gear="async", concurrency=100)
        .map(parse, gear="process", workers=2)
        .filter(lambda v: v % 2 == 0)
        .map(store, gear="thread", workers=8)
    )
    report = pipe.run()
    print(report)
