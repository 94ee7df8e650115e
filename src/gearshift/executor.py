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

import asyncio
import atexit
import concurrent.futures as _cf
import contextlib
import functools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from types import BuiltinFunctionType, FunctionType, MethodType, TracebackType
from typing import Any

from gearshift._advisor.probes import ThreadClock, fn_pickle_error, gil_pings, machine_facts
from gearshift._advisor.route import JUDGE_AFTER, Route, Sample, route_for
from gearshift._calls import fn_name, is_async_callable
from gearshift._engine import Scheduler, drive
from gearshift._feed import Feed, Stream
from gearshift._gears import Gear, make_gear
from gearshift._gears._base import cpu_count
from gearshift._rate import parse_rate
from gearshift._retry import Retry, as_retry
from gearshift._task import RunSpec
from gearshift.errors import Failure, GearshiftError, WorkerCrashed, short_repr

__all__ = ["BrokenExecutor", "Executor"]

log = logging.getLogger("gearshift")
_STOP = object()
#: Most threads running done-callbacks at once (more start only while all are inside callbacks).
MAX_CALLBACK_THREADS = 32
#: What a call returns when its future was cancelled before a worker started it.
_CANCELLED = object()


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


def _passes(exc: BaseException) -> bool:
    """Whether a call's exception goes to the gear as it is: any ``Exception``, a task's
    ``CancelledError`` (the async gear's own timeouts and cancellation), and gearshift's own
    control exceptions. Other ``BaseException``s (``SystemExit``, ``KeyboardInterrupt``,
    ``GeneratorExit``, a user's subclass, a ``BaseExceptionGroup``) are wrapped in ``_Escaped``."""
    return isinstance(exc, Exception | asyncio.CancelledError) or type(exc).__module__.startswith("gearshift.")


class _Escaped(Exception):
    """Carries a call's ``SystemExit``/``KeyboardInterrupt`` out of the gear, which would take it
    for "stop everything": as in the stdlib executors, it fails that call's future only."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


class Call:
    """One submitted call: arguments, keywords, and the future when the worker is in this
    process (it marks the future RUNNING as it starts, or skips the call if it was cancelled).
    Its repr is the call's arguments, as errors name it (``TaskTimeout``, ``WorkerCrashed``)."""

    __slots__ = ("args", "future", "kwargs")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], future: Future[Any] | None) -> None:
        self.args = args
        self.kwargs = kwargs
        self.future = future

    def __getstate__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.args, self.kwargs  # a future never crosses to another process

    def __setstate__(self, state: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
        self.args, self.kwargs = state
        self.future = None

    def __repr__(self) -> str:
        parts = [short_repr(a, 60) for a in self.args]
        parts += [f"{k}={short_repr(v, 60)}" for k, v in self.kwargs.items()]
        return f"call({', '.join(parts)})"


class _Star:
    """Calls ``fn(*args, **kwargs)`` from one ``Call`` item; picklable if ``fn`` is."""

    __slots__ = ("__weakref__", "fn")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, call: Call) -> Any:
        future = call.future
        if future is not None and not future.running() and not future.set_running_or_notify_cancel():
            return _CANCELLED
        try:
            return self.fn(*call.args, **call.kwargs)
        except BaseException as exc:
            if _passes(exc):
                raise
            raise _Escaped(exc) from None

    def __getstate__(self) -> Callable[..., Any]:
        return self.fn

    def __setstate__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn


class _AsyncStar(_Star):
    __slots__ = ()

    async def __call__(self, call: Call) -> Any:
        future = call.future
        if future is not None and not future.running() and not future.set_running_or_notify_cancel():
            return _CANCELLED
        try:
            return await self.fn(*call.args, **call.kwargs)
        except BaseException as exc:
            if _passes(exc):
                raise
            raise _Escaped(exc) from None


class _Spread(_Star):
    """Calls ``fn(*args)`` from one tuple of arguments (``Executor.map``, ``Pool.starmap``)."""

    __slots__ = ()

    def __call__(self, args: Any) -> Any:
        try:
            return self.fn(*args)
        except BaseException as exc:
            if _passes(exc):
                raise
            raise _Escaped(exc) from None


class _AsyncSpread(_Star):
    __slots__ = ()

    async def __call__(self, args: Any) -> Any:
        try:
            return await self.fn(*args)
        except BaseException as exc:
            if _passes(exc):
                raise
            raise _Escaped(exc) from None


