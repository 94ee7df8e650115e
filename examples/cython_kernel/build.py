"""Compile ``kernels.pyx`` with the machine's C compiler into a folder, and import it.

    python examples/cython_kernel/build.py      # build into a temp dir, then advise on both kernels

Used by ``tests/test_cython_advice.py``; needs Cython, setuptools and a C compiler.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
#: Rounds for about 5 ms per call on one core of this 2-core machine.
ROUNDS = 1_500_000


def build(folder: Path, name: str = "gs_cython_kernels") -> ModuleType:
    """Cythonize and compile the kernels as module ``name`` in ``folder``, put it on sys.path, import it."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"{name}.pyx"
    shutil.copyfile(HERE / "kernels.pyx", source)
    ext = Extension(name, [str(source)], extra_compile_args=["-O2"])
    dist = Distribution({"ext_modules": cythonize([ext], quiet=True, build_dir=str(folder / "c"))})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = str(folder)  # type: ignore[attr-defined]
    cmd.build_temp = str(folder / "tmp")  # type: ignore[attr-defined]
    dist.run_command("build_ext")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return importlib.import_module(name)


def main() -> None:
    import gearshift as gs

    with tempfile.TemporaryDirectory() as tmp:
        kernels = build(Path(tmp))
        for fn in (kernels.spin_gil, kernels.spin_nogil):
            print(gs.advise(fn, [ROUNDS] * 6))
            print()


if __name__ == "__main__":
    main()
