"""Measuring a function on real items: clocks, timed calls, the GIL, pickling, a gear's worker.

Everything here has side effects (it runs the user's function); the decisions live in
``model.py`` as pure functions of what these probes return.

A call's wall time splits three ways: on a CPU (the thread's CPU clock), runnable but
queued for a CPU (Linux ``schedstat`` run-queue delay: the machine is busy) and waiting
(I/O, sleep, a lock, the GIL). Leaving the queued time out keeps a CPU-bound function
CPU-bound on a loaded machine. Whether a function holds the GIL is seen from the
caller (``gil_pings``): how long it waits to run again while a thread runs the function.
"""

from __future__ import annotations

import pickle
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from gearshift._advisor.model import Machine
from gearshift._cancel import CancelToken
from gearshift._gears._base import Gear, cpu_count, initializer_error
from gearshift._gears.process import default_start_method
from gearshift._task import Batch, Outcome, RunSpec, Task, call, close_runner, expand, run_task


def gil_enabled() -> bool:
    """False on a free-threaded build running without the GIL (3.13t+); True on 3.11/3.12."""
    check: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def machine_facts() -> Machine:
    """The facts the model needs about this machine and interpreter."""
    return Machine(cores=cpu_count(), gil_enabled=gil_enabled(), start_method=default_start_method())


def _runq_path(native_id: int | None) -> str | None:
    return None if native_id is None else f"/proc/self/task/{native_id}/schedstat"


class ThreadClock:
    """CPU time and run-queue delay of one thread, readable from any thread.

    ``time.pthread_getcpuclockid`` gives another thread's CPU clock; ``schedstat`` its
    run-queue delay (0 where the kernel does not expose it).
    """

    def __init__(self, thread: threading.Thread | None = None) -> None:
        thread = thread or threading.current_thread()
        self._clock: int | None = None
        getclock = getattr(time, "pthread_getcpuclockid", None)
        if getclock is not None and thread.ident is not None:
            try:
                self._clock = getclock(thread.ident)
            except OSError:
                self._clock = None
        self._own = thread is threading.current_thread()
        self._path = _runq_path(thread.native_id)

    def cpu(self) -> float:
        if self._clock is not None:
            try:
                return time.clock_gettime(self._clock)
            except OSError:
                return 0.0
        return time.thread_time() if self._own else 0.0

    def runq(self) -> float:
        if self._path is None:
            return 0.0
        try:
            with open(self._path, "rb") as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def busy(self) -> float:
        """Seconds this thread has been on a CPU or queued for one."""
        return self.cpu() + self.runq()


def wait_fraction(wall: float, cpu: float, runq: float) -> float:
    """Share of a call's time spent waiting: off the CPU, leaving out time queued for one (load)."""
    running = wall - runq
    if running <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - cpu / running))


@dataclass(slots=True)
class CallTimes:
    """What timing some calls gave: counts and sums, and the last result (for pickling)."""

    calls: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    busy: float = 0.0
    result: Any = None
    item: Any = None

    def add(self, wall: float, cpu: float, busy: float) -> None:
        self.calls += 1
        self.wall += wall
        self.cpu += cpu
        self.busy += busy

    @property
    def per_item(self) -> float:
        return self.wall / self.calls if self.calls else 0.0

    @property
    def wait_fraction(self) -> float:
        return wait_fraction(self.wall, self.cpu, self.busy - self.cpu)


def time_calls(fn: Callable[[Any], Any], items: Sequence[Any], budget: float, min_work: float = 0.005) -> CallTimes:
    """Call ``fn`` on the items in the caller, then again round-robin while the work is tiny.

    Stops once ``budget`` seconds have gone (at least one call); the first call is
    dropped from the averages when there are three or more (imports, warm caches).
    Exceptions propagate: a sample the function cannot run is the caller's to report.
    """
    clock = ThreadClock()
    times = CallTimes()
    first: tuple[float, float, float] | None = None
    start = time.perf_counter()
    n = 0
    while True:
        item = items[n % len(items)]
        c0, b0, w0 = clock.cpu(), clock.busy(), time.perf_counter()
        result = call(fn, item)
        w1, c1, b1 = time.perf_counter(), clock.cpu(), clock.busy()
        n += 1
        if first is None:
            first = (w1 - w0, c1 - c0, b1 - b0)
        else:
            times.add(w1 - w0, c1 - c0, b1 - b0)
        times.result, times.item = result, item
        spent = w1 - start
        if spent >= budget or n >= 10_000:
            break
        if n >= len(items) and times.wall >= min_work and n >= 3:
            break
    if times.calls < 2:
        times.add(*first)
    return times


