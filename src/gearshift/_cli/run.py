"""``gearshift run``: a function over a file of inputs into a durable, resumable results file.

The run goes through ``gs.imap`` with ``errors="collect"`` so that every input ends as one
record, success or failure; the command's own ``--errors`` policy (raise: stop at the
first failure; skip: leave failures unrecorded, so a resumed run tries them again) is
applied here, where the record is written.

The exit code tells the truth: 0 only when every input has a success record (earlier
runs' records included, on --resume); 1 when some are failures, when an input has no
record, or on a run error; 130/143 when a signal cut the run short. Whenever an input
is left without a record, the command that finishes the run is printed.
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
from gearshift._cli import guard
from gearshift._cli.inputs import Format, Item, check_readable, count_inputs, display_name, read_items
from gearshift._cli.outputs import RecordWriter, Recovered, recover, safe_str
from gearshift._cli.target import MalformedInput, make_call, make_then
from gearshift._retry import Retry

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

ErrorsArg = Literal["raise", "collect", "skip"]


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
    overwrite: bool = False
    force: bool = False
    #: Further stages (``--then MODULE:FUNC@gear``): a pipeline, each given the previous result.
    then: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Tally:
    written: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    failures_by_type: Counter[str] = field(default_factory=Counter)


@dataclass
class Coverage:
    """Which inputs have a record: whether the run may exit 0, or must say how to finish.

    This run's records are counted, not kept (an endless stdin stays in bounded memory):
    the engine delivers each pending input once, and inputs done before are not pending.
    """

    before_ok: set[int] = field(default_factory=set)  # records from before (--resume): a success
    before_failed: set[int] = field(default_factory=set)  # only failure records
    ok: int = 0
    failed: int = 0
    read_all: bool = False  # the input was read to its end
    inputs: int = 0  # how many inputs it held (when read_all)

    def _before(self, indexes: set[int]) -> int:
        return sum(1 for i in indexes if i < self.inputs)

    def missing(self) -> int:
        return self.inputs - self.ok - self.failed - self._before(self.before_ok) - self._before(self.before_failed)

    def failures(self) -> int:
        return self.failed + self._before(self.before_failed)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in (0x09, 0x0A)}


def printable(text: str) -> str:
    """User-made text fit for a terminal: control characters and lone surrogates escaped."""
    text = text.translate(_CONTROL)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _say(message: str, *, styled: bool = False, **style: Any) -> None:
    """One line to stderr; ``styled``: the message holds colours of ours, and no user text to escape."""
    message = message if styled else printable(message)
    click.echo(click.style(message, **style) if style else message, err=True)


_ONE_RUN_ONLY = {"--overwrite", "--force", "--retry-failed"}


def resume_command(output: str) -> str:
    """The exact command that continues this run (what was said once, --overwrite, --force, is not repeated)."""
    argv0 = os.path.basename(sys.argv[0])
    prog = ["gearshift"] if argv0 == "gearshift" else [sys.executable, "-m", "gearshift"]
    args = [a for a in sys.argv[1:] if a not in _ONE_RUN_ONLY]
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
    # A failure in a --then stage holds that stage's input: (index, previous result, elapsed).
    index = (value.item.index if isinstance(value.item, Item) else value.item[0]) if failure else value[0]
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


def prepare(opts: RunOptions) -> tuple[set[int], set[int]]:
    """Check the input and decide what to do to the output, before anything is written.

    Raises ``guard.Refused`` (one line, exit 2) when the run would harm a file or cannot
    read its input. Returns the inputs that already have a success record, and a failure one.
    """
    try:
        check_readable(opts.input)
    except OSError as exc:
        raise guard.Refused(f"cannot read the input: {exc}") from None
    plan = guard.plan_output(opts.output, opts.input, resume=opts.resume, overwrite=opts.overwrite,
                             force=opts.force)
    if opts.resume:
        warning = guard.check_same_input(opts.output, opts.input, force=opts.force)
        if warning is not None:
            _say(f"gearshift run: {warning}", fg="yellow")
    try:
        guard.start_output(plan, opts.input, guard.command_line())
    except OSError as exc:
        raise guard.Refused(f"cannot write beside --output {opts.output}: {exc}") from None
    for note in plan.notes:
        _say(f"gearshift run: {note}")
    if not opts.resume:
        return set(), set()
    found = recover(opts.output, drop_failures=opts.retry_failed, input_path=opts.input)
    _tell_recovered(opts.output, found)
    return found.done - found.failed, found.failed


def _tell_recovered(output: str, found: Recovered) -> None:
    if found.torn_bytes:
        _say(f"gearshift run: cut a torn last line ({found.torn_bytes} bytes, a record cut short by a kill) "
             f"off {output}", fg="yellow")
    for number in found.bad_lines:
        _say(f"gearshift run: {output}:{number}: not a record, left as it is", fg="yellow")
    if found.dropped_failures:
        _say(f"gearshift run: dropped {found.dropped_failures} failure records, to run those inputs again "
             f"(the file as it was is kept as {found.backup})")
    if found.duplicates:
        _say(f"gearshift run: {output} holds {found.duplicates} duplicate records", fg="yellow")
    _say(f"gearshift run: resuming, {len(found.done)} inputs already have a record in {output}")


def run(opts: RunOptions) -> int:
    """Run ``opts`` and return the exit code; the summary goes to stderr."""
    call = make_call(opts.target, opts.kwargs)
    gear = opts.gear
    succeeded, failed = prepare(opts)
    done = succeeded | failed
    cover = Coverage(before_ok=succeeded, before_failed=failed)

    bar = opts.progress and sys.stderr.isatty()

    def on_malformed(message: str) -> None:
        text = f"gearshift run: {message}"
        if bar:  # above the progress bar, not through it
            from tqdm import tqdm

            tqdm.write(click.style(printable(text), fg="red"), file=sys.stderr)
        else:
            _say(text, fg="red")

    in_flight: dict[int, Item] = {}  # the line and input of each running item (a bounded window)

    def pending() -> Iterator[Item]:
        count = 0
        for item in read_items(opts.input, opts.fmt, kwargs=opts.kwargs, on_malformed=on_malformed):
            count = item.index + 1
            if item.index not in done:
                in_flight[item.index] = item
                yield item
        cover.inputs = count
        cover.read_all = True

    total = count_inputs(opts.input, opts.fmt)  # one quick pass: a progress bar with an ETA
    items: Iterable[Item] = pending() if total is None else _Sized(pending(), max(0, total - len(done)))
    retries = _NoRetryOnMalformed(attempts=opts.retries + 1) if opts.retries else 0
    tally = Tally()
    try:
        writer = RecordWriter(opts.output)
    except OSError as exc:
        raise guard.Refused(f"cannot write --output {opts.output}: {exc.strerror or exc}") from None
    started = time.perf_counter()
    results: gs.ResultIterator | gs.PipelineIterator
    if opts.then:
        pipe = gs.Pipeline(items, errors="collect", ordered=opts.ordered, progress=opts.progress).map(
            call, gear=gear, workers=opts.workers, timeout=opts.timeout, retries=retries, rate=opts.rate,
            name=opts.target,
        )
        for spec, then_gear in opts.then:
            pipe = pipe.map(make_then(spec), gear=then_gear, timeout=opts.timeout, retries=retries, name=spec)
        results = iter(pipe)
    else:
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
            if ok:
                cover.ok += 1
            else:
                cover.failed += 1
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
        where = "" if cover.read_all else f" (reading {display_name(opts.input)})"
        _say(f"gearshift run: error{where}: {type(exc).__name__}: {safe_str(exc)}", fg="red", bold=True)
        _summary(opts, tally, results.report, gear, time.perf_counter() - started, len(done))
        _finish_hint(opts, cover)
        return EXIT_FAILED
    finally:
        results.close()
        writer.close()
    code = _stopped_code(stopped, code)
    _summary(opts, tally, results.report, gear, time.perf_counter() - started, len(done))
    return _final_code(opts, cover, code)


def _stopped_code(stopped: BaseException | None, code: int) -> int:
    """The exit code for a run stopped by Ctrl-C, SIGTERM (the engine raises SystemExit(143)) or a SystemExit."""
    if isinstance(stopped, KeyboardInterrupt):
        _say("gearshift run: interrupted; what finished is recorded, what was running was dropped", fg="yellow")
        return EXIT_INTERRUPTED
    if isinstance(stopped, SystemExit):
        if stopped.code == EXIT_TERMINATED:
            _say("gearshift run: terminated; what finished is recorded, what was running was dropped", fg="yellow")
            return EXIT_TERMINATED
        _say(f"gearshift run: stopped by SystemExit({stopped.code!r}); what finished is recorded", fg="yellow")
        return stopped.code if isinstance(stopped.code, int) and stopped.code != 0 else EXIT_FAILED
    return code


def _final_code(opts: RunOptions, cover: Coverage, code: int) -> int:
    """0 only when every input has a success record; otherwise non-zero, with how to finish."""
    missing = cover.missing() if cover.read_all else None
    if missing is None or missing:
        _finish_hint(opts, cover)
        return code if code != EXIT_OK else EXIT_FAILED
    failures = cover.failures()
    if failures and code == EXIT_OK:
        _say(f"gearshift run: {failures} of {cover.inputs} inputs have a failure record (exit 1); "
             "--resume --retry-failed runs them again")
        return EXIT_FAILED
    return code


def _finish_hint(opts: RunOptions, cover: Coverage) -> None:
    missing = cover.missing() if cover.read_all else None
    what = "some inputs have" if missing is None else f"{missing} of {cover.inputs} inputs have"
    if opts.output == "-":
        _say(f"gearshift run: {what} no record (results went to stdout: run those again with an --output file)",
             fg="yellow")
        return
    _say(f"gearshift run: {what} no record yet", fg="yellow")
    stdin = " (feeding it the same input)" if opts.input == "-" else ""
    _say(f"to finish the run{stdin}: {resume_command(opts.output)}", bold=True)


def _summary(
    opts: RunOptions, tally: Tally, report: gs.Report | gs.PipelineReport, gear: str, wall: float, already: int
) -> None:
    done = tally.succeeded + tally.failed
    rate = done / wall if wall > 0 else 0.0
    failed = f"{tally.failed} failed"
    if tally.failures_by_type:
        failed += " (" + ", ".join(f"{printable(k)} x{v}" for k, v in tally.failures_by_type.most_common()) + ")"
    _say(
        f"gearshift run: {done} inputs in {wall:.2f}s ({rate:,.0f}/s): "
        + click.style(f"{tally.succeeded} succeeded", fg="green")
        + ", "
        + click.style(failed, fg="red" if tally.failed else None),
        styled=True,
    )
    if tally.skipped:
        _say(f"  {tally.skipped} failures not recorded (--errors skip): a --resume run tries them again")
    if already:
        _say(f"  {already} inputs were already done (--resume)")
    if isinstance(report, gs.PipelineReport):
        for line in str(report).splitlines()[1:]:
            _say(f"  {line}")
    else:
        _say(f"  gear: {report.gear or gear}" + (f", chunks of {report.chunksize}" if report.chunksize > 1 else ""))
        for reason in report.reasons:
            _say(f"  why: {reason}")
    if opts.output != "-":
        _say(f"  results: {opts.output} ({tally.written} records written)")
