"""gs.map: results, order, function kinds, input kinds, error policies and argument checks, in every gear."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing.process
import os
import threading
from typing import Any

import pytest
from conftest import leftover_children
from helpers import GEARS, add_one, asquare, fail_on, ran_files, record, square

import gearshift as gs

N = 60


@pytest.mark.parametrize("gear", GEARS)
def test_results_in_order(gear: str) -> None:
    out = gs.map(square, range(N), gear=gear, workers=2)
    assert out == [x * x for x in range(N)]
    assert isinstance(out, list)
    assert out.report.succeeded == N and out.report.items == N and out.report.failed == 0
    assert out.report.gear.startswith(gear)


@pytest.mark.parametrize("gear", GEARS)
def test_unordered_has_every_result(gear: str) -> None:
    out = gs.map(square, range(N), gear=gear, workers=2, ordered=False)
    assert sorted(out) == [x * x for x in range(N)]


@pytest.mark.parametrize("gear", GEARS)
def test_async_def_function_in_every_gear(gear: str) -> None:
    assert gs.map(asquare, range(20), gear=gear, workers=2) == [x * x for x in range(20)]


@pytest.mark.parametrize("gear", GEARS)
def test_generator_input(gear: str) -> None:
    gen = (x for x in range(N))
    assert gs.map(add_one, gen, gear=gear, workers=2) == list(range(1, N + 1))


@pytest.mark.parametrize("gear", GEARS)
def test_empty_input(gear: str) -> None:
    out = gs.map(square, [], gear=gear, workers=2)
    assert out == [] and out.report.items == 0


def test_lambdas_and_closures_in_process_gear() -> None:
    offset = 10

    def shifted(x: int) -> int:
        return x + offset

    assert gs.map(lambda x: x * 3, range(10), gear="process", workers=2) == [x * 3 for x in range(10)]
    assert gs.map(shifted, range(10), gear="process", workers=2) == [x + 10 for x in range(10)]


def test_process_gear_really_uses_other_processes() -> None:
    pids = gs.map(lambda _: os.getpid(), range(10), gear="process", workers=2)
    assert os.getpid() not in pids


def test_concurrency_alias() -> None:
    out = gs.map(square, range(5), gear="thread", concurrency=3)
    assert out == [0, 1, 4, 9, 16] and out.report.workers == 3
    with pytest.raises(ValueError, match="same setting"):
        gs.map(square, range(5), workers=2, concurrency=3)


def test_gear_object_accepted() -> None:
    assert gs.map(square, range(5), gear=gs.ThreadGear(2)) == [0, 1, 4, 9, 16]


# -- errors="raise" -----------------------------------------------------------------------


@pytest.mark.parametrize("gear", GEARS)
def test_raise_keeps_type_and_names_item(gear: str) -> None:
    with pytest.raises(KeyError) as info:
        gs.map(fail_on, range(10), gear=gear, workers=2)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "item #3" in notes and "fail_on" in notes
    partial = info.value.partial_results  # type: ignore[attr-defined]
    assert 3 not in partial and all(partial[i] == i for i in partial)


def test_partial_results_hold_everything_finished_before_the_failure() -> None:
    """The serial gear runs items in order, so exactly the items before the failure are done."""
    with pytest.raises(KeyError) as info:
        gs.map(functools.partial(fail_on, bad=50), range(100), gear="serial")
    assert info.value.partial_results == {i: i for i in range(50)}  # type: ignore[attr-defined]


def test_raise_in_process_gear_carries_worker_traceback() -> None:
    with pytest.raises(KeyError) as info:
        gs.map(fail_on, range(10), gear="process", workers=2)
    cause = info.value.__cause__
    assert isinstance(cause, gs.RemoteTraceback)
    assert "fail_on" in cause.tb and "KeyError" in cause.tb


@pytest.mark.parametrize("gear", GEARS)
def test_raise_cancels_the_rest(gear: str, tmp_path: Any) -> None:
    total = 2000
    fn = functools.partial(record, folder=str(tmp_path), bad=2)
    with pytest.raises(ValueError, match="item 2 is bad"):
        gs.map(fn, range(total), gear=gear, workers=2)
    ran = ran_files(str(tmp_path))
    assert 2 in ran
    assert len(ran) < total, "the items after the failure should not all have run"


# -- errors="collect" / "skip" ------------------------------------------------------------


@pytest.mark.parametrize("gear", GEARS)
def test_collect_puts_failure_in_place(gear: str) -> None:
    out = gs.map(fail_on, range(6), gear=gear, workers=2, errors="collect")
    assert [x for i, x in enumerate(out) if i != 3] == [0, 1, 2, 4, 5]
    failure = out[3]
    assert isinstance(failure, gs.Failure)
    assert failure.item == 3 and isinstance(failure.exception, KeyError)
    assert "KeyError" in failure.traceback
    assert out.report.failed == 1 and out.report.succeeded == 5


@pytest.mark.parametrize("gear", GEARS)
def test_skip_drops_and_counts(gear: str) -> None:
    out = gs.map(functools.partial(fail_on, bad=1), range(6), gear=gear, workers=2, errors="skip")
    assert out == [0, 2, 3, 4, 5]
    assert out.report.skipped == 1 and out.report.failed == 1


# -- pickling -----------------------------------------------------------------------------


def test_unpicklable_function_raises_before_any_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()

    def guarded(x: int) -> int:
        with lock:
            return x

    starts: list[object] = []
    real_start = multiprocessing.process.BaseProcess.start

    def counting_start(self: multiprocessing.process.BaseProcess) -> None:
        starts.append(self)
        real_start(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counting_start)
    with pytest.raises(gs.UnpicklableError) as info:
        gs.map(guarded, range(5), gear="process", workers=2)
    message = str(info.value)
    assert "guarded" in message and "gear='thread'" in message
    assert isinstance(info.value, TypeError)
    assert starts == []
    assert leftover_children(wait=0) == []
    # The same function is fine in the thread gear, as the message suggests.
    assert gs.map(guarded, range(5), gear="thread", workers=2) == list(range(5))


def test_unpicklable_item_fails_only_that_item() -> None:
    items: list[Any] = [1, 2, threading.Lock(), 4]
    out = gs.map(repr, items, gear="process", workers=2, errors="collect")
    assert out[0] == "1" and out[1] == "2" and out[3] == "4"
    failure = out[2]
    # pickle's own error (its own type and message), with notes naming the item and the remedy
    assert isinstance(failure, gs.Failure) and type(failure.exception) is TypeError
    notes = "\n".join(failure.exception.__notes__)
    assert "lock" in str(failure.exception).lower() and "#2" in notes and "gear='thread'" in notes


def test_unpicklable_item_under_raise_names_it() -> None:
    with pytest.raises(TypeError, match="lock") as info:
        gs.map(repr, [0, threading.Lock(), 2], gear="process", workers=2)
    assert "#1" in "\n".join(info.value.__notes__)


# -- event loops --------------------------------------------------------------------------


@pytest.mark.parametrize("call", [gs.map, gs.imap])
def test_map_inside_running_loop_points_to_amap(call: Any) -> None:
    async def main() -> None:
        call(square, range(3))

    with pytest.raises(RuntimeError, match=r"gs\.amap"):
        asyncio.run(main())


# -- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"errors": "bogus"}, "errors"),
        ({"chunksize": 0}, "chunksize"),
        ({"chunksize": -5}, "chunksize"),
        ({"workers": 0}, "workers"),
        ({"workers": -1}, "workers"),
        ({"gear": "warp"}, "gear"),
        ({"timeout": 0}, "timeout"),
    ],
)
@pytest.mark.parametrize("call", ["map", "imap"])
def test_invalid_arguments_raise_value_error(kwargs: dict[str, Any], word: str, call: str) -> None:
    with pytest.raises(ValueError, match=word):
        getattr(gs, call)(square, range(3), **kwargs)


def test_invalid_arguments_in_amap() -> None:
    async def main() -> None:
        async for _ in gs.amap(square, range(3), errors="bogus"):  # type: ignore[arg-type]
            pass

    with pytest.raises(ValueError, match="errors"):
        asyncio.run(main())


def test_not_callable_raises_type_error() -> None:
    with pytest.raises(TypeError, match="callable"):
        gs.map(42, range(3))  # type: ignore[arg-type]


# -- progress -----------------------------------------------------------------------------


def test_progress_true_is_silent_off_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GEARSHIFT_PROGRESS", raising=False)
    assert gs.map(square, range(20), gear="thread", workers=2, progress=True) == [x * x for x in range(20)]
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_force_draws_a_bar(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEARSHIFT_PROGRESS", raising=False)
    gs.map(square, range(20), gear="thread", workers=2, progress="force")
    captured = capsys.readouterr()
    assert "20/20" in captured.err and "square" in captured.err
    assert captured.out == ""


def _broken_input(n: int) -> Any:
    yield from range(n)
    raise OSError("input broke")


@pytest.mark.parametrize("gear", GEARS)
def test_error_in_the_input_iterator_propagates(gear: str) -> None:
    with pytest.raises(OSError, match="input broke"):
        gs.map(square, _broken_input(20), gear=gear, workers=2)


def test_unpicklable_result_fails_only_that_item() -> None:
    out = gs.map(lambda x: threading.Lock() if x == 2 else x, range(5), gear="process", workers=2, errors="collect")
    assert [out[i] for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    assert isinstance(out[2], gs.Failure) and "pickle" in str(out[2].exception)
