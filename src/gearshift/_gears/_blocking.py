"""Threads for the blocking functions the async gear runs, never joined at interpreter exit.

``ThreadPoolExecutor`` joins its threads when the interpreter exits, so one blocking call
that ignores ``gs.cancelled()`` (a stuck socket, a long sleep) would keep a program that was
interrupted with Ctrl-C from exiting. These threads are daemons: ``shutdown(wait=True)``
joins them, as the gear does on a normal end, while a cancelled run leaves a stuck one
behind to finish on its own.

Threads cannot be killed either: a call the gear gave up on (a timeout) keeps its thread
until the function returns. ``abandon`` marks such a call, and the pool then counts its
thread as gone, starting another if work waits, so ``max_workers`` threads stay usable and
items queued behind stuck calls still run (as the thread gear does with its ``stuck``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class DaemonThreadPool(Executor):
    """A minimal ``concurrent.futures.Executor`` over ``max_workers`` usable daemon threads.

    Usable: threads running an abandoned call do not count (see ``abandon``).
    """

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work that no queued call is promised to
        self._backlog = 0  # queued calls that no thread is promised to
        self._stuck: set[Future[Any]] = set()  # abandoned calls still running
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if kwargs:
            raise TypeError("DaemonThreadPool.submit takes positional arguments only")
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.put((future, fn, args))
            if self._idle > 0:
                self._idle -= 1
            elif not self._spawn():
                self._backlog += 1
        return future

    def _spawn(self) -> bool:
        """Start a thread if fewer than ``max_workers`` are usable; call with the lock held."""
        if len(self._threads) - len(self._stuck) >= self._max:
            return False
        thread = threading.Thread(target=self._serve, name=f"{self._prefix}-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return True

    def abandon(self, future: Future[Any]) -> None:
        """Stop counting the thread running ``future`` (given up on) until the call returns."""
        with self._lock:
            if not future.running() or self._closed:
                return  # it ended meanwhile (or never started): its thread is usable
            self._stuck.add(future)
            if self._backlog > 0 and self._spawn():
                self._backlog -= 1

    @property
    def stuck(self) -> int:
        """Abandoned calls still running."""
        with self._lock:
            return len(self._stuck)

    def _serve(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            future, fn, args = work
            work = None
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with self._lock:
                self._stuck.discard(future)
                if self._backlog > 0:
                    self._backlog -= 1  # the next queued call is this thread's
                else:
                    self._idle += 1
            del future, fn, args

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    work = self._work.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.1)  # in slices: the main thread keeps receiving signals

    def join(self, timeout: float) -> list[str]:
        """After ``shutdown(wait=False)``: wait up to ``timeout`` s; return the threads still busy."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in threads if thread.is_alive()]
