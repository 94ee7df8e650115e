"""``gs.Pool``: ``multiprocessing.Pool``'s API over any gear, one line to switch.

``multiprocessing.Pool(4)`` becomes ``gs.Pool(4)``; ``gs.Pool(64, gear="thread")``
is a ``ThreadPool``. Built on ``gs.Executor``, so workers are reused across calls,
lambdas work in processes, and a crashed worker fails only its own task.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from multiprocessing.context import BaseContext
from multiprocessing.pool import RemoteTraceback as _MpRemoteTraceback  # type: ignore[attr-defined]
from typing import Any

from gearshift._feed import Stream
from gearshift._gears import Gear, ProcessGear
from gearshift._retry import Retry
from gearshift.errors import Failure, RemoteTraceback
from gearshift.executor import Executor, Policy, Results, _Buffer, _Core, _Each, _Escaped, _Spread

__all__ = ["AsyncResult", "Pool", "ThreadPool"]


class AsyncResult:
    """``multiprocessing.pool.AsyncResult`` over a future."""

    def __init__(
        self,
        future: Future[Any],
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._future = future
        if callback is not None or error_callback is not None:
            future.add_done_callback(lambda f: self._call_back(f, callback, error_callback))

    def _value(self) -> Any:
        return self._future.result()

    def _call_back(
        self,
        future: Future[Any],
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            if callback is not None:
                callback(self._value())
        elif error_callback is not None:
            error_callback(exc)

    def get(self, timeout: float | None = None) -> Any:
        """The result; ``multiprocessing.TimeoutError`` if not ready within ``timeout`` (a call's
        own ``TimeoutError``, a ``gs.TaskTimeout`` included, is raised as itself)."""
        if not wait([self._future], timeout).done:
            raise multiprocessing.TimeoutError
        return self._value()

    def wait(self, timeout: float | None = None) -> None:
        wait([self._future], timeout)

    def ready(self) -> bool:
        return self._future.done()

    def successful(self) -> bool:
        if not self._future.done():
            raise ValueError(f"{self!r} not ready")
        return not self._future.cancelled() and self._future.exception() is None


#: Fewest items ``imap`` may have read and not yet handed to its consumer.
IMAP_AHEAD = 64


class _ListSink:
    """``map_async``'s results: a list in input order, or the first failure, on one future."""

    def __init__(self, core: _Core, n: int, future: Future[Any]) -> None:
        self.core = core
        self.values: list[Any] = [None] * n
        self.left = n
        self.future = future

    def deliver(self, pos: int, values: list[Any]) -> None:
        for value in values:
            if isinstance(value, Failure):
                exc = value.exception
                self.core.complete(self.future, Future.set_exception, exc.exc if isinstance(exc, _Escaped) else exc)
                return
        self.values[pos : pos + len(values)] = values
        self.left -= len(values)
        if self.left == 0:
            self.core.complete(self.future, Future.set_result, self.values)

    def end(self, count: int, error: BaseException | None) -> None:
        if not self.values:
            self.core.complete(self.future, Future.set_result, [])

    def abandon(self, exc: BaseException) -> None:
        self.core.complete(self.future, Future.set_exception, exc)


class _PoolPolicy(Policy):
    """``multiprocessing.Pool``'s rules: a worker's traceback is the ``__cause__`` as a
    ``multiprocessing.pool.RemoteTraceback``."""

    def as_raised(self, exc: BaseException) -> BaseException:
        cause = exc.__cause__
        if isinstance(cause, RemoteTraceback):
            exc.__cause__ = _MpRemoteTraceback(cause.tb)
        return exc


class _PoolExecutor(Executor):
    def _policy(self) -> Policy:
        return _PoolPolicy()


