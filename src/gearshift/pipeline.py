"""``gs.Pipeline``: stages in different gears at once, with bounded queues between them.

Real jobs mix kinds of work (download: async I/O, parse: CPU, store: blocking I/O), and the
advice "processes for CPU, threads or asyncio for I/O" applies per step. Each stage is one
run of the engine (``_engine.drive`` over a ``Scheduler``, exactly as ``gs.map``) in its own
gear, on a thread of its own (``gearshift-stage-<n>-<name>``); the first reads the pipeline's
source, each later one reads the previous stage's results from a bounded ``Channel``, and the
caller reads the last. A full channel holds its producer back (backpressure), so memory stays
flat however long the source, and every stage runs at the same time as the others.

Gears are opened from the last stage to the first before any item moves: a process stage
forks its workers while no thread of the pipeline runs user code (replacements come from the
gear's zygote later, never from the busy parent).

Errors: under ``errors="raise"`` the first failure in any stage stops every stage and is
raised to the caller, naming the stage and the item; under ``"collect"`` a ``gs.Failure``
(naming its stage) flows to the output in its item's place, past the later stages untouched.
An exception raised by the source itself comes out after every result of the items before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

from gearshift._api import GearArg, _check_timeout, _prepare, _workers
from gearshift._calls import fn_name, is_async_callable
from gearshift._engine import ERROR_POLICIES, PULL_MODES, ErrorPolicy, PullArg, Scheduler, drive
from gearshift._gears import Gear, gear_class
from gearshift._gears._base import CANCEL_GRACE, cpu_count
from gearshift._pipeline_report import PipelineReport, StageReport
from gearshift._progress import ProgressArg, make_progress
from gearshift._rate import RateArg, make_rate
from gearshift._retry import Retry
from gearshift._sources import Channel, _bound_to_its_thread, input_length
from gearshift._task import RunSpec
from gearshift.errors import Failure

__all__ = ["Pipeline", "PipelineIterator"]

Kind = Literal["map", "filter", "flat_map"]
#: Items that may wait between two stages, unless a stage says otherwise (``buffer=``).
DEFAULT_BUFFER = 256
#: Seconds between the samples of queue lengths and counts kept for ``report.plot()``.
SAMPLE_EVERY = 0.05
MAX_SAMPLES = 2048


class _Stopped(BaseException):
    """Raised inside a stage's thread to stop it (the pipeline is stopping): never seen outside."""


class _Dropped:
    """What a filter's wrapper returns for an item it drops (one object, also across processes)."""

    def __reduce__(self) -> str:
        return "DROPPED"

    def __repr__(self) -> str:
        return "DROPPED"


DROPPED = _Dropped()


class _Keep:
    """A filter stage's function: the item itself when ``pred`` keeps it, else ``DROPPED``."""

    def __init__(self, pred: Callable[[Any], Any]) -> None:
        self.pred = pred
        self.__name__ = fn_name(pred)

    def __call__(self, item: Any) -> Any:
        return item if self.pred(item) else DROPPED


class _AKeep(_Keep):
    async def __call__(self, item: Any) -> Any:
        return item if await self.pred(item) else DROPPED


class _Flat:
    """A flat_map stage's function: the items ``fn`` returns or yields, as one list."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.__name__ = fn_name(fn)

    def __call__(self, item: Any) -> list[Any]:
        return list(self.fn(item))


class _AFlat(_Flat):
    async def __call__(self, item: Any) -> list[Any]:  # type: ignore[override]
        got = self.fn(item)
        if hasattr(got, "__aiter__"):
            return [x async for x in got]
        return list(await got)


def _is_failure(value: Any) -> bool:
    return type(value) is Failure


@dataclass(frozen=True)
class _Stage:
    kind: Kind
    fn: Callable[[Any], Any]
    name: str
    gear: GearArg
    workers: int | None
    chunksize: int | Literal["auto"]
    timeout: float | None
    retries: int | Retry | None
    rate: RateArg
    errors: ErrorPolicy | None
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    max_tasks_per_worker: int | None
    buffer: int | None
    rate_key: Callable[[Any], Hashable] | None

    def call(self) -> Callable[[Any], Any]:
        """The function the stage's gear runs."""
        if self.kind == "map":
            return self.fn
        asynchronous = is_async_callable(self.fn) or inspect.isasyncgenfunction(self.fn)
        if self.kind == "filter":
            return _AKeep(self.fn) if asynchronous else _Keep(self.fn)
        return _AFlat(self.fn) if asynchronous else _Flat(self.fn)


