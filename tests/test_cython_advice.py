"""The Cython example: the same kernel holding the GIL goes to processes, released (nogil) to threads.

Compiled at test time with the machine's C compiler into a temp dir (examples/cython_kernel).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

import gearshift as gs

pytest.importorskip("Cython", reason="Cython is not installed (pip install cython): the kernel cannot be compiled")
if shutil.which("gcc") is None and shutil.which("cc") is None:
    pytest.skip("no C compiler (gcc/cc) on PATH: the kernel cannot be compiled", allow_module_level=True)

# Workers fork (see fork_workers) while probe threads run; the module they need exists only here.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cython_kernel"
sys.path.insert(0, str(EXAMPLE))
import build as kernel_build  # noqa: E402


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return kernel_build.build(tmp_path_factory.mktemp("cython_kernel"))


@pytest.fixture(autouse=True)
def fork_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers must import the freshly built module: fork inherits it (forkserver would need sys.path)."""
    monkeypatch.setenv("GEARSHIFT_START_METHOD", "fork")


def test_kernels_compute_the_same(kernels: ModuleType) -> None:
    assert kernels.spin_gil(1000) == kernels.spin_nogil(1000) != 0


def test_gil_holding_kernel_gets_processes(kernels: ModuleType) -> None:
    advice = gs.advise(kernels.spin_gil, [kernel_build.ROUNDS] * 6)
    assert advice.gear == "process", str(advice)
    assert advice.measurements.thread_scaling is not None and advice.measurements.thread_scaling < 1.6


def test_nogil_kernel_gets_threads(kernels: ModuleType) -> None:
    advice = gs.advise(kernels.spin_nogil, [kernel_build.ROUNDS] * 6)
    assert advice.gear == "thread", str(advice)
    assert "releases it" in str(advice)
    assert not advice.consider_compiled


def test_auto_gear_shifts_the_same_way(kernels: ModuleType) -> None:
    items = [kernel_build.ROUNDS] * 120  # long enough (~0.5 s serial) for a pool to pay
    held = gs.map(kernels.spin_gil, items)
    free = gs.map(kernels.spin_nogil, items)
    assert held == free == [kernels.spin_gil(kernel_build.ROUNDS)] * 120
    assert held.report.gear.startswith("process"), held.report.reasons
    assert free.report.gear.startswith("thread"), free.report.reasons
