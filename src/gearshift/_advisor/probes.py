"""Measuring a function on real items: clocks, calls, two threads at once, pickling, a process.

Everything here has side effects (it runs the user's function); the decisions live in
``model.py`` as pure functions of what these probes return.

A call's wall time splits three ways: on a CPU (the thread's CPU clock), runnable but
queued for a CPU (Linux ``schedstat`` run-queue delay: the machine is busy) and waiting
(I/O, sleep, a lock, the GIL). Counting the run-queue delay as "busy" keeps a CPU-bound
function CPU-bound on a loaded machine, and makes the two-thread test immune to load:
a thread blocked on the GIL is neither on a CPU nor queued for one.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from gearshift._advisor.model import Machine
from gearshift._cancel import CancelToken
from gearshift._gears._base import cpu_count
from gearshift._task import Batch, Outcome, RunSpec, Task, call, close_runner, run_task
from gearshift.errors import InitializerError


def gil_enabled() -> bool:
    """False on a free-threaded build running without the GIL (3.13t+); True on 3.11/3.12."""
    check: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def machine_facts() -> Machine:
    """The facts the model needs about this machine and interpreter."""
    from gearshift._gears.process import default_start_method

    return Machine(cores=cpu_count(), gil_enabled=gil_enabled(), start_method=default_start_method())


#: The GIL switch interval during a two-thread test: long, so threads that take turns hand the
#: GIL over rarely and the hand-overs' own delays (a woken thread queued for a CPU) stay small.
TEST_SWITCH_INTERVAL = 0.02


@contextlib.contextmanager
def long_switch_interval() -> Iterator[None]:
    """Lengthen ``sys.setswitchinterval`` for a two-thread test (a few tens of ms), then restore it."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(max(previous, TEST_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


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
        self._status = None if thread.native_id is None else f"/proc/self/task/{thread.native_id}/status"

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

    def switches(self) -> int:
        """Times this thread blocked (voluntary context switches): waits for the GIL among them."""
        if self._status is None:
            return 0
        try:
            with open(self._status, "rb") as f:
                for line in f:
                    if line.startswith(b"voluntary_ctxt_switches"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return 0


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
    """Tasks for probe threads: a deque under a condition; ``stop`` ends their loops.

    Threads account the time they spend idle, waiting for a task, so a watcher can tell
    "blocked on the GIL" from "had nothing to do".
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.tasks: deque[Task] = deque()
        self.stopped = False
        #: Threads read their run-queue delay around each call (a file read; off for the pair test).
        self.precise = True

    def put(self, tasks: Iterable[Task]) -> None:
        with self.cond:
            self.tasks.extend(tasks)
            self.cond.notify_all()

    def get(self, worker: ProbeThread) -> Task | None:
        with self.cond:
            if not self.tasks and not self.stopped:
                since = time.perf_counter()
                worker.idle_since = since
                worker.idle_waits += 1
                while not self.tasks and not self.stopped:
                    self.cond.wait()
                worker.idle += time.perf_counter() - since
                worker.idle_since = None
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
    """Runs ``fn`` on tasks from a feed, one at a time, timing each; watchable from outside."""

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
        self.idle = 0.0
        self.idle_since: float | None = None
        self.idle_waits = 0
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
                except BaseException as exc:
                    self.init_error = InitializerError(f"initializer {self.spec.initializer!r} raised {exc!r}")
                    self.init_error.__cause__ = exc
                    return
            while (task := self.feed.get(self)) is not None:
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

    def watch(self) -> Window:
        """The clocks now, for measuring a window from outside."""
        now = time.perf_counter()
        idle = self.idle + (now - self.idle_since if self.idle_since is not None else 0.0)
        if self.clock is None or not self.is_alive():
            return Window(now, 0.0, idle, 0, self.idle_waits)
        return Window(now, self.clock.busy(), idle, self.clock.switches(), self.idle_waits)


@dataclass(frozen=True, slots=True)
class Window:
    """A thread's clocks at one moment: wall, busy (CPU + run queue), idle, blocks, idle blocks."""

    wall: float
    busy: float
    idle: float
    switches: int
    idle_waits: int


def overlap_scaling(before: Sequence[Window], after: Sequence[Window]) -> tuple[float, float] | None:
    """How many calls ran at once over a window, and how often each thread blocked (per second).

    Each thread's share of its non-idle time on a CPU or queued for one, summed: a thread
    blocked on the GIL is neither, whatever the machine's load, so threads taking turns
    sum to well below 2 and block hundreds of times a second (a forced switch every
    ``sys.getswitchinterval()``), while code that releases the GIL sums to about 2.
    None when the threads were idle too much of the window to tell.
    """
    total = 0.0
    blocks = 0.0
    for a, b in zip(before, after, strict=True):
        active = (b.wall - a.wall) - (b.idle - a.idle)
        if active < 0.01:
            return None
        total += min(1.0, max(0.0, b.busy - a.busy) / active)
        blocks += max(0, (b.switches - a.switches) - (b.idle_waits - a.idle_waits)) / active
    return min(2.0, total), blocks / len(before)


def measure_scaling(fn: Callable[[Any], Any], items: Sequence[Any], window: float = 0.08) -> tuple[float, float]:
    """Run ``fn`` in two threads at once for about ``window`` seconds: calls at once, blocks per second."""
    stop = threading.Event()
    go = threading.Barrier(3)
    got: list[tuple[Window, Window]] = []
    lock = threading.Lock()

    def loop(offset: int) -> None:
        clock = ThreadClock()
        try:
            go.wait()
            first = Window(time.perf_counter(), clock.busy(), 0.0, clock.switches(), 0)
            n = offset
            while not stop.is_set():
                call(fn, items[n % len(items)])
                n += 1
            last = Window(time.perf_counter(), clock.busy(), 0.0, clock.switches(), 0)
            with lock:
                got.append((first, last))
        finally:
            close_runner()

    threads = [threading.Thread(target=loop, args=(i,), name=f"gearshift-probe-{i}", daemon=True) for i in range(2)]
    with long_switch_interval():
        for thread in threads:
            thread.start()
        try:
            go.wait()
            time.sleep(window)
        finally:
            stop.set()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.1)
    measured = overlap_scaling([g[0] for g in got], [g[1] for g in got]) if len(got) == 2 else None
    return measured if measured is not None else (1.0, 0.0)


