"""The durable results file of ``gearshift run``: append, flush, fsync in small batches.

Each record is one JSON line, written and flushed as soon as its input finishes, so
a run killed at any moment (SIGKILL included) loses only what was in flight, and at
most a torn last line, which ``recover`` cuts away before a resumed run appends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

SYNC_EVERY = 100  # records
SYNC_SECONDS = 0.5


def jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback: dataclasses as dicts, sets as lists, bytes as text; else refuse.

    What is left (a custom object, a dict with tuple keys) makes the whole result a repr
    with a note (``encode``): a faithful repr of the result, not a mix of JSON and reprs.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "backslashreplace")
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def safe_repr(value: Any) -> str:
    """``repr(value)``, or what can be said of it when its repr itself fails."""
    try:
        return repr(value)
    except Exception as exc:  # a broken __repr__, an int too long to print...
        return f"<{type(value).__name__} object: repr() raised {type(exc).__name__}: {safe_str(exc)}>"


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in when the exception's own __str__ fails."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<str() raised {type(inner).__name__}>"


def _dumps(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, default=jsonable)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" is valid JSON input): escape it, as JSON allows
        return json.dumps(record, ensure_ascii=True, allow_nan=False, default=jsonable).encode("ascii") + b"\n"


def encode(record: dict[str, Any]) -> bytes:
    """One record as a JSON line; never fails on an odd value.

    A result (or input) JSON cannot hold is recorded as its repr, with a ``note`` that
    says so and why; odd strings (lone surrogates, control characters) are escaped.
    """
    try:
        return _dumps(record)
    except (TypeError, ValueError, RecursionError) as exc:
        why = f"{type(exc).__name__}: {safe_str(exc)}"
    fixed = dict(record)
    notes = []
    for key in ("result", "input"):
        if key in fixed:
            try:
                _dumps({key: fixed[key]})
            except (TypeError, ValueError, RecursionError):
                fixed[key] = safe_repr(fixed[key])
                notes.append(f"the {key} is not JSON ({why}): recorded as its repr")
    if notes:
        fixed["note"] = "; ".join(notes)
    try:
        return _dumps(fixed)
    except (TypeError, ValueError, RecursionError):
        bare: dict[str, Any] = {k: fixed[k] for k in ("index", "line") if k in record}
        bare["error"] = {"type": "UnrecordableResult", "message": f"the record could not be written: {why}",
                         "traceback": ""}
        return _dumps(bare)


class RecordWriter:
    """Appends records to a file (or stdout), flushing each and fsyncing every few."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stdout = path == "-"
        self._file: BinaryIO = sys.stdout.buffer if self._stdout else open(path, "ab")  # noqa: SIM115
        self._can_sync = not self._stdout and os.path.isfile(path)
        self._pending = 0
        self._last_sync = time.monotonic()
        self.written = 0
        self._closed = False

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(encode(record))
        self._file.flush()
        self.written += 1
        self._pending += 1
        if self._pending >= SYNC_EVERY or time.monotonic() - self._last_sync >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        if self._can_sync and self._pending:
            os.fsync(self._file.fileno())
        self._pending = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Flush and fsync what is written; safe to call twice, and on a closed pipe."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sync()
        except BrokenPipeError:
            if not self._stdout:
                raise
        finally:
            if not self._stdout:
                self._file.close()


@dataclass
class Recovered:
    """What an existing results file holds: the indexes done (and failed), and what was repaired."""

    done: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    records: int = 0
    torn_bytes: int = 0
    bad_lines: list[int] = field(default_factory=list)
    duplicates: int = 0
    dropped_failures: int = 0
    backup: str | None = None


def recover(path: str, drop_failures: bool = False, input_path: str = "-") -> Recovered:
    """Read the records in gearshift's own results file ``path``; repair only a torn last line.

    Only bytes after the last newline are ever cut, and only when they are not a whole
    record (a write cut short by a kill); a complete record missing its newline gets one.
    A complete line that is not a record is never touched: it is reported in
    ``bad_lines``. ``drop_failures`` rewrites the file without its error records (into a
    new file renamed over the old, the old kept as the ``.bak``), so those inputs run again.
    """
    found = Recovered()
    if not os.path.exists(path):
        return found
    tail = b""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            if not raw.endswith(b"\n"):
                tail = raw
                break
            index, ok = _index_of(raw)
            if index is None:
                if raw.strip():
                    found.bad_lines.append(number)
                continue
            _count(found, index, ok)
    if tail:
        _repair_tail(path, tail, found)
    if drop_failures and found.failed:
        from gearshift._cli.guard import keep_backup

        found.backup = keep_backup(path, input_path)
        _rewrite_without(path, found.failed)
        found.done -= found.failed
        found.records -= len(found.failed)
        found.dropped_failures = len(found.failed)
        found.failed = set()
    return found


def _count(found: Recovered, index: int, ok: bool) -> None:
    """Count one record; an input is failed while its only records are failures."""
    seen = index in found.done
    if seen:
        found.duplicates += 1
    found.done.add(index)
    found.records += 1
    if ok:
        found.failed.discard(index)
    elif not seen:
        found.failed.add(index)


def _repair_tail(path: str, tail: bytes, found: Recovered) -> None:
    """A last line without its newline: a whole record gets the newline, a torn one is cut."""
    size = os.path.getsize(path)
    with open(path, "r+b") as stream:
        index, ok = _index_of(tail)
        if index is not None:
            stream.seek(size)
            stream.write(b"\n")
            _count(found, index, ok)
        else:
            stream.truncate(size - len(tail))
            found.torn_bytes = len(tail)
        stream.flush()
        os.fsync(stream.fileno())


def _rewrite_without(path: str, failed: set[int]) -> None:
    """Copy ``path`` without the error records of ``failed``; a crash leaves the old file whole."""
    from gearshift._cli.guard import sync_dir

    tmp = f"{path}.gearshift-tmp"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for raw in src:
            index, ok = _index_of(raw)
            if index is None or ok or index not in failed:
                dst.write(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    sync_dir(path)


def _index_of(raw: bytes) -> tuple[int | None, bool]:
    """A record's input index (None when the line is not a record) and whether it succeeded."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None, False
    if not isinstance(record, dict):
        return None, False
    index = record.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        return None, False
    return index, "error" not in record
