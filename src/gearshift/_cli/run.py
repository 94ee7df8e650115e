"""``gearshift run``: a function over a file of inputs into a durable, resumable results file.

The run goes through ``gs.imap`` with ``errors="collect"`` so that every input ends as one
record, success or failure; the command's own ``--errors`` policy (raise: stop at the
first failure; skip: leave failures unrecorded, so a resumed run tries them again) is
applied here, where the record is written.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import click

import gearshift as gs
from gearshift._cli.inputs import Format, Item, count_inputs, read_items
from gearshift._cli.outputs import RecordWriter, recover
from gearshift._cli.target import MalformedInput, make_call
from gearshift._gears import GEARS
from gearshift._retry import Retry

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

ErrorsArg = Literal["raise", "collect", "skip"]


GEAR_NAMES = (*GEARS, "auto")


class _NoRetryOnMalformed(Retry):
    """Retries, except for inputs that could not be parsed: trying again cannot help."""

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        return not isinstance(exc, MalformedInput) and Retry.should_retry(self, exc, attempt)


class _Sized(Iterable[Item]):
    """The pending inputs with their count, for the progress bar's total and the auto gear."""

    def __init__(self, items: Iterator[Item], count: int) -> None:
        self._items = items
        self._count = count

    def __iter__(self) -> Iterator[Item]:
        return self._items

    def __len__(self) -> int:
        return self._count


@dataclass
class RunOptions:
    target: str
    input: str
    output: str
    fmt: Format
    kwargs: bool
    gear: str = "auto"
    workers: int | None = None
    timeout: float | None = None
    retries: int = 0
    rate: str | None = None
    ordered: bool = False
    errors: ErrorsArg = "collect"
    progress: bool = True
    resume: bool = False
    retry_failed: bool = False
    echo_input: bool = True


@dataclass
class Tally:
    written: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    failures_by_type: Counter[str] = field(default_factory=Counter)


def _say(message: str, **style: Any) -> None:
    click.echo(click.style(message, **style) if style else message, err=True)


def resume_command(output: str) -> str:
    """The exact command that continues this run."""
    argv0 = os.path.basename(sys.argv[0])
    prog = ["gearshift"] if argv0 == "gearshift" else [sys.executable, "-m", "gearshift"]
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(prog + args)


_OUR_DIR = os.path.dirname(os.path.abspath(gs.__file__))


def user_frames(tb: str) -> str:
    """A formatted traceback without gearshift's own frames: only the user's code matters."""
    kept: list[str] = []
    skipping = False
    for line in tb.splitlines(keepends=True):
        if line.startswith('  File "'):
            path = line[len('  File "') :].split('"', 1)[0]
            skipping = os.path.abspath(path).startswith(_OUR_DIR + os.sep)
            if skipping:
                continue
        elif skipping and line.startswith("    "):
            continue
        else:
            skipping = False
        kept.append(line)
    return "".join(kept)


def record_of(value: Any, in_flight: dict[int, Item], echo_input: bool) -> tuple[dict[str, Any], bool]:
    """The JSON record for one outcome from the wrapper (or its ``gs.Failure``), and ok."""
    failure = isinstance(value, gs.Failure)
    index = value.item.index if failure else value[0]
    item = in_flight.pop(index)
    record: dict[str, Any] = {"index": item.index, "line": item.line}
    if echo_input:
        record["input"] = item.value
    if failure:
        exc = value.exception
        tb = "" if isinstance(exc, MalformedInput) else user_frames(value.traceback)  # the message says it all
        record["error"] = {"type": type(exc).__name__, "message": str(exc), "traceback": tb}
        elapsed = getattr(exc, "gearshift_elapsed", None)
        record["elapsed"] = None if elapsed is None else round(elapsed, 6)
        if value.attempts > 1:
            record["attempts"] = value.attempts
        return record, False
    _, record["result"], elapsed = value
    record["elapsed"] = round(elapsed, 6)
    return record, True


