"""The async gear: one event loop (uvloop when installed), tasks bounded by a limit.

The limit is the user's ``workers``/``concurrency`` when given; otherwise it is found by
measurement as the run goes (``_adaptive.AdaptiveLimit``: slow start while latency holds,
back off when it climbs or calls are refused), and the report says where it settled and why.

Coroutine functions run as tasks; plain (blocking) functions run in a thread pool of
the same size, as ``asyncio.to_thread`` would, so they never stall the loop. Two modes:

* called from sync code (``gs.map``, ``Executor``): the gear owns a loop in a thread,
  whose tasks live in an ``asyncio.TaskGroup``: an error or cancellation ends them all;
* bound to the caller's running loop (``gs.amap``): tasks run right there, so they can
  use the caller's loop-bound objects (an aiohttp session, say).

Every item ends exactly once: a coroutine's own ``CancelledError`` (not the run's) fails it
with ``gs.TaskCancelled``, and a blocking call's timeout counts from its start in a thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from gearshift._calls import is_async_callable
from gearshift._cancel import CancelToken, bind_token
from gearshift._gears._adaptive import NETWORK_SLACK, AdaptiveLimit, is_refusal
from gearshift._gears._base import CANCEL_GRACE, Gear, GearCosts, run_initializer, timeout_outcome, warn_stuck
from gearshift._gears._blocking import DaemonThreadPool
from gearshift._task import Batch, Outcome, Result, RunSpec, Task, format_tb
from gearshift.errors import TaskCancelled

__all__ = ["AsyncGear", "is_async_callable", "loop_factory", "loop_name"]  # is_async_callable: for its older importers


LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop to run: uvloop's when installed (it pays off with many events) or asked
    for, else asyncio's. ``loop="uvloop"`` without uvloop installed is an error that says so."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if loop == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ImportError("loop='uvloop' needs uvloop: pip install 'gearshift[fast]'") from None
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what runs the tasks (for the report)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


class _Clock:
    """A blocking call's timeout, counted from when a thread starts the call, not from its queueing.

    The thread only stamps ``started`` (no loop wake-up per call). A timer set at submission
    fires ``limit`` later, never before the real deadline; it expires the scope if the call
    started ``limit`` ago, else sets itself again for the time left.
    """

    __slots__ = ("handle", "limit", "scope", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop, scope: asyncio.Timeout, limit: float) -> None:
        self.scope = scope
        self.limit = limit
        self.started: float | None = None
        self.handle = loop.call_later(limit, self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        started = self.started
        left = self.limit if started is None else started + self.limit - time.monotonic()
        if started is not None and left <= 0:
            self.scope.reschedule(loop.time())  # expire now
        else:
            self.handle = loop.call_later(left, self._check)


def _same(fn: Any) -> Any:
    return fn


class _Slots:
    """A semaphore for tasks whose size may change while they wait (the adaptive limit).

    Loop-bound like ``asyncio.Semaphore``; a waiter handed a slot but cancelled before it
    resumed gives the slot back.
    """

    __slots__ = ("_waiters", "busy", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot, cancelled before it could use it
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        self.busy -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        while self._waiters and self.busy < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)

    @property
    def demand(self) -> int:
        """Tasks holding or waiting for a slot."""
        return self.busy + len(self._waiters)

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._hand_out()


class AsyncGear(Gear):
    name = "async"
    chunk_target = 0.5
    costs = GearCosts(
        handoff_per_batch=0.0, handoff_per_item=40e-6, batch_work=0.0, startup_per_worker=0.0, cpu_parallel="never",
        coroutines_only=True, min_workers=16, max_workers=1000, tie_rank=30, label="the async gear",
    )

    def __init__(self, workers: int | None = None, *, loop: str = "auto") -> None:
        """``workers``: tasks at once; None (the default) finds the number by measurement, per run.
        ``loop``: the event loop the gear runs when it owns one (called from sync code): "auto"
        (uvloop when installed), "uvloop" or "asyncio"; under ``gs.amap`` the caller's loop runs."""
        super().__init__(workers)
        self._loop_factory = loop_factory(loop)
        self._loop_used = ""  # what ran the last run's tasks, for the report
        #: No fixed concurrency: each run adapts it (see ``_adaptive``).
        self.adaptive = workers is None
        self._limit: AdaptiveLimit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._native = False
        self._thread: threading.Thread | None = None
        self._sem: _Slots | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # native mode; a task group tracks the others
        self._main_task: asyncio.Task[Any] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stop: asyncio.Event | None = None
        self._done: queue.SimpleQueue[list[Result] | None] = queue.SimpleQueue()
        self._native_done: list[Result] = []
        self._inbox: list[Batch] = []
        self._inbox_lock = threading.Lock()
        self._inbox_scheduled = False
        self._outbox: list[Result] = []
        self._native_event: asyncio.Event | None = None
        self._pool: DaemonThreadPool | None = None
        self._spec = RunSpec()
        self._token = CancelToken()
        self._is_async: dict[int, tuple[Callable[[], Any], bool]] = {}
        self._escaped: BaseException | None = None
        self._closing = False  # the run is cancelling its tasks: their CancelledError is its own

    @classmethod
    def default_workers(cls) -> int:
        return 100

    def max_inflight(self) -> int:
        return 2 * self.workers

    def window(self, chunk: int) -> int:
        # Every item becomes a task at once, so the window counts items, whatever the chunk:
        # chunks here only save hand-offs between the caller and the loop. While an adaptive
        # limit is in its slow start (4x a round trip), items must be there for it to grow into.
        limit = self._limit
        if limit is not None and limit.slow_start:
            return max(8 * self.workers, chunk)
        return max(2 * self.workers, chunk)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` (the caller's) instead of a loop of our own; call before ``open``."""
        self._loop = loop
        self._native = True

    # -- lifecycle ------------------------------------------------------------------------
    def describe(self) -> str:
        if self.adaptive:
            return "async gear, adaptive concurrency"
        return super().describe()

    def peak_workers(self) -> int | None:
        return None if self._limit is None or not self.adaptive else self._limit.peak_limit

    def notes(self) -> list[str]:
        notes = [] if self._limit is None else [self._limit.describe()]
        if self._loop_used:
            notes.append(f"event loop: {self._loop_used}")
        return notes

    def open(self, spec: RunSpec) -> None:
        self._spec = spec
        self._closing = False
        self._token = CancelToken()
        threads = self.workers
        if self.adaptive:
            self._limit = AdaptiveLimit(slack=NETWORK_SLACK)
            self.workers = self._limit.limit
            threads = self._limit.cap
        self._pool = DaemonThreadPool(max_workers=min(threads, 256), thread_name_prefix="gearshift-async")
        run_initializer(spec)
        if self._native:
            assert self._loop is not None
            self._loop_used = f"{loop_name(self._loop)} (the caller's)"
            self._sem = _Slots(self.workers)
            self._native_event = asyncio.Event()
            return
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="gearshift-async-loop", daemon=True)
        self._thread.start()
        started.wait()

    def _serve(self, started: threading.Event) -> None:
        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            try:
                runner.run(self._main(started))
            except asyncio.CancelledError:
                pass  # close(cancel=True): the task group cancelled every task and waited for them

    async def _main(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_used = f"{loop_name(self._loop)} (its own)"
        self._sem = _Slots(self.workers)
        self._stop = asyncio.Event()
        self._main_task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                started.set()
                await self._stop.wait()
        finally:
            self._tg = None

    # -- work -----------------------------------------------------------------------------
    def submit(self, batch: Batch) -> None:
        assert self._loop is not None
        if self._native:
            self._spawn(batch)
            return
        # Coalesce: one loop wake-up (a self-pipe write) for all batches submitted meanwhile.
        with self._inbox_lock:
            self._inbox.append(batch)
            if self._inbox_scheduled:
                return
            self._inbox_scheduled = True
        self._loop.call_soon_threadsafe(self._spawn_inbox)

    def _spawn_inbox(self) -> None:
        with self._inbox_lock:
            batches, self._inbox = self._inbox, []
            self._inbox_scheduled = False
        for batch in batches:
            self._spawn(batch)

    def _spawn(self, batch: Batch) -> None:
        is_async = self._async(batch.fn)
        for task in batch.tasks:
            coro = self._run(batch.fn, task, is_async)
            if self._tg is not None:
                self._tg.create_task(coro)  # the task group keeps track of it
                continue
            handle = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(handle)
            handle.add_done_callback(self._tasks.discard)

    def _async(self, fn: Callable[..., Any]) -> bool:
        # Keyed by id, so the entry keeps a (weak) reference to check: an id is unique only while
        # its object lives, and an executor's run sees any number of short-lived wrappers.
        known = self._is_async.get(id(fn))
        if known is None or known[0]() is not fn:
            if len(self._is_async) >= 256:
                self._is_async.clear()  # bounded
            try:
                ref: Callable[[], Any] = weakref.ref(fn)
            except TypeError:
                ref = functools.partial(_same, fn)
            known = self._is_async[id(fn)] = (ref, is_async_callable(fn))
        return known[1]

    async def _call(self, fn: Callable[[Any], Any], item: Any, token: CancelToken, clock: _Clock | None) -> Any:
        """Run a blocking ``fn`` in a thread (``clock``: its timeout, counted from its start there)."""
        assert self._pool is not None
        ctx = contextvars.copy_context()
        try:
            future = self._pool.submit(ctx.run, self._in_thread, fn, item, token, clock)
            try:
                result = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                if not future.cancel() and not self._closing:  # it runs on: count its thread as stuck
                    self._pool.abandon(future)
                raise
        finally:
            if clock is not None:
                clock.handle.cancel()
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            result = await result
        return result

    def _in_thread(self, fn: Callable[[Any], Any], item: Any, token: CancelToken, clock: _Clock | None) -> Any:
        if token.cancelled:  # the run was cancelled while this call waited for a thread
            raise asyncio.CancelledError
        if clock is not None:
            clock.started = time.monotonic()  # the item starts now: its deadline counts from here
        with bind_token(token):
            return fn(item)

    async def _run(self, fn: Callable[[Any], Any], task: Task, is_async: bool) -> None:
        assert self._sem is not None
        start = 0.0
        seen = 0
        scope: asyncio.Timeout | None = None
        token: CancelToken | None = None
        try:
            async with self._sem:
                start = time.perf_counter()
                seen = self._sem.busy
                if self._limit is not None:
                    self._limit.busy(seen)
                limit = self._spec.timeout
                if is_async:
                    # (No token: a token per coroutine would cost more than the coroutine.)
                    if limit is None:
                        value = await fn(task.item)
                    else:
                        async with asyncio.timeout(limit) as scope:
                            value = await fn(task.item)
                else:
                    # A blocking fn runs on in its thread after a timeout: its own token tells it to stop.
                    token = CancelToken(self._token)
                    if limit is None:
                        value = await self._call(fn, task.item, token, None)
                    else:
                        async with asyncio.timeout(None) as scope:  # see _Clock
                            clock = _Clock(asyncio.get_running_loop(), scope, limit)
                            value = await self._call(fn, task.item, token, clock)
        except asyncio.CancelledError as exc:
            if not self._cancelled(task, exc, start):
                return
            raise
        except Exception as exc:
            elapsed = time.perf_counter() - start
            if scope is not None and isinstance(exc, TimeoutError) and scope.expired():
                if token is not None:
                    token.cancel()
                self._adapt(elapsed, True, seen)
                self._deliver(timeout_outcome(task, self._spec.timeout, elapsed))
            else:
                self._adapt(elapsed, is_refusal(exc), seen)
                self._deliver(Outcome(task, False, exc, elapsed, format_tb(exc)))
            return
        except BaseException as exc:
            # SystemExit/KeyboardInterrupt from a task means "stop": raise it in the caller
            # (collect) rather than let it kill the loop thread and leave the run waiting.
            self._escaped = exc
            self.wake()
            return
        elapsed = time.perf_counter() - start
        self._adapt(elapsed, False, seen)
        self._deliver(Outcome(task, True, value, elapsed))

    def _adapt(self, latency: float, refused: bool, seen: int) -> None:
        """Feed the adaptive limit (on the loop); a new limit resizes the slots and the window."""
        limit = self._limit
        if limit is not None and limit.completed(latency, refused, self._sem.demand if self._sem else 0, seen):
            self.workers = limit.limit  # read by the driver for the window: more items come in
            assert self._sem is not None
            self._sem.resize(limit.limit)

    def _cancelled(self, task: Task, exc: asyncio.CancelledError, start: float) -> bool:
        """Whether a task that ended in ``exc`` was cancelled by the run (close, Ctrl-C, timeout).

        Otherwise the item failed on its own (it awaited a future someone else cancelled):
        it gets ``TaskCancelled``, a plain exception, so that neither the task group nor the
        caller's loop takes it for a cancellation of theirs, and the item still ends. A
        cancellation asked of this very task (``cancelling()``) stays one, as asyncio requires;
        if the run did not ask for it either, the item is reported as cancelled all the same.
        """
        current = asyncio.current_task()
        requested = current is not None and current.cancelling() > 0
        if requested and self._closing:
            return True
        error = TaskCancelled(task.item, task.index)
        error.__cause__ = exc
        elapsed = time.perf_counter() - start if start else 0.0
        self._deliver(Outcome(task, False, error, elapsed, format_tb(error)))
        return requested

    def _deliver(self, outcome: Outcome) -> None:
        if self._native:
            assert self._native_event is not None
            self._native_done.append(outcome)
            self._native_event.set()
            return
        # Coalesce: the outcomes of one loop iteration reach the caller in one hand-off.
        self._outbox.append(outcome)
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush_outbox)

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox:
            self._done.put(outbox)

    def _raise_escaped(self) -> None:
        escaped, self._escaped = self._escaped, None
        if escaped is not None:
            raise escaped

    def collect(self, timeout: float | None) -> list[Result]:
        outcomes: list[Result] = []
        self._raise_escaped()
        try:
            got = self._done.get(timeout=timeout)
        except queue.Empty:
            return outcomes
        self._raise_escaped()
        while True:
            if got is not None:
                outcomes.extend(got)
            try:
                got = self._done.get_nowait()
            except queue.Empty:
                return outcomes

    async def acollect(self, timeout: float | None) -> list[Result]:
        if not self._native:
            return await super().acollect(timeout)
        assert self._native_event is not None
        if not self._native_done:
            try:
                await asyncio.wait_for(self._native_event.wait(), timeout)
            except TimeoutError:
                pass
        self._native_event.clear()
        self._raise_escaped()
        outcomes, self._native_done = self._native_done, []
        return outcomes

    def wake(self) -> None:
        if self._native:
            if self._native_event is not None:
                self._native_event.set()
        else:
            self._done.put(None)

    # -- shutdown -------------------------------------------------------------------------
    def _cancel_all(self) -> None:
        self._closing = True
        if self._main_task is not None:
            self._main_task.cancel()  # its task group cancels every task, then waits for them
        for handle in list(self._tasks):
            handle.cancel()
        if self._stop is not None:
            self._stop.set()

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self._token.cancel()
        if self._native:
            self._closing = True
            for handle in list(self._tasks):
                handle.cancel()
        elif self._loop is not None and self._thread is not None:
            try:
                self._loop.call_soon_threadsafe(self._cancel_all if cancel else self._stop_soon)
            except RuntimeError:  # the loop already closed
                pass
            deadline = time.monotonic() + CANCEL_GRACE
            while self._thread.is_alive() and (not cancel or time.monotonic() < deadline):
                self._thread.join(0.05)  # in slices: the main thread keeps receiving signals
        if self._pool is not None:
            # Only timed-out (or cancelled) blocking calls can still run: give them a grace period.
            self._pool.shutdown(wait=False, cancel_futures=True)
            warn_stuck(self._pool.join(CANCEL_GRACE), "thread(s) of the async gear")
        self._reset()

    async def aclose(self, cancel: bool = False) -> None:
        """Close from the caller's loop, awaiting the cancelled tasks (native mode)."""
        if not self._native:
            await asyncio.to_thread(self.close, cancel)
            return
        if cancel:
            self._token.cancel()
        self._closing = True
        tasks = list(self._tasks)
        for handle in tasks:
            handle.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        pool = self._pool
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            if pool.join(0):  # joined off the loop: a stuck call may take the whole grace period
                warn_stuck(await asyncio.to_thread(pool.join, CANCEL_GRACE), "thread(s) of the async gear")
        self._reset()

    def _stop_soon(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _reset(self) -> None:
        self._tasks.clear()
        self._main_task = None
        self._thread = None
        self._pool = None
        self._done = queue.SimpleQueue()
        self._native_done = []
        self._inbox = []
        self._inbox_scheduled = False
        self._outbox = []
        self._is_async.clear()
        if not self._native:
            self._loop = None
