"""The scheduling engine, written once for every gear.

``Scheduler`` is a state machine with no I/O of its own: it admits items from the
input into batches (bounded window, adaptive chunk size, rate limit), takes outcomes
back (retries, error policy, progress) and releases results (in input order or as
they complete). Two thin drivers move it: ``drive`` for sync callers (``gs.map``,
``gs.imap``) and ``adrive`` for async ones (``gs.amap``). A gear only runs batches.
"""

from __future__ import annotations

import heapq
import itertools
import math
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal

from gearshift._gears import Gear
from gearshift._gears.aio import AsyncGear
from gearshift._progress import Progress, ProgressArg, make_progress
from gearshift._rate import RateLimiter, parse_rate
from gearshift._retry import Retry, as_retry
from gearshift._task import Batch, Done, Outcome, Result, RunSpec, Task, format_tb
from gearshift.errors import Failure, short_repr

ErrorPolicy = Literal["raise", "collect", "skip"]
ERROR_POLICIES = ("raise", "collect", "skip")
#: Longest a driver blocks at once, so the main thread keeps handling signals promptly.
POLL = 0.25
#: Largest chunk ever formed, whatever the measurements say.
MAX_CHUNK = 50_000
#: Chunks are capped so the known remaining input makes at least this many per worker (tail balance).
CHUNKS_PER_WORKER = 4

_SKIP = object()


@dataclass
class Report:
    """What a run did: counts, the gear, and, under ``gear="auto"``, why that gear."""

    gear: str = ""
    workers: int = 0
    items: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    failures_by_type: Counter[str] = field(default_factory=Counter)
    chunksize: int = 1
    wall: float = 0.0
    reasons: list[str] = field(default_factory=list)
    advice: Any = None

    @property
    def throughput(self) -> float:
        """Items per second over the whole run."""
        return self.items / self.wall if self.wall > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.items} items in {self.wall:.3f}s ({self.throughput:,.0f}/s) on the {self.gear}",
            f"succeeded {self.succeeded}, failed {self.failed}, skipped {self.skipped}, retried {self.retried}",
        ]
        if self.failures_by_type:
            lines.append("failures: " + ", ".join(f"{k} x{v}" for k, v in self.failures_by_type.most_common()))
        lines.extend(f"why: {reason}" for reason in self.reasons)
        return "\n".join(lines)


def fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or short_repr(fn, 60)