class Pipeline:
    """A source and stages, each in its own gear, all running at once with bounded queues between.

    ``source``: any iterable, or an async iterable (read on an event loop of its own).
    ``errors``: the policy of every stage unless it gives its own: "raise" stops every stage at
    the first failure and raises it naming the stage and the item; "collect" puts a
    ``gs.Failure`` (``failure.stage`` names the stage) in the item's place; "skip" drops it.
    ``ordered``: results in source order end to end (each stage keeps order), or as they come.
    ``buffer``: items that may wait between two stages (a stage's ``buffer=`` overrides it).
    ``progress``: a progress bar of the results out of the last stage.
    ``pull``: who reads the source. "thread" (the default for any source but the ones below):
    the first stage's own thread, so a slow source never stalls the results. "caller": the
    thread iterating over the pipeline, between results, for sources bound to their thread
    (a sqlite3 cursor, which "auto" detects); it reads while the pipeline waits for results,
    a queue's worth (``buffer``) at a time.

    A Pipeline is a recipe: each ``map``/``filter``/``flat_map`` returns a new one, and each
    iteration (``for``, ``async for``, ``run()``) is a run of its own over the source.
    """

    def __init__(
        self,
        source: Iterable[Any] | AsyncIterable[Any],
        *,
        errors: ErrorPolicy = "raise",
        ordered: bool = True,
        buffer: int = DEFAULT_BUFFER,
        progress: ProgressArg = False,
        pull: PullArg = "auto",
    ) -> None:
        if pull not in PULL_MODES:
            raise ValueError(f"pull must be one of {PULL_MODES}, got {pull!r}")
        if not (hasattr(source, "__iter__") or hasattr(source, "__aiter__")):
            raise TypeError(f"a pipeline's source must be iterable (or async iterable), got {type(source).__name__}")
        if errors not in ERROR_POLICIES:
            raise ValueError(f"errors must be one of {ERROR_POLICIES}, got {errors!r}")
        _check_buffer(buffer)
        self._source = source
        self._errors: ErrorPolicy = errors
        self._ordered = ordered
        self._buffer = buffer
        self._progress = progress
        self._pull: PullArg = pull
        self._stages: tuple[_Stage, ...] = ()
        #: The report of the last run that ended (None before any).
        self.report: PipelineReport | None = None

    # -- building -------------------------------------------------------------------------
    def map(
        self,
        fn: Callable[[Any], Any],
        *,
        gear: GearArg = "auto",
        workers: int | None = None,
        concurrency: int | None = None,
        chunksize: int | Literal["auto"] = "auto",
        timeout: float | None = None,
        retries: int | Retry | None = 0,
        rate: RateArg = None,
        rate_key: Callable[[Any], Hashable] | None = None,
        errors: ErrorPolicy | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        buffer: int | None = None,
        name: str | None = None,
    ) -> Pipeline:
        """Add a stage that runs ``fn`` on every item in ``gear``; the options mean what they do in ``gs.map``.

        ``buffer``: items that may wait in front of this stage. ``name``: in the report and in
        errors (default: the function's name; repeated names get ``#2``, ``#3``).
        """
        return self._add("map", fn, gear, workers, concurrency, chunksize, timeout, retries, rate, errors,
                         initializer, initargs, max_tasks_per_worker, buffer, name, rate_key)

    def filter(
        self,
        pred: Callable[[Any], Any],
        *,
        gear: GearArg = "serial",
        workers: int | None = None,
        concurrency: int | None = None,
        chunksize: int | Literal["auto"] = "auto",
        timeout: float | None = None,
        retries: int | Retry | None = 0,
        rate: RateArg = None,
        rate_key: Callable[[Any], Hashable] | None = None,
        errors: ErrorPolicy | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        buffer: int | None = None,
        name: str | None = None,
    ) -> Pipeline:
        """Add a stage that keeps the items for which ``pred`` is true.

        Runs inline by default (``gear="serial"``, on the stage's own thread): a cheap test
        is not worth a hand-off. Give it a gear when the test itself is heavy.
        """
        return self._add("filter", pred, gear, workers, concurrency, chunksize, timeout, retries, rate, errors,
                         initializer, initargs, max_tasks_per_worker, buffer, name, rate_key)

    def flat_map(
        self,
        fn: Callable[[Any], Any],
        *,
        gear: GearArg = "auto",
        workers: int | None = None,
        concurrency: int | None = None,
        chunksize: int | Literal["auto"] = "auto",
        timeout: float | None = None,
        retries: int | Retry | None = 0,
        rate: RateArg = None,
        rate_key: Callable[[Any], Hashable] | None = None,
        errors: ErrorPolicy | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        buffer: int | None = None,
        name: str | None = None,
    ) -> Pipeline:
        """Add a stage where ``fn`` returns (or yields) any number of items per item, each passed on.

        The items of one call are collected in its worker (a generator cannot cross a process)
        and passed on in order. An async generator function is fine in the async gear.
        """
        return self._add("flat_map", fn, gear, workers, concurrency, chunksize, timeout, retries, rate, errors,
                         initializer, initargs, max_tasks_per_worker, buffer, name, rate_key)

    def _add(
        self, kind: Kind, fn: Callable[[Any], Any], gear: GearArg, workers: int | None, concurrency: int | None,
        chunksize: int | Literal["auto"], timeout: float | None, retries: int | Retry | None,
        rate: RateArg, errors: ErrorPolicy | None, initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...], max_tasks_per_worker: int | None, buffer: int | None, name: str | None,
        rate_key: Callable[[Any], Hashable] | None = None,
    ) -> Pipeline:
        if not callable(fn):
            raise TypeError(f"a {kind} stage needs a callable, got {type(fn).__name__}")
        if errors is not None and errors not in ERROR_POLICIES:
            raise ValueError(f"errors must be one of {ERROR_POLICIES}, got {errors!r}")
        if isinstance(gear, str):
            gear_class(gear)  # an unknown name is refused here, not when the run starts
        elif not isinstance(gear, Gear):
            raise TypeError(f"gear must be a name or a Gear, got {type(gear).__name__}")
        if buffer is not None:
            _check_buffer(buffer)
        make_rate(rate, rate_key)  # a bad rate is refused here, not when the run starts
        if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
            raise ValueError(f"max_tasks_per_worker must be >= 1, got {max_tasks_per_worker!r}")
        if chunksize != "auto" and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be 'auto' or a positive int, got {chunksize!r}")
        taken = {s.name for s in self._stages}
        base = name if name is not None else fn_name(fn).rsplit(".", 1)[-1]  # "slow", not "main.<locals>.slow"
        unique, n = base, 1
        while unique in taken:
            n += 1
            unique = f"{base}#{n}"
        stage = _Stage(kind, fn, unique, gear, _workers(workers, concurrency), chunksize, _check_timeout(timeout),
                       retries, rate, errors, initializer, tuple(initargs), max_tasks_per_worker, buffer, rate_key)
        new = Pipeline(self._source, errors=self._errors, ordered=self._ordered, buffer=self._buffer,
                       progress=self._progress, pull=self._pull)
        new._stages = (*self._stages, stage)
        return new

    @property
    def stages(self) -> list[str]:
        """The stages' names, in order."""
        return [s.name for s in self._stages]

    def __repr__(self) -> str:
        return f"Pipeline({' -> '.join(['source', *self.stages])})"

    # -- running --------------------------------------------------------------------------
    def __iter__(self) -> PipelineIterator:
        """Start a run and iterate over its results (``for out in pipe``)."""
        if not self._stages:
            raise ValueError("the pipeline has no stages: add one with .map(), .filter() or .flat_map()")
        return PipelineIterator(_Run(self))

    def run(self) -> PipelineReport:
        """Run to the end, dropping the results (the last stage stores them), and return the report."""
        with iter(self) as it:
            for _ in it:
                pass
        return it.report

    async def __aiter__(self) -> AsyncIterator[Any]:
        """``async for out in pipe``: the stages run on their own threads; the loop only waits for results."""
        if not self._stages:
            raise ValueError("the pipeline has no stages: add one with .map(), .filter() or .flat_map()")
        run = _Run(self)
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def nudge() -> None:
            try:
                loop.call_soon_threadsafe(arrived.set)
            except RuntimeError:  # the loop closed: nobody is waiting
                pass

        run.output.listener = nudge
        try:
            await asyncio.to_thread(run.start)
            while True:
                arrived.clear()
                got = run.poll(0.0)
                if got is None:
                    break
                if not got:
                    try:
                        await asyncio.wait_for(arrived.wait(), 0.25)
                    except TimeoutError:
                        pass
                    continue
                for value in got:
                    yield value
        finally:
            await asyncio.to_thread(run.close)


