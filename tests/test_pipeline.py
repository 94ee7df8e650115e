"""gs.Pipeline: stages in different gears at once, bounded queues between, one error policy, a report."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest
from conftest import leftover_children, leftover_threads

import gearshift as gs

GEARS = ["serial", "thread", "process", "async"]


async def adouble(x: int) -> int:
    await asyncio.sleep(0.001)
    return 2 * x


def plus_one(x: int) -> int:
    return x + 1


def square(x: int) -> int:
    return x * x


def pid_of(x: int) -> tuple[int, int]:
    return x, os.getpid()


def fails_on_7(x: int) -> int:
    if x == 7:
        raise ValueError(f"bad item {x}")
    return x


async def afails_on_7(x: int) -> int:
    return fails_on_7(x)


def split(x: int) -> list[int]:
    return [x] * (x % 3)  # 0, 1 or 2 copies


def assert_all_gone() -> None:
    assert leftover_children() == []
    assert leftover_threads() == []


# -- correctness ------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("ordered", [True, False])
def test_async_process_thread_stages_with_filter_and_flat_map(ordered: bool) -> None:
    pipe = (
        gs.Pipeline(range(500), ordered=ordered)
        .map(adouble, gear="async", concurrency=50)
        .map(pid_of, gear="process", workers=2)
        .filter(lambda pair: pair[0] % 4 == 0, name="keep")
        .flat_map(lambda pair: [pair[0]] * (1 + pair[0] % 3), gear="thread", workers=3)
        .map(plus_one, gear="thread", workers=4)
    )
    out = list(pipe)
    expected = [2 * x + 1 for x in range(500) if (2 * x) % 4 == 0 for _ in range(1 + (2 * x) % 3)]
    assert (out if ordered else sorted(out)) == (expected if ordered else sorted(expected))
    report = pipe.report
    assert report is not None and report.items == len(expected)
    names = [s.name for s in report.stages]
    assert names == ["adouble", "pid_of", "keep", "<lambda>", "plus_one"]
    ins = [s.items_in for s in report.stages]
    outs = [s.items_out for s in report.stages]
    assert ins == [500, 500, 500, 250, len(expected)] and outs == [500, 500, 250, len(expected), len(expected)]
    assert report.stages[1].gear.startswith("process") and report.stages[0].gear.startswith("async")
    assert_all_gone()


@pytest.mark.timeout(60)
def test_the_process_stage_runs_in_worker_processes() -> None:
    out = list(gs.Pipeline(range(200)).map(pid_of, gear="process", workers=2))
    assert [x for x, _ in out] == list(range(200))
    assert os.getpid() not in {pid for _, pid in out}


@pytest.mark.timeout(60)
def test_stages_run_at_the_same_time() -> None:
    """Stage 2 holds item 0 until stage 1 has started item 5: only possible if both run at once."""
    fifth_started = threading.Event()

    def first(x: int) -> int:
        if x == 5:
            fifth_started.set()
        return x

    def second(x: int) -> int:
        if x == 0:
            assert fifth_started.wait(10), "stage 1 did not go on while stage 2 held item 0"
        return x

    out = list(gs.Pipeline(range(20)).map(first, gear="thread", workers=1).map(second, gear="thread", workers=1))
    assert out == list(range(20))


@pytest.mark.timeout(60)
def test_endless_source_with_islice_reads_a_bounded_amount() -> None:
    """Item by item (chunksize=1), the source runs ahead of the consumer by windows and buffers only."""
    taken = itertools.count()

    def source() -> Iterator[int]:
        for i in itertools.count():
            next(taken)
            yield i

    pipe = (gs.Pipeline(source(), buffer=16).map(square, gear="thread", workers=2, chunksize=1)
            .map(plus_one, gear="serial", chunksize=1))
    with iter(pipe) as it:
        got = list(itertools.islice(it, 5000))
        ahead = next(taken) - 5000
    assert got == [i * i + 1 for i in range(5000)]
    assert ahead < 200, f"the source ran {ahead} items ahead of the consumer"
    assert_all_gone()


def _settled(counter: itertools.count[int], deadline: float = 10.0) -> int:
    """The counter's value once it stopped moving for 0.2 s (a stalled pipeline), or fail."""
    end = time.monotonic() + deadline
    last = next(counter)
    while time.monotonic() < end:
        time.sleep(0.2)
        now = next(counter)
        if now == last + 1:  # only our own look moved it
            return now
        last = now
    raise AssertionError("the source never stopped being read while nobody consumed")


