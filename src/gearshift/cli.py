"""The ``gearshift`` command line: run, fetch, advise, bench, demo, lab, info.

Exit codes: 0 every input has a success record; 1 some failed or have no record, or a
run error; 2 bad usage (one line, no traceback; ``--debug`` shows it), a MODULE:FUNC
that cannot be imported or called, or a run refused because it would harm a file;
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Colours are used only on a terminal.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import click

from gearshift._cli.inputs import FORMATS, Format, display_name, guess_format
from gearshift._cli.run import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, RunOptions, printable
from gearshift._cli.target import TargetError

EPILOG = (
    "Exit codes: 0 every input has a success record; 1 some failed or have no record, or a run error; "
    "2 bad usage, MODULE:FUNC, or a run refused to protect a file; 130 interrupted; 143 terminated."
)

_debug = bool(os.environ.get("GEARSHIFT_DEBUG"))


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _debug
    _debug = _debug or value


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help="Show the traceback behind an error (also GEARSHIFT_DEBUG=1).",
)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    if _debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(click.style(f"gearshift: error: {printable(message)}", fg="red", bold=True), err=True)
    sys.exit(code)


def _gear_choices() -> list[str]:
    from gearshift._gears import gear_names

    return gear_names()


def _input_format(path: str, fmt: str | None) -> Format:
    if fmt is not None:
        return fmt  # type: ignore[return-value]
    try:
        return guess_format(path)
    except ValueError as exc:
        _fail(str(exc))
        raise AssertionError("unreachable") from exc


def _kwargs_mode(fmt: Format, kwargs: bool | None) -> bool:
    if fmt == "text" and kwargs:
        _fail("--kwargs needs JSON objects or CSV rows; text lines are passed as one string")
    if kwargs is None:
        return fmt == "csv"
    return kwargs


def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"expected positive integers separated by commas, got {text!r}")
    return values


input_option = click.option(
    "--input", "-i", "input_path", required=True, metavar="FILE",
    type=click.Path(exists=False, dir_okay=False, allow_dash=True),
    help="Inputs: JSON Lines, CSV (with a header) or text lines; '-' reads stdin.",
)
format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None,
    help="Input format (default: from the extension: .jsonl/.ndjson/.json, .csv, .txt; stdin: jsonl).",
)
kwargs_option = click.option(
    "--kwargs/--no-kwargs", "kwargs", default=None,
    help="Pass each JSON object (or CSV row) as keyword arguments (default: on for CSV, off for JSON Lines).",
)


def _check_input(path: str) -> None:
    if path == "-":
        return
    if not os.path.lexists(path):
        folder = os.path.dirname(os.path.abspath(path))
        where = "" if os.path.isdir(folder) else f" (its folder {folder} does not exist either)"
        _fail(f"input file {display_name(path)!r} does not exist{where}")
    if os.path.isdir(path):
        _fail(f"input {path!r} is a folder; give a file")
    if not os.path.exists(path):
        _fail(f"input {path!r} is a link to a missing file")
    if not os.access(path, os.R_OK):
        _fail(f"cannot read the input file {path!r}: permission denied")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.version_option(package_name="gearshift")
@debug_option
def cli() -> None:
    """gearshift: run Python work concurrently in the right gear.

    Start with `gearshift demo`, then `gearshift run MODULE:FUNC --input FILE`.
    """


@cli.command(epilog=EPILOG)
@click.argument("target", metavar="MODULE:FUNC")
@input_option
@click.option("--output", "-o", default="-", show_default=True, metavar="FILE",
              type=click.Path(dir_okay=False, allow_dash=True),
              help="Results as JSON Lines, one record per input; '-' writes stdout.")
@format_option
@kwargs_option
@click.option("--gear", "-g", default=None, metavar="GEAR",
              help="serial, thread, process, async or auto (default: auto, which measures and shifts).")
@click.option("--workers", "-w", type=click.IntRange(min=1), default=None, help="Workers (default: the gear's).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds per input; it fails with TaskTimeout.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Extra attempts for a failed input, with backoff.")
@click.option("--rate", default=None, metavar="N/s", help="At most this many starts, e.g. 50/s or 100/min.")
@click.option("--ordered/--unordered", default=False, show_default=True,
              help="Write records in input order, or as they complete.")
@click.option("--errors", type=click.Choice(["raise", "collect", "skip"]), default="collect", show_default=True,
              help="raise: stop at the first failure (exit 1); collect: record failures; "
                   "skip: do not record them (a --resume run tries them again).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr (only on a terminal).")
@click.option("--resume", is_flag=True, help="Run only the inputs that have no record in --output yet.")
@click.option("--retry-failed", is_flag=True,
              help="With --resume: also run again the inputs whose record is a failure (replacing it).")
@click.option("--overwrite", is_flag=True,
              help="Start afresh even if --output already holds results (the old file is kept as FILE.bak).")
@click.option("--force", is_flag=True,
              help="With --overwrite: replace a file gearshift did not write (kept as FILE.bak); "
                   "with --resume: resume although the input changed.")
@click.option("--echo-input/--no-echo-input", default=True, show_default=True,
              help="Copy each input into its record.")
@click.option("--then", "then", multiple=True, metavar="MODULE:FUNC[@GEAR]",
              help="A further stage, given the previous one's result (repeatable): a pipeline whose stages "
                   "run at once, each in its own gear (default auto); the record holds the last result.")
@debug_option
def run(target: str, input_path: str, output: str, fmt: str | None, kwargs: bool | None, gear: str | None,
        workers: int | None, timeout: float | None, retries: int, rate: str | None, ordered: bool, errors: str,
        progress: bool, resume: bool, retry_failed: bool, overwrite: bool, force: bool, echo_input: bool,
        then: tuple[str, ...]) -> None:
    """Run MODULE:FUNC over every input in FILE, into a durable, resumable results file.

    Each record is {"index", "line", "input", "result" | "error": {"type", "message",
    "traceback"}, "elapsed"}, appended and flushed as its input finishes. A killed run
    continued with --resume ends with each input's record exactly once.

    Your files are safe: the output is never the input; only a results file gearshift
    wrote (it keeps a small .FILE.gearshift beside it) is resumed or replaced, and a
    replaced one is kept as FILE.bak.

    \b
    Example:
      gearshift run mymodule:work --input items.jsonl --output results.jsonl --gear process
      gearshift run jobs:download --gear async --then jobs:parse@process --then jobs:store@thread -i urls.txt
    """
    from gearshift._cli.guard import Refused
    from gearshift._cli.run import run as run_command

    _check_input(input_path)
    the_format = _input_format(input_path, fmt)
    if gear is not None and gear not in _gear_choices():
        _fail(f"unknown gear {gear!r}; choose one of {', '.join(_gear_choices())}")
    if resume and output == "-":
        _fail("--resume needs an --output file (stdout cannot be read back)")
    if retry_failed and not resume:
        _fail("--retry-failed goes with --resume")
    if resume and overwrite:
        _fail("--resume and --overwrite contradict each other")
    if force and not (resume or overwrite):
        _fail("--force goes with --overwrite (replace a file gearshift did not write) "
              "or --resume (resume although the input changed)")
    stages: list[tuple[str, str]] = []
    for spec in then:
        func, _, then_gear = spec.partition("@")
        then_gear = then_gear or "auto"
        if then_gear not in _gear_choices():
            _fail(f"--then {spec}: unknown gear {then_gear!r}; choose one of {', '.join(_gear_choices())}")
        stages.append((func, then_gear))
    if rate is not None:
        from gearshift._rate import parse_rate

        try:
            parse_rate(rate)
        except (ValueError, TypeError) as exc:
            _fail(f"--rate: {exc}")
    opts = RunOptions(
        target=target, input=input_path, output=output, fmt=the_format, kwargs=_kwargs_mode(the_format, kwargs),
        gear=gear or "auto", workers=workers, timeout=timeout, retries=retries, rate=rate, ordered=ordered,
        errors=errors,  # type: ignore[arg-type]
        progress=progress, resume=resume, retry_failed=retry_failed, echo_input=echo_input,
        overwrite=overwrite, force=force, then=stages,
    )
    try:
        code = run_command(opts)
    except (TargetError, Refused) as exc:
        _fail(str(exc))
    sys.exit(code)


def _load_target(target: str, kwargs: bool) -> Any:
    from gearshift._cli.target import make_call

    try:
        return make_call(target, kwargs)
    except TargetError as exc:
        _fail(str(exc))


@cli.command(epilog=EPILOG)
@click.argument("target", metavar="MODULE:FUNC")
@input_option
@format_option
@kwargs_option
@debug_option
@click.option("--sample", "-n", type=click.IntRange(min=1), default=8, show_default=True,
              help="How many inputs (from the start of FILE) the advisor may measure.")
def advise(target: str, input_path: str, fmt: str | None, kwargs: bool | None, sample: int) -> None:
    """Measure MODULE:FUNC on a sample of FILE and print the advisor's report.

    The report names the gear, workers and chunk size to use, the speedup to expect
    and its Amdahl bound, the measurements, and why.
    """
    from gearshift._cli.bench import load_sample
    from gearshift._cli.inputs import count_inputs

    _check_input(input_path)
    the_format = _input_format(input_path, fmt)
    call = _load_target(target, _kwargs_mode(the_format, kwargs))
    import gearshift as gs

    items = load_sample(input_path, the_format, call.kwargs, sample)
    if not items:
        _fail(f"{display_name(input_path)} holds no valid inputs to sample", EXIT_FAILED)
    total = count_inputs(input_path, the_format)
    click.echo(str(gs.advise(call, items, total=total)))


@cli.command(epilog=EPILOG)
@click.argument("target", metavar="MODULE:FUNC")
@input_option
@format_option
@kwargs_option
@debug_option
@click.option("--gears", default="serial,thread,process,async,auto", show_default=True,
              help="Gears to compare, separated by commas.")
@click.option("--workers", "workers_text", default=None, metavar="N[,N...]",
              help="Worker counts to try in each gear (default: 1, 2, 4... up to twice the cores).")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Use at most this many inputs (read into memory: each gear runs the same items).")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png", type=click.Path(dir_okay=False),
              help="Draw speedup against workers, with the Amdahl curve (needs matplotlib: gearshift[plot]).")
def bench(target: str, input_path: str, fmt: str | None, kwargs: bool | None, gears: str,
          workers_text: str | None, limit: int, plot_path: str | None) -> None:
    """Run MODULE:FUNC over the same inputs in each gear, side by side.

    Prints the wall time, the speedup over the serial gear and the CPU used (this
    process and its worker processes) for each gear and worker count.
    """
    from gearshift._cli import bench as benchmod

    _check_input(input_path)
    the_format = _input_format(input_path, fmt)
    names = [g.strip() for g in gears.split(",") if g.strip()]
    unknown = [g for g in names if g not in _gear_choices()]
    if unknown or not names:
        _fail(f"unknown gear(s) {', '.join(unknown) or gears!r}; choose from {', '.join(_gear_choices())}")
    workers = _positive_int_list(workers_text) if workers_text else benchmod.default_workers()
    if plot_path is not None:
        benchmod.require_matplotlib()
    call = _load_target(target, _kwargs_mode(the_format, kwargs))
    items = benchmod.load_sample(input_path, the_format, call.kwargs, limit)
    if not items:
        _fail(f"{display_name(input_path)} holds no valid inputs", EXIT_FAILED)
    rows = benchmod.run_bench(call, items, names, workers)
    click.echo(benchmod.table(rows))
    if plot_path is not None:
        benchmod.plot(rows, plot_path, title=f"{target} over {len(items)} inputs")
        click.echo(f"plot: {plot_path}")


@cli.command(epilog=EPILOG)
@click.option("--only", default=None, metavar="NAME[,NAME...]", help="Run only these workloads.")
@click.option("--scale", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Multiply each workload's size (0.1 for a quick look).")
def demo(only: str | None, scale: float) -> None:
    """Run built-in workloads, each in the gear auto picks, and show why and how fast.

    Workloads: cpu (pure Python), hash (hashlib releases the GIL), sleep (blocking
    waits), async (awaits), tiny (x + 1). Serial time is measured on a small part and
    extrapolated, to keep the demo short.
    """
    from gearshift._cli import demo as demomod

    names = demomod.names() if only is None else [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in demomod.names()]
    if unknown:
        _fail(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(demomod.names())}")
    demomod.run_demo(names, scale, click.echo)


@cli.command(epilog=EPILOG)
@click.argument("urls_file", metavar="URLS_FILE", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--out", "-o", "out", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Directory for the bodies and DIR/manifest.jsonl (created if missing).")
@click.option("--concurrency", "-c", default="auto", show_default=True, metavar="N|auto",
              help="Requests at once; auto finds it by measurement (backs off when the service queues or refuses).")
@click.option("--rate", default=None, metavar="N/s", help="At most this many requests started, over all hosts.")
@click.option("--per-host-rate", default=None, metavar="N/s", help="At most this many requests started per host.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="More attempts on connection errors, timeouts, 429 and 5xx (never other 4xx).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds per attempt.")
@click.option("--resume", is_flag=True, help="Go on with DIR/manifest.jsonl: skip URLs already fetched.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr (only on a terminal).")
@click.option("--loop", type=click.Choice(["auto", "uvloop", "asyncio"]), default="auto", show_default=True,
              help="The event loop: auto is uvloop when installed.")
@click.option("--checksum/--no-checksum", default=True, show_default=True,
              help="Each body's SHA-256 in the manifest (--no-checksum saves ~0.5 ms of CPU a MiB).")
@debug_option
def fetch(urls_file: str, out: str, concurrency: str, rate: str | None, per_host_rate: str | None, retries: int,
          timeout: float, resume: bool, progress: bool, loop: str, checksum: bool) -> None:
    """Fetch every URL of URLS_FILE (one per line; '-' reads stdin) into files in DIR, politely.

    Each URL's record (url, status, bytes, file, sha256, elapsed, attempts, error) is appended
    to DIR/manifest.jsonl as it finishes; --resume after a kill leaves each URL's success
    recorded exactly once. Files are named from the URL but never leave DIR and never collide;
    a file in DIR the manifest does not list is never written over.

    \b
    Example:
      gearshift fetch urls.txt --out pages/ --per-host-rate 10/s --retries 5
    """
    import signal

    from gearshift._rate import parse_rate
    from gearshift.fetch import FetchRefused
    from gearshift.fetch import fetch as fetch_urls

    workers: int | None = None
    if concurrency != "auto":
        try:
            workers = int(concurrency)
        except ValueError:
            workers = 0
        if workers < 1:
            _fail(f"--concurrency must be a positive number or auto, got {concurrency!r}")
    for name, value in (("--rate", rate), ("--per-host-rate", per_host_rate)):
        if value is not None:
            try:
                parse_rate(value)
            except (ValueError, TypeError) as exc:
                _fail(f"{name}: {exc}")
    _check_input(urls_file)

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with click.open_file(urls_file, encoding="utf-8", errors="surrogateescape") as lines:
            report = fetch_urls(lines, out, concurrency=workers, rate=rate, per_host_rate=per_host_rate,
                                retries=retries, timeout=timeout, resume=resume,
                                progress=progress and sys.stderr.isatty(), loop=loop, checksum=checksum)
    except FetchRefused as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo(f"gearshift fetch: interrupted; what finished is in {out}/manifest.jsonl "
                   "(--resume goes on)", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exc:
        if exc.code == 143:
            click.echo(f"gearshift fetch: terminated; what finished is in {out}/manifest.jsonl "
                       "(--resume goes on)", err=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(str(report), err=True)
    sys.exit(EXIT_FAILED if report.failed else 0)


@cli.command(epilog=EPILOG)
@click.option("--quick", is_flag=True, help="Fewer repeats and smaller runs: under 2 minutes on 2 cores.")
@click.option("--size", type=click.Choice(["smallest", "quick", "full"]), default=None, hidden=True,
              help="smallest: a smoke test whose numbers mean little (the test suite's).")
@click.option("--only", default=None, metavar="ID[,ID...]", help="Measure only these claims (see --list).")
@click.option("--json", "json_path", default=None, metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True),
              help="Also write the findings as JSON ('-' for stdout): per claim id, claim, measured, verdict, "
                   "explanation; and the machine.")
@click.option("--html", "html_path", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Also write one self-contained HTML page with a plot per claim (needs matplotlib).")
@click.option("--list", "list_ids", is_flag=True, help="List the claims' ids and exit.")
@debug_option
def lab(quick: bool, size: str | None, only: str | None, json_path: str | None, html_path: str | None,
        list_ids: bool) -> None:
    """Measure each claim of the course notes on this machine and say whether it holds here.

    Each claim gets one small experiment, repeated; the verdict is "holds" when the effect
    goes the way the notes say by more than the noise (the spread of the repeats), "does
    not hold" when it goes the other way by more than the noise, "depends" within the
    noise, "not measurable here" (with the reason) when this machine cannot test it.
    The table goes to stdout, progress to stderr. Close other work first: a busy machine
    shows up as noise.

    \b
    Example:
      gearshift lab --quick
      gearshift lab --only locks,event-loop --json lab.json --html lab.html
    """
    from gearshift._cli import lab as labmod

    if list_ids:
        click.echo(labmod.listing())
        return
    ids = labmod.parse_only(only)
    chosen = size or ("quick" if quick else "full")
    sys.exit(labmod.run_lab(ids, chosen, json_path, html_path, click.echo))  # type: ignore[arg-type]


@cli.command(epilog=EPILOG)
def info() -> None:
    """The interpreter, GIL status, cores, event loop and optional engines."""
    from gearshift._cli.info import collect, render

    click.echo(render(collect()))


def main(argv: list[str] | None = None) -> None:
    """The console script: Ctrl-C anywhere is exit code 130; any other error one line (``--debug``: its traceback)."""
    try:
        rv = cli.main(args=argv, prog_name="gearshift", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("gearshift: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:  # one line, like every other usage error
        command = exc.ctx.command_path if exc.ctx is not None else "gearshift"
        message = " ".join(exc.format_message().split())
        click.echo(click.style(f"gearshift: error: {message} (see '{command} --help')", fg="red", bold=True),
                   err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        if _debug:
            traceback.print_exc()
        hint = "" if _debug else " (--debug shows the traceback)"
        message = f"gearshift: error: {type(exc).__name__}: {_message(exc)}{hint}"
        click.echo(click.style(printable(message), fg="red", bold=True), err=True)
        sys.exit(EXIT_FAILED)
    sys.exit(rv if isinstance(rv, int) else 0)


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<unprintable>"


if __name__ == "__main__":
    main()
