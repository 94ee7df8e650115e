"""chunksize: "auto" batches tiny tasks (process and thread gears), an int fixes the batch size."""

from __future__ import annotations

import functools
import math
import time

import pytest
from helpers import add_one

import gearshift as gs
from gearshift._task import Batch


class Recording(gs.ProcessGear):
    """A process gear that notes the size of every batch the engine hands it."""

    sizes: list[int]

    def submit(self, batch: Batch) -> None:
        self.sizes.append(len(batch.tasks))
        super().submit(batch)


class RecordingThreads(gs.ThreadGear):
    sizes: list[int]

    def submit(self, batch: Batch) -> None:
        self.sizes.append(len(batch.tasks))
        super().submit(batch)


def recording(cls: type[gs.Gear]) -> gs.Gear:
    gear = cls(2)
    gear.sizes = []  # type: ignore[attr-defined]
    return gear


def nap(x: int, seconds: float = 0.03) -> int:
    time.sleep(seconds)
    return x


def test_auto_batches_tiny_tasks_in_process_gear() -> None:
    n = 20_000
    gear = recording(Recording)
    out = gs.map(add_one, range(n), gear=gear)
    assert out == list(range(1, n + 1))
    sizes: list[int] = gear.sizes  # type: ignore[attr-defined]
    assert sum(sizes) == n
    assert out.report.chunksize > 1
    assert max(sizes) == out.report.chunksize
    assert len(sizes) < n / 10, "tiny tasks must not travel one per message"
    # Tail balance: no chunk so big that one worker gets most of the known input.
    assert max(sizes) <= math.ceil(n / (4 * 2))


def test_auto_batches_tiny_tasks_on_generator_input() -> None:
    out = gs.map(add_one, (x for x in range(20_000)), gear="process", workers=2)
    assert out == list(range(1, 20_001))
    assert out.report.chunksize > 1


def test_auto_keeps_slow_tasks_one_per_batch() -> None:
    gear = recording(Recording)
    gs.map(functools.partial(nap, seconds=0.03), range(12), gear=gear)
    assert set(gear.sizes) == {1}  # type: ignore[attr-defined]


def test_auto_batches_tiny_tasks_in_thread_gear() -> None:
    gear = recording(RecordingThreads)
    out = gs.map(add_one, range(20_000), gear=gear)
    assert out == list(range(1, 20_001))
    assert out.report.chunksize > 1


@pytest.mark.parametrize("cls", [Recording, RecordingThreads])
@pytest.mark.parametrize("size", [1, 7])
def test_int_chunksize_is_fixed(cls: type[gs.Gear], size: int) -> None:
    gear = recording(cls)
    out = gs.map(add_one, range(100), gear=gear, chunksize=size)
    assert out == list(range(1, 101))
    sizes: list[int] = gear.sizes  # type: ignore[attr-defined]
    assert set(sizes[:-1]) == {size} and 1 <= sizes[-1] <= size
    assert out.report.chunksize == size


@pytest.mark.parametrize("gear", ["serial", "thread", "process", "async"])
def test_int_chunksize_results_still_in_order(gear: str) -> None:
    out = gs.map(add_one, range(101), gear=gear, workers=2, chunksize=10)
    assert out == list(range(1, 102))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "big", True])
def test_bad_chunksize(bad: object) -> None:
    with pytest.raises(ValueError, match="chunksize"):
        gs.map(add_one, range(3), chunksize=bad)  # type: ignore[arg-type]


def test_failure_inside_a_chunk_names_the_right_item() -> None:
    out = gs.map(functools.partial(_fail_on_37), range(100), gear="process", workers=2, chunksize=10,
                 errors="collect")
    failures = [f for f in out if isinstance(f, gs.Failure)]
    assert len(failures) == 1 and failures[0].item == 37 and failures[0].index == 37
    assert [x for x in out if not isinstance(x, gs.Failure)] == [x for x in range(100) if x != 37]


def _fail_on_37(x: int) -> int:
    if x == 37:
        raise ArithmeticError("37")
    return x
