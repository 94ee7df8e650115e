"""Claims about asyncio: tasks vs threads, event loops, task groups, awaiting, to_thread."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from gearshift._lab._core import (
    Context,
    Effect,
    Finding,
    Machine,
    Verdict,
    combine,
    experiment,
    fmt,
    judge,
    judge_same,
    q,
)
from gearshift._lab.cpu import SAME_SPEED, timed

#: The full run starts the issue's 10,000 threads; on a loaded 2-core machine that took 100 s (the
#: kernel's work, mostly), so the quick run measures 2,000 and states the per-wait costs.
_WAITS = {"smallest": 200, "quick": 2_000, "full": 10_000}


def _rss_kib() -> float | None:
    """Resident memory now (Linux), else the peak so far; None where neither can be read (Windows).

    Not the peak on Linux: a process's peak survives exec, so a child started by a big parent
    would begin with the parent's peak and hide what it adds.
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else float(peak)


def _threads_wait(n: int, at_peak: Callable[[], None]) -> tuple[int, float]:
    """``n`` threads all waiting at once; returns how many started (the OS may refuse some) and the seconds."""
    release, all_in = threading.Event(), threading.Event()
    lock, waiting = threading.Lock(), [0]
    threads: list[threading.Thread] = []

    def waiter() -> None:
        with lock:
            waiting[0] += 1
            if waiting[0] == n:
                all_in.set()
        release.wait()

    start = time.perf_counter()
    try:
        for _ in range(n):
            t = threading.Thread(target=waiter)
            try:
                t.start()
            except RuntimeError:  # "can't start new thread": the answer, not an error
                break
            threads.append(t)
        if len(threads) == n:
            all_in.wait(60)
        at_peak()
    finally:
        release.set()
        for t in threads:
            t.join()
    return len(threads), time.perf_counter() - start


def _tasks_wait(n: int, at_peak: Callable[[], None]) -> tuple[int, float]:
    async def main() -> int:
        release = asyncio.Event()
        tasks = [asyncio.create_task(release.wait()) for _ in range(n)]
        await asyncio.sleep(0)  # every task has started and waits now
        at_peak()
        release.set()
        await asyncio.gather(*tasks)
        return len(tasks)

    start = time.perf_counter()
    started = asyncio.run(main())
    return started, time.perf_counter() - start


def probe_main() -> None:
    """Run in a fresh interpreter: ``kind n`` -> JSON of started, seconds and the peak memory it added."""
    kind, n = sys.argv[1], int(sys.argv[2])
    before = _rss_kib()
    peak: list[float | None] = [None]

    def at_peak() -> None:
        peak[0] = _rss_kib()

    started, took = (_threads_wait if kind == "threads" else _tasks_wait)(n, at_peak)
    after = peak[0]
    added = None if before is None or after is None else max(0.0, after - before)
    print(json.dumps({"started": started, "seconds": took, "kib": added}))


