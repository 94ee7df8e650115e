"""The gears, one module each, and the lookup from a gear's name."""

from __future__ import annotations

from gearshift._gears._base import Gear, cpu_count
from gearshift._gears.aio import AsyncGear
from gearshift._gears.process import ProcessGear
from gearshift._gears.serial import SerialGear
from gearshift._gears.thread import ThreadGear

GEARS: dict[str, type[Gear]] = {
    "serial": SerialGear,
    "thread": ThreadGear,
    "process": ProcessGear,
    "async": AsyncGear,
}

__all__ = ["GEARS", "AsyncGear", "Gear", "ProcessGear", "SerialGear", "ThreadGear", "cpu_count", "make_gear"]


def make_gear(gear: str | Gear, workers: int | None = None) -> Gear:
    """A fresh gear for a name, or the caller's gear object as it is."""
    if isinstance(gear, Gear):
        if workers is not None and workers != gear.workers:
            raise ValueError(f"workers={workers} conflicts with the gear object's workers={gear.workers}")
        return gear
    if not isinstance(gear, str):
        raise TypeError(f"gear must be a name or a Gear, got {type(gear).__name__}")
    if gear == "auto":
        from gearshift._gears.auto import AutoGear  # imported late: it needs the advisor, which needs the gears

        return AutoGear(workers)
    try:
        cls = GEARS[gear]
    except KeyError:
        names = ", ".join(repr(name) for name in [*GEARS, "auto"])
        raise ValueError(f"unknown gear {gear!r}; choose one of {names}") from None
    return cls(workers)
