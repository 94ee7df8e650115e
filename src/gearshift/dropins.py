"""``gs.ThreadPoolExecutor`` and ``gs.ProcessPoolExecutor``: the standard library's, one import away.

They take exactly the running interpreter's signatures, defaults, error messages and
semantics, so ``from concurrent.futures import ProcessPoolExecutor`` becomes
``from gearshift import ProcessPoolExecutor`` and nothing else changes. Where the
standard library defines a behaviour it wins over ``gs.Executor``'s:

* a worker process that dies breaks the pool: the future of the call that crashed and
  every pending one fail with ``BrokenProcessPool``, and so does every later ``submit``
  (``gs.Executor`` fails only the crashed call, with ``gs.WorkerCrashed``, which stays
  reachable as the ``BrokenProcessPool``'s ``__cause__``);
* an initializer that raises breaks the pool with ``BrokenThreadPool`` /
  ``BrokenProcessPool`` (``gs.Executor``: ``gs.BrokenExecutor``);
* ``map(timeout=)`` is a deadline for the whole map; ``result(timeout=0)`` polls;
* an argument that cannot be pickled fails its future instead of raising at ``submit``.

gearshift's own extras are keyword-only, under their own names: ``task_timeout=`` (seconds
each call may run; a runaway process is killed and replaced, a thread gets its cancel
token) and ``retries=``. Done-callbacks run on the executor's callback thread.
"""

from __future__ import annotations

import concurrent.futures as _cf
import multiprocessing as mp
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, PENDING
from concurrent.futures.process import BrokenProcessPool
from concurrent.futures.process import _RemoteTraceback as _StdRemoteTraceback
from concurrent.futures.thread import BrokenThreadPool
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, ClassVar

from gearshift._gears.process import ProcessGear
from gearshift._gears.thread import ThreadGear
from gearshift._retry import Retry
from gearshift.errors import RemoteTraceback, UnpicklableError, WorkerCrashed
from gearshift.executor import BrokenExecutor, Executor

__all__ = ["ProcessPoolExecutor", "ThreadPoolExecutor"]

#: Windows' limit on the handles ``WaitForMultipleObjects`` watches (as in concurrent.futures.process).
_MAX_WINDOWS_WORKERS = 63 - 2


def _cpu_count() -> int:
    """The stdlib's count: ``os.process_cpu_count()`` from 3.13, ``os.cpu_count()`` before."""
    counter = getattr(os, "process_cpu_count", os.cpu_count)
    return int(counter() or 1)


class _Linked(Future[Any]):
    """The future the caller gets: mirrors the gearshift executor's own future (``inner``).

    A layer of its own so the drop-in decides how a call ends (a crash breaks the pool)
    before anyone sees the outcome. ``cancel`` and ``running`` ask the inner future, which
    the worker marks RUNNING as it starts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inner: Future[Any] | None = None

    def cancel(self) -> bool:
        inner = self.inner
        if inner is not None and not inner.cancel():
            return False
        return super().cancel()

    def running(self) -> bool:
        inner = self.inner
        with self._condition:
            if self._state != PENDING:
                return super().running()
        return inner is not None and inner.running()

    def cancelled_now(self) -> None:
        """Cancelled and notified at once: ``wait``/``as_completed`` see it without delay."""
        with self._condition:
            if self._state == PENDING:
                Future.cancel(self)
            if self._state == CANCELLED:
                self.set_running_or_notify_cancel()


def _settle_quietly(future: Future[Any], how: Callable[[Future[Any], Any], None], value: Any) -> None:
    try:
        how(future, value)
    except _cf.InvalidStateError:
        pass  # already failed: the pool broke first


class _RunChunk:
    """Calls ``fn`` on each argument tuple of a chunk (``ProcessPoolExecutor.map(chunksize=)``)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        return [self.fn(*args) for args in chunk]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_RunChunk, (self.fn,))


def _chunked(iterables: tuple[Iterable[Any], ...], size: int) -> Iterator[list[tuple[Any, ...]]]:
    it = zip(*iterables, strict=False)
    while True:
        chunk = []
        for args in it:
            chunk.append(args)
            if len(chunk) == size:
                break
        if not chunk:
            return
        yield chunk


