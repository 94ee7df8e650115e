"""The thread gear: a pool of threads, started lazily, joined on close.

For blocking I/O, and for CPU work that releases the GIL (hashlib, zlib, NumPy,
Cython ``nogil``) or runs on a free-threaded build. Threads cannot be killed: a
timed-out item is reported at once, its cancel token is set, the rest of its batch
is handed to other threads, and its thread counts as busy until the function returns.

Given no ``workers``, the number of threads at work is found by measurement as the run
goes (``_adaptive.AdaptiveLimit``, as in the async gear): it climbs while the calls'
latency holds (blocking I/O: more at once pays), and backs off when latency climbs (a
service that queues, or CPU work that holds the GIL), on timeouts and on refusals.
Threads above the limit wait at a gate before taking work; a thread never stops midway.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gearshift._cancel import CancelToken
from gearshift._gears._adaptive import AdaptiveLimit, is_refusal, open_files_cap
from gearshift._gears._base import Gear, GearCosts, cpu_count, initializer_error, join_threads, timeout_outcome
from gearshift._task import Batch, Outcome, Result, RunSpec, Task, close_runner, run_batch, run_task

#: Seconds a single call's prestart waits for a busy thread to come free before starting another.
PRESTART_PATIENCE = 0.002
#: Threads an adaptive run may reach at most (each holds a stack; more rarely pays on one machine).
MAX_THREADS = 512


class _Gate:
    """At most ``limit`` threads past it at once; the limit may change while threads wait."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._cond = threading.Condition(threading.Lock())

    def enter(self, token: CancelToken) -> bool:
        """Wait for a place; False when the run was cancelled meanwhile."""
        with self._cond:
            while self.active >= self.limit:
                if token.cancelled:
                    return False
                self._cond.wait(0.05)
            self.active += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()

    def resize(self, limit: int) -> None:
        with self._cond:
            self.limit = limit
            self._cond.notify_all()


@dataclass(slots=True)
class _Running:
    """The task a thread is in, with what a timeout needs to take the rest of its batch."""

    batch: Batch
    pos: int
    deadline: float
    token: CancelToken
    timed_out: bool = False


