"""The serial gear: the caller's own thread, one item after another.

The baseline every other gear is measured against, and the right gear for tiny
tasks, whose cost is below any dispatch. ``collect`` runs the next queued batch.
A timeout interrupts the task with SIGALRM when running on the main thread (POSIX);
elsewhere an overdue item is reported as timed out once it returns.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from types import FrameType
from typing import Any

from gearshift._cancel import CancelToken
from gearshift._gears._base import Gear
from gearshift._task import Batch, Outcome, Result, RunSpec, close_runner, run_batch, run_task
from gearshift.errors import InitializerError, TaskTimeout


class _Alarm(BaseException):
    """Raised by SIGALRM inside a task; BaseException so the task's ``except Exception`` misses it."""


class SerialGear(Gear):
    name = "serial"
    chunk_target = 0.005  # batches only save engine round trips here; keep them short

    def __init__(self, workers: int | None = None) -> None:
        super().__init__(1 if workers is None else workers)
        self.workers = 1
        self._queue: deque[Batch] = deque()
        self._spec = RunSpec()
        self._token = CancelToken()

    @classmethod
    def default_workers(cls) -> int:
        return 1

    def max_inflight(self) -> int:
        return 1

    def open(self, spec: RunSpec) -> None:
        self._spec = spec
        self._token = CancelToken()
        self._queue.clear()
        if spec.initializer is not None:
            try:
                spec.initializer(*spec.initargs)
            except Exception as exc:
                raise InitializerError(f"initializer {spec.initializer!r} raised {exc!r}") from exc

    def submit(self, batch: Batch) -> None:
        self._queue.append(batch)

    def collect(self, timeout: float | None) -> list[Result]:
        if not self._queue:
            if timeout:
                time.sleep(min(timeout, 0.05))
            return []
        batch = self._queue.popleft()
        if self._spec.timeout is None:
            return run_batch(batch, self._token)
        return [self._run(batch, task) for task in batch.tasks]

    def _run(self, batch: Batch, task: Any) -> Outcome:
        limit = self._spec.timeout
        if limit is None:
            return run_task(batch.fn, task, self._token)
        use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        if not use_alarm:
            outcome = run_task(batch.fn, task, self._token)
            if outcome.elapsed > limit:
                return Outcome(task, False, TaskTimeout(limit, task.item, task.index), outcome.elapsed)
            return outcome

        def on_alarm(signum: int, frame: FrameType | None) -> None:
            raise _Alarm

        previous = signal.signal(signal.SIGALRM, on_alarm)
        start = time.perf_counter()
        try:
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                return run_task(batch.fn, task, self._token)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Alarm:
            return Outcome(task, False, TaskTimeout(limit, task.item, task.index), time.perf_counter() - start)
        finally:
            signal.signal(signal.SIGALRM, previous)

    def wake(self) -> None:
        pass

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self._token.cancel()
        self._queue.clear()
        close_runner()
