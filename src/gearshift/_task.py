"""The units of work that pass between the engine and the gears.

A ``Task`` is one item (with its input position); a ``Batch`` is the tasks a gear
runs as one dispatch, all with the same function; an ``Outcome`` is what came back.
``call`` is the one place a user function is invoked, in every gear, so coroutine
functions work everywhere.
"""

from __future__ import annotations

import asyncio
import inspect
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


@dataclass(slots=True)
class Batch:
    """Tasks a gear dispatches together (a chunk), all run by ``fn``."""

    fn: Callable[[Any], Any]
    tasks: list[Task]


@dataclass(slots=True)
class Outcome:
    """What running one task gave: a value, or an exception with its formatted traceback."""

    task: Task
    ok: bool
    value: Any
    elapsed: float = 0.0
    tb: str = ""


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Per-run options every gear honours in its own way."""

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


def call(fn: Callable[[Any], Any], item: Any) -> Any:
    """Run ``fn(item)``; a coroutine it returns is run to completion on this thread's loop."""
    result = fn(item)
    if inspect.iscoroutine(result):
        return _runner().run(result)
    return result


def format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def run_task(fn: Callable[[Any], Any], task: Task, token: CancelToken | None = None) -> Outcome:
    """Run one task, catching its exception into the outcome (never raising ``Exception``)."""
    return run_batch(fn, [task], token)[0]


def run_batch(fn: Callable[[Any], Any], tasks: list[Task], token: CancelToken | None = None) -> list[Outcome]:
    """Run tasks one after another on this thread; the hot loop of the serial and thread gears.

    Kept lean on purpose: for tiny tasks this loop *is* the cost of a run.
    """
    outcomes: list[Outcome] = []
    append = outcomes.append
    perf = time.perf_counter
    with bind_token(token):
        for task in tasks:
            start = perf()
            try:
                value = fn(task.item)
                if isinstance(value, CoroutineType):
                    value = _runner().run(value)
            except Exception as exc:
                append(Outcome(task, False, exc, perf() - start, format_tb(exc)))
                continue
            append(Outcome(task, True, value, perf() - start))
    return outcomes