class Scheduler:
    """Admission, chunking, retries, error policy and ordering for one run (no I/O)."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        gear: Gear,
        *,
        ordered: bool = True,
        chunksize: int | Literal["auto"] = "auto",
        errors: ErrorPolicy = "raise",
        retries: int | Retry | None = None,
        rate: str | float | None = None,
        progress: ProgressArg = False,
    ) -> None:
        if errors not in ERROR_POLICIES:
            raise ValueError(f"errors must be one of {ERROR_POLICIES}, got {errors!r}")
        if chunksize != "auto" and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be 'auto' or a positive int, got {chunksize!r}")
        self.fn = fn
        self.gear = gear
        self.ordered = ordered
        self.errors = errors
        self.retry = as_retry(retries)
        self._fixed_chunk = None if chunksize == "auto" else chunksize
        self._limiter = None if rate is None else RateLimiter(parse_rate(rate))
        try:
            self.total: int | None = len(items)  # type: ignore[arg-type]
        except TypeError:
            self.total = None
        self._source: Iterator[Any] = iter(items)
        self._next_index = 0
        self.exhausted = False
        self._outstanding = 0  # tasks handed to the gear, no outcome yet
        self._admitted = 0  # tasks taken from the input and not yet released
        self._retry_heap: list[tuple[float, int, Task]] = []
        self._retry_seq = itertools.count()
        # Ordered runs: finished results waiting for their turn, as runs of consecutive
        # results keyed by the input position of their first (one entry per batch, not per item).
        self._buffer: dict[int, list[Any]] = {}
        self._next_release = 0
        self.ready: deque[tuple[int, Any]] = deque()
        self._per_item: float | None = None
        self._rate_wait = 0.0
        self.report = Report(gear=gear.describe(), workers=gear.workers)
        self._progress: Progress = make_progress(progress, self.total, fn_name(fn))
        self._started = time.perf_counter()

    # -- admission ------------------------------------------------------------------------
    def chunk_size(self) -> int:
        if self._fixed_chunk is not None:
            return self._fixed_chunk
        target = self.gear.chunk_target
        if target <= 0 or self._limiter is not None or self._per_item is None:
            return 1
        size = int(target / max(self._per_item, 1e-7))
        if self.total is not None:
            remaining = self.total - self._next_index
            size = min(size, math.ceil(remaining / (CHUNKS_PER_WORKER * self.gear.workers)))
        return max(1, min(size, MAX_CHUNK))

    def take_batches(self, now: float) -> list[Batch]:
        """The batches to hand to the gear now: due retries first, then fresh input."""
        batches: list[Batch] = []
        while self._retry_heap and self._retry_heap[0][0] <= now:
            _, _, task = heapq.heappop(self._retry_heap)
            batches.append(Batch(self.fn, [task]))
            self._outstanding += 1
        self._rate_wait = 0.0
        while not self.exhausted:
            chunk = self.chunk_size()
            window = self.gear.window(chunk)
            if self._outstanding >= window or self._admitted - self._outstanding >= 2 * window:
                break
            if self._limiter is not None:
                wait = self._limiter.wait_time(now)
                if wait > 0:
                    self._rate_wait = wait
                    break
                self._limiter.take()
            items = list(itertools.islice(self._source, chunk))
            n = len(items)
            if n < chunk:
                self.exhausted = True
            if not n:
                break
            batches.append(Batch.run(self.fn, self._next_index, items))
            self._next_index += n
            self._outstanding += n
            self._admitted += n
            if n > self.report.chunksize:
                self.report.chunksize = n
        return batches

    # -- outcomes -------------------------------------------------------------------------
    def complete(self, outcomes: list[Result], now: float) -> None:
        """Take outcomes back; under ``errors="raise"`` re-raise the first final failure."""
        timed = 0.0
        released = 0
        report = self.report
        for outcome in outcomes:
            timed += outcome.elapsed
            if type(outcome) is Done:
                # The fast path: a run of successes, released as one run.
                values = outcome.values
                n = len(values)
                released += n
                report.succeeded += n
                self._outstanding -= n
                batch = outcome.batch
                if batch.start >= 0:
                    self._release_run(batch.start + outcome.first, values)
                else:
                    for i, value in enumerate(values, outcome.first):
                        self._release(batch.task(i).index, value)
                continue
            assert isinstance(outcome, Outcome)
            self._outstanding -= 1
            task = outcome.task
            if outcome.ok:
                report.succeeded += 1
                released += 1
                self._release(task.index, outcome.value)
                continue
            exc = outcome.value
            if self.retry is not None and self.retry.should_retry(exc, task.attempt):
                self.report.retried += 1
                retry_at = now + self.retry.delay(task.attempt)
                again = Task(task.index, task.item, task.attempt + 1)
                heapq.heappush(self._retry_heap, (retry_at, next(self._retry_seq), again))
                continue
            report.failed += 1
            report.failures_by_type[type(exc).__name__] += 1
            released += 1
            if self.errors == "raise":
                self._progress.update(released)
                self._annotate(exc, task)
                raise exc
            if self.errors == "collect":
                tb = outcome.tb or format_tb(exc)
                self._release(task.index, Failure(task.item, exc, tb, task.index, task.attempt))
            else:
                report.skipped += 1
                self._release(task.index, _SKIP)
        if released:
            self._progress.update(released)
            measured = timed / released
            self._per_item = measured if self._per_item is None else 0.7 * self._per_item + 0.3 * measured

    def _annotate(self, exc: BaseException, task: Task) -> None:
        attempts = f" after {task.attempt} attempts" if task.attempt > 1 else ""
        exc.add_note(
            f"gearshift: {fn_name(self.fn)} failed on item #{task.index} {short_repr(task.item)}"
            f"{attempts} (in the {self.gear.name} gear)"
        )

    def _release(self, index: int, value: Any) -> None:
        self._release_run(index, [value])

    def _release_run(self, first: int, values: list[Any]) -> None:
        """Release results for input positions ``first``, ``first + 1``, ... (in order, when ordered).

        Runs are never merged, so a skipped item is always a run of its own (``[_SKIP]``).
        """
        if self.ordered and (first != self._next_release or self._buffer):
            self._buffer[first] = values  # an earlier item is still running: wait for it
            while (run := self._buffer.pop(self._next_release, None)) is not None:
                self._emit(self._next_release, run)
                self._next_release += len(run)
            return
        self._emit(first, values)
        self._next_release += len(values)  # (only read when ordered)

    def _emit(self, first: int, values: list[Any]) -> None:
        n = len(values)
        self._admitted -= n
        if n == 1 and values[0] is _SKIP:
            return
        self.ready.extend(zip(range(first, first + n), values, strict=True))

    # -- driving --------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.exhausted and self._outstanding == 0 and not self._retry_heap and not self.ready

    def wait_timeout(self, now: float) -> float:
        """How long a driver may block in ``collect`` before the scheduler needs it back."""
        timeout = POLL
        if self._retry_heap:
            timeout = min(timeout, max(0.0, self._retry_heap[0][0] - now))
        if self._rate_wait:
            timeout = min(timeout, self._rate_wait)
        return timeout

    def take_ready(self) -> list[tuple[int, Any]]:
        """The released results, in release order, handed over once."""
        ready = list(self.ready)
        self.ready.clear()
        return ready

    def buffered(self) -> dict[int, Any]:
        """Results finished but not yet released (for ``partial_results`` on an interrupt)."""
        return {
            first + i: v for first, run in self._buffer.items() for i, v in enumerate(run) if v is not _SKIP
        }

    def finish(self) -> None:
        self._progress.close()
        self.report.items = self.report.succeeded + self.report.failed
        self.report.wall = time.perf_counter() - self._started


class _SigTerm:
    """While a sync run is on the main thread, SIGTERM raises SystemExit so cleanup runs."""

    def __init__(self) -> None:
        self._previous: Any = None

    def __enter__(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous = signal.signal(signal.SIGTERM, _raise_exit)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def drive(scheduler: Scheduler, gear: Gear, spec: RunSpec) -> Iterator[list[tuple[int, Any]]]:
    """Run ``scheduler`` on ``gear`` from sync code, yielding lists of ``(index, result)``.

    Lists, not pairs: one generator hand-off per batch of results, not per result.
    """
    gear.check(scheduler.fn)
    gear.open(spec)
    ok = False
    try:
        with _SigTerm():
            while True:
                for batch in scheduler.take_batches(time.monotonic()):
                    gear.submit(batch)
                if scheduler.ready:
                    yield scheduler.take_ready()
                if scheduler.finished:
                    break
                outcomes = gear.collect(scheduler.wait_timeout(time.monotonic()))
                scheduler.complete(outcomes, time.monotonic())
        ok = True
    finally:
        gear.close(cancel=not ok)
        scheduler.finish()


async def adrive(scheduler: Scheduler, gear: Gear, spec: RunSpec) -> AsyncGenerator[list[tuple[int, Any]], None]:
    """Run ``scheduler`` on ``gear`` from async code; the async gear uses the caller's loop."""
    import asyncio

    gear.check(scheduler.fn)
    if isinstance(gear, AsyncGear):
        gear.bind(asyncio.get_running_loop())
    gear.open(spec)
    ok = False
    try:
        while True:
            for batch in scheduler.take_batches(time.monotonic()):
                gear.submit(batch)
            if scheduler.ready:
                yield scheduler.take_ready()
            if scheduler.finished:
                break
            outcomes = await gear.acollect(scheduler.wait_timeout(time.monotonic()))
            scheduler.complete(outcomes, time.monotonic())
        ok = True
    finally:
        await gear.aclose(cancel=not ok)
        scheduler.finish()
