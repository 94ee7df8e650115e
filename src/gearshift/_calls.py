"""Facts about the user's callables that every layer needs, written once: a name, is it a coroutine function.

Part of the bottom layer (with ``_task`` and ``errors``): it imports nothing of gearshift,
so the gears, the advisor, the engine and the fronts can all use it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from gearshift.errors import short_repr

__all__ = ["fn_name", "is_async_callable"]


def fn_name(fn: Callable[..., Any]) -> str:
    """The name a report or an error gives a function: its qualified name, else a short repr."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or short_repr(fn, 60)


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions, partials of them and objects with an async ``__call__``.

    (``inspect.iscoroutinefunction`` sees through ``functools.partial`` since 3.8.)
    """
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - we want the class attribute
    return call is not None and inspect.iscoroutinefunction(call)
