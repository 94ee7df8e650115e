"""Streaming readers for ``gearshift run`` inputs: JSON Lines, CSV and plain text.

Inputs are read one line at a time (never loaded whole), so a file of any size, or an
endless stdin, runs in bounded memory. Each item keeps its input index (its position
among the data lines, the key ``--resume`` matches on) and its line number (for
messages). A line that cannot be parsed becomes an item that carries the error, so
it is recorded as a failure of that line and the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

Format = Literal["jsonl", "csv", "text"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv", "text")
_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".lst": "text",
}


@dataclass(frozen=True, slots=True)
class Item:
    """One input: its index, its line number, and its value (or why it is malformed)."""

    index: int
    line: int
    value: Any
    error: str | None = None

    def __repr__(self) -> str:  # what error messages show for the item
        return f"<input #{self.index}, line {self.line}>"


def guess_format(path: str) -> Format:
    """The format from the file's extension; stdin defaults to JSON Lines."""
    if path == "-":
        return "jsonl"
    ext = os.path.splitext(path)[1].lower()
    try:
        return _EXTENSIONS[ext]
    except KeyError:
        known = ", ".join(sorted(_EXTENSIONS))
        raise ValueError(f"cannot tell the format of {path!r} from its extension ({known}); give --format") from None


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _open_binary(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdin.buffer
    return open(path, "rb")


def read_items(
    path: str, fmt: Format, *, kwargs: bool, on_malformed: Callable[[str], None] | None = None
) -> Iterator[Item]:
    """Yield the items of ``path`` lazily; ``on_malformed`` hears each bad line's message."""
    reader = {"jsonl": _jsonl, "csv": _csv, "text": _text}[fmt]
    name = display_name(path)
    for item in reader(path, name, kwargs):
        if item.error is not None and on_malformed is not None:
            on_malformed(item.error)
        yield item


COUNT_LIMIT = 256 * 1024 * 1024  # bytes: larger files are not read twice just for a count


def count_inputs(path: str, fmt: Format) -> int | None:
    """How many inputs a file holds (its non-blank lines, less a CSV header).

    None for stdin and for files too large to read twice (the count is only for the
    progress bar's total and the auto gear's sizing).
    """
    if path == "-" or not os.path.isfile(path) or os.path.getsize(path) > COUNT_LIMIT:
        return None
    count = 0
    with open(path, "rb") as stream:
        for raw in stream:
            if raw.strip():
                count += 1
    return max(0, count - 1) if fmt == "csv" else count


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    stream = _open_binary(path)
    try:
        yield from enumerate(stream, 1)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _jsonl(path: str, name: str, kwargs: bool) -> Iterator[Item]:
    index = 0
    for number, raw in _lines(path):
        if not raw.strip():
            continue  # blank lines are not inputs and take no index
        try:
            value = json.loads(raw.rstrip(b"\r\n"))
        except (ValueError, UnicodeDecodeError) as exc:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            yield Item(index, number, text, f"{name}:{number}: malformed JSON ({exc})")
        else:
            if kwargs and not isinstance(value, dict):
                error = f"{name}:{number}: --kwargs needs a JSON object per line, got {type(value).__name__}"
                yield Item(index, number, value, error)
            else:
                yield Item(index, number, value)
        index += 1


def _text(path: str, name: str, kwargs: bool) -> Iterator[Item]:
    index = 0
    for number, raw in _lines(path):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            yield Item(index, number, text, f"{name}:{number}: not UTF-8 ({exc})")
            index += 1
            continue
        if not text.strip():
            continue
        yield Item(index, number, text)
        index += 1


def _csv(path: str, name: str, kwargs: bool) -> Iterator[Item]:
    """A CSV with a header row; each row is a dict of strings (keyword arguments by default)."""
    stream = io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="replace", newline="")
    try:
        reader = csv.reader(stream)
        header: list[str] | None = None
        index = 0
        last_line = 0
        while True:
            start = last_line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                last_line = reader.line_num
                if header is None:
                    raise ValueError(f"{name}:{start}: cannot read the CSV header ({exc})") from None
                yield Item(index, start, None, f"{name}:{start}: malformed CSV ({exc})")
                index += 1
                continue
            last_line = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = row
                continue
            if len(row) != len(header):
                error = f"{name}:{start}: expected {len(header)} fields (as the header), got {len(row)}"
                yield Item(index, start, row, error)
            else:
                yield Item(index, start, dict(zip(header, row, strict=True)))
            index += 1
    finally:
        if path == "-":
            stream.detach()
        else:
            stream.close()