def _probe(kind: str, n: int) -> dict[str, Any]:
    """Each measure in its own interpreter: a fresh peak RSS, and no allocator memory reused from a previous run."""
    code = "from gearshift._lab.aio import probe_main; probe_main()"
    done = subprocess.run([sys.executable, "-c", code, kind, str(n)], capture_output=True, text=True, timeout=120,
                          check=True, stdin=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@experiment("async-vs-threads", "Use async when you can, threads when you must: tasks are lighter than threads")
def async_vs_threads(ctx: Context) -> Finding:
    n = _WAITS.get(ctx.size.name, 3000)
    repeats = min(ctx.repeats, 3)  # thousands of threads take seconds: 3 repeats show the spread
    t_time, a_time, t_mem, a_mem, refused = [], [], [], [], 0
    for _ in range(repeats):
        th, ta = _probe("threads", n), _probe("tasks", n)
        assert ta["started"] == n, "tasks were lost"
        refused = max(refused, n - th["started"])
        t_time.append(th["seconds"] / max(1, th["started"]) * 1e6)
        a_time.append(ta["seconds"] / n * 1e6)
        if th["kib"] is not None and ta["kib"] is not None:
            t_mem.append(th["kib"] / max(1, th["started"]))
            a_mem.append(ta["kib"] / n)
    tt, at = q("thread: start, wait, join", "us/wait", t_time), q("task: create, wait, finish", "us/wait", a_time)
    faster = Effect.ratio(tt, at)
    measured = [tt, at, faster.q("time: thread / task")]
    parts = [judge(faster, 1.0, "above")]
    effects = [faster]
    memory = ""
    if t_mem and a_mem:
        tm, am = q("thread memory", "KiB/wait", t_mem), q("task memory", "KiB/wait", a_mem)
        lighter = Effect.ratio(tm, am) if am.median > 0 else Effect(float("inf"), 0.0)
        measured += [tm, am]
        parts.append(judge(lighter, 1.0, "above"))
        effects.append(lighter)
        memory = f"; memory {fmt(tm.median, 'KiB')} per thread vs {fmt(am.median, 'KiB')} per task"
    if refused:
        memory += f"; the OS refused {refused} of {n} threads"
        parts = ["holds" if faster.value > 1 else parts[0]]
    return ctx.finding(
        combine(parts), measured,
        f"{n:,} concurrent waits, each way in a fresh interpreter: a thread costs {fmt(tt.median, 'us')}, a task "
        f"{fmt(at.median, 'us')} ({faster.value:.0f}x){memory}",
        "for thousands of concurrent waits use async (gear='async'); threads for blocking libraries, a few dozen",
        *effects, repeats=repeats,
    )


def _runner(loop: str) -> asyncio.Runner:
    if loop == "uvloop":
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner(loop_factory=asyncio.new_event_loop)


def _on_loop(loop: str, coro: Callable[[], Coroutine[Any, Any, float]]) -> float:
    with _runner(loop) as runner:
        return runner.run(coro())


async def _switches(tasks: int, rounds: int) -> float:
    """Events per second: tasks handing the loop to each other (``await asyncio.sleep(0)``)."""

    async def spin() -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)

    start = time.perf_counter()
    await asyncio.gather(*(spin() for _ in range(tasks)))
    return tasks * rounds / (time.perf_counter() - start)


async def _ping_pong(pairs: int, rounds: int) -> float:
    """I/O events per second: messages echoed over local socket pairs (readiness, reads, writes)."""

    async def pair() -> None:
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        try:
            for _ in range(rounds):
                wa.write(b"x" * 64)
                await wa.drain()
                data = await rb.readexactly(64)
                wb.write(data)
                await wb.drain()
                await ra.readexactly(64)
        finally:
            for w in (wa, wb):
                w.close()
            for w in (wa, wb):
                await w.wait_closed()

    start = time.perf_counter()
    await asyncio.gather(*(pair() for _ in range(pairs)))
    return pairs * rounds * 2 / (time.perf_counter() - start)


def judge_event_loop(machine: Machine, switch_gain: Effect | None, io_gain: Effect | None) -> tuple[Verdict, str]:
    """uvloop's rate over asyncio's, for task switches and for socket I/O; no uvloop, nothing to compare."""
    if machine.uvloop is None or switch_gain is None or io_gain is None:
        why = "uvloop is not installed (pip install 'gearshift[fast]')" if machine.uvloop is None else "no numbers"
        return "not measurable here", why
    parts = [judge(switch_gain, 1.0, "above"), judge(io_gain, 1.0, "above")]
    said = f"uvloop {switch_gain.value:.2f}x asyncio's rate on task switches, {io_gain.value:.2f}x on socket I/O"
    if parts[0] == parts[1]:
        return parts[0], said
    return "depends", f"{said}: it depends on the kind of event"