# -- pickling and a process ------------------------------------------------------------------
def pickle_cost(item: Any, result: Any) -> tuple[float, str]:
    """Seconds to pickle and unpickle an item and its result (both ends); an error message if one cannot be."""
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
    return time.perf_counter() - start, ""


def fn_pickle_error(fn: Callable[..., Any]) -> str:
    """Why ``fn`` cannot be sent to a worker process, or "" when it can."""
    try:
        cloudpickle.dumps(fn)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def process_round_trip(fn: Callable[[Any], Any], item: Any) -> tuple[float, float]:
    """(start-up, round trip) of one worker process, in seconds: the cost beyond the work itself.

    Sends the item twice, one after the other; the first includes starting the worker and
    sending the function, the second is a steady round trip. Work time is taken out using
    the time the worker measured for the call.
    """
    from gearshift._gears.process import ProcessGear

    gear = ProcessGear(1)
    gear.open(RunSpec())
    costs: list[float] = []
    ok = False
    try:
        for index in range(2):
            start = time.perf_counter()
            gear.submit(Batch(fn, [Task(index, item)]))
            got: list[Outcome] = []
            while not got:
                got = gear.collect(1.0)
                if time.perf_counter() - start > 30:
                    raise TimeoutError("a worker process did not answer within 30 s")
            costs.append(max(0.0, time.perf_counter() - start - got[0].elapsed))
        ok = True
    finally:
        gear.close(cancel=not ok)
    return costs[0] - costs[1], costs[1]
