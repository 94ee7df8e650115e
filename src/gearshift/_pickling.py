"""Pickling shielded from the reducers some libraries install for every exception class.

tblib's ``pickling_support.install()``, which ``distributed`` (Dask) runs when imported,
registers a reducer for every exception class in ``copyreg.dispatch_table``, process-wide.
Some of its reductions do not round-trip (``UnicodeDecodeError`` comes back without its
message, ``SystemExit`` without its code, a ``BaseExceptionGroup`` cannot be rebuilt), so a
user who merely imported Dask would get mangled errors from gearshift's workers. gearshift's
own messages between its processes pickle exceptions with pickle's own reductions instead:
the table without those entries (other entries, cloudpickle's included, are kept).
"""

from __future__ import annotations

import copyreg
import io
import pickle
from collections import ChainMap
from typing import Any

__all__ = ["cloud_dumps", "dumps", "shield"]

_cache: tuple[int, dict[Any, Any] | None] = (-1, None)


def _clean_table() -> dict[Any, Any] | None:
    """``copyreg.dispatch_table`` without tblib's exception reducers; None when it has none."""
    global _cache
    table = copyreg.dispatch_table
    size = len(table)
    if _cache[0] == size:
        return _cache[1]
    foreign = [
        key for key, reducer in table.items()
        if isinstance(key, type) and issubclass(key, BaseException)
        and str(getattr(reducer, "__module__", "") or "").startswith("tblib")
    ]
    clean = {k: v for k, v in table.items() if k not in set(foreign)} if foreign else None
    _cache = (size, clean)
    return clean


def shield(pickler: pickle.Pickler) -> None:
    """Make ``pickler`` ignore tblib's exception reducers (a no-op while none is installed)."""
    clean = _clean_table()
    if clean is None:
        return
    current = getattr(pickler, "dispatch_table", None)
    if isinstance(current, ChainMap) and current.maps and current.maps[-1] is copyreg.dispatch_table:
        pickler.dispatch_table = ChainMap(*current.maps[:-1], clean)  # cloudpickle's own first
    else:
        pickler.dispatch_table = clean


def dumps(obj: Any, protocol: int = 5) -> bytes:
    """``pickle.dumps``, shielded."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=protocol)
    shield(pickler)
    pickler.dump(obj)
    return out.getvalue()


def cloud_dumps(obj: Any, protocol: int = 5) -> bytes:
    """``cloudpickle.dumps``, shielded."""
    import cloudpickle

    out = io.BytesIO()
    pickler = cloudpickle.Pickler(out, protocol=protocol)
    shield(pickler)
    pickler.dump(obj)
    return out.getvalue()
