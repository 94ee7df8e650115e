"""The units of work that pass between the engine and the gears.

A ``Task`` is one item (with its input position); a ``Batch`` is the tasks a gear
runs as one dispatch, all with the same function; an ``Outcome`` is what came back.
``call`` is the one place a user function is invoked, in every gear, so coroutine
functions work everywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any

from gearshift._cancel import CancelToken, bind_token


@dataclass(slots=True)
class Task:
    """One item of input: ``index`` is its input position, the key the engine orders by."""

    index: int
    item: Any
    attempt: int = 1


class Batch:
    """Items a gear dispatches together (a chunk), all run by ``fn``.

    Fresh input comes as consecutive items (``Batch.run(fn, start, items)``): no object
    per item, which is what keeps tiny tasks cheap. Retries and re-runs come as explicit
    ``Task`` lists (``Batch(fn, tasks)``). ``tasks`` materialises either form.

    Provisional: public for gear authors (docs/gears.md); may change until the pipeline and the
    new gears have used it.
    """

    __slots__ = ("_tasks", "attempt", "fn", "items", "start")

    def __init__(self, fn: Callable[[Any], Any], tasks: list[Task]) -> None:
        self.fn = fn
        self._tasks: list[Task] | None = tasks
        self.items: list[Any] = [task.item for task in tasks]
        self.start = -1  # not consecutive
        self.attempt = 1

    @classmethod
    def run(cls, fn: Callable[[Any], Any], start: int, items: list[Any], attempt: int = 1) -> Batch:
        """``items`` at input positions ``start``, ``start + 1``, ..."""
        batch = cls.__new__(cls)
        batch.fn = fn
        batch._tasks = None
        batch.items = items
        batch.start = start
        batch.attempt = attempt
        return batch

    @property
    def tasks(self) -> list[Task]:
        if self._tasks is None:
            start, attempt = self.start, self.attempt
            self._tasks = [Task(start + pos, item, attempt) for pos, item in enumerate(self.items)]
        return self._tasks

    def task(self, pos: int) -> Task:
        if self._tasks is not None:
            return self._tasks[pos]
        return Task(self.start + pos, self.items[pos], self.attempt)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"<Batch of {len(self.items)} from #{self.start if self._tasks is None else self.tasks[0].index}>"


@dataclass(slots=True)
class Outcome:
    """What running one task gave: a value, or an exception with its formatted traceback.

    Provisional: public for gear authors (docs/gears.md); may change until the pipeline and the
    new gears have used it.
    """

    task: Task
    ok: bool
    value: Any
    elapsed: float = 0.0
    tb: str = ""


@dataclass(slots=True)
class Done:
    """Consecutive items of ``batch`` that all succeeded: positions ``first``, ``first + 1``...

    The fast path: one object per run of successes instead of one per item.

    Provisional: public for gear authors (docs/gears.md); may change until the pipeline and the
    new gears have used it.
    """

    batch: Batch
    first: int
    values: list[Any]
    elapsed: float = 0.0  # seconds of all these calls together

    def outcomes(self) -> list[Outcome]:
        """The per-item view, for consumers that need one outcome per task."""
        share = self.elapsed / len(self.values) if self.values else 0.0
        task = self.batch.task
        return [Outcome(task(self.first + i), True, value, share) for i, value in enumerate(self.values)]


Result = Outcome | Done


def expand(results: list[Result]) -> list[Outcome]:
    """Per-item outcomes from what ``Gear.collect`` returned."""
    out: list[Outcome] = []
    for result in results:
        if isinstance(result, Done):
            out.extend(result.outcomes())
        else:
            out.append(result)
    return out


def count(results: list[Result]) -> int:
    """How many items ``results`` covers."""
    return sum(len(r.values) if isinstance(r, Done) else 1 for r in results)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Per-run options every gear honours in its own way.

    Provisional: public for gear authors (docs/gears.md); may change until the pipeline and the
    new gears have used it.
    """

    timeout: float | None = None
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    max_tasks_per_worker: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_runners = threading.local()


def _runner() -> asyncio.Runner:
    """One event loop per worker thread, reused, for coroutine functions outside the async gear."""
    runner: asyncio.Runner | None = getattr(_runners, "runner", None)
    if runner is None:
        runner = asyncio.Runner()
        _runners.runner = runner
    return runner


def close_runner() -> None:
    """Close this thread's event loop, if ``call`` made one."""
    runner = getattr(_runners, "runner", None)
    if runner is not None:
        runner.close()
        _runners.runner = None


def run_coroutine(coro: Any) -> Any:
    """Run a coroutine to completion on this thread's own event loop."""
    return _runner().run(coro)


def call(fn: Callable[[Any], Any], item: Any) -> Any:
    """Run ``fn(item)``; a coroutine it returns is run to completion on this thread's loop."""
    result = fn(item)
    if type(result) is CoroutineType:
        return _runner().run(result)
    return result


def format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def run_task(fn: Callable[[Any], Any], task: Task, token: CancelToken | None = None) -> Outcome:
    """Run one task, catching its exception into the outcome (never raising ``Exception``)."""
    start = time.perf_counter()
    with bind_token(token):
        try:
            value = call(fn, task.item)
        except Exception as exc:
            return Outcome(task, False, exc, time.perf_counter() - start, format_tb(exc))
    return Outcome(task, True, value, time.perf_counter() - start)


def run_batch(batch: Batch, token: CancelToken | None = None) -> list[Result]:
    """Run a batch on this thread: the hot loop of the serial and thread gears.

    Successes accumulate in one ``Done`` per run of them; a failure ends the run with an
    ``Outcome`` for that item and the loop resumes after it. For tiny tasks this loop
    *is* the cost of a run, so it creates nothing per item but the result.
    """
    results: list[Result] = []
    fn, items = batch.fn, batch.items
    n = len(items)
    pos = 0
    perf = time.perf_counter
    with bind_token(token):
        while pos < n:
            values: list[Any] = []
            append = values.append
            start = perf()
            try:
                for item in items if pos == 0 else itertools.islice(items, pos, None):
                    value = fn(item)
                    if type(value) is CoroutineType:
                        value = _runner().run(value)
                    append(value)
            except Exception as exc:
                failed = pos + len(values)
                if values:
                    results.append(Done(batch, pos, values, perf() - start))
                results.append(Outcome(batch.task(failed), False, exc, 0.0, format_tb(exc)))
                pos = failed + 1
            else:
                results.append(Done(batch, pos, values, perf() - start))
                pos = n
    return results
