"""The table of gears (names, registration, entry points), declared costs, and the layers: no import circles.

Layers, bottom to top; a module may import only from its own layer or below:
tasks (0) <- plain gears (1) <- advisor (2) <- auto gear (3) <- engine (4) <- fronts (5).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import gearshift._gears as table
from gearshift._advisor.model import Machine, Measurements, decide, predict
from gearshift._gears import GearCosts, GearLoadError, gear_class, gear_names, make_gear, register_gear
from gearshift._gears._base import Gear, initializer_error, run_initializer, timeout_outcome
from gearshift._gears.auto import AutoGear
from gearshift._gears.serial import SerialGear
from gearshift._task import RunSpec, Task
from gearshift.errors import InitializerError, TaskTimeout

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "gearshift"
LAYER_NAMES = ["tasks", "gears", "advisor", "auto", "engine", "fronts"]
TASKS = {"gearshift.errors", "gearshift._task", "gearshift._cancel", "gearshift._portable", "gearshift._calls",
         "gearshift._pickling"}
FRONTS = {"gearshift", "gearshift.__main__", "gearshift._api", "gearshift.executor", "gearshift.pool", "gearshift.cli",
          "gearshift.pipeline", "gearshift.fetch"}
#: Function-level imports of gearshift allowed without a comment of their own, and why.
LAZY_OK = {
    "gearshift.cli": "each subcommand imports its modules when it runs, so `gearshift --help` starts fast",
    "gearshift._cli": "the command line's modules import what only one subcommand needs when it runs",
}


def layer(module: str) -> int:
    """The layer of a module of gearshift: public modules are fronts; a new private one counts as the engine's."""
    if module in TASKS:
        return 0
    if module == "gearshift._gears.auto":
        return 3
    if module == "gearshift._gears" or module.startswith("gearshift._gears."):
        return 1
    if module == "gearshift._advisor" or module.startswith("gearshift._advisor."):
        return 2
    public = not module.split(".")[1].startswith("_") if "." in module else True
    if public or module in FRONTS or module.startswith(("gearshift._cli", "gearshift._lab")):
        return 5
    return 4


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The gearshift modules an import statement loads (``from pkg import name`` may name a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "gearshift"]
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    if base.split(".")[0] != "gearshift":
        return []
    known = modules()
    subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    return subs or [base]


def function_level(tree: ast.Module) -> set[int]:
    """Line numbers of import statements inside functions."""
    lines: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    lines.add(node.lineno)
    return lines


def test_no_module_imports_from_a_layer_above_it() -> None:
    wrong = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(module, path, node):
                    if layer(target) > layer(module):
                        wrong.append(
                            f"{path.relative_to(SRC)}:{node.lineno}: {module} ({LAYER_NAMES[layer(module)]}) imports "
                            f"{target} ({LAYER_NAMES[layer(target)]})"
                        )
    assert not wrong, "\n".join(wrong)


