"""The scheduling engine, written once for every gear.

``Scheduler`` is a state machine with no I/O of its own: it admits items from the
input into batches (bounded window, adaptive chunk size, rate limit), takes outcomes
back (retries, error policy, progress) and releases results (in input order or as
they complete). Two thin drivers move it: ``drive`` for sync callers (``gs.map``,
``gs.imap``) and ``adrive`` for async ones (``gs.amap``). A gear only runs batches.

Input is pulled without blocking the delivery of results or the enforcement of
timeouts: a sized input (a list, a range, a dict) is read inline, since taking its
next items cannot block; any other iterable is read by a thread of its own
("gearshift-source") into a buffer bounded by the run's window, which wakes the gear
when items arrive. The scheduler only takes what is there.
"""

from __future__ import annotations

import heapq
import itertools
import math
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal

from gearshift._calls import fn_name
from gearshift._feed import Feed
from gearshift._gears import Gear
from gearshift._gears.aio import AsyncGear
from gearshift._progress import Progress, ProgressArg, make_progress
from gearshift._rate import KeyedRate, RateArg, RateLimiter, make_rate
from gearshift._retry import Retry, as_retry
from gearshift._sources import (
    POLL,
    Channel,
    _AsyncPuller,
    _bound_to_its_thread,
    _Inline,
    _nothing,
    _Puller,
    input_length,
)
from gearshift._task import Batch, Done, Outcome, Result, RunSpec, Task, format_tb
from gearshift.errors import Failure, short_repr

ErrorPolicy = Literal["raise", "collect", "skip"]
ERROR_POLICIES = ("raise", "collect", "skip")
PullArg = Literal["auto", "thread", "caller"]
PULL_MODES = ("auto", "thread", "caller")
#: Largest chunk ever formed, whatever the measurements say.
MAX_CHUNK = 50_000
#: Under a rate per key, items waiting for their key's token (or, in an ordered run, finished
#: and waiting for an earlier item) before the input waits too: fewer for big items.
PARK_MAX = 1024
#: Chunks are capped so the known remaining input makes at least this many per worker (tail balance).
CHUNKS_PER_WORKER = 4
#: A batch holds about this many bytes of items at most (estimated from the items' sizes), so big
#: items (MiB each) go a few at a time however cheap the call: the input read ahead, the batches in
#: flight and the results waiting are bounded in bytes, not only in items.
CHUNK_BYTES = 8 << 20

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
    #: Seconds the calls took, summed over every attempt (busy time: what the workers spent).
    busy: float = 0.0
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



