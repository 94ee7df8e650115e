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

import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool as _StdBrokenProcessPool
from concurrent.futures.process import _RemoteTraceback as _StdRemoteTraceback
from concurrent.futures.thread import BrokenThreadPool as _StdBrokenThreadPool
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from gearshift._gears import Gear
from gearshift._gears.process import ProcessGear
from gearshift._gears.thread import ThreadGear
from gearshift._retry import Retry
from gearshift.errors import RemoteTraceback, UnpicklableError, WorkerCrashed
from gearshift.executor import BrokenExecutor, Executor, Policy

__all__ = ["BrokenProcessPool", "BrokenThreadPool", "ProcessPoolExecutor", "ThreadPoolExecutor"]

#: Windows' limit on the handles ``WaitForMultipleObjects`` watches (as in concurrent.futures.process).
_MAX_WINDOWS_WORKERS = 63 - 2


def _cpu_count() -> int:
    """The stdlib's count: ``os.process_cpu_count()`` from 3.13, ``os.cpu_count()`` before."""
    counter = getattr(os, "process_cpu_count", os.cpu_count)
    return int(counter() or 1)


class BrokenThreadPool(BrokenExecutor, _StdBrokenThreadPool):
    """A ``gs.ThreadPoolExecutor`` whose initializer failed: both ``concurrent.futures.thread.
    BrokenThreadPool`` and ``gs.BrokenExecutor``."""


class BrokenProcessPool(BrokenExecutor, _StdBrokenProcessPool):
    """A ``gs.ProcessPoolExecutor`` whose worker died or whose initializer failed: both
    ``concurrent.futures.process.BrokenProcessPool`` and ``gs.BrokenExecutor``."""


class _Stdlib(Policy):
    """The standard library's rules, where they differ from ``gs.Executor``'s."""

    def __init__(self, broken: type[BrokenExecutor], init_failed: str, crashed: str | None = None) -> None:
        self._broken = broken
        self._init_failed = init_failed
        self._crashed = crashed
        self.death_breaks = crashed is not None

    def breaks_on(self, exc: BaseException) -> bool:
        return self.death_breaks and isinstance(exc, WorkerCrashed)

    def broken(self, gear: Gear, exc: BaseException) -> BrokenExecutor:
        crashed = self._crashed is not None and isinstance(exc, WorkerCrashed)
        return self._broken(self._crashed if crashed else self._init_failed)

    def as_raised(self, exc: BaseException) -> BaseException:
        """The worker's traceback as the stdlib carries it: a ``_RemoteTraceback`` ``__cause__``."""
        cause = exc.__cause__
        if self._crashed is not None and isinstance(cause, RemoteTraceback):
            exc.__cause__ = _StdRemoteTraceback(f'\n"""\n{cause.tb}"""')  # type: ignore[arg-type]  # (it takes the text)
        return exc


class _DropIn(Executor):
    """What both drop-ins share: stdlib ``submit`` details and ``map``'s per-version signature."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if sys.is_finalizing():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        try:
            return super().submit(fn, *args, **kwargs)
        except UnpicklableError as exc:  # the stdlib fails the future, not the call
            self._core.start()  # and has its workers up all the same
            future: Future[Any] = Future()
            future.set_exception(exc)
            return future

    if sys.version_info >= (3, 14):

        def map(  # type: ignore[override]
            self,
            fn: Callable[..., Any],
            *iterables: Iterable[Any],
            timeout: float | None = None,
            chunksize: int = 1,
            buffersize: int | None = None,
        ) -> Iterator[Any]:
            """The stdlib's ``map``: calls queued now (``buffersize`` ahead); ``timeout``: a deadline for all."""
            return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize, buffersize=buffersize)

    else:

        def map(  # type: ignore[override]
            self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
        ) -> Iterator[Any]:
            """The stdlib's ``map``: every call queued now; ``timeout``: a deadline for them all."""
            return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)


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

    def _policy(self) -> Policy:
        return _Stdlib(BrokenThreadPool, "A thread initializer failed, the thread pool is not usable anymore")

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

    def _policy(self) -> Policy:
        return _Stdlib(
            BrokenProcessPool,
            "A child process terminated abruptly, the process pool is not usable anymore",
            "A process in the process pool was terminated abruptly while the future was running or pending.",
        )

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