@pytest.mark.timeout(60)
def test_a_slow_consumer_holds_every_stage_back() -> None:
    """Automatic chunks of tiny items are thousands of items: the read-ahead is bounded, not small."""
    made = itertools.count()

    def source() -> Iterator[int]:
        for i in range(10_000_000):
            next(made)
            yield i

    pipe = gs.Pipeline(source(), buffer=8).map(plus_one, gear="thread", workers=2).map(square, gear="process")
    with iter(pipe) as it:
        first = [next(it) for _ in range(10)]
        settled = _settled(made)
    assert first == [(x + 1) ** 2 for x in range(10)]
    assert settled < 500_000, settled
    assert_all_gone()


def test_async_iteration_and_async_source() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(50):
            await asyncio.sleep(0)
            yield i

    async def main() -> list[int]:
        pipe = gs.Pipeline(numbers()).map(adouble, gear="async").map(plus_one, gear="thread", workers=2)
        return [x async for x in pipe]

    assert asyncio.run(main()) == [2 * i + 1 for i in range(50)]
    assert_all_gone()


def test_async_iteration_broken_early_stops_everything() -> None:
    async def main() -> list[int]:
        pipe = gs.Pipeline(itertools.count()).map(plus_one, gear="thread", workers=2)
        got = []
        async with contextlib.aclosing(pipe.__aiter__()) as results:
            async for x in results:
                got.append(x)
                if len(got) == 20:
                    break
        return got

    assert asyncio.run(main()) == list(range(1, 21))
    assert_all_gone()


def test_run_returns_the_report_and_a_pipeline_runs_again() -> None:
    seen: list[int] = []
    pipe = gs.Pipeline(range(30)).map(seen.append, gear="thread", workers=2)
    report = pipe.run()
    assert isinstance(report, gs.PipelineReport) and report.items == 30 and sorted(seen) == list(range(30))
    assert pipe.run().items == 30 and len(seen) == 60