class Scheduler:
    """Admission, chunking, retries, error policy and ordering for one run (no I/O)."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any] | AsyncIterable[Any] | Feed | Channel,
        gear: Gear,
        *,
        ordered: bool = True,
        chunksize: int | Literal["auto"] = "auto",
        errors: ErrorPolicy = "raise",
        retries: int | Retry | None = None,
        rate: RateArg = None,
        progress: ProgressArg = False,
        pull: PullArg = "auto",
        rate_key: Callable[[Any], Hashable] | None = None,
    ) -> None:
        if pull not in PULL_MODES:
            raise ValueError(f"pull must be one of {PULL_MODES}, got {pull!r}")
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
        limiter = make_rate(rate, rate_key)
        self._limiter = limiter if isinstance(limiter, RateLimiter) else None
        self._keyed = limiter if isinstance(limiter, KeyedRate) else None
        if self._keyed is not None and isinstance(items, Feed):
            raise ValueError("a rate per key is for map, imap, amap and pipeline stages; give the executor one rate")
        # Under a rate per key: items whose key has no token yet, by key (oldest first), so
        # they wait without holding up items of other keys; at most ``_park_max`` of them.
        self._parked: dict[Hashable, deque[Task]] = {}
        self._parked_count = 0
        self._park_max = 0
        self.total: int | None = input_length(items)
        self._feed: Feed | None = items if isinstance(items, Feed) else None
        self._source: _Inline | _Puller | Feed | Channel
        if self._feed is not None:
            self._source = self._feed
        elif isinstance(items, Channel):
            self._source = items
        elif hasattr(items, "__aiter__") and not hasattr(items, "__iter__"):
            self._source = _AsyncPuller(items, max(1, gear.window(1)))
        elif pull == "caller" or (pull == "auto" and (self.total is not None or _bound_to_its_thread(items))):
            self._source = _Inline(items)  # type: ignore[arg-type]
        else:
            self._source = _Puller(items, max(1, gear.window(1)))  # type: ignore[arg-type]
        self._next_index = 0
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
        self._item_bytes = 0  # estimated size of an item (from one item per batch)
        self._rate_wait = 0.0
        self._pending_batches: list[Batch] = []
        self.report = Report(gear=gear.describe(), workers=gear.workers)
        #: Items for which this is true skip the function and are released as they are, in
        #: their place (a pipeline's earlier failures under "collect" pass a later stage).
        self.passthrough: Callable[[Any], bool] | None = None
        #: Release runs ``(first index, values)`` instead of ``(index, value)`` pairs (the
        #: Executor's driver routes whole runs to its streams: no pair per result).
        self.release_runs = False
        self._aborted: BaseException | None = None
        self._progress: Progress = make_progress(progress, self.total, fn_name(fn))
        self._started = time.perf_counter()

    # -- admission ------------------------------------------------------------------------
    def chunk_size(self) -> int:
        if self._fixed_chunk is not None:
            return self._fixed_chunk
        target = self.gear.chunk_target
        if target <= 0 or self._per_item is None:
            return 1
        size = int(target / max(self._per_item, 1e-7))
        if self._item_bytes:
            size = min(size, CHUNK_BYTES // self._item_bytes)
        if self.total is not None:
            remaining = self.total - self._next_index
            tail = math.ceil(remaining / (CHUNKS_PER_WORKER * self.gear.workers))
            # Smaller toward the end to balance the tail, but never below the gear's floor of work a
            # batch holds (a cluster's task costs ms: a tail of one-item tasks would dominate a run).
            floor = int(self.gear.min_batch_work / max(self._per_item, 1e-7))
            size = min(size, max(tail, floor))
        return max(1, min(size, MAX_CHUNK))

    @property
    def exhausted(self) -> bool:
        """No more fresh input: the source ended (or raised) and everything it gave was admitted."""
        return self._source.exhausted

    @property
    def input_error(self) -> BaseException | None:
        """What the input itself raised (after its items are delivered, ``raise_input_error`` raises it)."""
        return self._source.error

    @property
    def reads_on_thread(self) -> bool:
        return self._source.threaded

    @property
    def reads_async(self) -> bool:
        """The input is an async iterable: only ``adrive`` (``gs.amap``) can read it."""
        return isinstance(self._source, _AsyncPuller)

    async def ajoin(self) -> None:
        """``join`` for async callers: never blocks the loop."""
        import asyncio

        if isinstance(self._source, _AsyncPuller):
            await self._source.ajoin()
        elif self._source.threaded:
            await asyncio.to_thread(self._source.join)  # it may wait a grace period

    def start(self, wake: Callable[[], None]) -> None:
        """Start reading the input (a thread for an unsized one); ``wake`` wakes the gear's ``collect``.

        Called after the gear opened: a gear that forks its workers does so before any
        thread of ours runs user code (the input's iterator is user code).
        """
        self._source.start(wake)

    def stop(self) -> None:
        """Stop reading the input (without waiting)."""
        self._source.stop()

    def join(self) -> None:
        """Wait for the input's thread to end (see ``_Puller.join``)."""
        self._source.join()

    def abort(self, exc: BaseException) -> None:
        """From any thread: the driver raises ``exc`` at its next step (a pipeline stopping every stage)."""
        self._aborted = exc
        self._source.stop()
        try:
            self.gear.wake()
        except Exception:  # not open, or closed already: the driver is not waiting in it
            pass

    def _window(self, chunk: int) -> int:
        # Under a rate no item waits in a gear's queue (one item per worker at most), so an
        # item starts when its token is taken, never in a clump after a queue drains.
        if self._limiter is not None or self._keyed is not None:
            return self.gear.workers
        return self.gear.window(chunk)

    def take_batches(self, now: float) -> list[Batch]:
        """The batches to hand to the gear now: due retries first, then fresh input.

        Never blocks: fresh input is what the source holds now. Under a rate every item
        takes a token, retries included, and a batch holds no more items than tokens are free.
        """
        if self._aborted is not None:
            raise self._aborted
        batches: list[Batch] = []
        limiter = self._limiter
        self._rate_wait = 0.0
        while self._retry_heap and self._retry_heap[0][0] <= now:
            if self._keyed is not None:
                _, _, task = heapq.heappop(self._retry_heap)
                self._park(task, now, first=True)
                continue
            if limiter is not None:
                if self._outstanding >= self._window(1):
                    break
                if not limiter.available(now):
                    self._rate_wait = limiter.wait_time(now)
                    break
                limiter.take(1)
            _, _, task = heapq.heappop(self._retry_heap)
            batches.append(Batch(self.fn if self._feed is None else self._feed.fn_for(task.index), [task]))
            self._outstanding += 1
        source = self._source
        if source.error is not None and not isinstance(source.error, Exception):
            raise source.error  # SystemExit or the like from the input: stop now, not after its items
        if self._keyed is not None:
            self._take_keyed(now, batches)
            return batches
        feed = self._feed
        while not self._rate_wait and not source.exhausted:
            chunk = self.chunk_size() if feed is None or feed.chunk_hint is None else feed.chunk_hint
            window = self._window(chunk)
            if self._outstanding >= window or self._admitted - self._outstanding >= 2 * window:
                break
            if limiter is not None:
                chunk = min(chunk, window - self._outstanding, limiter.available(now))
                if chunk < 1:
                    self._rate_wait = limiter.wait_time(now)
                    break
            # One batch read ahead keeps the gear fed (it refills while the window runs); more
            # would only let the input run further ahead of the results.
            source.capacity = chunk
            if feed is not None:
                # A stream's own chunk size wins (the hint read above may be another stream's),
                # but never more items than the rate allows now.
                feed.cap = chunk if limiter is not None else None
            # A short batch is worth sending only while the gear runs low; otherwise wait for a full one.
            items = source.take(chunk, partial_ok=self._outstanding < max(1, window // 2))
            n = len(items)
            if not n:
                break
            if limiter is not None:
                limiter.take(n)
            if self._fixed_chunk is None:
                self._item_bytes = _size_of(items[0])
            fn = self.fn
            if feed is not None and feed.batch_fn is not None:
                fn, feed.batch_fn = feed.batch_fn, None  # the feed keeps no finished call's function
            self._admitted += n
            if self.passthrough is not None and any(map(self.passthrough, items)):
                self._pass_around(fn, items, batches)
                continue
            batches.append(Batch.run(fn, self._next_index, items))
            self._next_index += n
            self._outstanding += n
            if n > self.report.chunksize:
                self.report.chunksize = n
        return batches

    def _take_keyed(self, now: float, batches: list[Batch]) -> None:
        """Under a rate per key: parked items whose key has a token, then fresh input, one item a batch.

        A fresh item whose key has no token (or whose key already has items waiting) is
        parked and the input read on, so one slow key never holds up the others; the input
        stops being read only when ``_park_max`` items wait (memory stays bounded).
        """
        keyed = self._keyed
        assert keyed is not None
        window = self._window(1)
        for key in list(self._parked):
            waiting = self._parked[key]
            while waiting and self._outstanding < window and keyed.take(key, now):
                self._start_one(waiting.popleft())
                self._parked_count -= 1
            if not waiting:
                del self._parked[key]
            if self._outstanding >= window:
                break
        source = self._source
        self._park_max = max(PARK_MAX, 4 * window)
        if self._item_bytes:
            self._park_max = max(window, min(self._park_max, CHUNK_BYTES * 4 // self._item_bytes))
        while (not source.exhausted and self._outstanding < window and self._parked_count < self._park_max
               and self._admitted - self._outstanding < 2 * window + self._park_max):
            source.capacity = window - self._outstanding
            items = source.take(window - self._outstanding, partial_ok=True)
            if not items:
                break
            self._item_bytes = _size_of(items[0])
            for item in items:
                task = Task(self._next_index, item)
                self._next_index += 1
                self._admitted += 1
                if self.passthrough is not None and self.passthrough(item):
                    self._release(task.index, item)
                else:
                    self._park(task, now)
        # What becomes possible next without an outcome: the soonest token of a waiting key.
        if self._parked and self._outstanding < window:
            self._rate_wait = max(1e-4, min(keyed.wait_time(key, now) for key in self._parked))
        if self._pending_batches:
            batches.extend(self._pending_batches)
            self._pending_batches.clear()

    def _park(self, task: Task, now: float, first: bool = False) -> None:
        """Start ``task`` now if its key has a token and none of its key waits; else park it."""
        keyed = self._keyed
        assert keyed is not None
        try:
            key = keyed.key(task.item)
            # (a key whose hash or comparison raises fails here too, its item alone)
            waiting = self._parked.get(key)
            if not waiting and self._outstanding < self._window(1) and keyed.take(key, now):
                self._start_one(task)
                return
        except Exception as exc:
            exc.add_note(f"gearshift: rate_key failed on item #{task.index} {short_repr(task.item)}")
            if self.errors == "raise":
                self.report.failed += 1
                raise
            self._outstanding += 1
            self.complete([Outcome(task, False, exc, 0.0, format_tb(exc))], now, final=True)
            return
        if waiting is None:
            waiting = self._parked[key] = deque()
        if first:
            waiting.appendleft(task)  # a retry goes before its key's fresh items
        else:
            waiting.append(task)
        self._parked_count += 1

    def _start_one(self, task: Task) -> None:
        fn = self.fn
        batch = Batch.run(fn, task.index, [task.item], task.attempt) if task.attempt == 1 else Batch(fn, [task])
        self._pending_batches.append(batch)
        self._outstanding += 1
        if self.report.chunksize < 1:
            self.report.chunksize = 1

    def _pass_around(self, fn: Callable[[Any], Any], items: list[Any], batches: list[Batch]) -> None:
        """Items the ``passthrough`` picks are released in place; the runs between them are batches."""
        passes = self.passthrough
        assert passes is not None
        for passing, group in itertools.groupby(items, key=passes):
            run = list(group)
            if passing:
                for value in run:
                    self._release(self._next_index, value)
                    self._next_index += 1
            else:
                batches.append(Batch.run(fn, self._next_index, run))
                self._next_index += len(run)
                self._outstanding += len(run)

    def raise_input_error(self) -> None:
        """At the end of a run, raise the exception the input raised, after its items' results.

        Everything the iterator produced before it raised was run and delivered, as
        multiprocessing's ``imap`` does; the exception itself is the input's own.
        """
        exc = self._source.error
        if exc is None:
            return
        if getattr(self._source, "relays", False):
            raise exc  # an earlier stage's input error, noted where it first happened
        exc.add_note(f"gearshift: the input raised after {self._next_index} items; their results were delivered")
        if type(exc).__name__ == "ProgrammingError" and "thread" in str(exc):
            exc.add_note(
                "gearshift: the input was read on a thread of its own; pass pull='caller' to read it "
                "on the calling thread (needed for objects bound to their thread, e.g. a sqlite3 cursor)"
            )
        raise exc

    # -- outcomes -------------------------------------------------------------------------
    def complete(self, outcomes: list[Result], now: float, final: bool = False) -> None:
        """Take outcomes back; under ``errors="raise"`` re-raise the first final failure.

        ``final``: failures are not retried (an item that could not be started at all).
        """
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
            if not final and self.retry is not None and self.retry.should_retry(exc, task.attempt):
                self.report.retried += 1
                retry_at = now + self.retry.delay_for(exc, task.attempt)
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
        report.busy += timed
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
        if self.release_runs:
            self.ready.append((first, values))
        else:
            self.ready.extend(zip(range(first, first + n), values, strict=True))

    # -- driving --------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return (self.exhausted and self._outstanding == 0 and not self._retry_heap and not self.ready
                and not self._parked)

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
        peak = self.gear.peak_workers()
        if peak is not None:
            self.report.workers = peak  # an adaptive run: what it reached (the notes say where it ended)
        self.report.reasons.extend(self.gear.notes())
        self.report.items = self.report.succeeded + self.report.failed
        self.report.wall = time.perf_counter() - self._started


def _size_of(item: Any) -> int:
    """An item's size in bytes, roughly: its own, plus its first elements' for a tuple, list or dict.

    Enough to see the big ones (bytes, str, NumPy arrays, records holding them) at the cost of a
    few ``sys.getsizeof`` calls per batch.
    """
    try:
        size = sys.getsizeof(item)
        if isinstance(item, (tuple, list)):
            size += sum(sys.getsizeof(x) for x in item[:16])
        elif isinstance(item, dict):
            size += sum(sys.getsizeof(v) for v in itertools.islice(item.values(), 16))
        return int(size)
    except Exception:  # a custom __sizeof__ that fails: size unknown
        return 0


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


def _submit_all(gear: Gear, batches: list[Batch]) -> None:
    for batch in batches:
        gear.submit(batch)


def drive(
    scheduler: Scheduler, gear: Gear, spec: RunSpec, *, claim: bool = True, opened: Callable[[], None] = _nothing
) -> Iterator[list[tuple[int, Any]]]:
    """Run ``scheduler`` on ``gear`` from sync code, yielding lists of ``(index, result)``.

    Lists, not pairs: one generator hand-off per batch of results, not per result.
    The gear is claimed for the run (a second run on it is refused) and released at its end,
    unless the caller holds it already (``claim=False``: an Executor holds its gear for its
    life). ``opened`` is called once the gear is open (its workers forked).
    """
    if scheduler.reads_async:
        raise TypeError("the input is an async iterable: read it with `async for r in gs.amap(...)`")
    if claim:
        gear.claim()
    ok = False
    try:
        gear.check(scheduler.fn)
        gear.open(spec)
        opened()
        try:
            scheduler.start(gear.wake)
            with _SigTerm():
                while True:
                    _submit_all(gear, scheduler.take_batches(time.monotonic()))
                    if scheduler.ready:
                        yield scheduler.take_ready()
                    if scheduler.finished:
                        scheduler.raise_input_error()
                        break
                    # No locals for batches or outcomes: a finished call's items and result must
                    # not live on in this frame while the next collect waits (an Executor's idle).
                    scheduler.complete(gear.collect(scheduler.wait_timeout(time.monotonic())), time.monotonic())
            ok = True
        finally:
            scheduler.stop()
            try:
                gear.close(cancel=not ok)
            finally:
                scheduler.join()
    finally:
        if claim:
            gear.release()
        scheduler.finish()


def _threadsafe_wake(gear: Gear, loop: Any) -> Callable[[], None]:
    """``gear.wake`` run on ``loop``: the input's thread must not touch the loop's objects itself."""

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(gear.wake)
        except RuntimeError:  # the loop closed: nobody is waiting
            pass

    return wake


async def adrive(scheduler: Scheduler, gear: Gear, spec: RunSpec) -> AsyncGenerator[list[tuple[int, Any]], None]:
    """Run ``scheduler`` on ``gear`` from async code; the async gear uses the caller's loop."""
    import asyncio

    gear.claim()
    ok = False
    try:
        gear.check(scheduler.fn)
        loop = asyncio.get_running_loop()
        if isinstance(gear, AsyncGear):
            gear.bind(loop)
        gear.open(spec)
        try:
            scheduler.start(_threadsafe_wake(gear, loop))
            while True:
                for batch in scheduler.take_batches(time.monotonic()):
                    gear.submit(batch)
                if scheduler.ready:
                    yield scheduler.take_ready()
                if scheduler.finished:
                    scheduler.raise_input_error()
                    break
                outcomes = await gear.acollect(scheduler.wait_timeout(time.monotonic()))
                scheduler.complete(outcomes, time.monotonic())
            ok = True
        finally:
            scheduler.stop()
            try:
                await gear.aclose(cancel=not ok)
            finally:
                await scheduler.ajoin()
    finally:
        gear.release()
        scheduler.finish()