class _Run:
    """One run's queues and bookkeeping. A thread keeps its run's for life, so a thread
    left stuck in a cancelled or timed-out function can never feed (or starve) a later run."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.work: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[list[Result] | None] = queue.SimpleQueue()
        self.idle = threading.Semaphore(0)
        self.token = CancelToken()
        self.running: dict[int, _Running] = {}
        self.stuck = 0
        self.init_error: BaseException | None = None
        self.escaped: BaseException | None = None


class ThreadGear(Gear):
    name = "thread"
    chunk_target = 0.002
    costs = GearCosts(
        handoff_per_batch=30e-6, batch_work=0.002, startup_per_worker=1e-4, cpu_parallel="without_gil",
        max_workers=128, tie_rank=10, label="threads",
    )

    def __init__(self, workers: int | None = None, *, thread_name_prefix: str | None = None) -> None:
        """``thread_name_prefix``: threads are named ``f"{prefix}_{n}"`` (as ``ThreadPoolExecutor``
        names them) instead of ``gearshift-thread-{n}``."""
        super().__init__(workers)
        #: No fixed number of threads: each run adapts it (see the module docstring).
        self.adaptive = workers is None
        self._limit: AdaptiveLimit | None = None
        self._gate: _Gate | None = None
        self._adapt_lock = threading.Lock()
        self.thread_name_prefix = thread_name_prefix
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._run = _Run(RunSpec())
        #: Between open and close: no thread is started outside a run (one would wait forever
        #: on a run nobody closes, e.g. a ``prestart`` from a submitter racing a shutdown).
        self._open = False

    @classmethod
    def default_workers(cls) -> int:
        # Threads mostly wait (I/O) or run GIL-free code: more than cores pays.
        return min(32, 4 * cpu_count() + 4)

    def describe(self) -> str:
        if self.adaptive:
            return "thread gear, adaptive concurrency"
        return super().describe()

    def peak_workers(self) -> int | None:
        return None if self._limit is None or not self.adaptive else self._limit.peak_limit

    def notes(self) -> list[str]:
        return [] if self._limit is None else [self._limit.describe().replace(" in flight", " threads at work")]

    def window(self, chunk: int) -> int:
        # While an adaptive limit is in its slow start, work must be queued for it to grow into.
        limit = self._limit
        if limit is not None and limit.slow_start:
            return 4 * self.workers * chunk
        return super().window(chunk)

    def open(self, spec: RunSpec) -> None:
        with self._lock:
            if self.adaptive:
                self._limit = AdaptiveLimit(cap=min(MAX_THREADS, open_files_cap()))
                self.workers = self._limit.limit
                self._gate = _Gate(self.workers)
            self._run = _Run(spec)
            self._open = True

    def _adapt(self, latency: float, refused: bool, seen: int, run: _Run) -> None:
        """Feed the adaptive limit (from any thread); a new limit resizes the gate and the window."""
        limit, gate = self._limit, self._gate
        if limit is None or gate is None:
            return
        with self._adapt_lock:
            changed = limit.completed(latency, refused, gate.active + run.work.qsize(), seen)
            if changed:
                self.workers = limit.limit  # read by the engine for its window and by _spawn
                gate.resize(limit.limit)

    def submit(self, batch: Batch) -> None:
        run = self._run
        if run.init_error is not None:
            raise initializer_error(run.spec.initializer, run.init_error)
        run.work.put(batch)
        if not run.idle.acquire(blocking=False):
            self._spawn()

    def prestart(self, calls: int) -> None:
        """From a caller's thread, as work is queued (after ``open``): make sure a thread is there
        for ``calls`` more calls, as ``ThreadPoolExecutor.submit`` does, instead of waiting for
        the engine to hand the work over; ``workers`` threads at most, an idle one reused."""
        run = self._run
        for _ in range(min(calls, self.workers)):
            with self._lock:
                threads = len(self._threads) - run.stuck
            # With threads up but none idle, give one a moment to come free (a call it just ended,
            # or the engine's own dispatch of this very call, which may start a thread itself):
            # a caller who waits for each result reuses one thread, as ThreadPoolExecutor does.
            if run.idle.acquire(timeout=PRESTART_PATIENCE if calls == 1 and threads else 0):
                run.idle.release()  # an idle thread will take it: only looked, not taken
                return
            with self._lock:
                if not self._open or run is not self._run or len(self._threads) - run.stuck >= self.workers:
                    return
            self._spawn()

    def _spawn(self) -> None:
        """Start a thread unless ``workers`` threads are already usable (stuck ones don't count)."""
        with self._lock:
            run = self._run
            if self._open and len(self._threads) - run.stuck < self.workers:
                n = len(self._threads)
                name = f"{self.thread_name_prefix}_{n}" if self.thread_name_prefix else f"gearshift-thread-{n}"
                thread = threading.Thread(target=self._worker, args=(run,), name=name, daemon=True)
                self._threads.append(thread)
                thread.start()

    def _worker(self, run: _Run) -> None:
        spec = run.spec
        try:
            self._enter_worker(spec)
        except BaseException as exc:
            run.init_error = exc
            run.done.put(None)
            self._leave_worker()
            return
        timed = spec.timeout is not None
        ident = threading.get_ident()
        work, done, token = run.work, run.done, run.token
        gate = self._gate if self.adaptive else None
        try:
            while True:
                if gate is not None and not gate.enter(token):
                    # Cancelled while over the limit: drain without running, until told to stop.
                    if work.get() is None:
                        return
                    continue
                inside = gate is not None
                try:
                    batch = work.get()
                    if batch is None:
                        return
                    if token.cancelled:
                        continue
                    if timed:
                        if not self._run_timed(run, batch, ident, gate):
                            inside = False  # a timed-out call's place at the gate was given back
                        run.idle.release()
                    elif gate is not None:
                        seen = gate.active
                        start = time.perf_counter()
                        results = self._run_batch(batch, token)
                        latency = (time.perf_counter() - start) / max(1, len(batch))
                        refused = any(type(r) is Outcome and not r.ok and is_refusal(r.value) for r in results)
                        self._adapt(latency, refused, seen, run)
                        run.idle.release()
                        done.put(results)
                        del results
                    else:
                        results = self._run_batch(batch, token)
                        # Idle before its results are seen: a caller who waits for them and submits
                        # again finds this thread free (ThreadPoolExecutor reuses it: CPython's
                        # test_idle_thread_reuse), rather than racing it and starting another.
                        run.idle.release()
                        done.put(results)
                        del results
                    batch = None  # let the finished batch's items go before waiting for the next
                finally:
                    if gate is not None and inside:
                        gate.leave()
        except BaseException as exc:
            # SystemExit (or KeyboardInterrupt) raised by a task: it means "stop", so it is
            # raised in the caller, as if the task had run there, rather than lost with the thread.
            with self._lock:
                run.running.pop(ident, None)
            run.escaped = exc
            done.put(None)
        finally:
            self._leave_worker()

    # -- where a thread runs its calls: here, in the thread; a subclass may run them elsewhere
    # (the interpreter gear: in the thread's own sub-interpreter) and keep the rest of this gear.
    def _enter_worker(self, spec: RunSpec) -> None:
        """A new thread gets ready: runs the initializer (its exception stops the run)."""
        if spec.initializer is not None:
            spec.initializer(*spec.initargs)

    def _leave_worker(self) -> None:
        """A thread ends: close the event loop ``call`` may have made for it."""
        close_runner()

    def _run_batch(self, batch: Batch, token: CancelToken) -> list[Result]:
        return run_batch(batch, token)

    def _run_task(self, fn: Callable[[Any], Any], task: Task, token: CancelToken) -> Outcome:
        return run_task(fn, task, token)

    def _run_timed(self, run: _Run, batch: Batch, ident: int, gate: _Gate | None) -> bool:
        """Run the batch's tasks one by one under their deadlines; False when one timed out."""
        assert run.spec.timeout is not None
        for pos, task in enumerate(batch.tasks):
            token = CancelToken(run.token)
            running = _Running(batch, pos, time.monotonic() + run.spec.timeout, token)
            with self._lock:
                run.running[ident] = running
            seen = 0 if gate is None else gate.active
            outcome = self._run_task(batch.fn, task, token)
            with self._lock:
                # Not registered any more when close() gave up on this thread.
                registered = run.running.pop(ident, None) is running
                if running.timed_out:  # already reported; the rest of the batch was re-queued
                    if registered:
                        run.stuck -= 1
                    return False
            if gate is not None:
                refused = type(outcome) is Outcome and not outcome.ok and is_refusal(outcome.value)
                self._adapt(outcome.elapsed, refused, seen, run)
            run.done.put([outcome])
        return True

    def _expire(self) -> tuple[list[Result], float | None]:
        """Report overdue tasks; return outcomes and the time to the next deadline."""
        now = time.monotonic()
        run = self._run
        outcomes: list[Result] = []
        nearest: float | None = None
        with self._lock:
            for running in run.running.values():
                if running.timed_out:
                    continue
                if running.deadline <= now:
                    running.timed_out = True
                    running.token.cancel()
                    if self._gate is not None:
                        self._gate.leave()  # the stuck call no longer counts against the limit
                    task = running.batch.tasks[running.pos]
                    outcomes.append(timeout_outcome(task, run.spec.timeout))
                    run.stuck += 1
                    rest = running.batch.tasks[running.pos + 1 :]
                    if rest:
                        run.work.put(Batch(running.batch.fn, rest))
                else:
                    left = running.deadline - now
                    nearest = left if nearest is None else min(nearest, left)
        if outcomes:
            for _ in outcomes:
                self._adapt(run.spec.timeout or 0.0, True, 0, run)  # a timeout: fewer at once
            self._spawn()  # keep `workers` threads usable while the stuck ones finish
        return outcomes, nearest

    def collect(self, timeout: float | None) -> list[Result]:
        run = self._run
        outcomes: list[Result] = []
        if run.spec.timeout is not None:
            expired, nearest = self._expire()
            outcomes.extend(expired)
            if nearest is not None:
                timeout = nearest if timeout is None else min(timeout, nearest)
        if not outcomes:
            try:
                first = run.done.get(timeout=timeout)
            except queue.Empty:
                return outcomes
            self._take(run, first, outcomes)
        while True:
            try:
                self._take(run, run.done.get_nowait(), outcomes)
            except queue.Empty:
                return outcomes

    def _take(self, run: _Run, got: list[Result] | None, into: list[Result]) -> None:
        if got is None:
            if run.escaped is not None:
                escaped, run.escaped = run.escaped, None
                raise escaped
            if run.init_error is not None:
                raise initializer_error(run.spec.initializer, run.init_error)
            return
        into.extend(got)

    def wake(self) -> None:
        self._run.done.put(None)

    def close(self, cancel: bool = False) -> None:
        run = self._run
        if cancel:
            run.token.cancel()
            while True:  # drop what no thread has started
                try:
                    run.work.get_nowait()
                except queue.Empty:
                    break
        with self._lock:
            self._open = False
            threads, self._threads = self._threads, []
            abandoned = {ident for ident, running in run.running.items() if running.timed_out}
        for _ in threads:
            run.work.put(None)
        join_threads(threads, lambda thread: cancel or thread.ident in abandoned, "thread(s)")
        with self._lock:
            run.running.clear()
            run.stuck = 0
        # A fresh run state: threads left behind keep the old one.
        self._run = _Run(RunSpec())