def _flatten(chunks: Iterator[list[Any]]) -> Iterator[Any]:
    """Yield each chunk's results, letting go of each one as it is yielded (as the stdlib does)."""
    for chunk in chunks:
        chunk.reverse()
        while chunk:
            yield chunk.pop()


class _DropIn(Executor):
    """What both drop-ins share: the linked futures, the broken state, stdlib ``map``."""

    #: The stdlib's exception for a broken pool of this kind.
    BROKEN: ClassVar[type[_cf.BrokenExecutor]]
    #: The message the stdlib gives when an initializer fails.
    INIT_FAILED: ClassVar[str]

    def _dropin_init(self) -> None:
        self._state_lock = threading.Lock()
        self._broken: str | None = None
        self._shutdown_called = False
        self._waiting: dict[int, _Linked] = {}
        self._breaker: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        outer = _Linked()
        with self._state_lock:
            if self._broken is not None:
                raise self.BROKEN(self._broken)
            if self._shutdown_called:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if sys.is_finalizing():
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            try:
                inner = super().submit(fn, *args, **kwargs)
            except BrokenExecutor as exc:
                self._broken = self._broken_message(exc)
                raise self.BROKEN(self._broken) from exc
            except UnpicklableError as exc:  # the stdlib fails the future, not the call
                outer.set_exception(exc)
                return outer
            outer.inner = inner
            self._waiting[id(outer)] = outer
        inner.add_done_callback(_Link(self, outer))
        return outer

    def _broken_message(self, exc: BaseException) -> str:
        return self.INIT_FAILED

    def _link_done(self, outer: _Linked, inner: Future[Any]) -> None:
        """The gearshift future is done: end the caller's the stdlib's way."""
        with self._state_lock:
            self._waiting.pop(id(outer), None)
        outer.inner = None
        if inner.cancelled():
            outer.cancelled_now()
            return
        exc = inner.exception()
        if exc is None:
            _settle_quietly(outer, Future.set_result, inner.result())
        elif isinstance(exc, BrokenExecutor | WorkerCrashed):
            self._break(exc, outer)
        else:
            _settle_quietly(outer, Future.set_exception, self._as_stdlib(exc))

    def _as_stdlib(self, exc: BaseException) -> BaseException:
        """A call's own exception, as the stdlib pool would raise it (the process pool adjusts it)."""
        return exc

    def _break(self, cause: BaseException, first: _Linked) -> None:
        """Fail the crashed call's future and every pending one; refuse later submits; stop."""
        with self._state_lock:
            already = self._broken is not None
            if not already:
                self._broken = self._broken_message(cause)
            message = self._broken
            assert message is not None
            waiting = [first, *self._waiting.values()]
            self._waiting.clear()
        for future in waiting:
            error = self.BROKEN(message)
            error.__cause__ = cause
            future.inner = None
            _settle_quietly(future, Future.set_exception, error)
        if not already:
            # Not from this thread: terminate() waits for the thread that runs this callback.
            self._breaker = threading.Thread(target=Executor.terminate, args=(self,), name="gearshift-dropin-break")
            self._breaker.start()

    if sys.version_info >= (3, 14):

        def map(  # type: ignore[override]
            self,
            fn: Callable[..., Any],
            *iterables: Iterable[Any],
            timeout: float | None = None,
            chunksize: int = 1,
            buffersize: int | None = None,
        ) -> Iterator[Any]:
            """The stdlib's ``map``: calls submitted now (``buffersize`` ahead); ``timeout``: a deadline for all."""
            return self._map(fn, iterables, timeout, chunksize, {"buffersize": buffersize})

    else:

        def map(  # type: ignore[override]
            self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
        ) -> Iterator[Any]:
            """The stdlib's ``map``: every call submitted now; ``timeout``: a deadline for them all."""
            return self._map(fn, iterables, timeout, chunksize, {})

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        extra: dict[str, Any],
    ) -> Iterator[Any]:
        return _cf.Executor.map(self, fn, *iterables, timeout=timeout, **extra)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._state_lock:
            self._shutdown_called = True
            waiting = list(self._waiting.values()) if cancel_futures else []
        for future in waiting:
            future.cancel()
        super().shutdown(wait, cancel_futures=cancel_futures)
        breaker = self._breaker
        if wait and breaker is not None:
            breaker.join()

    def terminate(self) -> None:
        with self._state_lock:
            self._shutdown_called = True
        super().terminate()
        if self._breaker is not None:
            self._breaker.join()


