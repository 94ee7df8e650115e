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


def hang_if_negative(x: int) -> int:
    """Stands for a runaway task: only a timeout gets it out."""
    if x < 0:
        time.sleep(300)
    return x


def add(a: Any, b: Any) -> Any:
    return a + b


def shout(line: str) -> str:
    return line.upper()


async def asquare(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def identity(x: Any) -> Any:
    return x


def tuple_keys(x: int) -> dict[tuple[int, str], int]:
    """A result JSON cannot hold (a dict with tuple keys)."""
    return {(x, "k"): x}


class NoRepr:
    def __repr__(self) -> str:
        raise RuntimeError("this object cannot be shown")


def unshowable(x: int) -> NoRepr:
    return NoRepr()


def exit_on_twos(x: int) -> int:
    """Calls sys.exit(0) for every multiple of 2: that input fails, the run goes on."""
    if x % 2 == 0:
        raise SystemExit(0)
    return x


async def aexit_on_twos(x: int) -> int:
    await asyncio.sleep(0)
    return exit_on_twos(x)


async def asquare_slowly(x: int) -> int:
    await asyncio.sleep(0.002)
    return x * x


def reject(x: Any) -> Any:
    """Fails with the input in its message (odd characters included)."""
    raise ValueError(f"cannot take {x}")


def greet(name: str, greeting: str = "hello") -> str:
    return f"{greeting}, {name}!"


NOT_CALLABLE = 42


# -- helpers for the tests themselves ----------------------------------------------------------
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a ``gearshift`` subprocess: this directory importable, no forced bar."""
    env = {k: v for k, v in os.environ.items() if k != "GEARSHIFT_PROGRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def read_records(path: str) -> list[dict[str, Any]]:
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def wait_for_lines(path: str, n: int, proc: Any, timeout: float = 60.0) -> int:
    """Block until ``path`` has ``n`` lines (polling the file the run writes), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = count_lines(path)
        if have >= n:
            return have
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before writing {n} lines")
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout}s")


async def aidentity(x: Any) -> Any:
    """An async first stage (the async gear) for --then pipelines."""
    await asyncio.sleep(0.001)
    return x


def isqrt_or_fail(x: int) -> int:
    """A --then stage that fails on multiples of 7 (whose squares it is given): a later stage's failure."""
    root = round(x**0.5)
    if root % 7 == 0:
        raise ValueError(f"{root} is a multiple of 7")
    return root
