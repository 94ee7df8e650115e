"""An open-ended source for the scheduler: the submissions of an Executor or a Pool.

A ``Feed`` is a queue of *streams*, each one function over some items with a ``Sink`` that
takes their results: ``submit`` puts a stream of one call, ``Pool.map`` one of a list,
``Pool.imap`` one of a lazy iterable (read by a thread of its own, bounded, as ``gs.imap``'s
input is). The scheduler reads the feed as it reads any input: it takes batches, each from
one stream (so one function), numbers the items, and hands back ``(index, result)`` pairs,
which ``deliver`` routes to the stream's sink. Admission, the in-flight window, chunking,
retries, rate and timeouts stay in the scheduler: the fronts only make streams and sinks.

The feed ends when it is closed and its streams are drained; ``terminate`` ends it at once.
Threads: ``put`` and ``close`` from any thread; ``take``, ``deliver`` from the driver's.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from gearshift._sources import _Inline, _nothing, _Puller

#: Fewest items a lazy stream's thread may read ahead of the engine.
READ_AHEAD = 32


class Sink(Protocol):
    """Where a stream's results go. Called on the driver's thread: must not block."""

    def deliver(self, pos: int, values: list[Any]) -> None:
        """Results (or ``gs.Failure``s) of the stream's items at positions ``pos``, ``pos + 1``, ...

        Runs, not single results: a consumer on another thread is woken once per run."""

    def end(self, count: int, error: BaseException | None) -> None:
        """The stream gave ``count`` items (then raised ``error``); results may still follow."""

    def abandon(self, exc: BaseException) -> None:
        """The stream's outstanding items will never finish (terminated, broken): fail them."""


class Stream:
    """One function over items, with the sink for their results.

    ``chunk``: the batch size this stream asks for (``Pool.map``'s ``chunksize``), else the
    scheduler's own. ``drop_partial``: when the items' iterator raises, the incomplete chunk
    before the error is dropped (``multiprocessing.Pool.imap``'s behaviour). ``admit``, for a
    single call, is asked as the call is taken: False skips it (its future was cancelled).
    """

    __slots__ = (
        "admit", "cancelled", "chunk", "consumed", "cut", "cut_at_close", "drop_partial", "fn", "limit", "single",
        "sink", "source", "taken",
    )

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        sink: Sink,
        *,
        chunk: int | None = None,
        lazy: bool = False,
        drop_partial: bool = False,
        admit: Callable[[], bool] | None = None,
    ) -> None:
        self.fn = fn
        self.sink = sink
        self.chunk = chunk
        self.drop_partial = drop_partial
        self.admit = admit
        self.source: _Inline | _Puller = _Puller(items, max(1, chunk or 1)) if lazy else _Inline(items)
        self.taken = 0
        #: Results the consumer has taken (kept by the consumer); with ``limit``, at most
        #: ``limit`` items are taken and not yet consumed: the stream's own backpressure.
        self.consumed = 0
        self.limit: int | None = None
        self.cancelled = False  # the consumer went away: take nothing more, deliver nothing more
        self.cut = False  # take nothing more, deliver what was taken
        self.cut_at_close = False
        self.single = False

    @classmethod
    def call(cls, fn: Callable[[Any], Any], item: Any, sink: Sink, admit: Callable[[], bool] | None = None) -> Stream:
        """A stream of one item (``submit``): a batch of its own, as each call is in the stdlib's
        executors (two calls in one batch would run one after the other, and one that waits
        for the other would wait forever)."""
        stream = cls(fn, (item,), sink, chunk=1, admit=admit)
        stream.single = True
        return stream