class _Each(_Star):
    """Calls ``fn(item)`` (``Pool.map``, ``Pool.imap``)."""

    __slots__ = ()

    def __call__(self, item: Any) -> Any:
        try:
            return self.fn(item)
        except BaseException as exc:
            if _passes(exc):
                raise
            raise _Escaped(exc) from None


class _AsyncEach(_Star):
    __slots__ = ()

    async def __call__(self, item: Any) -> Any:
        try:
            return await self.fn(item)
        except BaseException as exc:
            if _passes(exc):
                raise
            raise _Escaped(exc) from None


#: The async twin of each wrapper: a coroutine function is awaited in the gear, not returned unawaited.
_ASYNC: dict[type[_Star], type[_Star]] = {_Star: _AsyncStar, _Spread: _AsyncSpread, _Each: _AsyncEach}


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


class _Callbacks:
    """Threads that complete the futures that have done-callbacks, so the callbacks run there
    and never on the driver. One thread normally; when every one is inside a callback (which
    may wait on another future with callbacks, whose completion is queued here), another
    starts, up to ``MAX_CALLBACK_THREADS``, so such a callback cannot wait on itself."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = 0
        self.idle = 0
        self.closed = False
        self.ended = threading.Event()  # set once closed and every thread has left

    def put(self, future: Future[Any], how: Callable[[Future[Any], Any], None], value: Any) -> None:
        with self.lock:
            if not self.closed:
                if self.idle == 0 and self.threads < MAX_CALLBACK_THREADS:
                    self.threads += 1
                    threading.Thread(target=self._run, name="gearshift-executor-callbacks", daemon=True).start()
                self.jobs.put((future, how, value))
                return
        _complete_quietly(future, how, value)  # after the executor ended: here and now

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    self.idle += 1
                job = self.jobs.get()
                with self.lock:
                    self.idle -= 1
                if job is None:
                    return
                _complete_quietly(*job)
                job = None
        finally:
            with self.lock:
                self.threads -= 1
                if self.closed and not self.threads:
                    self.ended.set()

    def close(self) -> None:
        """No more jobs: the threads leave once the queued ones are done."""
        with self.lock:
            self.closed = True
            for _ in range(self.threads):
                self.jobs.put(None)
            if not self.threads:
                self.ended.set()


def _complete_quietly(future: Future[Any], how: Callable[[Future[Any], Any], None], value: Any) -> None:
    try:
        how(future, value)
    except _cf.InvalidStateError:
        pass  # completed meanwhile (cancelled, terminated, broken)


def _calls(call: Call) -> Any:
    """The scheduler's nominal function (for names): every batch carries its own wrapper."""
    raise AssertionError("an executor's batches run their own functions")


class _Terminated(BaseException):
    """Ends the executor's run at once (``terminate``): a BaseException, so the engine cancels."""


class _Broken(BaseException):
    """Ends the executor's run at once and breaks it (a drop-in whose worker died)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


class Policy:
    """How an executor ends calls and breaks: ``gs.Executor``'s own rules; the drop-ins
    (``gearshift.dropins``) override them with the standard library's."""

    #: A worker that dies breaks the executor (the stdlib pools), instead of failing its call only.
    death_breaks = False

    def breaks_on(self, exc: BaseException) -> bool:
        """Whether a call failing with ``exc`` breaks the executor."""
        return False

    def broken(self, gear: Gear, exc: BaseException) -> BrokenExecutor:
        """The error every pending and later call fails with once the executor is broken."""
        return BrokenExecutor(f"{gear.describe()} cannot run calls ({exc!r}): pending and later calls fail")

    def as_raised(self, exc: BaseException) -> BaseException:
        """A call's exception as its future raises it."""
        return exc


class _FutureSink:
    """A submitted call's result goes to its future."""

    __slots__ = ("core", "future")

    def __init__(self, core: _Core, future: Future[Any]) -> None:
        self.core = core
        self.future = future

    def deliver(self, pos: int, values: list[Any]) -> None:
        self.core.settle(self.future, values[0])

    def end(self, count: int, error: BaseException | None) -> None:
        pass

    def cancel(self) -> None:
        self.future.cancel()  # only succeeds while no worker has started it

    def abandon(self, exc: BaseException) -> None:
        self.core.complete(self.future, Future.set_exception, exc)


