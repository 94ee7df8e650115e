"""The table of gears by name: built in, registered (``register_gear``) or installed (entry points).

One table serves ``make_gear`` (every front), the auto gear and the advisor. A gear outside
the package gets in two ways:

* ``gearshift.register_gear("mygear", MyGear)`` from the code that defines it;
* an entry point in the ``gearshift.gears`` group of its distribution, e.g. in pyproject.toml
  ``[project.entry-points."gearshift.gears"] mygear = "mypkg.gear:MyGear"``: loaded at the
  first lookup of a name the table does not know (``gear="mygear"``), or by the advisor,
  which considers every installed gear. A broken entry point raises ``GearLoadError``
  naming it.

Layers: this package is the plain-gear layer. The auto gear sits above the advisor (it uses
it), so this module cannot import it; ``gearshift._gears.auto`` registers itself here when
imported, as any third-party gear does (``gearshift/__init__.py`` imports it).
"""

from __future__ import annotations

import threading
from importlib.metadata import EntryPoint, entry_points

from gearshift._gears._base import Gear, GearCosts, cpu_count
from gearshift._gears.aio import AsyncGear
from gearshift._gears.dask import DaskGear
from gearshift._gears.interpreter import InterpreterGear
from gearshift._gears.process import ProcessGear
from gearshift._gears.ray import RayGear
from gearshift._gears.serial import SerialGear
from gearshift._gears.thread import ThreadGear

__all__ = [
    "ENTRY_POINT_GROUP",
    "GEARS",
    "AsyncGear",
    "DaskGear",
    "Gear",
    "GearCosts",
    "GearLoadError",
    "InterpreterGear",
    "ProcessGear",
    "RayGear",
    "SerialGear",
    "ThreadGear",
    "advisable_gears",
    "cpu_count",
    "gear_class",
    "gear_names",
    "load_entry_points",
    "make_gear",
    "register_gear",
    "unregister_gear",
]

#: The entry-point group a distribution declares its gears in.
ENTRY_POINT_GROUP = "gearshift.gears"
#: The gear every speedup is measured against (the caller's own thread).
BASELINE = "serial"

_table: dict[str, type[Gear]] = {}
_lock = threading.Lock()


class GearLoadError(ImportError):
    """A gear's entry point could not be loaded, or did not give a ``Gear`` subclass."""


def register_gear(name: str, cls: type[Gear], *, replace: bool = False) -> type[Gear]:
    """Make ``cls`` available as ``gear=name`` everywhere: map, Executor, Pool, the advisor (provisional).

    ``cls`` must subclass ``gearshift.Gear``; its ``name`` is set to ``name`` if it has
    none, and must match otherwise. Registering a taken name raises unless ``replace``.
    Returns ``cls``, so it can be used at the end of the gear's module.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a gear's name must be an identifier-like string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Gear)):
        raise TypeError(f"register_gear({name!r}, ...) needs a subclass of gearshift.Gear, got {cls!r}")
    own = getattr(cls, "name", None)
    if own is None:
        cls.name = name
    elif own != name:
        raise ValueError(f"{cls.__qualname__}.name is {own!r}: register it under that name, not {name!r}")
    with _lock:
        taken = _table.get(name)
        if taken is not None and taken is not cls and not replace:
            owner = f"{taken.__module__}.{taken.__qualname__}"
            raise ValueError(f"gear name {name!r} is taken by {owner}; pass replace=True to replace it")
        _table[name] = cls
    return cls


def unregister_gear(name: str) -> None:
    """Forget a registered gear (tests; a plugin that unloads). Unknown names are ignored."""
    with _lock:
        _table.pop(name, None)


def _entry_points(name: str | None = None) -> list[EntryPoint]:
    found = entry_points(group=ENTRY_POINT_GROUP) if name is None else entry_points(group=ENTRY_POINT_GROUP, name=name)
    return list(found)


def _load(point: EntryPoint) -> type[Gear]:
    """Load one entry point into the table; errors name it and its distribution."""
    dist = getattr(point.dist, "name", None) or "an unknown distribution"
    where = f"gear entry point {point.name!r} = {point.value!r} (group {ENTRY_POINT_GROUP!r}, from {dist})"
    try:
        cls = point.load()
    except Exception as exc:
        raise GearLoadError(f"{where} could not be loaded: {exc!r}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Gear)):
        raise GearLoadError(f"{where} gave {cls!r}, not a subclass of gearshift.Gear")
    try:
        return register_gear(point.name, cls)
    except (TypeError, ValueError) as exc:
        raise GearLoadError(f"{where}: {exc}") from exc


def load_entry_points() -> None:
    """Load every installed gear not in the table yet (the advisor considers them all)."""
    for point in _entry_points():
        if point.name not in _table:
            _load(point)


def gear_names() -> list[str]:
    """Every gear name usable now: the table's, then installed ones not loaded yet."""
    names = list(_table)
    names.extend(p.name for p in _entry_points() if p.name not in _table)
    return names


def gear_class(name: str) -> type[Gear]:
    """The gear class for ``name``; an installed gear is loaded at its first lookup."""
    cls = _table.get(name)
    if cls is not None:
        return cls
    points = _entry_points(name)
    if points:
        return _load(points[0])
    choices = ", ".join(repr(n) for n in gear_names())
    raise ValueError(f"unknown gear {name!r}; choose one of {choices}")


def make_gear(gear: str | Gear, workers: int | None = None) -> Gear:
    """A fresh gear for a name, or the caller's gear object as it is."""
    if isinstance(gear, Gear):
        if workers is not None and workers != gear.workers:
            raise ValueError(f"workers={workers} conflicts with the gear object's workers={gear.workers}")
        return gear
    if not isinstance(gear, str):
        raise TypeError(f"gear must be a name or a Gear, got {type(gear).__name__}")
    return gear_class(gear)(workers)


def advisable_gears(load: bool = False) -> dict[str, GearCosts | None]:
    """The candidates of the advisor, by name, with their declared costs (None: declared none).

    Leaves out the baseline (serial: every speedup is over it) and gears that pick another
    gear (auto). ``load`` first loads the installed gears (entry points).
    """
    if load:
        load_entry_points()
    return {
        name: cls.costs
        for name, cls in list(_table.items())
        if name != BASELINE and not cls.picks_gear and not cls.unavailable()
    }


# -- the built-in plain gears ---------------------------------------------------------------------
for _cls in (SerialGear, ThreadGear, ProcessGear, AsyncGear, InterpreterGear, DaskGear, RayGear):
    register_gear(_cls.name, _cls)

#: The built-in plain gears by name, as before the table (existing callers); new code uses
#: ``gear_names()`` / ``gear_class()``, which also know "auto" and third-party gears.
GEARS: dict[str, type[Gear]] = {"serial": SerialGear, "thread": ThreadGear, "process": ProcessGear, "async": AsyncGear}