# -- two threads at once ---------------------------------------------------------------------
class Feed:
    """Tasks for probe threads: a deque under a condition; ``stop`` ends their loops."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.tasks: deque[Task] = deque()
        self.stopped = False
        #: Threads read their run-queue delay around each call (a file read; off while the caller pings).
        self.precise = True

    def put(self, tasks: Iterable[Task]) -> None:
        with self.cond:
            self.tasks.extend(tasks)
            self.cond.notify_all()

    def get(self) -> Task | None:
        with self.cond:
            while not self.tasks and not self.stopped:
                self.cond.wait()
            if self.stopped or not self.tasks:
                return None
            return self.tasks.popleft()

    def stop(self) -> list[Task]:
        """End the loops (a thread finishes its current task); return the tasks not started."""
        with self.cond:
            self.stopped = True
            rest = list(self.tasks)
            self.tasks.clear()
            self.cond.notify_all()
            return rest


@dataclass(slots=True)
class Measured:
    """One probe thread's outcome with the clocks of its call."""

    thread: ProbeThread
    outcome: Outcome
    cpu: float
    busy: float
    precise: bool = True


class ProbeThread(threading.Thread):
    """Runs ``fn`` on tasks from a feed, one at a time, timing each; its clocks readable from outside."""

    def __init__(
        self,
        number: int,
        fn: Callable[[Any], Any],
        feed: Feed,
        done: Callable[[Measured], None],
        spec: RunSpec,
        token: CancelToken,
    ) -> None:
        super().__init__(name=f"gearshift-probe-{number}", daemon=True)
        self.fn, self.feed, self.done, self.spec, self.token = fn, feed, done, spec, token
        self.current: Task | None = None
        self.current_start = 0.0
        self.start_cpu = 0.0
        self.start_runq = 0.0
        self.current_token: CancelToken | None = None
        self.expired: Task | None = None
        self.init_error: BaseException | None = None
        self.clock: ThreadClock | None = None
        self.started_at = 0.0

    def run(self) -> None:
        self.clock = ThreadClock()
        self.started_at = time.perf_counter()
        try:
            if self.spec.initializer is not None:
                try:
                    self.spec.initializer(*self.spec.initargs)
                except BaseException as exc:  # a thread reports everything: the caller raises it
                    self.init_error = initializer_error(self.spec.initializer, exc)
                    return
            while (task := self.feed.get()) is not None:
                token = CancelToken(self.token)
                self.current_token = token
                precise = self.feed.precise
                c0 = self.clock.cpu()
                r0 = self.clock.runq() if precise else 0.0
                self.start_cpu, self.start_runq = c0, r0
                self.current_start = time.perf_counter()
                self.current = task
                outcome = run_task(self.fn, task, token)
                self.current = None
                c1 = self.clock.cpu()
                r1 = self.clock.runq() if precise else 0.0
                self.done(Measured(self, outcome, c1 - c0, c1 - c0 + r1 - r0, precise))
        finally:
            close_runner()

def gil_pings(
    busy: Callable[[], bool], cpu: Callable[[], float], pings: int = 8, budget: float = 0.25,
    over: Callable[[], bool] | None = None,
) -> float | None:
    """Share of the time a thread running the function holds the GIL, seen from the caller.

    While another thread runs the function (``busy()``: in a call or about to start one),
    the caller sleeps 1 ms, over and over, and times how long it then waits to run again,
    leaving out its own run-queue delay (the machine's load). A thread running Python
    code holds the GIL until forced to drop it, after ``sys.getswitchinterval()`` (5 ms),
    and a compiled call that keeps the GIL holds it until it returns; code that releases
    the GIL (hashlib, zlib, NumPy, Cython ``nogil``) lets the caller back at once. The
    share of pings that waited 0.5 ms or more is the share of time the GIL was held:
    about 1 for pure Python, about 0 for released code. A ping counts only if the thread
    ran (``cpu()``, its CPU clock, moved for half the ping): on a busy machine a thread
    queued for a CPU holds nothing. (A compiled call that keeps the GIL for well under a
    millisecond looks released: its threads would gain little either way.)
    ``over()`` true stops early. None when fewer than three pings counted within ``budget`` seconds (a GIL hand-over can
    take tens of ms on a busy or virtualised machine, so a ping may be that long).
    """
    # Python code holds the GIL a full switch interval before it must let go; released code
    # lets the caller in within ~0.1 ms. Half an interval separates them with room for the
    # run-queue noise of a busy machine (which errs towards "held": processes, the safe side).
    threshold = sys.getswitchinterval() / 2
    held = counted = 0
    give_up = time.perf_counter() + budget
    while counted < pings and time.perf_counter() < give_up:
        if over is not None and over():
            break  # (the call being watched ended: no more to see)
        if not busy():
            time.sleep(0.001)  # not started yet: look again
            continue
        # Nothing in the window but the sleep and C-level clock reads: any call that lets go
        # of the GIL (a file read, say) would make the caller wait for it again, and measure that.
        c0 = cpu()
        w0 = time.perf_counter()
        time.sleep(0.001)
        w1 = time.perf_counter()
        c1 = cpu()
        if c1 - c0 < 0.5 * (w1 - w0):
            continue  # the thread hardly ran (queued for a CPU, or between calls): no evidence
        counted += 1
        held += (w1 - w0) - 0.001 >= threshold
        if counted >= 3 and held in (0, counted):
            break  # unanimous: more pings would only cost time
    return held / counted if counted >= 3 else None


