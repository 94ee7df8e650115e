"""The gear of docs/gears.md, run from the page itself: the doc is the tested code.

The page imports only public names. Until ``gearshift/__init__.py`` exports the provisional
ones (TODO(issue 13): Batch, Done, Outcome, RunSpec, GearCosts, register_gear), the fixture
lends them from their private modules for the test's duration.
"""

from __future__ import annotations

import re
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gearshift as gs
import gearshift._gears as table
from gearshift._gears import GearCosts, register_gear
from gearshift._task import Batch, Done, Outcome, RunSpec

PAGE = Path(__file__).resolve().parent.parent / "docs" / "gears.md"
PROVISIONAL = {
    "Batch": Batch, "Done": Done, "Outcome": Outcome, "RunSpec": RunSpec, "GearCosts": GearCosts,
    "register_gear": register_gear,
}


def blocks() -> list[str]:
    """The page's Python code blocks, in order."""
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.fixture
def solo(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The page's gear module, imported as ``solo_gear`` (so its class pickles by reference)."""
    for name, value in PROVISIONAL.items():
        if not hasattr(gs, name):
            monkeypatch.setattr(gs, name, value, raising=False)
    before = dict(table._table)
    module = types.ModuleType("solo_gear")
    module.__file__ = str(PAGE)
    sys.modules["solo_gear"] = module
    try:
        exec(compile(blocks()[0], f"{PAGE}:solo_gear", "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules["solo_gear"]
        table._table.clear()
        table._table.update(before)


def test_the_page_imports_only_public_names() -> None:
    code = "\n".join(blocks())
    assert "gearshift." not in code.replace("import gearshift as gs", "")
    used = set(re.findall(r"\bgs\.(\w+)", code))
    assert used <= {*gs.__all__, *PROVISIONAL}, used - {*gs.__all__, *PROVISIONAL}


def test_the_solo_gear_runs_by_name_in_map(solo: types.ModuleType) -> None:
    threads: set[str] = set()

    def where(x: int) -> int:
        threads.add(threading.current_thread().name)
        return x * 2

    assert gs.map(where, range(500), gear="solo") == [x * 2 for x in range(500)]
    assert threads == {"gearshift-solo"}
    assert "solo" in table.gear_names()


def test_the_solo_gear_keeps_the_engines_promises(solo: types.ModuleType) -> None:
    def half(x: int) -> float:
        return 1 / x

    got = gs.map(half, [1, 0, 2], gear="solo", errors="collect")
    assert got[0] == 1.0 and got[2] == 0.5
    assert isinstance(got[1], gs.Failure) and isinstance(got[1].exception, ZeroDivisionError)
    assert "ZeroDivisionError" in got[1].traceback
    with pytest.raises(ZeroDivisionError):
        gs.map(half, [1, 0, 2], gear="solo")

    def bad_init() -> None:
        raise OSError("no database")

    with pytest.raises(gs.InitializerError, match="no database"):
        gs.map(half, [1, 2], gear="solo", initializer=bad_init)
    with pytest.raises(TypeError, match="coroutine function"):
        gs.map(asleep, [1], gear="solo")
    with pytest.raises(ValueError, match="one thread"):
        gs.map(half, [1], gear="solo", workers=3)


async def asleep(x: int) -> int:
    return x


def test_the_solo_gear_times_out_late_but_fails_the_item(solo: types.ModuleType) -> None:
    release = threading.Event()

    def slow(x: int) -> int:
        if x == 1:
            release.wait(0.3)  # nothing sets it: a call that takes 0.3 s, past its 0.05 s timeout
        return x

    got = gs.map(slow, [0, 1, 2], gear="solo", timeout=0.05, errors="collect")
    assert got[0] == 0 and got[2] == 2
    assert isinstance(got[1], gs.Failure) and isinstance(got[1].exception, gs.TaskTimeout)


def test_the_advisor_predicts_and_measures_the_solo_gear(solo: types.ModuleType) -> None:
    """Listed beside the built-ins from its declared costs; measured (measure=True) when in question."""
    advice = gs.advise(spin_a_little, [100_000] * 4, workers=1)
    solo_prediction = advice.predictions["solo"]
    assert solo_prediction.applicable and solo_prediction.workers == 1
    assert solo_prediction.speedup <= 1.0  # one thread never beats the caller: never chosen
    assert advice.gear != "solo"
    assert advice.measurements.round_trips["solo"] > 0 and solo_prediction.measured
    assert "solo gear measured: round trip" in str(advice)
    # Without workers=1 the gear is not in question: predicted from its declaration, not measured.
    free = gs.advise(spin_a_little, [100_000] * 4)
    assert "solo" in free.predictions and free.gear != "solo"


def spin_a_little(n: int) -> int:
    """About 1 ms for n=100_000: far above the advisor's 20 µs floor, below which no gear is measured."""
    return sum(range(n))


def test_the_pages_usage_block_runs(solo: types.ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(blocks()[1], f"{PAGE}:usage", "exec"), namespace)
    assert "Prediction(gear='solo'" in capsys.readouterr().out


def test_the_solo_gear_in_an_executor(solo: types.ModuleType) -> None:
    with gs.Executor(gear="solo") as ex:
        futures = [ex.submit(threading.current_thread) for _ in range(3)]
        names = {f.result().name for f in futures}
    assert names == {"gearshift-solo"}
