"""The one small interface every gear implements.

The engine (``gearshift._engine``) owns scheduling: the in-flight window, order,
chunk sizes, retries, the error policy and progress. A gear only runs batches:

* ``open(spec)``     get ready (workers may start lazily, on the first submit);
* ``submit(batch)``  queue a batch; never blocks, the engine bounds what is queued;
* ``collect(t)``     block up to ``t`` seconds for outcomes, and enforce timeouts;
* ``wake()``         make a blocked ``collect`` return now (new work, shutdown);
* ``close(cancel)``  finish (or, with ``cancel``, drop) the work and stop every worker.

A new gear (dask, ray, sub-interpreters) is one new module with one subclass.

A gear object runs one run at a time: the engine claims it for a run (``claim``) and
releases it at the run's end, so a second run on a gear in use is refused at once
instead of mixing its batches and outcomes with the first's. Run after run is fine.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

from gearshift._task import Batch, Result, RunSpec

#: How long closing waits for threads whose functions were cancelled: threads cannot be killed.
CANCEL_GRACE = 1.5

_Thread = TypeVar("_Thread", bound=threading.Thread)
_claims = threading.Lock()


def join_threads(threads: Iterable[_Thread], grace: Callable[[_Thread], bool], what: str) -> None:
    """Join ``threads``; the ones ``grace`` picks (cancelled, timed out) get ``CANCEL_GRACE`` in all.

    Joins in slices, so the main thread keeps receiving signals (Ctrl-C). A thread still
    running after its grace is left to finish (a daemon) and named in a RuntimeWarning.
    """
    deadline = time.monotonic() + CANCEL_GRACE
    stuck = []
    for thread in threads:
        if grace(thread):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        else:
            while thread.is_alive():
                thread.join(0.1)
    warn_stuck(stuck, what)


def warn_stuck(names: list[str], what: str) -> None:
    """Say which threads outlived their cancellation, and why that happens."""
    if names:
        warnings.warn(
            f"gearshift: {len(names)} {what} did not stop within {CANCEL_GRACE}s of cancellation "
            f"({', '.join(names)}); their functions ignore gs.cancelled() and will finish on their own",
            RuntimeWarning,
            stacklevel=4,
        )


def cpu_count() -> int:
    """Cores this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Gear(ABC):
    """Runs batches of tasks; see the module docstring for the contract."""

    name: ClassVar[str]
    #: Seconds of work a batch should hold so its dispatch cost stays ~1% (0: never chunk).
    #: Read on every admission, so a gear may change it as it learns (the auto gear does).
    chunk_target: float = 0.0
    #: True when items and the function cross a process boundary (must pickle).
    pickles: ClassVar[bool] = False
    #: True while a run holds this gear (see ``claim``).
    in_use: bool = False

    def __init__(self, workers: int | None = None) -> None:
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.workers: int = workers if workers is not None else self.default_workers()

    @classmethod
    def default_workers(cls) -> int:
        return cpu_count()

    def max_inflight(self) -> int:
        """Batches worth keeping queued: enough that no worker waits for the next one."""
        return 2 * self.workers

    def window(self, chunk: int) -> int:
        """Items the engine may have in this gear at once, given its chunk size."""
        return self.max_inflight() * chunk

    def claim(self) -> None:
        """Take this gear for one run; refuse at once if another run holds it."""
        with _claims:
            if self.in_use:
                raise RuntimeError(
                    f"{self!r} is already running another run (gs.map/imap/amap); a gear object runs "
                    "one run at a time. Give each concurrent run its own gear object, or pass the "
                    f"gear's name (gear={self.name!r}) to get a fresh one per run."
                )
            self.in_use = True

    def release(self) -> None:
        """End this gear's run: the next run may claim it."""
        self.in_use = False

    def check(self, fn: Callable[..., Any]) -> None:  # noqa: B027 - optional hook
        """Raise before any worker starts if ``fn`` cannot run in this gear."""

    @abstractmethod
    def open(self, spec: RunSpec) -> None: ...

    @abstractmethod
    def submit(self, batch: Batch) -> None: ...

    @abstractmethod
    def collect(self, timeout: float | None) -> list[Result]: ...

    async def acollect(self, timeout: float | None) -> list[Result]:
        """``collect`` for async callers; gears with a native loop override it."""
        return await asyncio.to_thread(self.collect, timeout)

    @abstractmethod
    def wake(self) -> None: ...

    @abstractmethod
    def close(self, cancel: bool = False) -> None: ...

    async def aclose(self, cancel: bool = False) -> None:
        """``close`` for async callers."""
        await asyncio.to_thread(self.close, cancel)

    def describe(self) -> str:
        return f"{self.name} gear, {self.workers} worker{'s' if self.workers != 1 else ''}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} workers={self.workers}>"
