"""The auto gear: start in first gear, measure the work, shift up when it pays.

Phases, each a way of running the items the engine hands over:

* ``probe``:  the first item runs in a probe thread while the caller watches its CPU
  clock. If it ends quickly the work is short: go ``serial``. If after ``WATCH`` seconds
  it still runs, its clock says whether it computes or waits: waiting shifts to threads
  at once; computing is pinged (below) while it runs, then shifts. The next items go to
  the new gear while the probe item finishes: no item is run twice, no wave is lost.
* ``serial``: the caller runs batches itself (tiny tasks never pay a hand-off), timing
  them; now and then (at doubling intervals of work) the model decides whether another
  gear pays off over the work left, start-up included.
* ``ping``:   a probe thread runs items while the caller sleeps 1 ms again and again and
  times how long it waits for the GIL (``probes.gil_pings``): code that releases the GIL
  goes to threads, code that holds it to processes.
* ``shifted``: a delegate gear runs the rest; the engine reads its ``workers``,
  ``chunk_target`` and ``max_inflight()`` through this gear. Items still in probe
  threads finish there and their results are merged in.

Coroutine functions go straight to the async gear. A function that cannot be pickled
never goes to processes, and the reasons say so. The candidates are the gears of the
table the advisor's model predicts (``GearCosts``), third-party ones included once
registered or loaded; the shift makes the chosen one by name from the table.

Fork safety: a probe thread runs the user's function, which may hold a lock (a module's
``threading.Lock``) at any moment; a worker forked then would inherit it taken, forever.
So where processes start by fork and are a candidate at all, their workers are forked in
``open``, before any probe runs, and wait; a shift to processes uses them (the gear's own
replacements come from its zygote, forked at that same moment). A run that never shifts to
processes stops them.

The choice and its reasons go to the run's ``Report`` (passed in ``RunSpec.extra["report"]``)
and to the ``gearshift`` logger.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gearshift._advisor.advice import Advice
from gearshift._advisor.model import Decision, Machine, Measurements, decide
from gearshift._advisor.probes import (
    Feed,
    Measured,
    ProbeThread,
    ThreadClock,
    fn_pickle_error,
    fn_share_error,
    gil_pings,
    machine_facts,
    pickle_cost,
    scaling_from_gil,
    wait_fraction,
)
from gearshift._calls import fn_name, is_async_callable
from gearshift._cancel import CancelToken
from gearshift._gears import gear_class, register_gear
from gearshift._gears._base import Gear, join_threads, timeout_outcome
from gearshift._gears.process import ProcessGear
from gearshift._gears.serial import SerialGear
from gearshift._task import Batch, Done, Result, RunSpec, count

log = logging.getLogger("gearshift")

#: A first item shorter than this is "short": measure more of them in the caller.
SHORT = 0.005
#: Watch a long first item this long before judging it from its CPU clock.
WATCH = 0.03
#: Work per batch while the caller pings a probe thread (enough for a dozen pings).
PING_CHUNK = 0.1
#: Ping rounds that find no call running before the GIL is assumed held.
PING_TRIES = 3
#: Work run serially before the first decision; the interval doubles after each.
FIRST_CHECK = 0.02
#: Slice in which the caller polls probe threads.
SLICE = 0.005
#: GIL switch interval while shifting (starting workers next to a computing probe thread).
SHIFT_SWITCH_INTERVAL = 0.0002

class AutoGear(Gear):
    """Measures the first items and shifts to the gear the measurements call for."""

    name = "auto"
    picks_gear = True

    def __init__(self, workers: int | None = None, *, machine: Machine | None = None) -> None:
        super().__init__(workers if workers is not None else 2)
        self._user_workers = workers
        self.machine = machine or machine_facts()
        self.workers = 2
        self.chunk_target = 0.0
        self.decision: Decision | None = None
        self.advice: Advice | None = None
        self.phase = "probe"
        self._fn: Callable[[Any], Any] | None = None
        self._pickle_error = ""
        self._share_error = ""
        self._coro = False
        self._spec = RunSpec()
        self._report: Any = None
        self._total: int | None = None
        self._prestarted: ProcessGear | None = None
        self._reset()

    def _reset(self) -> None:
        self.phase = "probe"
        self.workers = 2
        self.chunk_target = 0.0
        self._delegate: Gear | None = None
        self._feed = Feed()
        self._probes: list[ProbeThread] = []
        self._probe_done: queue.SimpleQueue[Measured | None] = queue.SimpleQueue()
        self._token = CancelToken()
        self._pending: deque[Batch] = deque()
        self._completed = 0
        self._m = Measurements(per_item=0.0)
        self._serial_n = 0
        self._serial_wall = 0.0
        self._serial_busy = 0.0  # CPU seconds of the calls run in the caller
        self._serial_runq = 0.0
        self._next_check = FIRST_CHECK
        self._ping_tries = 0
        self._watch = WATCH
        self._sample: tuple[Any, Any] | None = None
        self._clock: ThreadClock | None = None
        self._runq_mark = (0.0, 0.0)

    @classmethod
    def default_workers(cls) -> int:
        return 2

    def window(self, chunk: int) -> int:
        if self._delegate is not None and self.phase in ("shifted", "serial"):
            return self._delegate.window(chunk)
        return super().window(chunk)

    def max_inflight(self) -> int:
        if self._delegate is not None and self.phase in ("shifted", "serial"):
            return self._delegate.max_inflight()
        return 2

    def check(self, fn: Callable[..., Any]) -> None:
        """Never fails: an unpicklable function only rules processes out."""
        self._fn = fn
        self._coro = is_async_callable(fn)
        self._pickle_error = fn_pickle_error(fn) if self.machine.gil_enabled else ""
        self._share_error = fn_share_error(fn)

    # -- lifecycle ------------------------------------------------------------------------
    def open(self, spec: RunSpec) -> None:
        self._spec = spec
        self._report = spec.extra.get("report")
        self._total = spec.extra.get("total")
        self._reset()
        self._m.is_coroutine = self._coro
        self._m.pickle_error = self._pickle_error
        self._m.share_error = self._share_error
        if self._coro:
            n = self._user_workers
            at_once = f"{n} tasks at once" if n else "concurrency found by measurement"
            reasons = ["a coroutine function: async when you can", f"the async gear, {at_once}"]
            self._shift(Decision("async", n or 0, 1, 0.0, 0.0, {}, reasons))
        elif self.machine.gil_enabled and not self._pickle_error and self.machine.start_method == "fork":
            # Fork now, before a probe thread runs the function (see the module docstring).
            gear = ProcessGear(self._user_workers or self.machine.cores)
            gear.check(self._fn_or_fail())
            gear.open(self._spec)
            self._prestarted = gear

    def submit(self, batch: Batch) -> None:
        if self.phase == "shifted":
            assert self._delegate is not None
            self._delegate.submit(batch)
        elif self.phase == "serial":
            self._pending.append(batch)
        else:
            self._feed.put(batch.tasks)
            if not self._probes:
                self._start_probe()

    def _start_probe(self) -> None:
        assert self._fn is not None
        thread = ProbeThread(len(self._probes), self._fn, self._feed, self._probe_done.put, self._spec, self._token)
        self._probes.append(thread)
        thread.start()

    # -- collecting -----------------------------------------------------------------------
    def collect(self, timeout: float | None) -> list[Result]:
        if self.phase == "probe":
            return self._collect_probe(timeout)
        if self.phase == "ping":
            return self._collect_ping(timeout)
        if self.phase == "serial":
            return self._collect_serial(timeout)
        return self._collect_shifted(timeout)

    def _drain(self, wait: float | None) -> list[Result]:
        """Outcomes of probe threads (expired items reported, late results of them dropped)."""
        out: list[Result] = []
        try:
            got = self._probe_done.get(timeout=wait) if wait else self._probe_done.get_nowait()
        except queue.Empty:
            got = None
        while got is not None:
            self._take(got, out)
            try:
                got = self._probe_done.get_nowait()
            except queue.Empty:
                got = None
        for thread in self._probes:
            if thread.init_error is not None:
                raise thread.init_error
        out.extend(self._expire())
        self._completed += len(out)
        return out

    def _take(self, got: Measured, out: list[Result]) -> None:
        if got.outcome.task is got.thread.expired:
            return
        out.append(got.outcome)
        o = got.outcome
        if o.ok and self._sample is None:
            self._sample = (o.task.item, o.value)
        if o.elapsed > 0 and self.phase == "probe" and got.precise:
            # Only calls timed alone count: while the caller pings, it takes the GIL from them.
            self._m.samples += 1
            n = self._m.samples
            self._m.per_item += (o.elapsed - self._m.per_item) / n
            wait = wait_fraction(o.elapsed, got.cpu, got.busy - got.cpu)
            self._m.wait_fraction += (wait - self._m.wait_fraction) / n

    def _expire(self) -> list[Result]:
        limit = self._spec.timeout
        if limit is None:
            return []
        out: list[Result] = []
        now = time.perf_counter()
        for thread in self._probes:
            task, token = thread.current, thread.current_token
            if task is not None and thread.expired is not task and now - thread.current_start > limit:
                thread.expired = task
                if token is not None:
                    token.cancel()
                out.append(timeout_outcome(task, limit))
        if out and not self._feed.stopped:
            self._start_probe()  # threads cannot be killed: a fresh one takes the next items
        return out

    def _running(self) -> list[ProbeThread]:
        return [t for t in self._probes if t.is_alive() and t.current is not None and t.expired is not t.current]

    def _collect_probe(self, timeout: float | None) -> list[Result]:
        """Wait for the first outcomes, waking only to judge a long item (each wake costs it a GIL hand-over)."""
        deadline = time.perf_counter() + (timeout if timeout is not None else 3600.0)
        while True:
            running = self._running()
            # No item started yet (the thread is starting or taking one): look again soon.
            watch_at = running[0].current_start + self._watch if running else time.perf_counter() + SLICE
            wake = min(deadline, watch_at)
            out = self._drain(max(1e-4, wake - time.perf_counter()))
            if out and self._m.samples:
                if self._m.per_item < SHORT:
                    self._go_serial()
                else:
                    self._consider(test_gil=True)
                return out
            running = self._running()
            if running and time.perf_counter() - running[0].current_start >= self._watch:
                self._judge_running(running[0])
                return out
            if out or time.perf_counter() >= deadline:
                return out

    def _judge_running(self, thread: ProbeThread) -> None:
        """The first item is long: judge it from its clocks so far.

        If it does not yet justify a shift (its time so far is only a lower bound), keep
        watching it and judge again when it has run twice as long: never settle for serial
        while a call of unknown length is still running.
        """
        assert thread.clock is not None
        elapsed = time.perf_counter() - thread.current_start
        cpu, runq = thread.clock.cpu() - thread.start_cpu, thread.clock.runq() - thread.start_runq
        # Half-way through, on average: a call that has run this long will likely run as long again.
        self._m.per_item = max(self._m.per_item, 2 * elapsed)
        self._m.wait_fraction = wait_fraction(elapsed, cpu, runq)
        self._m.samples = max(self._m.samples, 1)
        self._watch = 2 * elapsed
        self._consider(test_gil=True, running_long=True)

    def _remaining(self) -> int:
        if self._total is not None:
            return max(1, self._total - self._completed - len(self._running()))
        # Unknown length: the run so far predicts the run ahead (and a long item, a few waves).
        return max(self._completed, 4 * self.machine.cores if self._m.per_item >= SHORT else 1)

    def _consider(self, test_gil: bool, running_long: bool = False) -> None:
        """Decide with what is measured; test the GIL first when its answer could change the choice."""
        m = self._m
        if self._sample is not None and m.picklable and not m.pickle_per_item:
            m.pickle_per_item, error = pickle_cost(*self._sample)
            if error:
                m.pickle_error = f"an item or its result cannot be pickled ({error})"
        remaining = self._remaining()
        decision = decide(m, self.machine, self._user_workers, remaining)
        if test_gil and self.machine.gil_enabled and m.thread_scaling is None and m.wait_fraction < 0.5:
            hopeful = dataclasses.replace(m, thread_scaling=2.0)
            if decide(hopeful, self.machine, self._user_workers, remaining).gear != decision.gear:
                if self._ping_now():
                    self._consider(test_gil=False, running_long=running_long)
                else:
                    self._go_ping()
                return
        if decision.gear == "serial":
            if running_long and self.phase == "probe":
                return  # judged again later (see _judge_running)
            self._go_serial()
            self.decision = decision
            return
        self._shift(decision)

    def _ping_now(self) -> bool:
        """Ping while a probe thread is inside a call: how much of its time it holds the GIL."""
        if not self._running():
            return False
        self._feed.precise = False  # calls timed while the caller pings are not clean samples
        held = gil_pings(self._has_work, self._probe_cpu)
        if held is None:
            self._ping_tries += 1
            if self._ping_tries < PING_TRIES and not self._running():
                return False  # nothing was running: ping when something is
            held = 1.0  # could not tell: assume the GIL is held (the safe side: processes)
        self._m.thread_scaling = scaling_from_gil(held)
        return True

    def _has_work(self) -> bool:
        """A probe thread is in a call or about to start one (the caller's holding the GIL may stop it)."""
        feed = self._feed
        return any(
            t.is_alive() and t.expired is None and (t.current is not None or (t.feed is feed and bool(feed.tasks)))
            for t in self._probes
        )

    def _probe_cpu(self) -> float:
        return sum(t.clock.cpu() for t in self._probes if t.clock is not None and t.is_alive())

    def _go_ping(self) -> None:
        """Run items in a probe thread (fed generously) so the caller can ping it."""
        if self.phase == "serial":
            assert self._delegate is not None
            self._delegate.close()
            self._delegate = None
            self._feed = Feed()
            for batch in self._pending:
                self._feed.put(batch.tasks)
            self._pending.clear()
        self.phase = "ping"
        self._feed.precise = False
        self.workers = 1
        self.chunk_target = PING_CHUNK
        if not any(t.is_alive() and t.feed is self._feed for t in self._probes):
            self._start_probe()

    def _collect_ping(self, timeout: float | None) -> list[Result]:
        if not self._running():
            return self._drain(min(timeout if timeout is not None else SLICE, SLICE))
        done = self._ping_now()
        out = self._drain(None)
        if done:
            self._consider(test_gil=False)
        return out

    # -- serial ---------------------------------------------------------------------------
    def _go_serial(self) -> None:
        if self.phase != "serial":
            tasks = self._feed.stop()
            size = max(1, int(0.002 / max(self._m.per_item, 1e-7)))
            for i in range(0, len(tasks), size):
                self._pending.append(Batch(self._fn_or_fail(), tasks[i : i + size]))
            gear = SerialGear()
            gear.check(self._fn_or_fail())
            gear.open(self._spec)
            self._delegate = gear
            self.phase = "serial"
            self.workers = 1
            self.chunk_target = 0.002
            self._clock = ThreadClock()
            self._runq_mark = (self._clock.runq(), self._serial_wall)
            self._next_check = max(FIRST_CHECK, self._serial_wall * 2)

    def _fn_or_fail(self) -> Callable[[Any], Any]:
        assert self._fn is not None
        return self._fn

    def _collect_serial(self, timeout: float | None) -> list[Result]:
        out = self._drain(None)
        if not self._pending:
            if not out:  # nothing to run (retries backing off, a rate limit, a slow source): wait, don't spin
                wait = min(timeout if timeout is not None else 0.05, 0.05)
                if wait > 0:
                    out = self._drain(wait)  # probe outcomes, or wake() (new input) ends the wait
            return out
        assert self._delegate is not None and self._clock is not None
        batch = self._pending.popleft()
        self._delegate.submit(batch)
        c0, w0 = time.thread_time(), time.perf_counter()
        got = self._delegate.collect(0)
        wall, busy = time.perf_counter() - w0, time.thread_time() - c0
        done = count(got)
        self._completed += done
        out.extend(got)
        if done:
            self._serial_n += done
            self._serial_wall += wall
            self._serial_busy += busy
            first = got[0]
            if self._sample is None and isinstance(first, Done):
                self._sample = (first.batch.items[first.first], first.values[0])
        if self._serial_wall >= self._next_check:
            # The run-queue delay (a file read) is taken once per check, not per batch.
            runq = self._clock.runq()
            self._serial_runq += runq - self._runq_mark[0]
            self._runq_mark = (runq, self._serial_wall)
            self._next_check = self._serial_wall * 2
            m = self._m
            m.per_item = self._serial_wall / self._serial_n
            m.wait_fraction = wait_fraction(self._serial_wall, self._serial_busy, self._serial_runq)
            m.samples = self._serial_n
            self._consider(test_gil=True)
        return out

    # -- shifted --------------------------------------------------------------------------
    def _shift(self, decision: Decision) -> None:
        """Run the rest in the chosen gear; items left in the feed or queue go there."""
        # Starting workers makes many calls that let go of the GIL; while a probe thread
        # computes, each would wait a whole switch interval (5 ms) to get it back.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SHIFT_SWITCH_INTERVAL))
        try:
            self._shift_now(decision)
        finally:
            sys.setswitchinterval(interval)

    def _shift_now(self, decision: Decision) -> None:
        fn = self._fn_or_fail()
        old = self._delegate
        gear: Gear
        if decision.gear == "process" and self._prestarted is not None:
            gear, self._prestarted = self._prestarted, None  # forked before the probe: use them
        else:
            gear = gear_class(decision.gear)(decision.workers or None)  # 0: the gear sizes itself
            gear.check(fn)
            gear.open(self._spec)
        tasks = [t for b in self._pending for t in b.tasks] + self._feed.stop()
        self._pending.clear()
        if old is not None:
            old.close()
        self._delegate = gear
        self.phase = "shifted"
        self.workers = gear.workers
        self.chunk_target = gear.chunk_target
        size = max(1, math.ceil(len(tasks) / (2 * gear.workers)))
        for i in range(0, len(tasks), size):
            gear.submit(Batch(fn, tasks[i : i + size]))
        self._record(decision)

    def _record(self, decision: Decision) -> None:
        self.decision = decision
        measured = dataclasses.replace(self._m)  # a snapshot: the gear's own keeps changing
        self.advice = Advice.from_decision(decision, measured, self.machine, fn_name(self._fn) if self._fn else "")
        gear_text = self.describe()
        log.info("gearshift auto: %s; %s", gear_text, "; ".join(decision.reasons))
        if self._report is not None:
            self._report.gear = gear_text
            self._report.workers = self.workers
            self._report.reasons = list(decision.reasons)
            self._report.advice = self.advice

    def _collect_shifted(self, timeout: float | None) -> list[Result]:
        assert self._delegate is not None
        out = self._drain(None)
        if any(t.is_alive() for t in self._probes):
            wait = 0.0 if out else min(timeout if timeout is not None else 0.02, 0.02)
            out.extend(self._delegate.collect(wait))
            out.extend(self._drain(None))
            return out
        out.extend(self._delegate.collect(0 if out else timeout))
        return out

    def wake(self) -> None:
        if self._delegate is not None:
            self._delegate.wake()
        self._probe_done.put(None)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self._token.cancel()
        self._feed.stop()
        if self.phase != "shifted" and self._report is not None:
            if self.decision is None:
                where = "serial gear" if self.phase == "serial" else "probe threads"
                self._report.gear = f"{where} (auto: the run ended while probing)"
                self._report.reasons = ["the run ended before the measurements called for a shift"]
            else:
                self._record(self.decision)
        try:
            if self._delegate is not None:
                self._delegate.close(cancel)
        finally:
            try:
                self._join_probes(cancel)
            finally:
                if self._prestarted is not None:
                    self._prestarted.close(cancel=True)
                    self._prestarted = None

    def _join_probes(self, cancel: bool) -> None:
        probes, self._probes = self._probes, []
        join_threads(probes, lambda thread: cancel or thread.expired is not None, "probe thread(s)")

    def notes(self) -> list[str]:
        return [] if self._delegate is None else self._delegate.notes()

    def describe(self) -> str:
        if self.phase in ("shifted", "serial") and self._delegate is not None and self.decision is not None:
            return f"{self._delegate.describe()}, chosen by auto"
        return "auto gear (probing)"


# The auto gear sits above the advisor, which sits above the table: it joins the table itself.
register_gear(AutoGear.name, AutoGear)
