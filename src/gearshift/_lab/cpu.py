"""Claims about CPU work: processes vs threads, free-threading, the upper bound, pools, start-up cost."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
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
from gearshift._lab._work import calibrate, cpu_work, ignore_sigint, noop, signals_held, start_mp_pool

#: Threads "do not speed up" CPU work when they gain less than this (measured gains under the GIL: ~1.0x).
NO_REAL_SPEEDUP = 1.15
#: Two ways of doing the same work are "the same speed" when they differ by less than this.
SAME_SPEED = 0.10


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def shut(pool: ProcessPoolExecutor) -> None:
    """Shut a pool down whole: a Ctrl-C in the middle of it would leave its workers to atexit."""
    with signals_held():
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def process_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A warm pool of the default start method whose workers leave Ctrl-C to the parent; shut on exit."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=ignore_sigint)
    try:
        with signals_held():  # the workers are forked by these first submits
            warm = [pool.submit(cpu_work, 20_000) for _ in range(workers)]
        for f in warm:  # every worker started before anything is timed
            f.result()
        yield pool
    finally:
        shut(pool)


def _cpu_runs(ctx: Context, per_task: float) -> tuple[list[float], list[float], list[float], int]:
    """Serial, threads and processes over the same CPU tasks, side by side in each repeat."""
    w = ctx.workers
    n = calibrate(per_task)
    tasks = [n] * (2 * w)
    serial, threads, procs = [], [], []
    expected = [cpu_work(t) for t in tasks]
    got: list[list[int]] = []
    with ThreadPoolExecutor(w) as tpool, process_pool(w) as ppool:
        for _ in range(ctx.repeats):
            serial.append(timed(lambda: got.append([cpu_work(t) for t in tasks])))
            threads.append(timed(lambda: got.append(list(tpool.map(cpu_work, tasks)))))
            procs.append(timed(lambda: got.append(list(ppool.map(cpu_work, tasks)))))
    assert all(g == expected for g in got), "a gear computed something else"
    return serial, threads, procs, len(tasks)


@experiment("processes-for-cpu", "Use processes for CPU-intensive work (do things faster); threads do not (the GIL)")
def processes_for_cpu(ctx: Context) -> Finding:
    serial, threads, procs, count = _cpu_runs(ctx, 0.04 * ctx.size.factor)
    s, t, p = q("serial", "s", serial), q("threads", "s", threads), q("processes", "s", procs)
    proc_gain, thread_gain = Effect.ratio(s, p), Effect.ratio(s, t)
    verdict, explanation = judge_processes_for_cpu(ctx.machine, proc_gain, thread_gain)
    return ctx.finding(
        verdict, [s, t, p, proc_gain.q("process speedup"), thread_gain.q("thread speedup")],
        f"{count} pure-Python tasks on {ctx.workers} workers: " + explanation,
        "pure-Python CPU work: processes (gear='process'); threads only wait their turn for the GIL",
        proc_gain, thread_gain,
    )


def judge_processes_for_cpu(machine: Machine, proc_gain: Effect, thread_gain: Effect) -> tuple[Verdict, str]:
    said = f"processes {proc_gain.value:.2f}x, threads {thread_gain.value:.2f}x over serial"
    if machine.cores < 2:
        return "not measurable here", f"{said}; one core: nothing can run in parallel"
    parts = [judge(proc_gain, 1.0, "above"), judge(thread_gain, NO_REAL_SPEEDUP, "below")]
    if not machine.gil_enabled and parts[1] == "does not hold":
        return "does not hold", f"{said}: the GIL is off here, so threads speed up CPU work too"
    return combine(parts), said


@experiment("free-threading", "From Python 3.14 the GIL can be disabled: threads then do CPU work faster")
def free_threading(ctx: Context) -> Finding:
    w = ctx.workers
    n = calibrate(0.03 * ctx.size.factor)
    tasks = [n] * (2 * w)
    serial, threads = [], []
    with ThreadPoolExecutor(w) as tpool:
        for _ in range(ctx.repeats):
            serial.append(timed(lambda: [cpu_work(t) for t in tasks]))
            threads.append(timed(lambda: list(tpool.map(cpu_work, tasks))))
    s, t = q("serial", "s", serial), q("threads", "s", threads)
    gain = Effect.ratio(s, t)
    verdict, explanation = judge_free_threading(ctx.machine, gain)
    return ctx.finding(
        verdict, [s, t, gain.q("thread speedup")], explanation,
        ("threads run Python code in parallel here: gear='thread' serves CPU work without pickling"
         if not ctx.machine.gil_enabled else "with the GIL, CPU work needs processes (or code that releases the GIL)"),
        gain,
    )


def judge_free_threading(machine: Machine, gain: Effect) -> tuple[Verdict, str]:
    """Only a build whose GIL is really off (``sys._is_gil_enabled()`` false) can test the claim."""
    said = f"threads gave {gain.value:.2f}x on pure-Python CPU work here"
    if machine.gil_enabled:
        why = ("a free-threaded build with the GIL turned back on (PYTHON_GIL=1, or an extension that needs it)"
               if machine.free_threaded_build else f"Python {machine.python} is a build with a GIL")
        return "not measurable here", f"{why}; {said}"
    if machine.cores < 2:
        return "not measurable here", f"the GIL is off but there is one core; {said}"
    return judge(gain, 1.0, "above"), f"the GIL is off: {said}"


def amdahl(serial_share: float, workers: float) -> float:
    return 1.0 / (serial_share + (1 - serial_share) / workers)


@experiment("upper-bound", "Think about the upper bound of improvement first (Amdahl: the serial part caps it)")
def upper_bound(ctx: Context) -> Finding:
    share = 0.3  # a known serial share: the bound is exact, whatever the machine
    total = 0.3 * ctx.size.factor
    counts = sorted({1, 2, ctx.workers})
    n_serial = calibrate(total * share)
    chunks = 2 * max(counts) * 2
    n_chunk = calibrate(total * (1 - share) / chunks)
    speedups: dict[int, list[float]] = {w: [] for w in counts}
    bases: list[float] = []
    with ExitStack() as stack:
        pools = {w: stack.enter_context(process_pool(w)) for w in counts if w > 1}
        for _ in range(ctx.repeats):
            base = timed(lambda: (cpu_work(n_serial), [cpu_work(n_chunk) for _ in range(chunks)]))
            bases.append(base)
            for w in counts:
                if w == 1:
                    speedups[w].append(1.0)
                    continue
                pool = pools[w]
                def job(p: ProcessPoolExecutor = pool) -> None:
                    cpu_work(n_serial)
                    list(p.map(cpu_work, [n_chunk] * chunks))

                took = timed(job)
                speedups[w].append(base / took)
    top = max(counts)
    cores = ctx.machine.cores
    bound = amdahl(share, min(top, cores))
    got = q(f"speedup with {top} processes", "x", speedups[top])
    eff = Effect.ratio(got, q("bound", "x", [bound] * len(got.values)))  # reached / bound, per repeat
    verdict = judge(eff, 1.0 + 0.05, "below")
    return ctx.finding(
        verdict, [q("serial job", "s", bases), got, q("Amdahl bound", "x", bound), q("serial share", "", share),
                  q("share of the bound reached", "", eff.value)],
        (f"a job {share:.0%} serial: {top} processes on {cores} cores reached {got.median:.2f}x of a "
                     f"bound {bound:.2f}x ({eff.value:.0%} of it); no worker count beats 1/{share} = "
                     f"{1 / share:.1f}x"),
        "estimate the serial share first: it, not the number of workers, sets how fast the job can get",
        eff, plot={"kind": "amdahl", "share": share, "cores": cores,
                   "points": {str(w): v for w, v in speedups.items()}},
    )


def _mp_pool_run(workers: int, tasks: list[int]) -> list[int]:
    """The notes' recipe: Pool(), apply_async, close, join, get; on Ctrl-C, terminate and join."""
    pool = start_mp_pool(workers)
    try:
        handles = [pool.apply_async(cpu_work, (t,)) for t in tasks]
        pool.close()
        pool.join()
        return [h.get() for h in handles]
    finally:
        with signals_held():  # whole, or the pool's own thread may fork a worker after atexit killed the rest
            pool.terminate()  # a no-op after join; after Ctrl-C it stops the workers
            pool.join()