class _Buffer:
    """The sink of a lazily consumed stream (``Executor.map``, ``Pool.imap``): results wait here
    for their consumer. Held by the feed; the consumer's iterator holds it too, not the other
    way round, so an iterator the caller drops is collected and its finalizer stops the stream."""

    def __init__(self, ordered: bool) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.ordered = ordered
        #: Ordered: runs of results by the position of their first (runs tile the positions).
        self.by_pos: dict[int, list[Any]] = {}
        self.arrived: deque[Any] = deque()
        self.count: int | None = None
        self.error: BaseException | None = None
        self.abandoned: BaseException | None = None

    def deliver(self, pos: int, values: list[Any]) -> None:
        with self.cond:
            if self.ordered:
                self.by_pos[pos] = values
            else:
                self.arrived.extend(values)
            self.cond.notify()

    def end(self, count: int, error: BaseException | None) -> None:
        with self.cond:
            self.count = count
            self.error = error
            self.cond.notify()

    def abandon(self, exc: BaseException) -> None:
        with self.cond:
            self.abandoned = exc
            self.cond.notify()


_NOTHING = object()


class Results(Iterator[Any]):
    """Results of one stream as the caller iterates (``Executor.map``, ``Pool.imap``).

    A failed item raises its exception at its turn; ``goes_on`` says whether iteration may
    continue after it (``Pool.imap``) or ends there (``Executor.map``, whose remaining calls
    are then cancelled). ``deadline`` (monotonic seconds) bounds the whole iteration.
    """

    def __init__(self, core: _Core, buffer: _Buffer, stream: Stream, *, goes_on: bool,
                 deadline: float | None = None) -> None:
        self._buffer = buffer
        self._goes_on = goes_on
        self._deadline = deadline
        self._taken = 0  # results the caller has had
        self._moved = 0  # results moved out of the buffer into ``_local``
        self._local: deque[Any] = deque()
        self._over = False
        self._feed, self._stream = core.feed, stream
        self._limit = stream.limit
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __iter__(self) -> Results:
        return self

    def __next__(self) -> Any:
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        return self.next(remaining)

    def next(self, timeout: float | None = None) -> Any:
        """The next result, waiting at most ``timeout`` seconds (then ``TimeoutError``)."""
        if self._over:
            raise StopIteration
        if self._finalizer is None:
            # Started: from now on, dropping the iterator cancels what has not run (as the stdlib's
            # map generator does in its ``finally``); an iterator never read leaves its calls running.
            self._finalizer = weakref.finalize(self, self._feed.stop_stream, self._stream)
        local = self._local
        if not local:
            self._refill(timeout)
        value = local.popleft()
        self._taken += 1
        stream = self._stream
        stream.consumed = self._taken
        if self._limit is not None and stream.taken - self._taken == self._limit - 1:
            self._feed.wake()  # the stream was held back by its consumer: room again
        if isinstance(value, Failure):
            if not self._goes_on:
                self._end()
            exc = value.exception
            raise exc.exc if isinstance(exc, _Escaped) else exc
        return value

    def _refill(self, timeout: float | None) -> None:
        """Move every result ready for the caller into ``_local``, waiting for one if none is.

        One lock round per run of results, not per result (200k tiny results: 0.16 -> 0.05 s).
        """
        buffer = self._buffer
        local = self._local
        deadline = None if timeout is None else time.monotonic() + timeout
        with buffer.cond:
            while True:
                if buffer.ordered:
                    pop = buffer.by_pos.pop
                    while (run := pop(self._moved, None)) is not None:
                        local.extend(run)
                        self._moved += len(run)
                elif buffer.arrived:
                    local.extend(buffer.arrived)
                    self._moved += len(buffer.arrived)
                    buffer.arrived.clear()
                if local:
                    return
                if buffer.count is not None and self._moved >= buffer.count:
                    self._end()
                    if buffer.error is not None:
                        error, buffer.error = buffer.error, None
                        raise error
                    raise StopIteration
                if buffer.abandoned is not None:
                    self._end()
                    raise buffer.abandoned
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    self._end()
                    raise TimeoutError
                buffer.cond.wait(wait)  # in slices: Ctrl-C stays prompt

    def _end(self) -> None:
        self._over = True
        self._local.clear()
        self._feed.stop_stream(self._stream)

    def close(self) -> None:
        """Stop: calls not started are dropped, running ones finish unobserved."""
        self._end()


