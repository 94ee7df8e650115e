"""Claims about threads: I/O, daemons, cancellation, pools, locks."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from gearshift._lab._core import Context, Effect, Finding, Verdict, combine, experiment, fmt, judge, q
from gearshift._lab._work import noop
from gearshift._lab.cpu import timed

#: Fine-grained locks yield "only minimal" gains when they win by less than this.
MINIMAL_GAIN = 0.10


@experiment("threads-for-io", "Use threads or asyncio for I/O-intensive work (do more at once)")
def threads_for_io(ctx: Context) -> Finding:
    count, wait = ctx.size.n(20, 4), 0.01

    async def waits() -> None:
        await asyncio.gather(*(asyncio.sleep(wait) for _ in range(count)))

    def one_at_a_time() -> None:
        for _ in range(count):
            time.sleep(wait)

    serial, threads, tasks = [], [], []
    with ThreadPoolExecutor(count) as pool:
        for _ in range(ctx.repeats):
            serial.append(timed(one_at_a_time))
            threads.append(timed(lambda: list(pool.map(time.sleep, [wait] * count))))
            tasks.append(timed(lambda: asyncio.run(waits())))
    s, t, a = q("serial", "s", serial), q(f"{count} threads", "s", threads), q(f"{count} tasks", "s", tasks)
    tg, ag = Effect.ratio(s, t), Effect.ratio(s, a)
    return ctx.finding(
        combine([judge(tg, 1.0, "above"), judge(ag, 1.0, "above")]),
        [s, t, a, tg.q("thread speedup"), ag.q("asyncio speedup")],
        f"{count} waits of {wait * 1000:.0f} ms: threads {tg.value:.1f}x, asyncio {ag.value:.1f}x faster than one "
        f"after another",
        "waiting work (network, disk, sleeps): threads or async, many at once; the CPU is idle meanwhile",
        tg, ag,
    )


_DAEMON_SCRIPT = r"""
import sys, threading, time
mode, marker = sys.argv[1], sys.argv[2]
started = threading.Event()
def work():
    started.set()
    try:
        time.sleep(0.2 if mode == "joined" else 30)
    finally:
        with open(marker, "w") as f:
            f.write("cleaned up")
t = threading.Thread(target=work, daemon=(mode == "daemon"))
t.start()
started.wait()
if mode == "joined":
    t.join()
"""


def _exit_with_thread(mode: str, folder: str, i: int) -> tuple[bool, float]:
    """A child interpreter that exits while a thread works: was the thread's ``finally`` run?"""
    marker = os.path.join(folder, f"{mode}-{i}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-c", _DAEMON_SCRIPT, mode, marker], check=True, timeout=60,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return os.path.exists(marker), time.perf_counter() - start


@experiment("daemon-threads", "A daemon thread is shut down at exit without clean-up; join threads to let them finish")
def daemon_threads(ctx: Context) -> Finding:
    cleaned = {"daemon": 0, "joined": 0}
    exits: dict[str, list[float]] = {"daemon": [], "joined": []}
    with tempfile.TemporaryDirectory(prefix="gearshift-lab-") as folder:
        for i in range(ctx.repeats):
            for mode in ("daemon", "joined"):
                done, took = _exit_with_thread(mode, folder, i)
                cleaned[mode] += done
                exits[mode].append(took)
    n = ctx.repeats
    cut_off = cleaned["daemon"] == 0
    finished = cleaned["joined"] == n
    verdict: Verdict = "holds" if cut_off and finished else "does not hold" if cleaned["daemon"] == n else "depends"
    return ctx.finding(
        verdict,
        [q("daemon thread cleaned up", "of runs", cleaned["daemon"]),
         q("joined thread cleaned up", "of runs", cleaned["joined"]),
         q("exit with a working daemon", "s", exits["daemon"]), q("exit after join", "s", exits["joined"])],
        f"a thread's finally block ran at exit in {cleaned['daemon']}/{n} runs as a daemon (the interpreter "
        f"exited in {q('', 's', exits['daemon']).median * 1000:.0f} ms, mid-work) and in {cleaned['joined']}/{n} "
        "runs when joined",
        "never leave half-done work to a daemon thread: join it (gearshift joins every worker it starts)",
    )


def _worker(stop: threading.Event | None, until: float, stopped: list[float]) -> None:
    """Work in small steps; a checking worker looks at the flag between steps."""
    while time.monotonic() < until:
        if stop is not None and stop.is_set():
            break
        time.sleep(0.002)
    stopped.append(time.monotonic())


