"""``gs.map``, ``gs.imap`` and ``gs.amap``: one function over many items, in a gear."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Hashable, Iterable, Iterator
from typing import Any, Literal

from gearshift._engine import ErrorPolicy, PullArg, Report, Scheduler, adrive, drive
from gearshift._gears import Gear, make_gear
from gearshift._progress import ProgressArg
from gearshift._rate import RateArg
from gearshift._retry import Retry
from gearshift._task import RunSpec

__all__ = ["Results", "ResultIterator", "amap", "imap", "map"]

GearArg = str | Gear


class Results(list[Any]):
    """The list ``gs.map`` returns, with the run's ``report`` attached."""

    report: Report


class ResultIterator(Iterator[Any]):
    """The lazy results of ``gs.imap``; ``report`` fills in as the run goes.

    Breaking out of a loop over it, or ``close()``, stops the run and its workers.
    """

    def __init__(self, chunks: Iterator[list[tuple[int, Any]]], scheduler: Scheduler) -> None:
        self._chunks = chunks
        self._current: Iterator[tuple[int, Any]] = iter(())
        self._scheduler = scheduler

    @property
    def report(self) -> Report:
        return self._scheduler.report

    def __iter__(self) -> ResultIterator:
        return self

    def __next__(self) -> Any:
        for pair in self._current:
            return pair[1]
        while True:
            self._current = iter(next(self._chunks))  # StopIteration ends us too
            for pair in self._current:
                return pair[1]

    def close(self) -> None:
        self._current = iter(())
        self._chunks.close()  # type: ignore[attr-defined]

    def __enter__(self) -> ResultIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _workers(workers: int | None, concurrency: int | None) -> int | None:
    if workers is not None and concurrency is not None and workers != concurrency:
        raise ValueError("workers and concurrency are the same setting; give one of them")
    return workers if workers is not None else concurrency


def _prepare(
    fn: Callable[[Any], Any],
    items: Iterable[Any] | AsyncIterable[Any],
    gear: GearArg,
    workers: int | None,
    concurrency: int | None,
    ordered: bool,
    chunksize: int | Literal["auto"],
    errors: ErrorPolicy,
    progress: ProgressArg,
    timeout: float | None,
    retries: int | Retry | None,
    rate: RateArg,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    max_tasks_per_worker: int | None,
    pull: PullArg,
    rate_key: Callable[[Any], Hashable] | None = None,
) -> tuple[Scheduler, Gear, RunSpec]:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    timeout = _check_timeout(timeout)
    if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
        raise ValueError(f"max_tasks_per_worker must be >= 1, got {max_tasks_per_worker!r}")
    the_gear = make_gear(gear, _workers(workers, concurrency))
    scheduler = Scheduler(
        fn, items, the_gear, ordered=ordered, chunksize=chunksize, errors=errors, retries=retries,
        rate=rate, progress=progress, pull=pull, rate_key=rate_key,
    )
    # The auto gear reports its choice on the run's report, and sizes it from the input's length.
    extra = {"report": scheduler.report, "total": scheduler.total}
    spec = RunSpec(timeout, initializer, tuple(initargs), max_tasks_per_worker, extra)
    return scheduler, the_gear, spec


