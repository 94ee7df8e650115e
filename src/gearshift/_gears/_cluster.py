"""What the cluster gears (dask, ray) share: batches as remote tasks, results through a queue.

Each batch is one remote task running ``_remote.run_batch``, so the cluster's per-task cost is
shared by the items of a chunk. A task's done-callback puts it on a queue the caller waits on,
from its own thread, which keeps receiving Ctrl-C. The engine bounds what is in flight
(``2 * workers`` tasks). A subclass connects (``_connect``), submits (``_submit``), reads a
finished task (``_read``) and cancels (``_cancel``); everything else is here once:

* a task that failed as a whole (its worker died past the cluster's retries; an item that could
  not be sent) is split, so only the item at fault fails; a worker death is ``WorkerCrashed``
  with a note naming the cluster's own error;
* an item past its timeout fails at its deadline (the worker waits for it in a thread and gives
  up); its call cannot be stopped and runs on in the worker, which ``notes`` says;
* the initializer runs once per worker process and run, before the first call there;
* what the gear started (a local cluster, a connection) it stops in ``close``; a cluster it was
  given it leaves running, with only this run's tasks cancelled.
"""

from __future__ import annotations

import queue
import threading
import uuid
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from gearshift._gears._base import Gear, initializer_error
from gearshift._gears._unpack import RemoteInitError, unpack
from gearshift._task import Batch, Outcome, Result, RunSpec
from gearshift.errors import WorkerCrashed


class ClusterGear(Gear):
    """Runs batches as tasks of a cluster; see the module docstring."""

    pickles = True
    #: The names of the cluster's errors that mean "the worker running it died" (past retries).
    crash_errors: tuple[str, ...] = ()

    def __init__(self, workers: int | None = None) -> None:
        self._fixed = workers is not None
        super().__init__(workers)
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._tasks: dict[Any, Batch] = {}
        self._lock = threading.Lock()
        self._spec = RunSpec()
        self._init: tuple[str, Callable[..., Any], tuple[Any, ...]] | None = None
        self._late = 0
        self._crashed = 0
        self._started = ""

    # -- what a cluster does its own way --------------------------------------------------
    @abstractmethod
    def _connect(self) -> int:
        """Get a client for the run (starting a local cluster if need be); return its worker slots."""

    @abstractmethod
    def _submit(self, batch: Batch, args: tuple[Any, ...]) -> Any:
        """Start ``_remote.run_batch(*args)`` as a task; return a handle ``_watch`` accepts."""

    @abstractmethod
    def _watch(self, handle: Any, done: Callable[[Any], None]) -> None:
        """Call ``done(handle)`` (from any thread) once the task has ended, however."""

    @abstractmethod
    def _read(self, handle: Any) -> tuple[bytes | None, BaseException | None]:
        """A finished task's payload, or the error that ended it as a whole."""

    @abstractmethod
    def _cancel(self, handles: list[Any]) -> None:
        """Cancel these tasks (those already running may run on: a cluster cannot stop them)."""

    @abstractmethod
    def _disconnect(self) -> None:
        """Stop what ``_connect`` started (a local cluster, a connection); leave a given one running."""

    # -- the gear interface ---------------------------------------------------------------
    def open(self, spec: RunSpec) -> None:
        self._spec = spec
        self._done = queue.SimpleQueue()
        self._tasks = {}
        self._late = self._crashed = 0
        slots = self._connect()
        if not self._fixed:
            self.workers = max(1, slots)
        self._init = None
        if spec.initializer is not None:
            self._init = (uuid.uuid4().hex, spec.initializer, tuple(spec.initargs))

    def submit(self, batch: Batch) -> None:
        handle = self._submit(batch, (batch.fn, batch.items, self._spec.timeout, self._init))
        with self._lock:
            self._tasks[handle] = batch
        self._watch(handle, self._done.put)

    def collect(self, timeout: float | None) -> list[Result]:
        out: list[Result] = []
        try:
            got = self._done.get(timeout=timeout)
        except queue.Empty:
            return out
        while True:
            if got is not None:
                self._take(got, out)
            try:
                got = self._done.get_nowait()
            except queue.Empty:
                return out

    def _take(self, handle: Any, out: list[Result]) -> None:
        with self._lock:
            batch = self._tasks.pop(handle, None)
        if batch is None:  # cancelled by close
            return
        payload, error = self._read(handle)
        if payload is not None:
            try:
                results, late = unpack(batch, payload, self._spec.timeout)
            except RemoteInitError as exc:
                raise initializer_error(self._spec.initializer, exc.exc) from exc.exc
            self._late += late
            out.extend(results)
            return
        assert error is not None
        if len(batch) > 1:  # split it: only the item at fault fails
            for task in batch.tasks:
                self.submit(Batch(batch.fn, [task]))
            return
        task = batch.tasks[0]
        if type(error).__name__ in self.crash_errors:
            self._crashed += 1
            crash = WorkerCrashed(None, task.item, task.index)
            crash.add_note(f"on the {self.name} cluster, {type(error).__name__}: {error} (its retries are spent)")
            crash.__cause__ = error
            error = crash
        out.append(Outcome(task, False, error, 0.0, ""))

    def wake(self) -> None:
        self._done.put(None)

    def close(self, cancel: bool = False) -> None:
        with self._lock:
            handles, self._tasks = list(self._tasks), {}
        try:
            if handles and cancel:
                self._cancel(handles)
        finally:
            self._disconnect()

    def notes(self) -> list[str]:
        out = [self._started] if self._started else []
        if self._late:
            out.append(
                f"{self._late} item(s) timed out on the cluster: their calls could not be stopped "
                "and run on in the workers until they return"
            )
        if self._crashed:
            out.append(f"{self._crashed} item(s) failed after the cluster's retries when their workers died")
        return out

    def describe(self) -> str:
        return f"{self.name} gear, {self.workers} worker slot{'s' if self.workers != 1 else ''}"