def _cancel_round(workers: int, run_for: float, checking: bool) -> tuple[float, int]:
    """Start workers, cancel them by a signal, and time how long they take to stop.

    The signal (SIGUSR1 where there is one, on the main thread) only sets a flag, as a
    handler should; the main thread then joins with a small wait, as the notes say.
    Workers that never check run to their own end (``run_for``), so nothing is left running.
    """
    stop = threading.Event()
    stopped: list[float] = []
    until = time.monotonic() + run_for
    threads = [threading.Thread(target=_worker, args=(stop if checking else None, until, stopped),
                                name=f"lab-cancel-{i}") for i in range(workers)]
    use_signal = hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR1, lambda s, f: stop.set()) if use_signal else None
    try:
        for t in threads:
            t.start()
        cancelled_at = time.monotonic()
        if use_signal:
            signal.raise_signal(signal.SIGUSR1)
        else:
            stop.set()
        deadline = time.monotonic() + 0.05  # join them all with a small wait, as the notes say
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive_after_short_wait = sum(t.is_alive() for t in threads)
    finally:
        for t in threads:
            if t.ident is not None:
                t.join()
        if use_signal:
            signal.signal(signal.SIGUSR1, previous)
    return max(stopped) - cancelled_at, alive_after_short_wait


@experiment("cancellation", "A cancellation flag, set on a signal and checked by worker threads, stops them")
def cancellation(ctx: Context) -> Finding:
    workers, run_for = 4, 0.25 * max(ctx.size.factor, 0.4)
    check, never, alive = [], [], []
    for _ in range(ctx.repeats):
        took, _left = _cancel_round(workers, run_for, checking=True)
        check.append(took * 1000)
        took, left = _cancel_round(workers, run_for, checking=False)
        never.append(took * 1000)
        alive.append(left)
    c, n = q("stop: checking threads", "ms", check), q("stop: never-checking threads", "ms", never)
    gain = Effect.ratio(n, c)
    verdict = combine([judge(gain, 1.0, "above"), "holds" if min(alive) > 0 else "depends"])
    return ctx.finding(
        verdict, [c, n, q("never-checking alive after a 50 ms join", "threads", alive)],
        f"{workers} threads: those checking the flag stopped {fmt(c.median, 'ms')} after the signal; those that "
        f"never check ran on to their own end ({fmt(n.median, 'ms')}), {max(alive)} still alive after the join wait",
        "give long-running threads a token to check (gs.cancel_token()); a thread cannot be killed from outside",
        gain,
    )