class _Link:
    """The done-callback joining a gearshift future to the caller's; holds the executor weakly,
    so a dropped executor's finalizer still runs while calls are in flight."""

    __slots__ = ("executor", "outer")

    def __init__(self, executor: _DropIn, outer: _Linked) -> None:
        self.executor = weakref.ref(executor)
        self.outer = outer

    def __call__(self, inner: Future[Any]) -> None:
        executor = self.executor()
        outer, self.outer = self.outer, None  # type: ignore[assignment]
        if executor is not None:
            executor._link_done(outer, inner)
        elif inner.cancelled():
            outer.cancelled_now()
        elif inner.exception() is not None:
            _settle_quietly(outer, Future.set_exception, inner.exception())
        else:
            _settle_quietly(outer, Future.set_result, inner.result())


def _check_initializer(initializer: Callable[..., object] | None) -> None:
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")


class ThreadPoolExecutor(_DropIn):
    """``concurrent.futures.ThreadPoolExecutor`` over gearshift's thread gear.

    Same signature, defaults (``min(32, cpus + 4)`` threads, named
    ``ThreadPoolExecutor-N_k`` or ``{thread_name_prefix}_k``), errors and semantics; an
    initializer that raises breaks the pool with ``BrokenThreadPool``. Unlike
    ``gs.Executor('thread')``: a call's ``SystemExit`` fails its own future only (as
    both do), but a broken pool fails everything pending. Extras, keyword-only:
    ``task_timeout`` (a late call fails with ``gs.TaskTimeout`` and gets its cancel
    token; the thread cannot be killed) and ``retries``.
    """

    BROKEN = BrokenThreadPool
    INIT_FAILED = "A thread initializer failed, the thread pool is not usable anymore"
    _counter = iter(range(sys.maxsize))

    if sys.version_info >= (3, 14):

        def __init__(
            self,
            max_workers: int | None = None,
            thread_name_prefix: str = "",
            initializer: Callable[..., object] | None = None,
            initargs: tuple[Any, ...] = (),
            *,
            task_timeout: float | None = None,
            retries: int | Retry | None = 0,
            **ctxkwargs: Any,
        ) -> None:
            if ctxkwargs:
                raise TypeError(f"prepare_context() got an unexpected keyword argument {next(iter(ctxkwargs))!r}")
            self._setup(max_workers, thread_name_prefix, initializer, initargs, task_timeout, retries)

    else:

        def __init__(
            self,
            max_workers: int | None = None,
            thread_name_prefix: str = "",
            initializer: Callable[..., object] | None = None,
            initargs: tuple[Any, ...] = (),
            *,
            task_timeout: float | None = None,
            retries: int | Retry | None = 0,
        ) -> None:
            self._setup(max_workers, thread_name_prefix, initializer, initargs, task_timeout, retries)

    def _setup(
        self,
        max_workers: int | None,
        thread_name_prefix: str,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        task_timeout: float | None,
        retries: int | Retry | None,
    ) -> None:
        if max_workers is None:
            max_workers = min(32, _cpu_count() + 4)
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        _check_initializer(initializer)
        self._max_workers = max_workers
        self._thread_name_prefix = thread_name_prefix or f"ThreadPoolExecutor-{next(self._counter)}"
        gear = ThreadGear(max_workers, thread_name_prefix=self._thread_name_prefix)
        super().__init__(
            gear, timeout=task_timeout, retries=retries, initializer=initializer, initargs=tuple(initargs)
        )
        self._dropin_init()

    @property
    def _threads(self) -> set[threading.Thread]:
        """The worker threads (CPython's tests count them)."""
        gear = self.gear
        assert isinstance(gear, ThreadGear)
        return set(gear._threads)