def _check_timeout(timeout: float | None) -> float | None:
    """Seconds per item, or None: ``inf`` means no timeout; nan, zero and negatives are refused."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be positive seconds (or None / inf for none), got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


def _refuse_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"gs.{name}() blocks, and was called from a running event loop; "
        "use `async for result in gs.amap(...)` inside async code"
    )


def imap(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    gear: GearArg = "auto",
    workers: int | None = None,
    concurrency: int | None = None,
    ordered: bool = True,
    chunksize: int | Literal["auto"] = "auto",
    errors: ErrorPolicy = "raise",
    progress: ProgressArg = False,
    timeout: float | None = None,
    retries: int | Retry | None = 0,
    rate: RateArg = None,
    rate_key: Callable[[Any], Hashable] | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_worker: int | None = None,
    pull: PullArg = "auto",
) -> ResultIterator:
    """Lazily yield ``fn(item)`` for each item, running them concurrently in ``gear``.

    Memory stays bounded however long (or endless) ``items`` is: only a window of a
    few batches per worker is in flight. See ``gs.map`` for the options.
    """
    _refuse_running_loop("imap")
    scheduler, the_gear, spec = _prepare(
        fn, items, gear, workers, concurrency, ordered, chunksize, errors, progress, timeout, retries, rate,
        initializer, initargs, max_tasks_per_worker, pull, rate_key,
    )
    if scheduler.reads_async:
        raise TypeError("the input is an async iterable: read it with `async for r in gs.amap(...)`")
    return ResultIterator(drive(scheduler, the_gear, spec), scheduler)


def map(  # noqa: A001 - the name is the point
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    gear: GearArg = "auto",
    workers: int | None = None,
    concurrency: int | None = None,
    ordered: bool = True,
    chunksize: int | Literal["auto"] = "auto",
    errors: ErrorPolicy = "raise",
    progress: ProgressArg = False,
    timeout: float | None = None,
    retries: int | Retry | None = 0,
    rate: RateArg = None,
    rate_key: Callable[[Any], Hashable] | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_worker: int | None = None,
    pull: PullArg = "auto",
) -> Results:
    """Run ``fn`` over ``items`` concurrently and return the results as a list.

    gear:      "auto" (measure the first items, then shift to the gear they call for; the
               choice and its reasons are on ``report.gear`` / ``report.reasons``),
               "serial", "thread", "process", "async" (or a Gear object).
    workers:   threads or processes, or tasks at once for "async" (alias: ``concurrency``).
    ordered:   results in input order (True) or as they complete (False).
    chunksize: "auto" sizes batches from measured task time; an int fixes it.
    errors:    "raise" cancels the rest and re-raises the first error (with the item and
               the worker's traceback); "collect" puts a ``gs.Failure`` in its place;
               "skip" drops it (counted in ``report.skipped``).
    timeout:   seconds per item, counted from its start; the item fails with ``gs.TaskTimeout``
               (``None`` or ``inf``: no timeout).
    retries:   extra attempts per item (int) or a ``gs.Retry`` policy.
    rate:      at most this many item starts, e.g. ``"50/s"``, counted per item (retries
               included), with a burst of a tenth of a second's worth at most; under a rate
               at most ``workers`` items are in flight, so none waits in a queue.
               A mapping sets a rate per key: ``rate={"api.example.com": "10/s", "*": "2/s"}``
               with ``rate_key=`` a function from an item to its key (e.g. the URL's host);
               ``"*"`` gives each key not listed a bucket of its own, keys not covered are not
               limited. An item whose key has no token waits apart (up to a few hundred
               items, then the input waits too) while items of other keys go on.
    pull:      how the input is read. "auto": a sized input (list, tuple, range, dict...)
               on the calling thread, any other iterable (a generator, a file, a socket
               reader) by a thread of its own ("gearshift-source"), so a slow or blocked
               input never delays results or timeouts; memory stays bounded. "thread" or
               "caller" force one way; "caller" is for inputs bound to their thread (a
               sqlite3 cursor is detected and read there by "auto"), at the cost of the
               run waiting while the input does. The input's thread stops between items:
               after an early end (an error, Ctrl-C, a closed ``imap``) it gets a grace
               period to return its next item, and is then left to finish with a warning.
    progress:  a progress bar on stderr when it is a terminal (``"force"``: always).

    On an exception (Ctrl-C included) the results finished so far are on the exception as
    ``partial_results`` (a dict from input position to result). When the input iterator
    itself raises, every item it produced before is run and delivered first, then its
    exception is raised (``partial_results`` holds them all).

    A Gear object may be passed for run after run; it runs one run at a time, and a second
    run started on it while it is in use is refused with RuntimeError.
    """
    _refuse_running_loop("map")
    scheduler, the_gear, spec = _prepare(
        fn, items, gear, workers, concurrency, ordered, chunksize, errors, progress, timeout, retries, rate,
        initializer, initargs, max_tasks_per_worker, pull, rate_key,
    )
    done: dict[int, Any] = {}
    results = Results()
    try:
        for chunk in drive(scheduler, the_gear, spec):
            done.update(chunk)
    except BaseException as exc:
        # Released but not yet yielded (``ready``) counts too: those results exist.
        partial = {**done, **dict(scheduler.ready), **scheduler.buffered()}
        try:
            exc.partial_results = dict(sorted(partial.items()))  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass
        raise
    results.extend(done.values())
    results.report = scheduler.report
    return results


async def amap(
    fn: Callable[[Any], Any],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    gear: GearArg = "async",
    workers: int | None = None,
    concurrency: int | None = None,
    ordered: bool = True,
    chunksize: int | Literal["auto"] = "auto",
    errors: ErrorPolicy = "raise",
    progress: ProgressArg = False,
    timeout: float | None = None,
    retries: int | Retry | None = 0,
    rate: RateArg = None,
    rate_key: Callable[[Any], Hashable] | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_worker: int | None = None,
    pull: PullArg = "auto",
) -> AsyncIterator[Any]:
    """``gs.imap`` for async code: ``async for result in gs.amap(fetch, urls, concurrency=100)``.

    ``items`` may also be an async iterable (an async generator, a stream reader): it is
    read by a task on the caller's loop, into the same bounded buffer.

    In the async gear the tasks run on the caller's own event loop. Use
    ``contextlib.aclosing(gs.amap(...))`` when you may break out of the loop early, so
    the run stops at once rather than when the generator is collected.
    """
    scheduler, the_gear, spec = _prepare(
        fn, items, gear, workers, concurrency, ordered, chunksize, errors, progress, timeout, retries, rate,
        initializer, initargs, max_tasks_per_worker, pull, rate_key,
    )
    chunks = adrive(scheduler, the_gear, spec)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            for _, value in chunk:
                yield value