@experiment("thread-pool", "ThreadPoolExecutor instead of starting threads by hand: less cost per task")
def thread_pool(ctx: Context) -> Finding:
    count, w = ctx.size.n(2000, 100), 4
    by_hand, pooled = [], []

    def hand() -> None:
        for start in range(0, count, w):  # w at a time, as a pool of w would run them
            threads = [threading.Thread(target=noop) for _ in range(min(w, count - start))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    with ThreadPoolExecutor(w) as pool:
        list(pool.map(lambda _: None, range(w)))  # its threads exist before the clock starts
        for _ in range(ctx.repeats):
            by_hand.append(timed(hand) / count * 1e6)
            pooled.append(timed(lambda: [f.result() for f in [pool.submit(noop) for _ in range(count)]]) / count * 1e6)
    h, p = q("thread per task", "us/task", by_hand), q("ThreadPoolExecutor", "us/task", pooled)
    gain = Effect.ratio(h, p)
    return ctx.finding(
        judge(gain, 1.0, "above"), [h, p, gain.q("by hand / pool")],
        f"{count} empty tasks, {w} at a time: a new thread each costs {fmt(h.median, 'us')}, a pool's task "
        f"{fmt(p.median, 'us')} ({gain.value:.1f}x)",
        "reuse threads (a pool, gs.map(gear='thread')); a thread per task pays its start every time",
        gain,
    )


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def write(self, value: int) -> None:
        self.value = value


def _count_up(counter: _Counter, times: int, lock: threading.Lock | None, go: threading.Barrier) -> None:
    go.wait()
    for _ in range(times):
        if lock is None:
            value = counter.value  # read, then write: another thread may write in between
            counter.write(value + 1)
        else:
            with lock:
                value = counter.value
                counter.write(value + 1)


def _race(threads: int, times: int, lock: threading.Lock | None) -> int:
    counter = _Counter()
    go = threading.Barrier(threads)
    workers = [threading.Thread(target=_count_up, args=(counter, times, lock, go)) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return threads * times - counter.value


@experiment("locks", "Without a lock a shared counter loses updates; use Lock by default, RLock only to re-enter")
def locks(ctx: Context) -> Finding:
    threads, times = 4, ctx.size.n(200_000, 60_000)  # a run must outlast a few switch intervals (5 ms)
    lost, lost_locked = [], []
    for _ in range(ctx.repeats):
        lost.append(_race(threads, times, None))
        lost_locked.append(_race(threads, times, threading.Lock()))
    assert not any(lost_locked), f"updates lost under a lock: {lost_locked}"
    cost: dict[str, list[float]] = {"Lock": [], "RLock": []}
    rounds = ctx.size.n(300_000, 10_000)
    for _ in range(ctx.repeats):
        for name, lk in (("Lock", threading.Lock()), ("RLock", threading.RLock())):
            def acquire_release(lk: threading.Lock | threading.RLock = lk) -> None:
                for _ in range(rounds):
                    with lk:
                        pass
            cost[name].append(timed(acquire_release) / rounds * 1e9)
    lo, rl = q("Lock acquire+release", "ns", cost["Lock"]), q("RLock acquire+release", "ns", cost["RLock"])
    cheaper = Effect.ratio(rl, lo)
    total = threads * times
    verdict: Verdict = "holds" if max(lost) > 0 else "depends"
    why = ("" if min(lost) > 0 else "; some runs lost none: threads switch only every few ms here, so the race "
           "is rarer in short runs, not absent")
    return ctx.finding(
        verdict,
        [q("updates lost without a lock", "updates", lost), q("updates lost with a Lock", "updates", lost_locked),
         q("share lost", "%", [x / total * 100 for x in lost]), lo, rl],
        f"{threads} threads x {times:,} read-then-write increments: {int(q('', '', lost).median):,} of {total:,} "
        f"lost without a lock (every run: {', '.join(f'{x:,}' for x in lost)}), none with one{why}; "
        f"Lock costs {fmt(lo.median, 'ns')}, RLock {fmt(rl.median, 'ns')} per acquire+release",
        "guard every read-modify-write of shared state with a Lock; an RLock only where a thread re-enters",
        cheaper,
    )


class _Bank:
    """Accounts moved between by concurrent transfers; the total must never change."""

    def __init__(self, accounts: int, fine: bool) -> None:
        self.balances = [1000] * accounts
        self.coarse = threading.Lock()
        self.locks = [threading.Lock() for _ in range(accounts)] if fine else []

    def transfer(self, a: int, b: int, amount: int) -> None:
        if self.locks:
            first, second = (a, b) if a < b else (b, a)  # one global order: no deadlock
            with self.locks[first], self.locks[second]:
                self._move(a, b, amount)
        else:
            with self.coarse:
                self._move(a, b, amount)

    def _move(self, a: int, b: int, amount: int) -> None:
        if self.balances[a] >= amount:
            self.balances[a] -= amount
            self.balances[b] += amount


def _run_bank(fine: bool, threads: int, transfers: int, accounts: int, seed: int) -> float:
    bank = _Bank(accounts, fine)
    total = sum(bank.balances)
    go = threading.Barrier(threads + 1)

    def teller(k: int) -> None:
        rnd = random.Random(seed + k)
        moves = [(rnd.randrange(accounts), rnd.randrange(accounts - 1), rnd.randrange(1, 50)) for _ in range(transfers)]
        go.wait()
        for a, b, amount in moves:
            bank.transfer(a, b if b < a else b + 1, amount)

    workers = [threading.Thread(target=teller, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in workers:
        t.join()
    took = time.perf_counter() - start
    assert sum(bank.balances) == total, f"the bank's total changed: {sum(bank.balances)} != {total}"
    assert min(bank.balances) >= 0, "an account went below zero"
    return threads * transfers / took


@experiment("fine-grained-locks", "Fine-grained locks add complexity and often yield only minimal improvements")
def fine_grained_locks(ctx: Context) -> Finding:
    threads, transfers, accounts = 4, ctx.size.n(30_000, 2000), 100
    coarse, fine = [], []
    for i in range(ctx.repeats):
        coarse.append(_run_bank(False, threads, transfers, accounts, i))
        fine.append(_run_bank(True, threads, transfers, accounts, i))
    c, f = q("one lock for the bank", "transfers/s", coarse), q("a lock per account", "transfers/s", fine)
    gain = Effect.ratio(f, c)  # throughputs, so this is fine / coarse
    verdict = judge(gain, 1 + MINIMAL_GAIN, "below")
    why = ("; with so little work per transfer the one lock is the bottleneck: a thread switched out while "
           "holding it (likely at the GIL's switch) stalls all others" if verdict == "does not hold" else "")
    return ctx.finding(
        verdict, [c, f, gain.q("fine / coarse throughput")],
        f"{threads} threads x {transfers:,} transfers among {accounts} accounts (total balance checked after "
        f"each run): a lock per account gave {gain.value:.2f}x the throughput of one lock (minimal: under "
        f"+{MINIMAL_GAIN:.0%}){why}",
        "start with one coarse lock; split it only where a measurement shows contention (and never with the GIL "
        "as the real bottleneck)",
        gain,
    )

