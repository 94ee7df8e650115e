"""``gs.Pool``: ``multiprocessing.Pool``'s API over any gear, one line to switch.

``multiprocessing.Pool(4)`` becomes ``gs.Pool(4)``; ``gs.Pool(64, gear="thread")``
is a ``ThreadPool``. Built on ``gs.Executor``, so workers are reused across calls,
lambdas work in processes, and a crashed worker fails only its own task.
"""

from __future__ import annotations

import itertools
import multiprocessing
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

from gearshift._gears import Gear
from gearshift.executor import Executor, chunk_runner

__all__ = ["AsyncResult", "Pool"]


class AsyncResult:
    """``multiprocessing.pool.AsyncResult`` over a future."""

    def __init__(
        self,
        future: Future[Any],
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        flatten: bool = False,
    ) -> None:
        self._future = future
        self._flatten = flatten
        if callback is not None or error_callback is not None:
            future.add_done_callback(lambda f: self._call_back(f, callback, error_callback))

    def _value(self) -> Any:
        value = self._future.result()
        return list(itertools.chain.from_iterable(value)) if self._flatten else value

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
        try:
            self._future.result(timeout)
        except FuturesTimeout:
            raise multiprocessing.TimeoutError from None
        return self._value()

    def wait(self, timeout: float | None = None) -> None:
        wait([self._future], timeout)

    def ready(self) -> bool:
        return self._future.done()

    def successful(self) -> bool:
        if not self._future.done():
            raise ValueError(f"{self!r} not ready")
        return not self._future.cancelled() and self._future.exception() is None


class _Gathered(Future[Any]):
    """One future for many (``map_async``): done when all are, failing with the first error."""

    def __init__(self, futures: list[Future[Any]]) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        self._futures = futures
        self._left = len(futures)
        if not futures:
            self.set_result([])
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, future: Future[Any]) -> None:
        with self._condition:
            if self.done():
                return
            self._left -= 1
            left = self._left
        if future.cancelled() or future.exception() is not None:
            try:
                self.set_exception(future.exception() if not future.cancelled() else RuntimeError("cancelled"))
            except Exception:
                pass
        elif left == 0:
            self.set_result([f.result() for f in self._futures])


def _cancel_all(inflight: deque[Future[Any]]) -> None:
    for future in inflight:
        future.cancel()


class _IMapIterator(Iterator[Any]):
    """``Pool.imap``'s results: lazily, at most ``window`` chunks in flight.

    As multiprocessing's, it goes on after an error: ``next()`` raises the failed chunk's
    error once, and the next call returns the following results. Chunks still in flight
    when it is dropped are cancelled.
    """

    def __init__(
        self, executor: Executor, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int, window: int,
        ordered: bool,
    ) -> None:
        self._executor = executor
        self._runner = chunk_runner(func)
        self._args = ((item,) for item in iterable)
        self._chunksize = chunksize
        self._window = window
        self._ordered = ordered
        self._inflight: deque[Future[Any]] = deque()
        self._ready: deque[Any] = deque()
        self._finalizer = weakref.finalize(self, _cancel_all, self._inflight)

    def __next__(self) -> Any:
        while not self._ready:
            self._fill()
            if not self._inflight:
                self._finalizer()
                raise StopIteration
            self._ready.extend(self._take().result())  # a failed chunk raises here, and is gone
        return self._ready.popleft()

    def _fill(self) -> None:
        while len(self._inflight) < self._window and (chunk := list(itertools.islice(self._args, self._chunksize))):
            self._inflight.append(self._executor.submit(self._runner, chunk))

    def _take(self) -> Future[Any]:
        if self._ordered:
            return self._inflight.popleft()
        done, _ = wait(self._inflight, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        self._inflight.remove(future)
        return future


class Pool:
    """A drop-in for ``multiprocessing.Pool`` whose workers run in any gear.

    ``workers`` (alias ``processes``) defaults to the gear's default; ``maxtasksperchild``
    recycles process workers. The context manager terminates on exit, as Pool's does.
    """

    def __init__(
        self,
        workers: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        maxtasksperchild: int | None = None,
        *,
        gear: str | Gear = "process",
        processes: int | None = None,
    ) -> None:
        self._executor = Executor(
            gear,
            workers if workers is not None else processes,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=maxtasksperchild,
        )
        self._executor._core.terminate_at_exit = True  # as multiprocessing.Pool's finalizer does
        self._state = "RUN"

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
    def _submit_chunks(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None, star: bool
    ) -> list[Future[Any]]:
        self._check_running()
        calls = [tuple(args) if star else (args,) for args in iterable]
        size = self._chunksize(len(calls), chunksize)
        runner = chunk_runner(func)
        return [self._executor.submit(runner, calls[i : i + size]) for i in range(0, len(calls), size)]

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
        futures = self._submit_chunks(func, iterable, chunksize, star=False)
        return AsyncResult(_Gathered(futures), callback, error_callback, flatten=True)

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult:
        futures = self._submit_chunks(func, iterable, chunksize, star=True)
        return AsyncResult(_Gathered(futures), callback, error_callback, flatten=True)

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Results in order, lazily; at most a few chunks per worker are in flight."""
        self._check_running()
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Results as they complete, lazily."""
        self._check_running()
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int, ordered: bool) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        return _IMapIterator(self._executor, func, iterable, chunksize, 4 * self.workers, ordered)

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
