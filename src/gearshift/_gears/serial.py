"""The serial gear: the caller's own thread, one item after another.

The baseline every other gear is measured against, and the right gear for tiny
tasks, whose cost is below any dispatch. ``collect`` runs the next queued batch.

Timeouts: on the main thread (POSIX), SIGALRM interrupts an overdue item. Runs nest (a
serial ``gs.map`` inside an item of another): every run keeps its own deadline on one
shared stack, the timer is armed for the nearest, and an alarm unwinds to the run whose
deadline passed. SIGALRM is only taken while it is free: when the user has a SIGALRM
handler of their own or an interval timer running (``signal.alarm``, ``setitimer``),
both are left untouched and the check is cooperative, as off the main thread: an item
that returns after its deadline is reported as timed out (and ``gs.cancelled()`` cannot
tell it earlier, since nothing interrupts it).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from types import FrameType
from typing import Any

from gearshift._cancel import CancelToken
from gearshift._gears._base import Gear, run_initializer, timeout_outcome
from gearshift._task import Batch, Outcome, Result, RunSpec, Task, close_runner, run_batch, run_task


class _Alarm(BaseException):
    """Raised by SIGALRM inside a task; BaseException so the task's ``except Exception`` misses it.

    ``deadline`` is the entry of the run whose time is up: runs nested inside it re-raise it.
    """

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline


class _Deadline:
    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at


class _Alarms:
    """The deadlines of the serial runs on the main thread, outermost first, on one ITIMER_REAL."""

    def __init__(self) -> None:
        self.stack: list[_Deadline] = []
        self._previous: Any = None

    @staticmethod
    def usable() -> bool:
        """SIGALRM is ours to use: main thread, and no handler or timer of the user's."""
        if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
            return False
        handler = signal.getsignal(signal.SIGALRM)
        if handler is _on_alarm:
            return True  # an outer run of ours holds it
        return handler == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)

    def enter(self, limit: float) -> _Deadline:
        entry = _Deadline(time.monotonic() + limit)
        if not self.stack:
            self._previous = signal.signal(signal.SIGALRM, _on_alarm)
        self.stack.append(entry)
        self._arm()
        return entry

    def leave(self, entry: _Deadline) -> None:
        """Drop ``entry`` (idempotent); re-arm for the next deadline or give SIGALRM back."""
        if entry not in self.stack:
            return
        self.stack.remove(entry)
        if self.stack:
            self._arm()
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self._previous = None

    def _arm(self) -> None:
        nearest = min(entry.at for entry in self.stack)
        signal.setitimer(signal.ITIMER_REAL, max(1e-4, nearest - time.monotonic()))

    def expired(self) -> _Deadline | None:
        """The outermost run whose deadline passed: the alarm unwinds everything inside it."""
        now = time.monotonic()
        for entry in self.stack:
            if entry.at <= now:
                return entry
        return None


_alarms = _Alarms()


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    entry = _alarms.expired()
    if entry is None:  # early (timer granularity): wait for the nearest deadline
        if _alarms.stack:
            _alarms._arm()
        return
    raise _Alarm(entry)


class SerialGear(Gear):
    """The caller's own thread: the baseline every speedup is measured against (so it declares no costs)."""

    name = "serial"
    chunk_target = 0.005  # batches only save engine round trips here; keep them short

    def __init__(self, workers: int | None = None) -> None:
        super().__init__(1 if workers is None else workers)
        self.workers = 1
        self._queue: deque[Batch] = deque()
        self._spec = RunSpec()
        self._token = CancelToken()
        self._woken = threading.Event()

    @classmethod
    def default_workers(cls) -> int:
        return 1

    def max_inflight(self) -> int:
        return 1

    def open(self, spec: RunSpec) -> None:
        self._spec = spec
        self._token = CancelToken()
        self._queue.clear()
        self._woken.clear()
        run_initializer(spec)

    def submit(self, batch: Batch) -> None:
        self._queue.append(batch)

    def collect(self, timeout: float | None) -> list[Result]:
        if not self._queue:
            # Nothing to run: wait for the engine's next deadline or a wake (input arrived).
            if timeout is None or timeout > 0:
                self._woken.wait(timeout)
            self._woken.clear()
            return []
        batch = self._queue.popleft()
        if self._spec.timeout is None:
            return run_batch(batch, self._token)
        return [self._run(batch, task) for task in batch.tasks]

    def _run(self, batch: Batch, task: Task) -> Outcome:
        limit = self._spec.timeout
        if limit is None:
            return run_task(batch.fn, task, self._token)
        if not _alarms.usable():
            outcome = run_task(batch.fn, task, self._token)
            if outcome.elapsed > limit:
                return timeout_outcome(task, limit, outcome.elapsed)
            return outcome
        start = time.perf_counter()
        entry = _alarms.enter(limit)
        try:
            try:
                return run_task(batch.fn, task, self._token)
            finally:
                _alarms.leave(entry)
        except _Alarm as alarm:
            _alarms.leave(entry)  # the alarm may have struck inside ``leave`` itself
            if alarm.deadline is not entry:
                raise  # an outer run's deadline: unwind to it
            return timeout_outcome(task, limit, time.perf_counter() - start)

    def wake(self) -> None:
        self._woken.set()

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self._token.cancel()
        self._queue.clear()
        close_runner()