def test_bad_options_are_refused_when_the_stage_is_added() -> None:
    pipe = gs.Pipeline(range(3))
    with pytest.raises(ValueError, match="unknown gear 'proces'"):
        pipe.map(square, gear="proces")
    with pytest.raises(TypeError, match="callable"):
        pipe.map(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="errors must be"):
        pipe.map(square, errors="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="buffer"):
        pipe.map(square, buffer=0)
    with pytest.raises(ValueError, match="no stages"):
        list(pipe)
    with pytest.raises(TypeError, match="iterable"):
        gs.Pipeline(5)  # type: ignore[arg-type]


# -- errors -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("gear", GEARS)
def test_raise_stops_every_stage_and_names_the_stage(gear: str) -> None:
    fn = afails_on_7 if gear == "async" else fails_on_7
    pipe = (
        gs.Pipeline(itertools.count())  # endless: only a stop can end it
        .map(plus_one, gear="thread", workers=2)
        .map(fn, gear=gear, workers=2, name="check")
        .map(square, gear="thread", workers=2)
    )
    got = []
    with pytest.raises(ValueError, match="bad item 7") as info:
        for x in pipe:
            got.append(x)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "pipeline stage 'check' (stage 2 of 3)" in notes
    assert "item #6" in notes  # the stage's own input position of the failed item
    assert got == [x * x for x in range(1, 7)][: len(got)]
    assert_all_gone()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gear", GEARS)
def test_collect_passes_a_failure_naming_its_stage(gear: str) -> None:
    fn = afails_on_7 if gear == "async" else fails_on_7
    after: list[Any] = []

    def record(x: Any) -> Any:
        after.append(x)
        return x

    pipe = (
        gs.Pipeline(range(12), errors="collect")
        .map(plus_one, gear="thread", workers=2)
        .map(fn, gear=gear, workers=2, name="check")
        .map(record, gear="thread", workers=2)
    )
    out = list(pipe)
    assert len(out) == 12
    failure = out[6]
    assert isinstance(failure, gs.Failure) and failure.stage == "check" and failure.item == 7
    assert isinstance(failure.exception, ValueError) and "fails_on_7" in failure.traceback
    assert [x for i, x in enumerate(out) if i != 6] == [x + 1 for x in range(12) if x != 6]
    assert all(not isinstance(x, gs.Failure) for x in after), "a later stage ran on a failure"
    report = pipe.report
    assert report is not None
    assert [s.failed for s in report.stages] == [0, 1, 0] and report.stages[2].passed == 1
    assert_all_gone()


def test_skip_drops_failures_and_a_stage_may_override_the_policy() -> None:
    out = list(gs.Pipeline(range(12), errors="raise").map(fails_on_7, gear="thread", errors="skip"))
    assert out == [x for x in range(12) if x != 7]
    with pytest.raises(ValueError, match="bad item 7"):
        list(gs.Pipeline(range(12), errors="collect").map(fails_on_7, gear="thread", errors="raise"))


@pytest.mark.timeout(60)
def test_the_sources_own_error_comes_after_every_earlier_result() -> None:
    def source() -> Iterator[int]:
        yield from range(10)
        raise LookupError("source broke")

    got = []
    with pytest.raises(LookupError, match="source broke"):
        for x in gs.Pipeline(source()).map(plus_one, gear="thread", workers=2).map(square, gear="process"):
            got.append(x)
    assert got == [(x + 1) ** 2 for x in range(10)]
    assert_all_gone()


@pytest.mark.timeout(60)
def test_a_crashed_process_worker_fails_only_its_item() -> None:
    out = list(gs.Pipeline(range(20), errors="collect").map(crash_on_5, gear="process", workers=2)
               .map(plus_one, gear="thread"))
    assert isinstance(out[5], gs.Failure) and isinstance(out[5].exception, gs.WorkerCrashed)
    assert [x for i, x in enumerate(out) if i != 5] == [x + 1 for x in range(20) if x != 5]


def crash_on_5(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x


# -- the report -------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_the_report_names_the_slow_stage_as_the_bottleneck() -> None:
    def quick(x: int) -> int:
        return x

    def slow(x: int) -> int:
        time.sleep(0.01)  # the work itself: a 10 ms wait per item, 2 threads
        return x

    pipe = gs.Pipeline(range(100)).map(quick, gear="thread", workers=4).map(slow, gear="thread", workers=2)
    report = pipe.run()
    bottleneck = report.bottleneck
    assert bottleneck is not None and bottleneck.name == "slow", str(report)
    assert bottleneck.busy_share > 0.5 and 100 < bottleneck.capacity < 400
    assert report.stages[0].busy_share < bottleneck.busy_share
    text = str(report)
    assert "bottleneck: slow" in text and "to lift it: more workers for slow (workers=4)" in text
    # Items wait in front of the slow stage, not in front of the quick one.
    assert report.stages[1].mean_queue > report.stages[0].mean_queue


def test_report_plot_draws_throughput_and_queues(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    report = gs.Pipeline(range(50)).map(nap, gear="thread", workers=2).run()
    fig = report.plot(str(tmp_path / "pipe.png"))
    assert (tmp_path / "pipe.png").stat().st_size > 0 and len(fig.axes) == 2


def nap(x: int) -> int:
    time.sleep(0.002)
    return x


# -- signals: a real child process --------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import sys, time, itertools
    import gearshift as gs

    def slow(x):
        time.sleep(0.05)
        return x

    if __name__ == "__main__":
        pipe = (gs.Pipeline(itertools.count()).map(slow, gear="process", workers=2)
                .map(slow, gear="thread", workers=2))
        try:
            for i, x in enumerate(pipe):
                if i == 3:
                    print("running", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_every_stage_of_a_real_process(sig: int, tmp_path: Any) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running"
        parent = psutil.Process(proc.pid)
        workers = parent.children(recursive=True)
        assert workers, "the process stage has worker processes"
        proc.send_signal(sig)
        code = proc.wait(timeout=20)
        assert code == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM), code
        if sig == signal.SIGINT:
            assert "interrupted" in proc.stdout.read()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphans left: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_pull_caller_reads_the_source_on_the_iterating_thread_and_keeps_its_error() -> None:
    readers = set()

    def source() -> Iterator[int]:
        for i in range(2000):
            readers.add(threading.get_ident())
            yield i
        raise LookupError("source broke")

    got = []
    with pytest.raises(LookupError, match="source broke"):
        for x in gs.Pipeline(source(), pull="caller", buffer=64).map(plus_one, gear="thread", workers=2):
            got.append(x)
    assert got == [x + 1 for x in range(2000)]
    assert readers == {threading.get_ident()}
    with pytest.raises(ValueError, match="pull must be"):
        gs.Pipeline([1], pull="nobody")  # type: ignore[arg-type]