@experiment("event-loop", "Consider an alternative event loop (uvloop) when dealing with lots of events")
def event_loop(ctx: Context) -> Finding:
    loops = ["asyncio"] + (["uvloop"] if ctx.machine.uvloop else [])
    tasks, rounds = 100, ctx.size.n(200, 20)
    pairs, trips = 20, ctx.size.n(200, 20)
    sw: dict[str, list[float]] = {lp: [] for lp in loops}
    io: dict[str, list[float]] = {lp: [] for lp in loops}
    for i in range(ctx.repeats):
        for lp in loops if i % 2 == 0 else loops[::-1]:
            sw[lp].append(_on_loop(lp, lambda: _switches(tasks, rounds)))
            io[lp].append(_on_loop(lp, lambda: _ping_pong(pairs, trips)))
    measured = [q(f"{lp}: task switches", "events/s", sw[lp]) for lp in loops]
    measured += [q(f"{lp}: socket messages", "events/s", io[lp]) for lp in loops]
    switch_gain = io_gain = None
    if "uvloop" in loops:
        switch_gain = Effect.ratio(q("", "", sw["uvloop"]), q("", "", sw["asyncio"]))
        io_gain = Effect.ratio(q("", "", io["uvloop"]), q("", "", io["asyncio"]))
        measured += [switch_gain.q("uvloop / asyncio: switches"),
                     io_gain.q("uvloop / asyncio: socket I/O")]
    verdict, said = judge_event_loop(ctx.machine, switch_gain, io_gain)
    base = (f"asyncio: {fmt(measured[0].median)} switches/s, {fmt(q('', '', io['asyncio']).median)} "
            f"socket messages/s")
    effects = [e for e in (switch_gain, io_gain) if e is not None]
    return ctx.finding(
        verdict, measured, f"{base}; {said}",
        "many small events (sockets, many tasks): try uvloop (gearshift's async gear uses it when installed)",
        *effects,
    )


async def _group_run(n: int) -> None:
    async def step() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(step())


async def _gather_run(n: int) -> None:
    async def step() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    await asyncio.gather(*(step() for _ in range(n)))


class _Boom(Exception):
    pass


async def _cancel_in_group(n: int) -> tuple[float, int]:
    """One task fails; how soon does the group end, and how many siblings did it cancel?"""
    started = asyncio.Event()
    cancelled = [0]

    async def sibling() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled[0] += 1
            raise

    async def failing() -> None:
        await started.wait()
        raise _Boom

    failed_at = 0.0
    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(n - 1):
                tg.create_task(sibling())
            tg.create_task(failing())
            await asyncio.sleep(0)
            failed_at = time.perf_counter()
            started.set()
    except* _Boom:
        pass
    return time.perf_counter() - failed_at, cancelled[0]


async def _left_by_gather(n: int) -> int:
    """gather raises the first error and leaves the siblings running (we then cancel them ourselves)."""
    started = asyncio.Event()

    async def failing() -> None:
        await started.wait()
        raise _Boom

    siblings = [asyncio.create_task(asyncio.sleep(60)) for _ in range(n - 1)]
    try:
        started.set()
        await asyncio.gather(*siblings, failing())
    except _Boom:
        pass
    left = sum(not t.done() for t in siblings)
    for t in siblings:
        t.cancel()
    await asyncio.gather(*siblings, return_exceptions=True)
    return left


@experiment("task-groups", "Task groups (or gather) run tasks without tracking them by hand; no need for trio")
def task_groups(ctx: Context) -> Finding:
    n = ctx.size.n(2000, 100)
    group_t: list[float] = []
    gather_t: list[float] = []
    cancel_t: list[float] = []
    cancelled: list[int] = []
    left: list[int] = []
    for i in range(ctx.repeats):
        runs = [(group_t, _group_run), (gather_t, _gather_run)]
        for times, fn in runs if i % 2 == 0 else runs[::-1]:
            times.append(timed(lambda: asyncio.run(fn(n))))  # noqa: B023 - called at once
        took, count = asyncio.run(_cancel_in_group(n))
        cancel_t.append(took * 1000)
        cancelled.append(count)
        left.append(asyncio.run(_left_by_gather(n)))
    g, a = q("TaskGroup", "s", group_t), q("gather", "s", gather_t)
    ratio = Effect.ratio(g, a)
    same = judge_same(ratio, SAME_SPEED)
    all_cancelled = min(cancelled) == n - 1
    verdict = combine([same, "holds" if all_cancelled else "does not hold"])
    return ctx.finding(
        verdict,
        [g, a, ratio.q("TaskGroup / gather time"), q("group: error to all cancelled", "ms", cancel_t),
         q("siblings cancelled by the group", "tasks", cancelled), q("siblings left running by gather", "tasks", left)],
        f"{n:,} tasks: TaskGroup {fmt(g.median, 's')} vs gather {fmt(a.median, 's')} ({ratio.value:.2f}x); on an "
        f"error the group cancelled {min(cancelled):,}/{n - 1:,} siblings in {fmt(q('', '', cancel_t).median, 'ms')}, "
        f"gather left {max(left):,} running",
        "prefer asyncio.TaskGroup: same speed as gather, and an error cancels the rest (gather leaves them running)",
        ratio,
    )


