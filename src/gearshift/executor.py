"""``gs.Executor``: a ``concurrent.futures.Executor`` over any gear.

Code written for ``ThreadPoolExecutor`` or ``ProcessPoolExecutor`` switches unchanged,
and gains what the stdlib pools lack: a dead worker fails only its own future
(``gs.WorkerCrashed``) instead of breaking the pool, per-call timeouts that really stop
the call, retries, lambdas in processes, and workers reused across ``map`` calls.

One driver thread ("gearshift-executor") moves work between the caller's futures and the
gear. Futures stay PENDING, so cancellable, until a worker starts them (thread, async and
serial gears) or, in the process gear, until the gear has room for them (as in
``ProcessPoolExecutor``). Done-callbacks never run on the driver: a future that has
callbacks is completed on a second thread ("gearshift-executor-callbacks"), so a callback
that submits and waits cannot stall the executor. A call raising ``SystemExit`` fails its
own future, as in the stdlib; if the workers cannot run at all (an initializer raised),
pending and later futures fail with ``gs.BrokenExecutor``.
"""

from __future__ import annotations

import atexit
import concurrent.futures as _cf
import heapq
import itertools
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from types import MethodType, TracebackType
from typing import Any

from gearshift._gears import Gear, make_gear
from gearshift._gears.aio import is_async_callable
from gearshift._retry import Retry, as_retry
from gearshift._task import Batch, Outcome, RunSpec, Task, expand
from gearshift.errors import GearshiftError

__all__ = ["BrokenExecutor", "Executor"]

_STOP = object()
#: What a call returns when its future was cancelled before a worker started it.
_CANCELLED = object()
#: Functions whose wrappers are kept for reuse (a process gear pickles a kept one once). Bounded:
#: a finished call's function (a bound method's object) must not live as long as the executor.
WRAPPER_CACHE = 16


class BrokenExecutor(GearshiftError, _cf.BrokenExecutor):
    """The executor's workers cannot run at all (an initializer raised, the gear failed).

    Pending and later futures fail with it and ``submit`` raises it, as with the stdlib's
    ``BrokenThreadPool``/``BrokenProcessPool``; its ``__cause__`` is what broke it.
    """


#: Executors with a running driver: at interpreter exit their submitted work still runs.
_live: weakref.WeakSet[_Core] = weakref.WeakSet()


def _finish_at_exit() -> None:
    """As the stdlib executors do, work submitted before exit is done, not dropped.

    Registered with ``threading._register_atexit`` (as concurrent.futures does), so it runs
    before the interpreter stops its threads; ``gs.Pool``, like multiprocessing's, terminates.
    """
    for core in list(_live):
        if core.terminate_at_exit:
            core.stop(wait=True, cancel=True, kill=True)
        else:
            core.stop(wait=True)


getattr(threading, "_register_atexit", atexit.register)(_finish_at_exit)
if hasattr(os, "register_at_fork"):
    # A forked worker inherits the set (and maybe a lock held mid-submit): it must not touch them at its exit.
    os.register_at_fork(after_in_child=_live.clear)


class _Escaped(Exception):
    """Carries a call's ``SystemExit``/``KeyboardInterrupt`` out of the gear, which would take it
    for "stop everything": as in the stdlib executors, it fails that call's future only."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


#: One submitted call: arguments, keywords, and the future when the worker is in this process
#: (it marks the future RUNNING as it starts, or skips the call if it was cancelled).
Call = tuple[tuple[Any, ...], dict[str, Any], "Future[Any] | None"]


class _Star:
    """Calls ``fn(*args, **kwargs)`` from one ``Call`` item; picklable if ``fn`` is."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, call: Call) -> Any:
        args, kwargs, future = call
        if future is not None and not future.set_running_or_notify_cancel():
            return _CANCELLED
        try:
            return self.fn(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt) as exc:
            raise _Escaped(exc) from None

    def __getstate__(self) -> Callable[..., Any]:
        return self.fn

    def __setstate__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn


class _AsyncStar(_Star):
    __slots__ = ()

    async def __call__(self, call: Call) -> Any:
        args, kwargs, future = call
        if future is not None and not future.set_running_or_notify_cancel():
            return _CANCELLED
        try:
            return await self.fn(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt) as exc:
            raise _Escaped(exc) from None


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