def _executor_run(workers: int, tasks: list[int]) -> list[int]:
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=ignore_sigint)
    try:
        with signals_held():  # the workers are forked by the first submits
            futures = [ex.submit(cpu_work, t) for t in tasks]
        return [f.result() for f in futures]
    finally:
        shut(ex)


@experiment("process-pool", "multiprocessing.Pool (apply_async, close, join, get) and ProcessPoolExecutor: same speed")
def process_pool_claim(ctx: Context) -> Finding:
    w = ctx.workers
    n = calibrate(0.02 * ctx.size.factor)
    tasks = [n] * (4 * w)
    expected = [cpu_work(n)] * len(tasks)
    pool_t: list[float] = []
    exec_t: list[float] = []
    for i in range(ctx.repeats):
        runs: list[tuple[list[float], Callable[[int, list[int]], list[int]]]] = [
            (pool_t, _mp_pool_run), (exec_t, _executor_run)]
        for times, fn in runs if i % 2 == 0 else runs[::-1]:  # alternate who goes first
            start = time.perf_counter()
            got = fn(w, tasks)
            times.append(time.perf_counter() - start)
            assert got == expected, "a pool returned wrong results"
    a, b = q("multiprocessing.Pool", "s", pool_t), q("ProcessPoolExecutor", "s", exec_t)
    ratio = Effect.ratio(a, b)
    verdict = judge_same(ratio, SAME_SPEED)
    faster = "ProcessPoolExecutor" if ratio.value > 1 else "multiprocessing.Pool"
    return ctx.finding(
        verdict, [a, b, ratio.q("Pool time / Executor time")],
        (f"{len(tasks)} CPU tasks on {w} processes, pool start to results: {faster} faster by "
                     f"{abs(ratio.value - 1):.0%} (same speed: within {SAME_SPEED:.0%} beyond the noise)"),
        "pick the API you like (or gs.Pool / gs.ProcessPoolExecutor): the processes do the work",
        ratio,
    )