async def _ticks_while(k: int, via_task: bool) -> tuple[int, float]:
    """How often another task ran while we awaited ``k`` coroutines directly, or each wrapped in a task."""
    ticks = [0]
    stop = False

    async def ticker() -> None:
        while not stop:
            ticks[0] += 1
            await asyncio.sleep(0)

    async def child() -> int:
        return 1  # never suspends

    other = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks[0]
    start = time.perf_counter()
    total = 0
    for _ in range(k):
        total += await (asyncio.create_task(child()) if via_task else child())
    took = time.perf_counter() - start
    seen = ticks[0] - before
    stop = True
    await other
    assert total == k
    return seen, took / k * 1e6


@experiment("await-vs-task", "Awaiting a coroutine does not hand control to the loop; wrapping it in a task does")
def await_vs_task(ctx: Context) -> Finding:
    k = ctx.size.n(2000, 100)
    direct, via, direct_us, via_us = [], [], [], []
    for _ in range(ctx.repeats):
        seen, us = asyncio.run(_ticks_while(k, via_task=False))
        direct.append(seen)
        direct_us.append(us)
        seen, us = asyncio.run(_ticks_while(k, via_task=True))
        via.append(seen)
        via_us.append(us)
    verdict: Verdict = "holds" if max(direct) == 0 and min(via) >= k else (
        "does not hold" if min(direct) > 0 or max(via) == 0 else "depends")
    d, v = q("await coroutine", "us/await", direct_us), q("await a task", "us/await", via_us)
    cost = Effect.ratio(v, d)
    return ctx.finding(
        verdict,
        [q("other task ran, direct awaits", "times", direct), q("other task ran, task awaits", "times", via), d, v],
        f"{k:,} awaits of a coroutine that never suspends: another task ran {max(direct)} times meanwhile; as tasks "
        f"it ran {min(via):,} times; a task costs {cost.value:.0f}x a direct await ({fmt(v.median, 'us')})",
        "a long chain of awaits that never suspend starves other tasks: create_task to run things concurrently, "
        "and await plain coroutines where you want no switch",
        cost,
    )


async def _lag_during(block: float, via_thread: bool) -> float:
    """The longest late wake-up of a 2 ms ticker while a blocking call runs, directly or via to_thread."""
    worst = [0.0]
    done = False

    async def ticker() -> None:
        while not done:
            t0 = time.perf_counter()
            await asyncio.sleep(0.002)
            worst[0] = max(worst[0], time.perf_counter() - t0 - 0.002)

    probe = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    worst[0] = 0.0
    if via_thread:
        await asyncio.to_thread(time.sleep, block)
    else:
        time.sleep(block)  # the blocking call, straight inside async code
    await asyncio.sleep(0.005)
    done = True
    await probe
    return worst[0]


@experiment("to-thread", "Run blocking code in a thread with asyncio.to_thread, or it stalls the event loop")
def to_thread(ctx: Context) -> Finding:
    block = {"smallest": 0.03, "quick": 0.1, "full": 0.2}.get(ctx.size.name, 0.1)
    direct, via = [], []
    for _ in range(ctx.repeats):
        direct.append(asyncio.run(_lag_during(block, via_thread=False)) * 1000)
        via.append(asyncio.run(_lag_during(block, via_thread=True)) * 1000)
    d, v = q("loop lag, blocking call inline", "ms", direct), q("loop lag, via to_thread", "ms", via)
    gain = Effect.ratio(d, v)
    return ctx.finding(
        judge(gain, 1.0, "above"), [d, v, gain.q("inline / to_thread lag")],
        f"a {block * 1000:.0f} ms blocking call: the loop stalled {fmt(d.median, 'ms')} inline, "
        f"{fmt(v.median, 'ms')} through to_thread",
        "never call blocking functions inside async code: await asyncio.to_thread(fn) (gearshift's async gear does)",
        gain,
    )