def _check_buffer(buffer: int) -> None:
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ValueError(f"buffer must be a positive number of items, got {buffer!r}")


class PipelineIterator(Iterator[Any]):
    """The results of a pipeline run; ``report`` fills in as it goes and is complete at the end.

    Breaking out of the loop over it, ``close()`` or leaving its ``with`` block stops every
    stage and leaves nothing running.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._ready: deque[Any] = deque()
        self._started = False

    @property
    def report(self) -> PipelineReport:
        return self._run.make_report()

    def __iter__(self) -> PipelineIterator:
        return self

    def __next__(self) -> Any:
        ready = self._ready
        if ready:
            return ready.popleft()
        run = self._run
        try:
            if not self._started:
                self._started = True
                run.start()
            while True:
                got = run.poll(0.1)  # in slices: Ctrl-C stays prompt
                if got is None:
                    raise StopIteration
                if got:
                    ready.extend(got)
                    return ready.popleft()
        except StopIteration:
            run.close()
            raise
        except BaseException:
            run.close()
            raise

    def close(self) -> None:
        """Stop every stage now; results not yet read are dropped."""
        self._ready.clear()
        self._run.close()

    def __enter__(self) -> PipelineIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Run:
    """One run of a pipeline: its channels, stage threads, the caller's end and the report."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.stages = pipe._stages
        self.ordered = pipe._ordered
        n = len(self.stages)
        # channels[k] feeds stage k (k >= 1; k = 0 too when the caller reads the source);
        # channels[n] is the caller's end.
        source = pipe._source
        by_caller = pipe._pull == "caller" or (pipe._pull == "auto" and _bound_to_its_thread(source))
        if by_caller and not hasattr(source, "__iter__"):
            raise TypeError("pull='caller' reads the source on the caller's thread: it must be a plain iterable")
        self.feed: Iterator[Any] | None = iter(source) if by_caller else None  # type: ignore[arg-type]
        self.channels: list[Channel | None] = [Channel(pipe._buffer) if by_caller else None]
        for k in range(1, n + 1):
            own = self.stages[k].buffer if k < n else None
            self.channels.append(Channel(own if own is not None else pipe._buffer))
        output = self.channels[n]
        assert output is not None
        self.output = output
        self.schedulers: list[Scheduler] = []
        self.gears: list[Gear] = []
        self.specs: list[RunSpec] = []
        self.threads: list[threading.Thread] = []
        self.started: list[int] = []  # the stages whose thread started (last to first)
        self.opened = [threading.Event() for _ in range(n)]
        self.ended = [threading.Event() for _ in range(n)]
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.error_stage: int | None = None
        self.stopping = False
        self.closed = False
        #: (monotonic, the channels' clock too) when the stages started and when the run closed.
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.out_counts = [0] * n
        self.last_out: list[float | None] = [None] * n  # (monotonic) each stage's last output
        self.passed = [0] * n
        self.samples: list[tuple[float, list[int], list[int]]] = []
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()
        self._sigterm: Any = None
        total = input_length(pipe._source) if all(s.kind == "map" for s in self.stages) else None
        self.progress = make_progress(pipe._progress, total, "pipeline")
        self.delivered = 0

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Make every stage's run (bad options raise here), open the gears last to first, start the flow."""
        source: Any = self.pipe._source if self.channels[0] is None else self.channels[0]
        if not hasattr(source, "__iter__") and not isinstance(source, Channel):
            source = _sync_iter(source)
        for k, stage in enumerate(self.stages):
            items: Any = source if k == 0 else self.channels[k]
            errors = stage.errors or self.pipe._errors
            scheduler, gear, spec = _prepare(
                stage.call(), items, stage.gear, stage.workers, None, self.ordered, stage.chunksize, errors,
                False, stage.timeout, stage.retries, stage.rate, stage.initializer, stage.initargs,
                stage.max_tasks_per_worker, "auto", stage.rate_key,
            )
            if k > 0:
                scheduler.passthrough = _is_failure
            self.schedulers.append(scheduler)
            self.gears.append(gear)
            self.specs.append(spec)
        self._catch_sigterm()
        self.started_at = time.monotonic()
        for k in reversed(range(len(self.stages))):
            # Each gear opens (a process gear forks) before any stage upstream runs user code.
            thread = threading.Thread(
                target=self._stage, args=(k,), name=f"gearshift-stage-{k + 1}-{self.stages[k].name}", daemon=True
            )
            self.threads.append(thread)
            self.started.append(k)
            thread.start()
            while not self.opened[k].wait(0.1):
                pass
            if self.error is not None:
                break
        self._monitor = threading.Thread(target=self._sample, name="gearshift-pipeline-monitor", daemon=True)
        self._monitor.start()

    def _catch_sigterm(self) -> None:
        """On the main thread, SIGTERM raises SystemExit in the caller (as for gs.map), so cleanup runs."""
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._sigterm = signal.signal(signal.SIGTERM, _raise_exit)

    # -- a stage's thread -----------------------------------------------------------------
    def _stage(self, k: int) -> None:
        stage = self.stages[k]
        scheduler, gear, spec = self.schedulers[k], self.gears[k], self.specs[k]
        out = self.channels[k + 1]
        assert out is not None
        kind = stage.kind
        named = [0]  # this stage's own failures named so far
        try:
            for chunk in drive(scheduler, gear, spec, opened=self.opened[k].set):
                values = [value for _, value in chunk]
                # A failure counted now may be released in a later chunk (after earlier items, in
                # order): look while any counted failure is not named yet, and always past the first
                # stage (failures of earlier stages pass through).
                if scheduler.report.failed > named[0] or k > 0:
                    values = self._name_failures(k, values, named)
                if kind == "filter":
                    values = [v for v in values if v is not DROPPED]
                elif kind == "flat_map":
                    values = [x for v in values for x in (v if type(v) is list else (v,))]
                self.out_counts[k] += len(values)
                out.put_many(values)
                self.last_out[k] = time.monotonic()
            out.close()
        except _Stopped:
            pass
        except BaseException as exc:
            if exc is scheduler.input_error and isinstance(exc, Exception):
                out.close(error=exc)  # the source's own error: after every earlier result, as imap does
            else:
                self._fail(k, exc)
        finally:
            self.opened[k].set()
            self.ended[k].set()

    def _name_failures(self, k: int, values: list[Any], named: list[int]) -> list[Any]:
        name = self.stages[k].name
        out = []
        for v in values:
            if type(v) is Failure:
                if v.stage is None:
                    v = dataclasses.replace(v, stage=name)
                    named[0] += 1
                else:
                    self.passed[k] += 1
            out.append(v)
        return out

    def _fail(self, k: int, exc: BaseException) -> None:
        with self.lock:
            first = self.error is None
            if first:
                self.error = exc
                self.error_stage = k
        if first:
            n = len(self.stages)
            try:
                exc.add_note(f"gearshift: in pipeline stage {self.stages[k].name!r} (stage {k + 1} of {n})")
            except Exception:
                pass
        self.stop()

    def stop(self) -> None:
        """Stop every stage and both ends of every channel, without waiting (any thread)."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
        for scheduler in self.schedulers:
            scheduler.abort(_Stopped())
        for channel in self.channels:
            if channel is not None:
                channel.abort(_Stopped())

    # -- the caller's end -----------------------------------------------------------------
    def poll(self, timeout: float) -> list[Any] | None:
        """Results that arrived (waiting up to ``timeout``), [] if none yet, None at the end.

        Raises the first stage error, or the source's own error after every earlier result.
        """
        if self.feed is not None:
            self._feed_source()
            if self.feed is not None:  # more to read: come back for it soon
                timeout = min(timeout, 0.02)
        got = self.output.get_many(timeout)
        if self.error is not None:
            self.close()
            raise self.error
        if got:
            self.delivered += len(got)
            self.progress.update(len(got))
            return got
        if got is None:
            error = self.output.error
            self.close()
            if self.error is not None:
                raise self.error
            if error is not None and not isinstance(error, _Stopped):
                raise error
            return None
        return got

    def _feed_source(self) -> None:
        """``pull="caller"``: read the source here, as much as the first channel has room for."""
        channel, feed = self.channels[0], self.feed
        assert channel is not None and feed is not None
        room = channel.size - channel.waiting()
        if room <= 0:
            return
        if self.stopping:
            self.feed = None
            return
        items: list[Any] = []
        try:
            items.extend(itertools.islice(feed, room))
        except Exception as exc:  # the source's own error: after its earlier items, as imap does
            self.feed = None
            with contextlib.suppress(_Stopped):
                channel.put_many(items)
                channel.close(error=exc)
            return
        except BaseException:
            self.feed = None
            raise
        try:
            channel.put_many(items)  # never waits: there was room, and only we put
        except _Stopped:  # stopped meanwhile (a stage failed): poll raises its error
            self.feed = None
            return
        if len(items) < room:
            self.feed = None
            channel.close()

    def close(self) -> None:
        """Stop what still runs and wait for every thread of the run (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            if not all(self.ended[k].is_set() for k in self.started) or not self.output.exhausted:
                self.stop()
            self._join()
        finally:
            self.ended_at = time.monotonic()
            self._monitor_stop.set()
            if self._monitor is not None:
                self._monitor.join()
            self.progress.close()
            if self._sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._sigterm)
            self.pipe.report = self.make_report()

    def _join(self) -> None:
        """Wait for the stage threads, in slices (signals stay prompt); a Ctrl-C meanwhile stops them."""
        started = self.started
        try:
            for k in started:
                while not self.ended[k].wait(0.1):
                    pass
        except BaseException:
            self.stop()
            deadline = time.monotonic() + CANCEL_GRACE
            for k in started:
                self.ended[k].wait(max(0.0, deadline - time.monotonic()))
            raise

    # -- the report -----------------------------------------------------------------------
    def _sample(self) -> None:
        every = SAMPLE_EVERY
        while not self._monitor_stop.wait(every):
            queues = [0 if c is None else c.waiting() for c in self.channels[:-1]]
            queues[0] = 0
            self.samples.append((time.monotonic() - self.started_at, queues, list(self.out_counts)))
            if len(self.samples) >= MAX_SAMPLES:
                del self.samples[::2]
                every *= 2

    def make_report(self) -> PipelineReport:
        end = self.ended_at if self.ended_at is not None else time.monotonic()
        wall = end - self.started_at
        stages = []
        for k, stage in enumerate(self.stages):
            channel = self.channels[k]
            scheduler = self.schedulers[k] if k < len(self.schedulers) else None
            r = scheduler.report if scheduler is not None else None
            gear = self.gears[k] if k < len(self.gears) else None
            first = self.started_at if channel is None else channel.first_put
            last = self.last_out[k]
            active = last - first if first is not None and last is not None and last > first else 0.0
            items_in = (channel.taken if channel is not None else (r.succeeded + r.failed + self.passed[k] if r else 0))
            stages.append(StageReport(
                name=stage.name, kind=stage.kind, gear=r.gear if r else "", gear_name=gear.name if gear else "",
                workers=r.workers if r else 0, items_in=items_in, items_out=self.out_counts[k],
                failed=r.failed if r else 0, skipped=r.skipped if r else 0, retried=r.retried if r else 0,
                passed=self.passed[k], busy=r.busy if r else 0.0, wall=wall, active=active,
                mean_queue=channel.mean_length() if channel is not None else 0.0,
                buffer=channel.size if channel is not None else 0, reasons=list(r.reasons) if r else [],
                chunksize=r.chunksize if r else 1,
            ))
        return PipelineReport(stages, self.delivered, wall, self.ordered, cpu_count(), list(self.samples))


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _sync_iter(source: AsyncIterable[Any]) -> Iterator[Any]:
    """An async iterable read on an event loop of its own (the first stage's input thread runs it)."""
    loop = asyncio.new_event_loop()
    it = source.__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(it.__anext__())
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    loop.run_until_complete(aclose())
                except BaseException:
                    pass
        loop.close()