class Pool:
    """A drop-in for ``multiprocessing.Pool`` whose workers run in any gear.

    The first arguments are ``multiprocessing.Pool``'s: ``processes`` (alias ``workers``,
    default: the gear's default), ``initializer``, ``initargs``, ``maxtasksperchild`` (recycles
    process workers), ``context`` (a multiprocessing context for the process gear). The
    context manager terminates on exit, as Pool's does. gearshift's extras are keyword-only:
    ``gear`` ("thread" makes it a ``ThreadPool``), ``retries``, ``task_timeout`` (seconds per
    call, counted from its start) and ``rate`` (calls per second, e.g. "50/s"), which apply
    to every call, whichever method made it; ``get(timeout)`` keeps the stdlib's meaning.
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        maxtasksperchild: int | None = None,
        context: BaseContext | None = None,
        *,
        gear: str | Gear = "process",
        workers: int | None = None,
        retries: int | Retry | None = 0,
        task_timeout: float | None = None,
        rate: str | float | None = None,
    ) -> None:
        count = processes if processes is not None else workers
        if processes is not None and workers is not None and processes != workers:
            raise ValueError("processes and workers are the same setting; give one of them")
        if count is not None and count < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if count is None and isinstance(gear, str) and gear == "thread":
            count = os.cpu_count() or 1  # a fixed pool, as multiprocessing.pool.ThreadPool's (not adaptive)
        chosen: str | Gear = gear
        if context is not None:
            if gear != "process":
                raise ValueError(f"context= is for the process gear, not gear={gear!r}")
            chosen = ProcessGear(count, mp_context=context)
            count = None
        self._executor = _PoolExecutor(
            chosen,
            count,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=maxtasksperchild,
            retries=retries,
            timeout=task_timeout,
            rate=rate,
        )
        self._executor._core.terminate_at_exit = True  # as multiprocessing.Pool's finalizer does
        self._state = "RUN"
        self._executor._core.start()  # workers from the start, as multiprocessing.Pool's
        self._executor.gear.prestart(self.workers)

    @property
    def _pool(self) -> list[Any]:
        """The worker processes (or threads) now, as ``multiprocessing.Pool._pool`` (CPython's tests count them)."""
        gear = self._executor.gear
        if isinstance(gear, ProcessGear):
            return [proc.process for proc in list(gear._procs.values()) if not proc.leaving]
        return list(getattr(gear, "_threads", []))

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_state", None) == "RUN":
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    @property
    def workers(self) -> int:
        return self._executor.workers

    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def _chunksize(self, n: int, chunksize: int | None) -> int:
        if chunksize is not None:
            if chunksize < 1:
                raise ValueError(f"chunksize must be >= 1, got {chunksize}")
            return chunksize
        size, extra = divmod(n, self.workers * 4)
        return size + 1 if extra else max(1, size)

    # -- one call -------------------------------------------------------------------------
    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult:
        self._check_running()
        future = self._executor.submit(func, *args, **(kwds or {}))
        return AsyncResult(future, callback, error_callback)

    # -- many calls -----------------------------------------------------------------------
    def _stream(
        self, func: Callable[..., Any], items: Iterable[Any], sink: Any, chunksize: int | None, star: bool,
        lazy: bool = False,
        limit: int | None = None,
    ) -> Stream:
        """Queue one stream of calls on the pool's engine run."""
        self._check_running()
        core = self._executor._core
        stream = Stream(core.wrap(func, _Spread if star else _Each), items, sink, chunk=chunksize, lazy=lazy,
                        drop_partial=lazy)
        stream.limit = limit
        core.put(stream)
        return stream

    def _map_async(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None, star: bool,
        callback: Callable[[Any], object] | None, error_callback: Callable[[BaseException], object] | None,
    ) -> AsyncResult:
        self._check_running()
        items = iterable if isinstance(iterable, list) else list(iterable)
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        result = AsyncResult(future, callback, error_callback)
        if not items:  # nothing to run: ready now, even while the workers are busy (as the stdlib's)
            future.set_result([])
            return result
        self._stream(func, items, _ListSink(self._executor._core, len(items), future),
                     self._chunksize(len(items), chunksize), star)
        return result

    def map(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None) -> list[Any]:
        return self.map_async(func, iterable, chunksize).get()  # type: ignore[no-any-return]

    def starmap(
        self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]], chunksize: int | None = None
    ) -> list[Any]:
        return self.starmap_async(func, iterable, chunksize).get()  # type: ignore[no-any-return]

    def map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult:
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult:
        return self._map_async(func, iterable, chunksize, True, callback, error_callback)

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1) -> Results:
        """Results in order, lazily: the input is read ahead only as far as the engine's window."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1) -> Results:
        """Results as they complete, lazily."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int, ordered: bool) -> Results:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        buffer = _Buffer(ordered)
        # Bounded read-ahead: the iterable is read only this far past what the caller consumed.
        limit = max(IMAP_AHEAD, 4 * self.workers * chunksize)
        stream = self._stream(func, iterable, buffer, chunksize, star=False, lazy=True, limit=limit)
        return Results(self._executor._core, buffer, stream, goes_on=True)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """No more work may be submitted; workers leave once the queued work is done."""
        if self._state == "RUN":
            self._state = "CLOSE"

    def join(self) -> None:
        """Wait for the workers to finish (after ``close`` or ``terminate``)."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        self._executor.shutdown(wait=True)

    def terminate(self) -> None:
        """Stop at once: pending work is dropped and the workers are killed."""
        self._state = "TERMINATE"
        self._executor.terminate()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<gearshift.Pool state={self._state} {self._executor.gear.describe()}>"


class ThreadPool(Pool):
    """``multiprocessing.pool.ThreadPool``: a ``gs.Pool`` whose workers are threads."""

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        retries: int | Retry | None = 0,
        task_timeout: float | None = None,
        rate: str | float | None = None,
    ) -> None:
        super().__init__(
            processes, initializer, initargs, gear="thread", retries=retries, task_timeout=task_timeout, rate=rate
        )