class _Core:
    """All an executor's state but the ``Executor`` object itself: the driver thread holds only
    this, so a dropped Executor is collected and its finalizer stops the driver.

    The driver runs the engine (``_engine.drive``) over a ``Feed`` of the submitted calls:
    every scheduling decision (window, chunks, retries, rate, timeouts) is the engine's.
    """

    def __init__(
        self, gear: Gear, spec: RunSpec, retry: Retry | None, rate: str | float | None, policy: Policy
    ) -> None:
        self.gear = gear
        self.policy = policy
        if policy.death_breaks and hasattr(gear, "on_death"):
            gear.on_death = self.worker_died
        self.spec = spec
        self.retry = retry
        self.rate = rate
        self.feed = Feed()
        self.lock = threading.Lock()
        self.wrap_lock = threading.Lock()
        self.shutdown = False
        self.terminate_at_exit = False
        self.broken: BrokenExecutor | None = None
        self.thread: threading.Thread | None = None
        self.opened = threading.Event()
        # Set as the driver and the callback thread end. Waited on instead of Thread.join, which
        # Python 3.11 breaks when Ctrl-C interrupts it (the thread is then reported dead: bpo-45274).
        self.driver_ended = threading.Event()

        #: Wrappers of functions with calls in flight (weak: a finished call's function is not kept).
        self.wrappers: weakref.WeakValueDictionary[Any, _Star] = weakref.WeakValueDictionary()
        #: In-process workers mark their futures RUNNING themselves (see ``_Star``).
        self.in_worker = not gear.pickles
        self.callbacks = _Callbacks()
        self.released = False

    # -- the caller's side ----------------------------------------------------------------
    def wrap(self, fn: Callable[..., Any], kind: type[_Star] = _Star) -> _Star:
        """One wrapper per function in flight, so a process gear pickles a function once per batch run."""
        if is_async_callable(fn):
            kind = _ASYNC[kind]
        key = (kind, _wrapper_key(fn))
        with self.wrap_lock:  # the gear's check keeps a table of its own (the process gear's pickles)
            wrapper = self.wrappers.get(key)
            if wrapper is not None and _same_callable(wrapper.fn, fn):
                return wrapper
            wrapper = kind(fn)
            self.gear.check(wrapper)
            self.wrappers[key] = wrapper
        return wrapper

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        self._check_open()
        future: Future[Any] = Future()
        call = Call(args, kwargs, future if self.in_worker else None)
        admit = None if self.in_worker else future.set_running_or_notify_cancel
        self.put(Stream.call(self.wrap(fn), call, _FutureSink(self, future), admit))
        self.gear.prestart(1)
        return future

    def put(self, stream: Stream) -> None:
        """Queue a stream of work; the driver starts with the first.

        The caller waits until the gear is open (a process gear forks its workers first), but
        not under the lock: a driver that fails to open takes the lock to break the executor.
        """
        with self.lock:
            self._check_open()
            self.feed.put(stream)
            self._start()
        self.opened.wait()

    def start(self) -> None:
        """Start the driver (it opens the gear: a process gear forks its workers) and wait for it."""
        with self.lock:
            self._check_open()
            self._start()
        self.opened.wait()

    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.drive, name="gearshift-executor", daemon=True)
            self.thread.start()
            _live.add(self)

    def _check_open(self) -> None:
        if self.broken is not None:
            raise type(self.broken)(*self.broken.args) from self.broken.__cause__
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def stop(self, wait: bool, cancel: bool = False, kill: bool = False) -> None:
        """Shut down: no new work; ``cancel`` drops queued work, ``kill`` running work too."""
        with self.lock:
            self.shutdown = True
            thread = self.thread
            if thread is None:
                self.release()
                return
            if cancel:
                self.cancel_queued()
            if kill:
                self.feed.terminate(_Terminated())
            else:
                self.feed.close()
        if not wait:
            return
        try:
            self.join(thread)
        except BaseException:
            # Interrupted (Ctrl-C) while waiting: the caller wants out now, not when the running
            # calls end (they may never). Terminate (queued calls cancelled, thread tokens set,
            # process workers killed) and wait for that, which takes a grace period at most.
            self.terminate_at_exit = True  # exit must not wait again
            with self.lock:
                self.cancel_queued()
                self.feed.terminate(_Terminated())
            self.join(thread)
            raise

    def join(self, thread: threading.Thread) -> None:
        """Wait for the driver and the callback thread, in slices (signals stay prompt)."""
        me = threading.current_thread()
        if thread is not me and me.name != "gearshift-executor-callbacks":  # not from inside a callback
            for ended in (self.driver_ended, self.callbacks.ended):
                while not ended.wait(0.1):
                    pass

    def cancel_queued(self) -> None:
        """``shutdown(cancel_futures=True)``: cancel every future no worker has started."""
        for stream in self.feed.cancel_queued():
            cancel = getattr(stream.sink, "cancel", None)
            if cancel is not None:
                cancel()
            else:
                stream.sink.abandon(_cf.CancelledError())
        self.feed.cancel_started()

    def dropped(self) -> None:
        """The Executor was collected without a shutdown: stop without waiting (we may be any thread)."""
        self.stop(wait=False, cancel=self.terminate_at_exit, kill=self.terminate_at_exit)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gear.release()

    # -- completing futures -----------------------------------------------------------------
    def settle(self, future: Future[Any], value: Any) -> None:
        """Complete ``future`` with what the engine delivered for its call."""
        if value is _CANCELLED:
            return
        if not isinstance(value, Failure):
            self.complete(future, Future.set_result, value)
            return
        exc = value.exception
        exc = exc.exc if isinstance(exc, _Escaped) else exc
        if self.policy.breaks_on(exc):
            # The drop-ins' rule (a dead worker breaks the pool): this call fails as broken, and
            # the driver breaks the executor at its next admission (not here, mid-delivery).
            self.complete(future, Future.set_exception, self.broken_error(exc))
            self.feed.terminate(_Broken(exc))
            return
        self.complete(future, Future.set_exception, self.policy.as_raised(exc))

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
        self.callbacks.put(future, how, value)

    # -- the driver thread ----------------------------------------------------------------
    def drive(self) -> None:
        """Run the engine over the feed until it is closed and drained (or terminated)."""
        scheduler = Scheduler(
            _calls, self.feed, self.gear, ordered=False, errors="collect", retries=self.retry, rate=self.rate
        )
        scheduler.release_runs = True
        deliver = self.feed.deliver
        try:
            for ready in drive(scheduler, self.gear, self.spec, claim=False, opened=self.opened.set):
                deliver(ready)
                del ready  # a finished call's result is not kept until the next one
        except _Terminated:
            self.feed.abandon_all(RuntimeError("executor terminated"))
        except _Broken as broken:
            self.break_down(broken.cause)
        except BaseException as exc:
            self.break_down(exc)
        finally:
            self.opened.set()
            with self.lock:
                self.release()
            self.callbacks.close()
            self.driver_ended.set()

    def broken_error(self, exc: BaseException) -> BrokenExecutor:
        broken = self.policy.broken(self.gear, exc)
        broken.__cause__ = exc
        return broken

    def break_down(self, exc: BaseException) -> None:
        """The gear cannot run calls: fail running, queued and later calls with BrokenExecutor."""
        broken = self.broken_error(exc)
        with self.lock:
            self.broken = broken
        self.feed.abandon_all(broken)

    def worker_died(self, exitcode: int | None) -> None:
        """The gear lost a worker that was not told to leave (called on the driver's thread)."""
        if self.policy.death_breaks:
            self.feed.terminate(_Broken(WorkerCrashed(exitcode, None, -1)))


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

    ``gear="auto"`` routes each function to a gear of its own, measured on its first call
    and remembered for the scope: coroutine functions to an event loop, blocking calls to
    threads, CPU work holding the GIL to processes (``Executor.routes`` says where and why).
    """

    def __new__(cls, gear: str | Gear = "process", *args: Any, **kwargs: Any) -> Executor:
        # gear="auto" routes each function to a gear of its own: an executor of executors.
        if cls is Executor and isinstance(gear, str) and gear == "auto":
            return super().__new__(_AutoExecutor)
        return super().__new__(cls)

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
        rate: str | float | None = None,
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
        retry = as_retry(retries)
        if rate is not None:
            parse_rate(rate)  # a bad rate is refused here, not on the driver thread
        spec = RunSpec(timeout, initializer, tuple(initargs), max_tasks_per_worker)
        chosen = make_gear(gear, count)
        chosen.claim()
        self._core = _Core(chosen, spec, retry, rate, self._policy())
        self._lock = self._core.lock
        self._finalizer = weakref.finalize(self, self._core.dropped)
        self._finalizer.atexit = False  # exit is handled by _finish_at_exit, before threads stop

    def _policy(self) -> Policy:
        """The rules for ending calls and breaking (the drop-ins give the stdlib's)."""
        return Policy()

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
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """``Executor.map``: results in order, ``timeout`` a deadline for the whole map.

        The calls are one stream through the engine: ``chunksize > 1`` sends that many per
        batch (else the engine sizes batches itself, from measured call time); ``buffersize``
        (3.14's) reads the iterables lazily, at most that many calls ahead of the consumer.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int) or isinstance(buffersize, bool):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        deadline = None if timeout is None else time.monotonic() + timeout
        args: Iterable[Any] = zip(*iterables, strict=False)
        lazy = buffersize is not None
        if not lazy:
            args = list(args)  # as the stdlib's map: the iterables are read now, the calls queued now
        core = self._core
        buffer = _Buffer(ordered=True)
        # Exactly ``chunksize`` calls per dispatch, as the stdlib: calls may wait on each other, and
        # a dropped map cancels what no worker holds yet (pass a larger chunksize for tiny calls).
        stream = Stream(core.wrap(fn, _Spread), args, buffer, chunk=chunksize, lazy=lazy)
        if lazy:
            stream.limit = buffersize  # at most this many calls ahead of the consumer
            stream.cut_at_close = True  # shutdown waits for calls already made, reads no more
        core.put(stream)
        return Results(core, buffer, stream, goes_on=False, deadline=deadline)

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


# -- gear="auto": each function to its own gear ------------------------------------------------


def _route_key(fn: Callable[..., Any]) -> Any:
    """What a route is remembered by: the function itself (a method's function, a partial's
    function, a callable object's class), so one decision serves every call of it."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    func = getattr(fn, "__func__", None)
    if func is not None:
        return func
    if isinstance(fn, (FunctionType, BuiltinFunctionType)):
        return fn
    return type(fn)


class _Judging:
    """A function's first call, watched on a thread while its route is decided; calls of it that
    come meanwhile wait here for the verdict (at most ``JUDGE_AFTER`` seconds)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.started = threading.Event()
        self.ended = threading.Event()
        self.decided = threading.Event()
        self.thread: threading.Thread | None = None
        self.t0 = 0.0
        self.cpu0 = 0.0
        self.wall = 0.0
        self.cpu = 0.0
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Future[Any]]] = []
        self.route: Route | None = None
        #: The first call's future in the thread gear, and the caller's (completed after the verdict).
        self.first: tuple[Future[Any], Future[Any]] | None = None

    def run(self, call: Call) -> Any:
        """The first call, on a thread of the thread gear: timed, wall clock and this thread's CPU."""
        self.thread = threading.current_thread()
        self.t0, self.cpu0 = time.perf_counter(), time.thread_time()
        self.started.set()
        try:
            return self.fn(*call.args, **call.kwargs)
        finally:
            self.wall, self.cpu = time.perf_counter() - self.t0, time.thread_time() - self.cpu0
            self.ended.set()


def _star(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)


def _chain(source: Future[Any], target: Future[Any]) -> None:
    """Complete ``target`` as ``source`` completes (a held call's future, routed late)."""

    def done(f: Future[Any]) -> None:
        if target.done():
            return
        if f.cancelled():
            target.cancel()
            target.set_running_or_notify_cancel()
            return
        exc = f.exception()
        with contextlib.suppress(_cf.InvalidStateError):
            if exc is not None:
                target.set_exception(exc)
            else:
                target.set_result(f.result())

    source.add_done_callback(done)


class _AutoExecutor(Executor):
    """``gs.Executor(gear="auto")``: one executor per gear, made when first needed, and each
    function routed to one of them by its first call (``_advisor.route``). Options (timeout,
    retries, rate, initializer, ...) apply in every gear; ``workers`` too when given (else each
    gear sizes itself: cores for processes, measured for threads and the loop)."""

    def __init__(
        self,
        gear: str | Gear = "auto",
        workers: int | None = None,
        *,
        max_workers: int | None = None,
        concurrency: int | None = None,
        timeout: float | None = None,
        retries: int | Retry | None = 0,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        rate: str | float | None = None,
    ) -> None:
        count = _count(workers=workers, max_workers=max_workers, concurrency=concurrency)
        if count is not None and count < 1:
            raise ValueError(f"workers must be a positive int, got {count!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        as_retry(retries)
        if rate is not None:
            parse_rate(rate)
        self._count = count
        self._options: dict[str, Any] = {
            "timeout": timeout, "retries": retries, "initializer": initializer, "initargs": tuple(initargs),
            "max_tasks_per_worker": max_tasks_per_worker, "rate": rate,
        }
        self._lock = threading.Lock()
        self._executors: dict[str, Executor] = {}
        self._routes: weakref.WeakKeyDictionary[Any, Route] = weakref.WeakKeyDictionary()
        self._strong_routes: dict[Any, Route] = {}  # keys that take no weak reference (builtins)
        self._judging: dict[int, _Judging] = {}
        self._watchers: list[threading.Thread] = []
        self._closed = False
        self._machine = machine_facts()
        self._finalizer = weakref.finalize(self, functools.partial(_AutoExecutor._drop, self._executors))
        self._finalizer.atexit = False

    @staticmethod
    def _drop(executors: dict[str, Executor]) -> None:
        for ex in list(executors.values()):
            ex.shutdown(wait=False, cancel_futures=True)

    # -- the executors, one per gear ---------------------------------------------------------
    def _executor(self, gear: str) -> Executor:
        """The executor of ``gear`` (under ``_lock``), made on first use."""
        ex = self._executors.get(gear)
        if ex is None:
            workers = self._count
            if gear == "process" and workers is None:
                workers = cpu_count()
            ex = self._executors[gear] = Executor(gear, workers, **self._options)
        return ex

    @property
    def gear(self) -> Gear:
        """The thread gear (where calls are first watched); see ``routes`` for the others."""
        with self._lock:
            return self._executor("thread").gear

    @property
    def workers(self) -> int:
        with self._lock:
            return sum(ex.workers for ex in self._executors.values())

    @property
    def routes(self) -> dict[str, tuple[str, str]]:
        """Each function routed so far: its name -> (gear, why)."""
        with self._lock:
            pairs = [*self._routes.items(), *self._strong_routes.items()]
        return {fn_name(key) if callable(key) else repr(key): (r.gear, r.why) for key, r in pairs}

    def _route_of(self, key: Any) -> Route | None:
        try:
            return self._routes.get(key)
        except TypeError:
            return self._strong_routes.get(key)

    def _remember(self, key: Any, route: Route) -> None:
        try:
            self._routes[key] = route
        except TypeError:
            self._strong_routes[key] = route

    # -- calls ------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        key = _route_key(fn)
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            route = self._route_of(key)
            if route is None and is_async_callable(fn):
                route = Route("async", "a coroutine function: the event loop")
                self._remember(key, route)
            if route is not None:
                return self._executor(route.gear).submit(fn, *args, **kwargs)
            judging = self._judging.get(id(key))
            if judging is not None:
                held: Future[Any] = Future()
                judging.held.append((fn, args, kwargs, held))
                return held
            judging = self._judging[id(key)] = _Judging(fn)
            inner = self._executor("thread").submit(judging.run, Call(args, kwargs, None))
            # The caller's future completes once the call has and its route is known (so
            # ``routes`` names it as soon as the first result is in).
            future: Future[Any] = Future()
            future.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
            judging.first = (inner, future)
            watcher = threading.Thread(target=self._judge, args=(key, judging), name="gearshift-route", daemon=True)
            self._watchers.append(watcher)
        watcher.start()
        return future

    def _judge(self, key: Any, judging: _Judging) -> None:
        """Watch a first call (``JUDGE_AFTER`` at most), decide its function's route, release held calls."""
        try:
            route = self._decide(judging)
        except BaseException as exc:  # never leave held calls waiting
            route = Route("thread", f"could not be measured ({type(exc).__name__}: {exc}): threads")
        with self._lock:
            self._remember(key, route)
            self._judging.pop(id(key), None)
            judging.route = route
            held, judging.held = judging.held, []
            if self._closed:
                for *_, future in held:
                    future.cancel()
                    future.set_running_or_notify_cancel()
                if judging.first is not None:
                    _chain(*judging.first)
                judging.decided.set()
                return
            targets = [(self._executor(route.gear), fn, args, kwargs, future) for fn, args, kwargs, future in held]
        log.info("gearshift: %s -> %s gear: %s", fn_name(judging.fn), route.gear, route.why)
        if judging.first is not None:
            _chain(*judging.first)
        for ex, fn, args, kwargs, future in targets:
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited for the verdict
            try:
                _chain(ex.submit(fn, *args, **kwargs), future)
            except BaseException as exc:
                future.set_exception(exc)
        judging.decided.set()

    def _decide(self, judging: _Judging) -> Route:
        # The call may wait in the thread gear's queue first: judge it from when it starts.
        while not judging.started.wait(0.05):
            if self._closed:
                return Route("thread", "never started (the executor shut down)")
        thread = judging.thread
        assert thread is not None
        clock = ThreadClock(thread)
        runq0 = clock.runq()
        held: float | None = None
        if self._machine.gil_enabled:
            # Pings while it runs: does it hold the GIL? (only counted while it computes)
            held = gil_pings(lambda: not judging.ended.is_set(), clock.cpu, pings=5, budget=JUDGE_AFTER,
                             over=judging.ended.is_set)
        ended = judging.ended.wait(max(0.0, JUDGE_AFTER - (time.perf_counter() - judging.t0)))
        if ended:
            wall, cpu = judging.wall, judging.cpu
        else:
            wall, cpu = time.perf_counter() - judging.t0, clock.cpu() - judging.cpu0
        runq = clock.runq() - runq0
        pickle_error = fn_pickle_error(judging.fn) if cpu > 0.5 * wall else ""
        sample = Sample(wall, cpu, runq, held, ended)
        return route_for(sample, cores=self._machine.cores, gil_enabled=self._machine.gil_enabled,
                         pickle_error=pickle_error)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """``Executor.map`` in the function's gear: its first call decides it when not known yet."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        key = _route_key(fn)
        with self._lock:
            route = self._route_of(key)
            if route is None and is_async_callable(fn):
                route = Route("async", "a coroutine function: the event loop")
                self._remember(key, route)
        if route is not None:
            with self._lock:
                ex = self._executor(route.gear)
            return ex.map(fn, *iterables, timeout=timeout, chunksize=chunksize, buffersize=buffersize)
        deadline = None if timeout is None else time.monotonic() + timeout
        args = zip(*iterables, strict=False)
        first = next(args, None)
        if first is None:
            return iter(())
        future = self.submit(fn, *first)
        route = self._verdict(key)
        with self._lock:
            ex = self._executor(route.gear)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        rest = ex.map(functools.partial(_star, fn), args, timeout=left, chunksize=chunksize, buffersize=buffersize)

        def results() -> Iterator[Any]:
            try:
                yield future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
                yield from rest
            finally:
                future.cancel()
                close = getattr(rest, "close", None)
                if close is not None:
                    close()

        return results()

    def _verdict(self, key: Any) -> Route:
        """The route of ``key``, waiting for its first call's judging if it is under way."""
        with self._lock:
            route = self._route_of(key)
            judging = self._judging.get(id(key))
        if route is None and judging is not None:
            judging.decided.wait()
            route = judging.route
        if route is None:
            with self._lock:
                route = self._route_of(key)
        return route if route is not None else Route("thread", "not measured: threads")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.join()
        with self._lock:
            executors = list(self._executors.values())
        for ex in executors:
            ex.shutdown(wait, cancel_futures=cancel_futures)

    def terminate(self) -> None:
        with self._lock:
            self._closed = True
            executors = list(self._executors.values())
        for ex in executors:
            ex.terminate()
        for watcher in list(self._watchers):
            watcher.join()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.terminate()
            return None
        self.shutdown(wait=True)
        return None

    def __repr__(self) -> str:
        with self._lock:
            gears = ", ".join(sorted(self._executors)) or "none yet"
        return f"<gearshift.Executor auto (gears in use: {gears}){' shut down' if self._closed else ''}>"