def run(opts: RunOptions) -> int:
    """Run ``opts`` and return the exit code; the summary goes to stderr."""
    call = make_call(opts.target, opts.kwargs)
    gear = opts.gear
    done: set[int] = set()
    if opts.resume:
        found = recover(opts.output, drop_failures=opts.retry_failed)
        done = found.done
        if found.torn_bytes:
            _say(f"gearshift run: cut a torn last line ({found.torn_bytes} bytes) off {opts.output}", fg="yellow")
        for number in found.bad_lines:
            _say(f"gearshift run: {opts.output}:{number}: not a record, ignored", fg="yellow")
        if found.dropped_failures:
            _say(f"gearshift run: dropped {found.dropped_failures} failure records, to run those inputs again")
        if found.duplicates:
            _say(f"gearshift run: {opts.output} holds {found.duplicates} duplicate records", fg="yellow")
        _say(f"gearshift run: resuming, {len(done)} inputs already have a record in {opts.output}")

    bar = opts.progress and sys.stderr.isatty()

    def on_malformed(message: str) -> None:
        text = f"gearshift run: {message}"
        if bar:  # above the progress bar, not through it
            from tqdm import tqdm

            tqdm.write(click.style(text, fg="red"), file=sys.stderr)
        else:
            _say(text, fg="red")

    in_flight: dict[int, Item] = {}  # the line and input of each running item (a bounded window)

    def pending() -> Iterator[Item]:
        for item in read_items(opts.input, opts.fmt, kwargs=opts.kwargs, on_malformed=on_malformed):
            if item.index not in done:
                in_flight[item.index] = item
                yield item

    total = count_inputs(opts.input, opts.fmt)  # one quick pass: a progress bar with an ETA
    items: Iterable[Item] = pending() if total is None else _Sized(pending(), max(0, total - len(done)))
    retries = _NoRetryOnMalformed(attempts=opts.retries + 1) if opts.retries else 0
    tally = Tally()
    writer = RecordWriter(opts.output)
    started = time.perf_counter()
    results = gs.imap(
        call, items, gear=gear, workers=opts.workers, ordered=opts.ordered, errors="collect",
        progress=opts.progress, timeout=opts.timeout, retries=retries, rate=opts.rate,
    )
    code = EXIT_OK
    stopped: BaseException | None = None
    try:
        for value in results:
            record, ok = record_of(value, in_flight, opts.echo_input)
            if ok:
                tally.succeeded += 1
            else:
                tally.failed += 1
                tally.failures_by_type[record["error"]["type"]] += 1
                if opts.errors == "skip":
                    tally.skipped += 1
                    continue
            writer.write(record)
            tally.written += 1
            if not ok and opts.errors == "raise":
                _say(f"gearshift run: stopped at the first failure (--errors raise), input #{record['index']} "
                     f"(line {record['line']}):", fg="red", bold=True)
                error = record["error"]
                _say(error["traceback"].rstrip() or f"{error['type']}: {error['message']}")
                code = EXIT_FAILED
                break
    except (KeyboardInterrupt, SystemExit) as exc:
        stopped = exc
    except BrokenPipeError:  # `gearshift run ... | head`: the reader has all it wants
        results.close()
        writer.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        _say("gearshift run: the output was closed; stopped")
        return EXIT_FAILED
    except Exception as exc:
        results.close()
        writer.close()
        _say(f"gearshift run: error: {type(exc).__name__}: {exc}", fg="red", bold=True)
        _summary(opts, tally, results.report, gear, time.perf_counter() - started, len(done))
        return EXIT_FAILED
    finally:
        results.close()
        writer.close()
    if isinstance(stopped, KeyboardInterrupt):
        _say("gearshift run: interrupted; what finished is recorded, what was running was dropped", fg="yellow")
        code = EXIT_INTERRUPTED
    elif isinstance(stopped, SystemExit):
        _say("gearshift run: terminated; what finished is recorded, what was running was dropped", fg="yellow")
        code = stopped.code if isinstance(stopped.code, int) else EXIT_FAILED
    _summary(opts, tally, results.report, gear, time.perf_counter() - started, len(done))
    if code != EXIT_OK and opts.output != "-":
        _say(f"to finish the run: {resume_command(opts.output)}", bold=True)
    return code


def _summary(opts: RunOptions, tally: Tally, report: gs.Report, gear: str, wall: float, already: int) -> None:
    done = tally.succeeded + tally.failed
    rate = done / wall if wall > 0 else 0.0
    failed = f"{tally.failed} failed"
    if tally.failures_by_type:
        failed += " (" + ", ".join(f"{k} x{v}" for k, v in tally.failures_by_type.most_common()) + ")"
    _say(
        f"gearshift run: {done} inputs in {wall:.2f}s ({rate:,.0f}/s): "
        + click.style(f"{tally.succeeded} succeeded", fg="green")
        + ", "
        + click.style(failed, fg="red" if tally.failed else None)
    )
    if tally.skipped:
        _say(f"  {tally.skipped} failures not recorded (--errors skip): a --resume run tries them again")
    if already:
        _say(f"  {already} inputs were already done (--resume)")
    _say(f"  gear: {report.gear or gear}" + (f", chunks of {report.chunksize}" if report.chunksize > 1 else ""))
    for reason in report.reasons:
        _say(f"  why: {reason}")
    if opts.output != "-":
        _say(f"  results: {opts.output} ({tally.written} records written)")