class ProcessPoolExecutor(_DropIn):
    """``concurrent.futures.ProcessPoolExecutor`` over gearshift's process gear.

    Same signature, defaults (a worker per usable CPU; ``mp_context`` defaults to
    ``multiprocessing.get_context()``, or ``spawn`` with ``max_tasks_per_child``), errors
    and semantics: a worker that dies breaks the pool (``BrokenProcessPool``), as does an
    initializer that raises. Unlike ``gs.Executor('process')``, which fails only the
    crashed call (``gs.WorkerCrashed``, kept as the ``__cause__`` here). Workers start
    with the pool, in ``mp_context``; lambdas and closures work (cloudpickle). Extras,
    keyword-only: ``task_timeout`` (a late call's worker is killed and replaced, the call
    fails with ``gs.TaskTimeout``; the pool stays usable) and ``retries``.
    """

    BROKEN = BrokenProcessPool
    INIT_FAILED = "A child process terminated abruptly, the process pool is not usable anymore"
    CRASHED = (
        "A process in the process pool was terminated abruptly while the future was running or pending."
    )

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: BaseContext | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        retries: int | Retry | None = 0,
    ) -> None:
        if max_workers is None:
            max_workers = _cpu_count()
            if sys.platform == "win32":
                max_workers = min(_MAX_WINDOWS_WORKERS, max_workers)
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        elif sys.platform == "win32" and max_workers > _MAX_WINDOWS_WORKERS:
            raise ValueError(f"max_workers must be <= {_MAX_WINDOWS_WORKERS}")
        if mp_context is None:
            mp_context = mp.get_context("spawn") if max_tasks_per_child is not None else mp.get_context()
        _check_initializer(initializer)
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            if mp_context.get_start_method(allow_none=False) == "fork":
                raise ValueError(
                    "max_tasks_per_child is incompatible with the 'fork' multiprocessing start method; "
                    "supply a different mp_context."
                )
        self._max_workers = max_workers
        self._mp_context = mp_context
        self._max_tasks_per_child = max_tasks_per_child
        super().__init__(
            ProcessGear(max_workers, mp_context=mp_context),
            timeout=task_timeout,
            retries=retries,
            initializer=initializer,
            initargs=tuple(initargs),
            max_tasks_per_worker=max_tasks_per_child,
        )
        self._dropin_init()

    def _as_stdlib(self, exc: BaseException) -> BaseException:
        """The worker's traceback as the stdlib carries it: a ``_RemoteTraceback`` ``__cause__``."""
        cause = exc.__cause__
        if isinstance(cause, RemoteTraceback):
            exc.__cause__ = _StdRemoteTraceback(f'\n"""\n{cause.tb}"""')  # type: ignore[arg-type]  # (typeshed; it takes the text)
        return exc

    def _broken_message(self, exc: BaseException) -> str:
        return self.CRASHED if isinstance(exc, WorkerCrashed) else self.INIT_FAILED

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        extra: dict[str, Any],
    ) -> Iterator[Any]:
        """As the stdlib's: argument tuples travel ``chunksize`` at a time."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        chunks = _cf.Executor.map(self, _RunChunk(fn), _chunked(iterables, chunksize), timeout=timeout, **extra)
        return _flatten(chunks)

    @property
    def _processes(self) -> dict[int, BaseProcess]:
        """The worker processes by pid (CPython's tests count and kill them)."""
        gear = self.gear
        assert isinstance(gear, ProcessGear)
        procs = {}
        for proc in list(gear._procs.values()):
            if not proc.leaving and proc.process.pid is not None:
                procs[proc.process.pid] = proc.process
        return procs  # type: ignore[return-value]

    if sys.version_info >= (3, 14):

        def terminate_workers(self) -> None:
            """Stop every worker with SIGTERM now; pending futures are cancelled, running ones fail."""
            self.terminate()

        def kill_workers(self) -> None:
            """Stop every worker now (gearshift stops them the same way as ``terminate_workers``)."""
            self.terminate()
