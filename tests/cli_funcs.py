"""Functions the command-line tests run through ``gearshift run MODULE:FUNC``."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any


def square(x: int) -> int:
    return x * x


def square_slowly(x: int) -> int:
    """A few milliseconds each, so a run of thousands is still going when a test kills it."""
    time.sleep(0.002)
    return x * x


def square_with_pid(x: int) -> list[int]:
    """The result and the worker that computed it (to check workers die with their run)."""
    time.sleep(0.002)
    return [x * x, os.getpid()]


def fail_on_sevens(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"{x} is a multiple of 7")
    return x


def add(a: Any, b: Any) -> Any:
    return a + b


def shout(line: str) -> str:
    return line.upper()


async def asquare(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


NOT_CALLABLE = 42