def _wrapper_key(fn: Callable[..., Any]) -> Any:
    """Cache key: a bound method by its object and function (``obj.m`` is a new object each time)."""
    if isinstance(fn, MethodType):
        return (id(fn.__self__), id(fn.__func__))
    return id(fn)


def _same_callable(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    if a is b:
        return True
    if not (isinstance(a, MethodType) and isinstance(b, MethodType)):
        return False
    return a.__self__ is b.__self__ and a.__func__ is b.__func__


def _count(**aliases: int | None) -> int | None:
    """The one worker count given under any of its names."""
    given = {name: value for name, value in aliases.items() if value is not None}
    if len(set(given.values())) > 1:
        raise ValueError(f"{' and '.join(given)} are the same setting (the number of workers); give one of them")
    return next(iter(given.values()), None)


def _run_callbacks(todo: queue.SimpleQueue[Any]) -> None:
    """The callback thread: completes futures that have done-callbacks, which run here."""
    while (job := todo.get()) is not None:
        future, complete, value = job
        try:
            complete(future, value)
        except _cf.InvalidStateError:
            pass  # completed meanwhile (terminated, broken)
        job = future = value = None


class _Core:
    """All an executor's state but the ``Executor`` object itself: the driver thread holds only
    this, so a dropped Executor is collected and its finalizer stops the driver."""

    def __init__(self, gear: Gear, spec: RunSpec, retry: Retry | None) -> None:
        self.gear = gear
        self.spec = spec
        self.retry = retry
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.shutdown = False
        self.kill = False
        self.terminate_at_exit = False
        self.broken: BrokenExecutor | None = None
        self.thread: threading.Thread | None = None
        self.opened = threading.Event()
        self.wrappers: OrderedDict[Any, _Star] = OrderedDict()
        self.ids = itertools.count()
        #: In-process workers mark their futures RUNNING themselves (see ``_Star``).
        self.in_worker = not gear.pickles
        self.callbacks: queue.SimpleQueue[Any] | None = None
        self.callback_thread: threading.Thread | None = None
        self.released = False

    # -- the caller's side ----------------------------------------------------------------
    def wrap(self, fn: Callable[..., Any]) -> _Star:
        """One wrapper per recent function, so a process gear pickles a function once."""
        key = _wrapper_key(fn)
        wrapper = self.wrappers.get(key)
        if wrapper is not None and _same_callable(wrapper.fn, fn):
            self.wrappers.move_to_end(key)
            return wrapper
        wrapper = (_AsyncStar if is_async_callable(fn) else _Star)(fn)
        self.gear.check(wrapper)
        self.wrappers[key] = wrapper
        if len(self.wrappers) > WRAPPER_CACHE:
            self.wrappers.popitem(last=False)
        return wrapper

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        with self.lock:
            if self.broken is not None:
                raise BrokenExecutor(*self.broken.args) from self.broken.__cause__
            if self.shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            wrapper = self.wrap(fn)
            future: Future[Any] = Future()
            call: Call = (args, kwargs, future if self.in_worker else None)
            self.inbox.put((future, wrapper, call))
            if self.thread is None:
                self.thread = threading.Thread(target=self.drive, name="gearshift-executor", daemon=True)
                self.thread.start()
                _live.add(self)
                self.opened.wait()
            else:
                self.gear.wake()
        return future

    def stop(self, wait: bool, cancel: bool = False, kill: bool = False) -> None:
        """Shut down: no new work; ``cancel`` drops queued work, ``kill`` running work too."""
        with self.lock:
            self.shutdown = True
            self.kill = self.kill or kill
            thread = self.thread
            if thread is None:
                self.release()
                return
            self.inbox.put((_STOP, cancel))
            self.gear.wake()
        if not wait:
            return
        try:
            for each in (thread, self.callback_thread):
                while each is not None and each is not threading.current_thread() and each.is_alive():
                    each.join(0.1)  # in slices: the main thread keeps receiving signals
        except BaseException:
            self.terminate_at_exit = True  # interrupted (Ctrl-C): exit must not wait again
            raise

    def dropped(self) -> None:
        """The Executor was collected without a shutdown: stop without waiting (we may be any thread)."""
        self.stop(wait=False, cancel=self.terminate_at_exit, kill=self.terminate_at_exit)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.wrappers.clear()
            self.gear.release()

    # -- completing futures -----------------------------------------------------------------
    def complete(self, future: Future[Any], how: Callable[[Future[Any], Any], None], value: Any) -> None:
        """Complete ``future`` here if it has no done-callbacks, else on the callback thread.

        Checked under the future's own (reentrant) lock, which ``add_done_callback`` takes:
        no callback can slip in between the check and the completion.
        """
        with future._condition:
            if future.done():
                return
            if not future._done_callbacks:  # type: ignore[attr-defined]
                how(future, value)
                return
        if self.callbacks is None:
            self.callbacks = queue.SimpleQueue()
            self.callback_thread = threading.Thread(
                target=_run_callbacks, args=(self.callbacks,), name="gearshift-executor-callbacks", daemon=True
            )
            self.callback_thread.start()
        self.callbacks.put((future, how, value))

    def fail(self, futures: Iterable[Future[Any]], exc: BaseException) -> None:
        for future in list(futures):
            self.complete(future, Future.set_exception, exc)

    # -- the driver thread ----------------------------------------------------------------
    def drive(self) -> None:
        running: dict[int, tuple[Future[Any], Batch]] = {}
        pending: deque[tuple[Future[Any], Batch]] = deque()
        retries: list[tuple[float, int, Future[Any], Batch]] = []
        opened = cancel = False
        try:
            try:
                self.gear.open(self.spec)
                opened = True
            finally:
                self.opened.set()
            cancel = self.loop(running, pending, retries)
        except BaseException as exc:
            cancel = True
            self.break_down(exc, [f for f, _ in running.values()] + [f for f, _ in pending] + [r[2] for r in retries])
        finally:
            try:
                if opened:
                    self.gear.close(cancel=cancel)
            except BaseException as exc:
                if self.broken is None:
                    self.break_down(exc, [])
            finally:
                if cancel:
                    terminated = RuntimeError("executor terminated")
                    self.fail([f for f, _ in running.values()] + [r[2] for r in retries], terminated)
                running.clear()
                retries.clear()
                with self.lock:
                    self.release()
                if self.callbacks is not None:
                    self.callbacks.put(None)

    def loop(
        self,
        running: dict[int, tuple[Future[Any], Batch]],
        pending: deque[tuple[Future[Any], Batch]],
        retries: list[tuple[float, int, Future[Any], Batch]],
    ) -> bool:
        """Move work until shut down; True when terminated (running work is to be dropped)."""
        gear = self.gear
        stopping = False
        # Loop locals, cleared before idling so a finished call's arguments and result can be
        # freed (as CPython's executors do: a large argument must not live on until the next call).
        msg: Any = None
        future: Any = None
        call: Any = None
        batch: Any = None
        outcome: Any = None
        while True:
            # Take new submissions (block only when there is nothing else to wait for).
            block = not (running or pending or retries or stopping)
            if block:
                msg = future = call = batch = outcome = None
            while True:
                try:
                    msg = self.inbox.get(timeout=0.25) if block else self.inbox.get_nowait()
                except queue.Empty:
                    break
                block = False
                if msg[0] is _STOP:
                    stopping = True
                    if msg[1]:
                        self.cancel_queued(pending, running)
                        if self.kill:
                            return True
                    continue
                future, _, call = msg
                pending.append((future, Batch(msg[1], [Task(next(self.ids), call)])))
            now = time.monotonic()
            while retries and retries[0][0] <= now:
                _, _, future, batch = heapq.heappop(retries)
                running[batch.tasks[0].index] = (future, batch)
                gear.submit(batch)
            while pending and len(running) < gear.max_inflight():
                future, batch = pending.popleft()
                if self.admit(future):
                    running[batch.tasks[0].index] = (future, batch)
                    gear.submit(batch)
            if stopping and not (running or pending or retries):
                return False
            if not running:
                continue
            wait = 0.25 if not retries else max(0.0, min(0.25, retries[0][0] - now))
            for outcome in expand(gear.collect(wait)):
                self.settle(outcome, running, retries)

    def admit(self, future: Future[Any]) -> bool:
        """Whether to hand ``future``'s call to the gear (a cancelled one is only notified)."""
        if self.in_worker and not future.cancelled():
            return True  # its worker marks it RUNNING as it starts
        return future.set_running_or_notify_cancel() and not self.in_worker

    def cancel_queued(
        self, pending: deque[tuple[Future[Any], Batch]], running: dict[int, tuple[Future[Any], Batch]]
    ) -> None:
        """``shutdown(cancel_futures=True)``: cancel every future no worker has started."""
        while pending:
            pending.popleft()[0].cancel()
        for future, _ in running.values():
            future.cancel()  # only succeeds for those still PENDING
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] is not _STOP:
                msg[0].cancel()

    def settle(
        self,
        outcome: Outcome,
        running: dict[int, tuple[Future[Any], Batch]],
        retries: list[tuple[float, int, Future[Any], Batch]],
    ) -> None:
        task = outcome.task
        future, batch = running.pop(task.index)
        if outcome.ok:
            if outcome.value is not _CANCELLED:
                self.complete(future, Future.set_result, outcome.value)
            return
        exc = outcome.value
        if isinstance(exc, _Escaped):
            self.complete(future, Future.set_exception, exc.exc)
            return
        if self.retry is not None and self.retry.should_retry(exc, task.attempt):
            args, kwargs, _ = task.item
            again = Batch(batch.fn, [Task(task.index, (args, kwargs, None), task.attempt + 1)])  # already RUNNING
            at = time.monotonic() + self.retry.delay(task.attempt)
            heapq.heappush(retries, (at, task.index, future, again))
            return
        self.complete(future, Future.set_exception, exc)

    def break_down(self, exc: BaseException, futures: list[Future[Any]]) -> None:
        """The gear cannot run calls: fail ``futures``, queued and later ones with BrokenExecutor."""
        broken = BrokenExecutor(
            f"{self.gear.describe()} cannot run calls ({exc!r}): pending and later calls fail"
        )
        broken.__cause__ = exc
        queued = []
        with self.lock:
            self.broken = broken
            while True:
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if msg[0] is not _STOP:
                    queued.append(msg[0])
        self.fail(futures + queued, broken)