def test_function_level_imports_of_gearshift_are_justified() -> None:
    """A late import is how a circle hides: each one left says why on its line (or the line before)."""
    bare = []
    for module, path in modules().items():
        if any(module == lazy or module.startswith(lazy + ".") for lazy in LAZY_OK):
            continue
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, str(path))
        late = function_level(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno in late:
                if not imported(module, path, node):
                    continue
                here, before = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if "#" not in here and not before.startswith("#"):
                    bare.append(f"{path.relative_to(SRC)}:{node.lineno}: {here.strip()}")
    assert not bare, "late imports of gearshift without a reason:\n" + "\n".join(bare)


LAYER_PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys
    # The package object without running gearshift/__init__.py (which imports every layer):
    spec = importlib.util.find_spec("gearshift")
    sys.modules["gearshift"] = importlib.util.module_from_spec(spec)
    failed = {}
    for name in json.loads(sys.argv[1]):
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = repr(exc)
    loaded = sorted(m for m in sys.modules if m.startswith("gearshift."))
    print(json.dumps({"failed": failed, "loaded": loaded}))
    """
)


def run_probe(names: list[str], bare: bool) -> dict[str, Any]:
    code = LAYER_PROBE if bare else LAYER_PROBE.replace('sys.modules["gearshift"] =', "_ =")
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    names = [m for m in modules() if m not in ("gearshift", "gearshift.__main__")]
    result = run_probe(names, bare=False)
    assert not result["failed"], result["failed"]


def test_auto_is_in_the_table_once_gearshift_is_imported() -> None:
    """auto registers itself when imported; ``import gearshift`` (run before any submodule) must import it."""
    code = "import gearshift._gears as t, sys; print('auto' in t._table)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "True", done.stderr


@pytest.mark.parametrize("top", range(4), ids=LAYER_NAMES[:4])
def test_each_layer_imports_without_the_layers_above(top: int) -> None:
    """In a fresh interpreter, the modules up to a layer load without loading any module above it."""
    names = [m for m in modules() if layer(m) <= top and m != "gearshift"]
    result = run_probe(names, bare=True)
    assert not result["failed"], result["failed"]
    above = [m for m in result["loaded"] if layer(m) > top]
    assert not above, f"importing the {LAYER_NAMES[top]} layer loaded {above}"


# -- the table ---------------------------------------------------------------------------------
class Plain(Gear):
    """A registrable gear that never runs (the table only needs the class)."""

    name = "plain_test"

    def open(self, spec: RunSpec) -> None: ...
    def submit(self, batch: Any) -> None: ...
    def collect(self, timeout: float | None) -> list[Any]:
        return []
    def wake(self) -> None: ...
    def close(self, cancel: bool = False) -> None: ...


@pytest.fixture
def clean_table() -> Any:
    before = dict(table._table)
    yield
    table._table.clear()
    table._table.update(before)


def test_builtin_gears_and_auto_share_one_table() -> None:
    names = gear_names()
    assert names[:4] == ["serial", "thread", "process", "async"] and "auto" in names
    assert gear_class("auto") is AutoGear
    gear = make_gear("auto")
    assert isinstance(gear, AutoGear)
    assert isinstance(make_gear("serial"), SerialGear)
    builtin = {n: gear_class(n) for n in ("serial", "thread", "process", "async")}
    assert builtin == table.GEARS  # kept for its callers


def test_unknown_gear_names_every_choice(clean_table: None) -> None:
    register_gear("plain_test", Plain)
    with pytest.raises(ValueError, match="unknown gear 'nope'") as caught:
        make_gear("nope")
    for name in ("serial", "thread", "process", "async", "auto", "plain_test"):
        assert repr(name) in str(caught.value)


def test_register_gear_checks_what_it_is_given(clean_table: None) -> None:
    assert register_gear("plain_test", Plain) is Plain
    assert register_gear("plain_test", Plain) is Plain  # again: the same class is fine
    with pytest.raises(TypeError, match=r"subclass of gearshift\.Gear"):
        register_gear("plain_test", object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Plain\.name is 'plain_test'"):
        register_gear("other", Plain)
    with pytest.raises(ValueError, match="identifier"):
        register_gear("a b", Plain)

    class Thief(Plain):
        name = "thread"

    with pytest.raises(ValueError, match=r"'thread' is taken by gearshift\._gears\.thread\.ThreadGear"):
        register_gear("thread", Thief)
    assert gear_class("thread").__name__ == "ThreadGear"


def fake_entry_points(points: list[importlib.metadata.EntryPoint]) -> Any:
    def entry_points(group: str, name: str | None = None) -> list[importlib.metadata.EntryPoint]:
        return [p for p in points if p.group == group and (name is None or p.name == name)]

    return entry_points


def test_entry_point_gears_load_at_their_first_lookup(
    clean_table: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "plugin_gear_mod.py").write_text(
        "from test_gear_registry import Plain\n\nclass Plugged(Plain):\n    name = 'plugged'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    group = table.ENTRY_POINT_GROUP
    points = [
        importlib.metadata.EntryPoint("plugged", "plugin_gear_mod:Plugged", group),
        importlib.metadata.EntryPoint("broken", "no_such_module_for_gearshift:Gear", group),
        importlib.metadata.EntryPoint("notagear", "plugin_gear_mod:Plain", group),
        importlib.metadata.EntryPoint("other", "elsewhere:Gear", "some.other.group"),
    ]
    monkeypatch.setattr(table, "entry_points", fake_entry_points(points))
    assert {"plugged", "broken", "notagear"} <= set(gear_names()) and "other" not in gear_names()
    assert "plugged" not in table._table  # listed, not loaded
    assert gear_class("plugged").__name__ == "Plugged"
    assert "plugged" in table._table
    with pytest.raises(GearLoadError, match=r"'broken' = 'no_such_module_for_gearshift:Gear'.*could not be loaded"):
        make_gear("broken")
    with pytest.raises(GearLoadError, match=r"'notagear'.*Plain\.name is 'plain_test'"):
        make_gear("notagear")
    with pytest.raises(GearLoadError, match="'broken'"):
        table.advisable_gears(load=True)  # the advisor loads them all: a broken one is named


# -- declared costs ------------------------------------------------------------------------------
def test_every_builtin_candidate_declares_its_costs() -> None:
    gears = table.advisable_gears()
    assert {"thread", "process", "async"} <= set(gears) and "serial" not in gears and "auto" not in gears
    for name, costs in gears.items():
        assert isinstance(costs, GearCosts), name
        assert costs.pickles == gear_class(name).pickles, name  # one fact, said twice: must agree


TWO = Machine(cores=2, gil_enabled=True, start_method="fork")
CPU = Measurements(per_item=0.005, pickle_per_item=20e-6, thread_scaling=1.0, samples=8)


def test_the_model_reads_costs_not_names() -> None:
    """A gear unknown to the model wins on its declared costs; one that declares none is listed, never chosen."""
    gears = dict(table.advisable_gears())
    assert decide(CPU, TWO, gears=gears).gear == "process"
    gears["fast"] = GearCosts(handoff_per_batch=1e-6, cpu_parallel="always", tie_rank=5, label="fast workers")
    gears["opaque"] = None
    decision = decide(CPU, TWO, gears=gears)
    assert decision.gear == "fast", decision.reasons
    assert any(r.startswith("fast workers, 2 workers") for r in decision.reasons)
    assert not decision.predictions["opaque"].applicable
    assert "declares no costs" in decision.predictions["opaque"].why_not
    # The same gear whose CPU work cannot run in parallel under the GIL: threads' fate.
    gears["fast"] = GearCosts(handoff_per_batch=1e-6, cpu_parallel="without_gil", tie_rank=5)
    assert decide(CPU, TWO, gears=gears).gear == "process"


def test_measured_costs_replace_declared_ones() -> None:
    declared = predict(CPU, TWO, remaining=100)["process"]
    slow = dataclasses.replace(CPU, round_trips={"process": 0.05}, startups={"process": 2.0})
    measured = predict(slow, TWO, remaining=100)["process"]
    assert measured.measured and not declared.measured
    assert measured.speedup < declared.speedup / 2 and measured.serial_part > declared.serial_part
    assert decide(slow, TWO, remaining=100).gear == "serial"


# -- written once --------------------------------------------------------------------------------
def test_timeout_outcome_names_the_item() -> None:
    outcome = timeout_outcome(Task(7, "slow"), 2.5)
    assert not outcome.ok and outcome.elapsed == 2.5
    assert isinstance(outcome.value, TaskTimeout) and outcome.value.index == 7 and "'slow'" in str(outcome.value)
    assert timeout_outcome(Task(1, 0), 1.0, 1.25).elapsed == 1.25


def test_initializer_errors_name_the_initializer() -> None:
    def setup(x: int) -> None:
        raise OSError(f"no database {x}")

    with pytest.raises(InitializerError, match=r"initializer .*setup.* raised OSError\('no database 3'\)") as caught:
        run_initializer(RunSpec(initializer=setup, initargs=(3,)))
    assert isinstance(caught.value.__cause__, OSError)
    run_initializer(RunSpec())  # none: nothing happens
    assert isinstance(initializer_error(setup, SystemExit(2)).__cause__, SystemExit)