def scaling_from_gil(held: float) -> float:
    """Calls two threads run at once when each holds the GIL ``held`` of its time."""
    return 2.0 - min(1.0, max(0.0, held))


def measure_scaling(fn: Callable[[Any], Any], items: Sequence[Any], budget: float = 0.25) -> float:
    """Run ``fn`` in a thread over the items while the caller pings: calls two threads would run at once."""
    stop = threading.Event()
    inside = threading.Event()

    def loop() -> None:
        try:
            n = 0
            while not stop.is_set():
                inside.set()
                call(fn, items[n % len(items)])
                n += 1
        finally:
            inside.clear()
            close_runner()

    thread = threading.Thread(target=loop, name="gearshift-probe-gil", daemon=True)
    thread.start()
    try:
        inside.wait()
        clock = ThreadClock(thread)
        held = gil_pings(lambda: thread.is_alive() and inside.is_set(), clock.cpu, budget=budget)
    finally:
        stop.set()
        while thread.is_alive():
            thread.join(0.1)
    return scaling_from_gil(1.0 if held is None else held)


# -- pickling and a worker -------------------------------------------------------------------
def pickle_cost(item: Any, result: Any) -> tuple[float, str]:
    """Seconds to pickle and unpickle an item and its result (both ends; best of three); an error if one cannot be."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        try:
            for value in (item, result):
                try:
                    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:
                    data = cloudpickle.dumps(value)
                pickle.loads(data)
        except Exception as exc:
            return 0.0, f"{type(exc).__name__}: {exc}"
        best = min(best, time.perf_counter() - start)
    return best, ""


def fn_pickle_error(fn: Callable[..., Any]) -> str:
    """Why ``fn`` cannot be sent to a worker process, or "" when it can."""
    try:
        cloudpickle.dumps(fn)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def fn_share_error(fn: Callable[..., Any]) -> str:
    """Why ``fn`` cannot be sent by reference (plain pickle, as to a sub-interpreter), or "" when it can."""
    try:
        pickle.dumps(fn, protocol=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def gear_round_trip(cls: type[Gear], fn: Callable[[Any], Any], item: Any) -> tuple[float, float]:
    """(start-up, round trip) of one worker of the gear ``cls``, in seconds: what it costs beyond the work.

    Sends the item twice, one after the other. The start-up is the first trip's wall time
    beyond the second's (starting the worker, sending the function). The round trip is
    the *caller's CPU time* for the second trip (framing, pipe, wake-ups): the part that
    cannot overlap, since with batches queued ahead the wait for a worker is hidden.
    """
    gear = cls(1)
    gear.check(fn)
    gear.open(RunSpec())
    walls: list[float] = []
    cpu = 0.0
    ok = False
    try:
        for index in range(2):
            start, c0 = time.perf_counter(), time.thread_time()
            gear.submit(Batch(fn, [Task(index, item)]))
            got: list[Outcome] = []
            while not got:
                got = expand(gear.collect(1.0))
                if time.perf_counter() - start > 30:
                    raise TimeoutError(f"a worker of the {cls.name} gear did not answer within 30 s")
            walls.append(max(0.0, time.perf_counter() - start - got[0].elapsed))
            cpu = time.thread_time() - c0
        ok = True
    finally:
        gear.close(cancel=not ok)
    return max(0.0, walls[0] - walls[1]), cpu
