"""``gs.Executor``: a ``concurrent.futures.Executor`` over any gear.

Code written for ``ThreadPoolExecutor`` or ``ProcessPoolExecutor`` switches unchanged,
and gains what the stdlib pools lack: a dead worker fails only its own future
(``gs.WorkerCrashed``) instead of breaking the pool, per-call timeouts that really stop
the call, retries, lambdas in processes, and workers reused across ``map`` calls.

One driver thread moves work between the caller's futures and the gear; futures stay
PENDING (cancellable) until the gear has room for them, as in the stdlib.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from gearshift._gears import Gear, make_gear
from gearshift._gears.aio import is_async_callable
from gearshift._retry import Retry, as_retry
from gearshift._task import Batch, Outcome, RunSpec, Task, expand

__all__ = ["Executor"]

_STOP = object()

#: Executors with a running driver: at interpreter exit their submitted work still runs.
_live: weakref.WeakSet[Executor] = weakref.WeakSet()


def _finish_at_exit() -> None:
    """As the stdlib executors do, work submitted before exit is done, not dropped.

    Registered with ``threading._register_atexit`` (as concurrent.futures does), so it runs
    before the interpreter stops its threads; ``gs.Pool``, like multiprocessing's, terminates.
    """
    for executor in list(_live):
        if executor._terminate_at_exit:
            executor.terminate()
        else:
            executor.shutdown(wait=True)


getattr(threading, "_register_atexit", atexit.register)(_finish_at_exit)
if hasattr(os, "register_at_fork"):
    # A forked worker inherits the set (and maybe a lock held mid-submit): it must not touch them at its exit.
    os.register_at_fork(after_in_child=_live.clear)


class _Star:
    """Calls ``fn(*args, **kwargs)`` from one ``(args, kwargs)`` item; picklable if ``fn`` is."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, call: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        return self.fn(*call[0], **call[1])

    def __getstate__(self) -> Callable[..., Any]:
        return self.fn

    def __setstate__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn


class _AsyncStar(_Star):
    __slots__ = ()

    async def __call__(self, call: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        return await self.fn(*call[0], **call[1])


class _Chunk:
    """Runs ``fn`` over a chunk of argument tuples (``Executor.map`` with ``chunksize``)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        return [self.fn(*args) for args in chunk]

    def __getstate__(self) -> Callable[..., Any]:
        return self.fn

    def __setstate__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn


class _AsyncChunk(_Chunk):
    """``_Chunk`` for a coroutine function: awaited in the async gear, not returned unawaited."""

    __slots__ = ()

    async def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:  # type: ignore[override]
        return [await self.fn(*args) for args in chunk]


def chunk_runner(fn: Callable[..., Any]) -> _Chunk:
    """The chunk wrapper for ``fn``, async when ``fn`` is."""
    return _AsyncChunk(fn) if is_async_callable(fn) else _Chunk(fn)


def _chunks(chunksize: int, iterables: tuple[Iterable[Any], ...]) -> Iterator[list[tuple[Any, ...]]]:
    it = zip(*iterables, strict=False)
    while chunk := list(itertools.islice(it, chunksize)):
        yield chunk


class Executor(_StdExecutor):
    """A ``concurrent.futures.Executor`` whose work runs in a gearshift gear.

    >>> with gs.Executor(gear="process", workers=4) as ex:
    ...     ex.submit(pow, 2, 10).result()
    1024

    ``timeout`` and ``retries`` apply to every call; ``initializer(*initargs)`` runs once
    per worker; ``max_tasks_per_worker`` recycles process workers.
    """

    def __init__(
        self,
        gear: str | Gear = "process",
        workers: int | None = None,
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        retries: int | Retry | None = 0,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
    ) -> None:
        if workers is not None and concurrency is not None and workers != concurrency:
            raise ValueError("workers and concurrency are the same setting; give one of them")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if gear == "auto":
            raise ValueError(
                "gs.Executor needs a fixed gear: its workers serve calls of any function for the whole scope, "
                "so there is no one workload to measure; choose one with gs.advise(fn, sample).gear, "
                "or use gs.map(fn, items) (gear='auto' by default)"
            )
        self._gear = make_gear(gear, workers if workers is not None else concurrency)
        self._spec = RunSpec(timeout, initializer, tuple(initargs), max_tasks_per_worker)
        self._retry = as_retry(retries)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shutdown = False
        self._kill = False
        self._thread: threading.Thread | None = None
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._wrappers: dict[int, _Star] = {}
        self._ids = itertools.count()
        self._terminate_at_exit = False

    @property
    def gear(self) -> Gear:
        return self._gear

    @property
    def workers(self) -> int:
        return self._gear.workers

    def _wrap(self, fn: Callable[..., Any]) -> _Star:
        """One wrapper per function, so a process gear pickles each function once."""
        wrapper = self._wrappers.get(id(fn))
        if wrapper is None or wrapper.fn is not fn:
            wrapper = (_AsyncStar if is_async_callable(fn) else _Star)(fn)
            self._gear.check(wrapper)
            self._wrappers[id(fn)] = wrapper
        return wrapper

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._open_error is not None:
                raise RuntimeError(f"executor failed to start: {self._open_error!r}") from self._open_error
            wrapper = self._wrap(fn)
            future: Future[Any] = Future()
            self._inbox.put((future, wrapper, (args, kwargs)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._drive, name="gearshift-executor", daemon=True)
                self._thread.start()
                _live.add(self)
                self._opened.wait()
            else:
                self._gear.wake()
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """Like ``Executor.map``; ``chunksize > 1`` sends argument tuples in chunks."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout, **kwargs)
        chunked = super().map(chunk_runner(fn), _chunks(chunksize, iterables), timeout=timeout, **kwargs)
        return itertools.chain.from_iterable(chunked)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            thread = self._thread
            if thread is None:
                return
            self._inbox.put((_STOP, cancel_futures))
            self._gear.wake()
        if wait:
            try:
                while thread.is_alive():
                    thread.join(0.1)  # in slices: the main thread keeps receiving signals
            except BaseException:
                self._terminate_at_exit = True  # interrupted (Ctrl-C): exit must not wait again
                raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Leaving on Ctrl-C/SystemExit: the caller wants out now, not when the running calls
            # end (they may never): cancel, set thread tokens, stop workers, within a grace period.
            self._terminate_at_exit = True
            self.terminate()
            return None
        return super().__exit__(exc_type, exc, tb)

    def terminate(self) -> None:
        """Stop now: cancel pending futures, kill workers; running futures fail."""
        self._kill = True
        self.shutdown(wait=True, cancel_futures=True)

    # -- the driver thread ----------------------------------------------------------------
    def _drive(self) -> None:
        gear = self._gear
        try:
            gear.open(self._spec)
        except BaseException as exc:
            self._open_error = exc
            self._opened.set()
            self._fail_all(exc)
            return
        self._opened.set()
        pending: deque[tuple[Future[Any], Batch]] = deque()
        running: dict[int, tuple[Future[Any], Batch]] = {}
        retries: list[tuple[float, int, Future[Any], Batch]] = []
        stopping = False
        cancel = False
        # Loop locals, cleared before idling so a finished call's arguments and result can be
        # freed (as CPython's executors do: a large argument must not live on until the next call).
        msg: Any = None
        future: Any = None
        wrapper: Any = None
        call: Any = None
        batch: Any = None
        outcome: Any = None
        try:
            while True:
                # Take new submissions (block only when there is nothing else to wait for).
                block = not (running or pending or retries or stopping)
                if block:
                    msg = future = wrapper = call = batch = outcome = None
                while True:
                    try:
                        msg = self._inbox.get(timeout=0.25) if block else self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    block = False
                    if msg[0] is _STOP:
                        stopping = True
                        if msg[1]:
                            cancel = self._kill
                            while pending:
                                pending.popleft()[0].cancel()
                            self._cancel_inbox()
                        continue
                    future, wrapper, call = msg
                    pending.append((future, Batch(wrapper, [Task(next(self._ids), call)])))
                if cancel:
                    break
                now = time.monotonic()
                while retries and retries[0][0] <= now:
                    _, _, future, batch = heapq.heappop(retries)
                    running[batch.tasks[0].index] = (future, batch)
                    gear.submit(batch)
                while pending and len(running) < gear.max_inflight():
                    future, batch = pending.popleft()
                    if future.set_running_or_notify_cancel():
                        running[batch.tasks[0].index] = (future, batch)
                        gear.submit(batch)
                if stopping and not (running or pending or retries):
                    break
                if not running:
                    continue
                wait = 0.25 if not retries else max(0.0, min(0.25, retries[0][0] - now))
                for outcome in expand(gear.collect(wait)):
                    self._settle(outcome, running, retries)
        except BaseException as exc:
            cancel = True
            self._fail((f for f, _ in running.values()), exc)
            for future, _ in pending:
                future.cancel()
        finally:
            gear.close(cancel=cancel)
            if cancel:
                self._fail((f for f, _ in running.values()), RuntimeError("executor terminated"))
                self._fail((f for _, _, f, _ in retries), RuntimeError("executor terminated"))

    def _settle(self, outcome: Outcome, running: dict[int, tuple[Future[Any], Batch]], retries: list[Any]) -> None:
        task = outcome.task
        future, batch = running.pop(task.index)
        if outcome.ok:
            future.set_result(outcome.value)
            return
        exc = outcome.value
        if self._retry is not None and self._retry.should_retry(exc, task.attempt):
            again = Batch(batch.fn, [Task(task.index, task.item, task.attempt + 1)])
            at = time.monotonic() + self._retry.delay(task.attempt)
            heapq.heappush(retries, (at, task.index, future, again))
            return
        future.set_exception(exc)

    def _cancel_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] is not _STOP:
                msg[0].cancel()

    def _fail_all(self, exc: BaseException) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] is not _STOP and msg[0].set_running_or_notify_cancel():
                msg[0].set_exception(exc)

    @staticmethod
    def _fail(futures: Iterable[Future[Any]], exc: BaseException) -> None:
        for future in list(futures):
            if not future.done():
                future.set_exception(exc)

    def __repr__(self) -> str:
        return f"<gearshift.Executor {self._gear.describe()}{' shut down' if self._shutdown else ''}>"