class Feed:
    """Streams in, batches out; see the module docstring."""

    threaded = False
    routed = True

    def __init__(self) -> None:
        self._streams: deque[Stream] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake: Callable[[], None] = _nothing
        self._started = False
        #: Who each taken item belongs to, by runs: first index -> [stream, pos of first, count, left, first index].
        self._runs: dict[int, list[Any]] = {}
        self._starts: list[int] = []  # the runs' first indexes, ascending (finished ones pruned lazily)
        self._next = 0
        self._threads: list[Stream] = []  # lazy streams whose reading thread may still run
        self.capacity = 1
        self.done = False
        self.error: BaseException | None = None
        #: The function of the batch ``take`` returned last (all its items share it).
        self.batch_fn: Callable[[Any], Any] | None = None
        #: The chunk size the head stream asks for, if it asks (read by the scheduler).
        self.chunk_hint: int | None = None
        #: Most items the scheduler allows in the next batch, when it limits them (a rate).
        self.cap: int | None = None

    # -- any thread -----------------------------------------------------------------------
    def put(self, stream: Stream) -> None:
        """Queue ``stream``; raises RuntimeError once the feed is closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._streams.append(stream)
            if self._started:
                self._start(stream)
            if len(self._streams) == 1:
                self.chunk_hint = stream.chunk
        self._wake()

    def close(self) -> None:
        """No more streams: the run ends once the queued ones are done. Streams marked
        ``cut_at_close`` (``Executor.map(buffersize=)``) take nothing more: their items taken
        so far finish and are delivered, the rest are never read (the stdlib's shutdown)."""
        with self._lock:
            self._closed = True
            for stream in self._streams:
                if stream.cut_at_close:
                    stream.cut = True
                    stream.source.stop()
        self._wake()

    def wake(self) -> None:
        """Have the scheduler look again (a consumer made room)."""
        self._wake()

    def cancel_queued(self) -> list[Stream]:
        """Drop every stream no item of which was taken yet, and return them (for their sinks)."""
        with self._lock:
            dropped = [s for s in self._streams if s.taken == 0]
            self._streams = deque(s for s in self._streams if s.taken)
            self._refresh_hint()
        for stream in dropped:
            stream.source.stop()
        return dropped

    def terminate(self, exc: BaseException) -> None:
        """End the run now: the scheduler raises ``exc`` (a BaseException) at its next admission."""
        with self._lock:
            self._closed = True
            self.error = exc
            self.done = True
        self._wake()

    def stop_stream(self, stream: Stream) -> None:
        """Take no more items from ``stream`` (its consumer went away); running ones finish."""
        stream.cancelled = True
        stream.source.stop()
        self._wake()

    # -- the scheduler's side (the driver's thread) ----------------------------------------
    @property
    def exhausted(self) -> bool:
        return self.done

    def start(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wake = wake
            self._started = True
            for stream in self._streams:
                self._start(stream)

    def _start(self, stream: Stream) -> None:
        stream.source.start(self._wake)
        if stream.source.threaded:
            self._threads = [s for s in self._threads if not s.source.done]
            self._threads.append(stream)

    def take(self, n: int, partial_ok: bool) -> list[Any]:
        """Up to ``n`` items of the first stream that has some ready (never mixing functions).

        Streams are served in order, but one whose items are not there yet (a slow iterator)
        or whose consumer has fallen behind (``limit``) does not hold up the ones after it.
        [] when no stream has items ready.
        """
        with self._lock:
            streams = self._streams
            at = 0
            while at < len(streams):
                stream = streams[at]
                items = self._take_from(stream, n)
                if items:
                    if stream.single:  # done with: let it go now (its sink lives on in the runs)
                        del streams[at]
                        self._refresh_hint()
                    return items
                if not self._finished(stream):
                    at += 1
                    continue
                del streams[at]
                self._refresh_hint()
                error = None if stream.cancelled or stream.cut else stream.source.error
                stream.sink.end(stream.taken, error)
            if self._closed and not streams:
                self.done = True
            return []

    def _take_from(self, stream: Stream, n: int) -> list[Any]:
        if stream.cancelled or stream.cut:
            return []
        if stream.limit is not None:
            room = stream.limit - (stream.taken - stream.consumed)
            if room <= 0:
                return []  # its consumer is behind: no more reading until it catches up
            n = min(n, room)
        source = stream.source
        size = n if stream.chunk is None else stream.chunk
        if self.cap is not None:
            size = min(size, self.cap)  # the scheduler may allow fewer (a rate)
        if stream.admit is not None and not stream.admit():  # a single call whose future was cancelled
            source.done = True
            return []
        # Read ahead two batches (at least READ_AHEAD items): the reading thread then runs in bursts,
        # not in a hand-off per batch with the driver; memory stays bounded all the same.
        source.capacity = max(2 * size, READ_AHEAD)
        items = source.take(size, partial_ok=False)
        if stream.drop_partial and len(items) < size and source.error is not None:
            items = []  # the chunk the iterator raised in is dropped, as multiprocessing's imap does
        self._assign(stream, items)
        return items

    def _assign(self, stream: Stream, items: list[Any]) -> None:
        n = len(items)
        if n:
            self._runs[self._next] = [stream, stream.taken, n, n, self._next]
            self._starts.append(self._next)
            self._next += n
            stream.taken += n
        self.batch_fn = stream.fn

    @staticmethod
    def _finished(stream: Stream) -> bool:
        source = stream.source
        return stream.cancelled or stream.cut or source.exhausted or (source.done and stream.drop_partial)

    def _refresh_hint(self) -> None:
        self.chunk_hint = self._streams[0].chunk if self._streams else None

    def _run_of(self, index: int) -> list[Any]:
        starts = self._starts
        if len(starts) > 2 * len(self._runs) + 64:
            starts[:] = sorted(self._runs)
        return self._runs[starts[bisect.bisect_right(starts, index) - 1]]

    def fn_for(self, index: int) -> Callable[[Any], Any]:
        """The function of the item numbered ``index`` (for a retry)."""
        return self._run_of(index)[0].fn  # type: ignore[no-any-return]

    def deliver(self, ready: list[tuple[int, list[Any]]]) -> None:
        """Route runs of results ``(first index, values)`` to their streams' sinks (dropped if a
        stream's consumer went away). A run is one batch's, so it rarely spans two streams' items;
        it is split where it does."""
        for first, values in ready:
            n = len(values)
            done = 0
            while done < n:
                index = first + done
                run = self._run_of(index)
                take = min(n - done, run[4] + run[2] - index)
                self._flush(run, index, values if take == n else values[done : done + take])
                done += take

    def _flush(self, run: list[Any], index: int, values: list[Any]) -> None:
        if not values:
            return
        stream, pos, _, left, first = run
        if not stream.cancelled:
            stream.sink.deliver(pos + index - first, values)
        run[3] = left - len(values)
        if not run[3]:
            del self._runs[first]

    def cancel_started(self) -> None:
        """Ask the sinks of items already taken to cancel what no worker has started yet."""
        for stream in {id(run[0]): run[0] for run in self._runs.copy().values()}.values():
            cancel = getattr(stream.sink, "cancel", None)
            if cancel is not None:
                cancel()

    def abandon_all(self, exc: BaseException) -> None:
        """Fail everything taken and not finished, and everything queued (the run ended abnormally)."""
        with self._lock:
            streams = list(self._streams)
            self._streams.clear()
            self._closed = True
            self.done = True
        seen: set[int] = set()
        for stream, *_ in list(self._runs.values()):
            if id(stream) not in seen:
                seen.add(id(stream))
                stream.sink.abandon(exc)
        self._runs.clear()
        self._starts.clear()
        for stream in streams:
            stream.source.stop()
            if id(stream) not in seen:
                stream.sink.abandon(exc)

    def stop(self) -> None:
        """Stop every stream's reading thread (without waiting)."""
        with self._lock:
            streams = [*self._streams, *self._threads]
        for stream in streams:
            stream.source.stop()

    def join(self) -> None:
        """Wait for the reading threads (a grace period each, as ``gs.imap``'s input gets)."""
        with self._lock:
            streams, self._threads = self._threads, []
        for stream in streams:
            stream.source.join()