class Executor(_StdExecutor):
    """A ``concurrent.futures.Executor`` whose work runs in a gearshift gear.

    >>> with gs.Executor("process", max_workers=4) as ex:
    ...     ex.submit(pow, 2, 10).result()
    1024

    ``gear`` comes first (``gs.ProcessPoolExecutor``/``gs.ThreadPoolExecutor`` take the worker
    count first, as the stdlib's do); ``workers``, ``max_workers`` and ``concurrency`` are one
    setting. ``timeout`` and ``retries`` apply to every call; ``initializer(*initargs)`` runs
    once per worker; ``max_tasks_per_worker`` recycles process workers. A gear object passed
    in is claimed for the executor's life. Done-callbacks run on the executor's callback
    thread ("gearshift-executor-callbacks"), never on its driver. An executor dropped without
    ``shutdown`` is shut down (without waiting) when collected.
    """

    def __init__(
        self,
        gear: str | Gear = "process",
        workers: int | None = None,
        *,
        max_workers: int | None = None,
        concurrency: int | None = None,
        timeout: float | None = None,
        retries: int | Retry | None = 0,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
    ) -> None:
        given: object = gear
        if isinstance(given, int) and not isinstance(given, bool):
            raise TypeError(
                f"gs.Executor's first argument is the gear, not the worker count: write "
                f"gs.ProcessPoolExecutor({gear}) or gs.Executor('process', max_workers={gear})"
            )
        count = _count(workers=workers, max_workers=max_workers, concurrency=concurrency)
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
        retry = as_retry(retries)
        spec = RunSpec(timeout, initializer, tuple(initargs), max_tasks_per_worker)
        chosen = make_gear(gear, count)
        chosen.claim()
        self._core = _Core(chosen, spec, retry)
        self._lock = self._core.lock
        self._finalizer = weakref.finalize(self, self._core.dropped)
        self._finalizer.atexit = False  # exit is handled by _finish_at_exit, before threads stop

    @property
    def gear(self) -> Gear:
        return self._core.gear

    @property
    def workers(self) -> int:
        return self._core.gear.workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        return self._core.submit(fn, args, kwargs)

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
        self._core.stop(wait, cancel=cancel_futures)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Leaving on Ctrl-C/SystemExit: the caller wants out now, not when the running calls
            # end (they may never): cancel, set thread tokens, stop workers, within a grace period.
            self._core.terminate_at_exit = True
            self.terminate()
            return None
        return super().__exit__(exc_type, exc, tb)

    def terminate(self) -> None:
        """Stop now: cancel pending futures, kill workers; running futures fail."""
        self._core.stop(wait=True, cancel=True, kill=True)

    def __repr__(self) -> str:
        return f"<gearshift.Executor {self.gear.describe()}{' shut down' if self._core.shutdown else ''}>"
