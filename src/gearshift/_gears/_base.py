"""The one small interface every gear implements.

The engine (``gearshift._engine``) owns scheduling: the in-flight window, order,
chunk sizes, retries, the error policy and progress. A gear only runs batches:

* ``open(spec)``     get ready (workers may start lazily, on the first submit);
* ``submit(batch)``  queue a batch; never blocks, the engine bounds what is queued;
* ``collect(t)``     block up to ``t`` seconds for outcomes, and enforce timeouts;
* ``wake()``         make a blocked ``collect`` return now (new work, shutdown);
* ``close(cancel)``  finish (or, with ``cancel``, drop) the work and stop every worker.

A new gear (dask, ray, sub-interpreters) is one new module with one subclass that
declares its costs (``GearCosts``, read by the advisor) and registers its name
(``gearshift.register_gear`` or the ``gearshift.gears`` entry-point group); docs/gears.md
walks through one. The interface is *provisional*: it may change until the pipeline and
the next gears have used it.

What every gear does the same way is written here once: the outcome of an item that ran
out of time (``timeout_outcome``), the error of an initializer that raised
(``initializer_error``, ``run_initializer``).

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
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from gearshift._task import Batch, Outcome, Result, RunSpec, Task
from gearshift.errors import InitializerError, TaskTimeout, short_repr

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


def timeout_outcome(task: Task, limit: float | None, elapsed: float | None = None) -> Outcome:
    """The one way an item fails for running past its timeout, in every gear: ``TaskTimeout`` naming it.

    ``elapsed`` defaults to the limit (the item was given up at its deadline).
    """
    seconds = limit or 0.0
    return Outcome(task, False, TaskTimeout(seconds, task.item, task.index), seconds if elapsed is None else elapsed)


def initializer_error(initializer: Callable[..., Any] | None, exc: BaseException) -> InitializerError:
    """The one error for an initializer that raised: names the initializer, the original is ``__cause__``."""
    error = InitializerError(f"initializer {short_repr(initializer)} raised {exc!r}")
    error.__cause__ = exc
    return error


def run_initializer(spec: RunSpec) -> None:
    """Run ``spec``'s initializer here (the caller or a worker); raise ``InitializerError`` if it raises.

    Only ``Exception`` is converted: Ctrl-C or ``sys.exit`` in the caller's thread stays what it is.
    A worker thread that must report everything catches ``BaseException`` and uses ``initializer_error``.
    """
    if spec.initializer is None:
        return
    try:
        spec.initializer(*spec.initargs)
    except Exception as exc:
        raise initializer_error(spec.initializer, exc) from exc


CpuParallel = Literal["always", "without_gil", "never"]


@dataclass(frozen=True, slots=True)
class GearCosts:
    """What a gear costs beyond the work itself, as plain data: the advisor's model reads it (provisional).

    Seconds unless said otherwise; these are declared defaults. For a gear with
    ``measure=True`` the advisor, when the gear is in question, starts one worker and
    times two items: the measured round trip replaces ``handoff_per_batch`` and the
    measured start-up replaces the declared one. The model (``gearshift._advisor.model``)
    says how each field enters the predicted speedup.
    """

    #: Caller-side time per batch that cannot overlap the work (a queue and a wake-up; a pipe round trip).
    handoff_per_batch: float = 30e-6
    #: Caller-side time per item, however the items are batched (the async gear: a task and a loop turn).
    handoff_per_item: float = 0.0
    #: Seconds of work a batch should hold so its hand-off stays small (0: one item per batch).
    batch_work: float = 0.002
    #: Start-up before the first item: once, and per worker.
    startup: float = 0.0
    startup_per_worker: float = 1e-4
    #: Workers are processes that import the modules again unless they start by fork (spawn, forkserver).
    reimports: bool = False
    #: The function, items and results are pickled (they cross a process boundary); an unpicklable
    #: function rules the gear out.
    pickles: bool = False
    #: The function must be importable by name (plain pickle, no cloudpickle): sub-interpreters
    #: cannot share lambdas or closures (cpython#125865); such a function rules the gear out.
    by_reference: bool = False
    #: Used only when the caller names it (a cluster: ``gear="dask"`` or a gear object with its
    #: client): the advisor predicts it, auto never shifts to it on its own.
    on_request: bool = False
    #: When the workers run the CPU part of calls in parallel: "always" (processes, sub-interpreters);
    #: "without_gil" (threads: on a free-threaded build, or for code that releases the GIL);
    #: "never" (one thread, one event loop).
    cpu_parallel: CpuParallel = "without_gil"
    #: Worth it only for coroutine functions (the async gear: blocking functions would run in threads).
    coroutines_only: bool = False
    #: Bounds on the workers the model sizes from the wait (cores / (1 - wait fraction)).
    min_workers: int = 1
    max_workers: int = 128
    max_workers_per_core: int | None = None
    #: Among gears within 10% of the best predicted speedup, the lowest rank wins (the simplest gear).
    tie_rank: int = 100
    #: The advisor may start one worker and time two items to replace the declared hand-off and start-up.
    measure: bool = False
    #: The gear in the advisor's words ("threads", "processes"); "" gives "the <name> gear".
    label: str = ""


def cpu_count() -> int:
    """Cores this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Gear(ABC):
    """Runs batches of tasks; see the module docstring for the contract.

    Provisional: the base class of every gear, public so that gears can live outside the
    package; it may change until the pipeline and the next gears have used it.
    """

    name: ClassVar[str]
    #: What the advisor needs to predict this gear; None: it cannot, and lists the gear as such.
    costs: ClassVar[GearCosts | None] = None
    #: A gear that picks another gear to run the items (auto): never a candidate of the advisor itself.
    picks_gear: ClassVar[bool] = False
    #: Seconds of work a batch should hold so its dispatch cost stays ~1% (0: never chunk).
    #: Read on every admission, so a gear may change it as it learns (the auto gear does).
    chunk_target: float = 0.0
    #: Seconds of work a batch holds at least, even where the engine shrinks batches to balance
    #: the end of a run (0: no floor). For gears whose hand-off costs milliseconds (a cluster).
    min_batch_work: float = 0.0
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

    def prestart(self, calls: int) -> None:  # noqa: B027 - optional hook
        """From a caller's thread, after ``open``: ``calls`` more calls are coming; a gear that
        starts workers lazily may start them now (the thread gear does, as the stdlib's pool)."""

    @classmethod
    def unavailable(cls) -> str:
        """Why this gear cannot run here (a Python too old, an extra not installed), or "".

        The advisor leaves out a gear that cannot run; making one says why."""
        return ""

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

    def peak_workers(self) -> int | None:
        """Most workers (or calls in flight) the last run reached when the gear sized itself; else None."""
        return None

    def notes(self) -> list[str]:
        """What the gear learned during the run, for the report's reasons (e.g. an adapted limit)."""
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} workers={self.workers}>"
