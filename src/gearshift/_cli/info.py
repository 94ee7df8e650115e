"""``gearshift info``: what this interpreter offers each gear."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import platform
import sys
import sysconfig

OPTIONAL = ("uvloop", "dask", "ray", "matplotlib", "numpy", "aiohttp")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, str]:
    from gearshift._gears import cpu_count, gear_names
    from gearshift._gears.process import default_start_method

    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    gil_check = getattr(sys, "_is_gil_enabled", None)
    if gil_check is None:
        gil = "enabled (this Python always has a GIL)"
    elif gil_check():
        gil = "enabled" + (" (a free-threaded build with the GIL turned back on)" if free_threaded else "")
    else:
        gil = "disabled: threads run Python code in parallel"
    uvloop = _version("uvloop")
    mp_default = multiprocessing.get_context().get_start_method()
    facts = {
        "gearshift": _version("gearshift") or "?",
        "python": f"{platform.python_version()} ({platform.python_implementation()}, "
        f"{'free-threaded' if free_threaded else 'GIL'} build) at {sys.executable}",
        "platform": platform.platform(),
        "GIL": gil,
        "cores": f"{cpu_count()} usable (of {os.cpu_count()} on the machine)",
        "event loop": f"uvloop {uvloop}" if uvloop else "asyncio (pip install 'gearshift[fast]' for uvloop)",
        "start method": f"{default_start_method()} (multiprocessing's default: {mp_default})",
        "gears": ", ".join(gear_names()),
    }
    for name in OPTIONAL:
        facts[name] = _version(name) or "not installed"
    return facts


def render(facts: dict[str, str]) -> str:
    width = max(len(k) for k in facts)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in facts.items())