def _start_processes(count: int) -> None:
    ctx = multiprocessing.get_context()
    procs = [ctx.Process(target=noop) for _ in range(count)]
    try:
        with signals_held():
            for p in procs:
                p.start()
    finally:
        for p in procs:
            if p.pid is not None:
                p.join()
    assert all(p.exitcode == 0 for p in procs), "a no-op process failed"


def _start_threads(count: int) -> None:
    threads = [threading.Thread(target=noop) for _ in range(count)]
    try:
        for t in threads:
            t.start()
    finally:
        for t in threads:
            if t.ident is not None:
                t.join()


def _start_tasks(count: int) -> None:
    async def nothing() -> None:
        return None

    async def main() -> None:
        await asyncio.gather(*(asyncio.create_task(nothing()) for _ in range(count)))

    asyncio.run(main())


@experiment("process-cost", "Creating a process is heavy weight; a thread is light weight")
def process_cost(ctx: Context) -> Finding:
    counts = {"process": ctx.size.n(12, 2), "thread": ctx.size.n(300, 20), "task": ctx.size.n(3000, 100)}
    fns = {"process": _start_processes, "thread": _start_threads, "task": _start_tasks}
    per: dict[str, list[float]] = {k: [] for k in counts}
    for _ in range(ctx.repeats):
        for kind, count in counts.items():
            fn = fns[kind]
            per[kind].append(timed(lambda: fn(count)) / count * 1e6)  # noqa: B023 - called at once
    p, t, k = (q(f"start+join a {kind}", "us", per[kind]) for kind in ("process", "thread", "task"))
    heavy, light = Effect.ratio(p, t), Effect.ratio(t, k)
    verdict = combine([judge(heavy, 1.0, "above"), judge(light, 1.0, "above")])
    return ctx.finding(
        verdict, [p, t, k, heavy.q("process / thread"), light.q("thread / task")],
        (f"start and finish ({ctx.machine.start_method}): a process {fmt(p.median, 'us')}, a thread "
                     f"{fmt(t.median, 'us')}, a task {fmt(k.median, 'us')}: a process costs {heavy.value:.0f} "
                     f"threads, a thread {light.value:.0f} tasks"),
        "keep processes alive across tasks (a pool, gs.Executor scope); never one process per small task",
        heavy, light,
    )
