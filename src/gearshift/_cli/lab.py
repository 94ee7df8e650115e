"""``gearshift lab``: the claims of the course notes measured here; the table, JSON and HTML outputs."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from gearshift._lab import LabReport, LabSize, claim_ids, lab
from gearshift._lab._core import REGISTRY, Finding, this_machine
from gearshift._lab._work import Terminated
from gearshift._lab.report import json_text, write_html


def parse_only(text: str | None) -> list[str] | None:
    if text is None:
        return None
    ids = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [i for i in ids if i not in REGISTRY]
    if unknown or not ids:
        raise click.UsageError(f"--only: unknown claim id(s) {', '.join(unknown) or repr(text)}; "
                               f"choose from {', '.join(claim_ids())}")
    return ids


def listing() -> str:
    width = max(len(i) for i in claim_ids())
    return "\n".join(f"{i:<{width}}  {REGISTRY[i].claim}" for i in claim_ids())


def run_lab(ids: list[str] | None, size: LabSize, json_path: str | None, html_path: str | None,
            echo: Callable[[str], None]) -> int:
    """Run, print the table, write the files; on Ctrl-C keep and write what was found, and say so (exit 130)."""
    if html_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--html needs matplotlib, which is not installed: "
                                       "pip install 'gearshift[plot]'") from None
    found: list[Finding] = []
    machine = this_machine()
    interrupted = False
    total = len(ids) if ids is not None else len(claim_ids())

    def progress(line: str) -> None:
        click.echo(line, err=True)

    progress(f"gearshift lab: {total} claims, {size} run on {machine.cores} cores (Ctrl-C stops it; what was "
             "measured is kept)")
    code = 0

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        report = lab(ids, size, progress=progress, on_finding=found.append, machine=machine)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the experiment cleaned up; keep what was found
        interrupted = True
        code = 143 if isinstance(exc, Terminated) else 130
        report = LabReport(machine, size, found, interrupted=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if json_path == "-":
        echo = functools.partial(click.echo, err=True)  # stdout is the JSON's
    echo(str(report))
    if json_path is not None:
        text = json_text(report)
        if json_path == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(json_path, "w", encoding="utf-8") as out:
                out.write(text + "\n")
            echo(f"json: {json_path}")
    if html_path is not None and report.findings:
        write_html(report, html_path)
        echo(f"html: {html_path}")
    if interrupted:
        what = "terminated" if code == 143 else "interrupted"
        click.echo(f"gearshift lab: {what}; the table holds the claims measured before it", err=True)
    return code
