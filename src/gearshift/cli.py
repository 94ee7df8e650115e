"""The ``gearshift`` command line: run, advise, bench, demo, info.

Exit codes: 0 ok; 1 a run error, or an item failed under ``--errors raise``;
2 bad usage or a MODULE:FUNC that cannot be imported or called; 130 interrupted (Ctrl-C).
Colours are used only on a terminal.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from gearshift._cli.inputs import FORMATS, Format, display_name, guess_format
from gearshift._cli.run import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, RunOptions
from gearshift._cli.target import TargetError

EPILOG = (
    "Exit codes: 0 ok; 1 a run error, or an item failed under --errors raise; "
    "2 bad usage or MODULE:FUNC; 130 interrupted."
)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(click.style(f"gearshift: error: {message}", fg="red", bold=True), err=True)
    sys.exit(code)


def _gear_choices() -> list[str]:
    from gearshift._cli.run import GEAR_NAMES

    return list(GEAR_NAMES)


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
    import os

    if path != "-" and not os.path.isfile(path):
        _fail(f"input file {display_name(path)!r} does not exist")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.version_option(package_name="gearshift")
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
@click.option("--overwrite", is_flag=True, help="Start afresh even if --output already holds records.")
@click.option("--echo-input/--no-echo-input", default=True, show_default=True,
              help="Copy each input into its record.")
def run(target: str, input_path: str, output: str, fmt: str | None, kwargs: bool | None, gear: str | None,
        workers: int | None, timeout: float | None, retries: int, rate: str | None, ordered: bool, errors: str,
        progress: bool, resume: bool, retry_failed: bool, overwrite: bool, echo_input: bool) -> None:
    """Run MODULE:FUNC over every input in FILE, into a durable, resumable results file.

    Each record is {"index", "line", "input", "result" | "error": {"type", "message",
    "traceback"}, "elapsed"}, appended and flushed as its input finishes. A killed run
    continued with --resume ends with each input's record exactly once.

    \b
    Example:
      gearshift run mymodule:work --input items.jsonl --output results.jsonl --gear process
    """
    import os

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
    if output != "-" and not resume and os.path.exists(output) and os.path.getsize(output) > 0:
        if not overwrite:
            _fail(f"{output} already holds results; add --resume to continue that run or --overwrite to start afresh")
        open(output, "w").close()
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
    )
    try:
        code = run_command(opts)
    except TargetError as exc:
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
def info() -> None:
    """The interpreter, GIL status, cores, event loop and optional engines."""
    from gearshift._cli.info import collect, render

    click.echo(render(collect()))


def main(argv: list[str] | None = None) -> None:
    """The console script: run ``cli`` and turn Ctrl-C anywhere into exit code 130."""
    try:
        rv = cli.main(args=argv, prog_name="gearshift", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("gearshift: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("gearshift: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
