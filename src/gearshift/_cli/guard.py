"""What ``gearshift run`` may do to the ``--output`` file: the user's files are sacred.

A results file is known as gearshift's own by a small sidecar beside it
(``.out.jsonl.gearshift``: a format version, the command, the input's fingerprint), not
by a header line, so the records stay plain JSON Lines for jq and pandas. Only a file
with a sidecar is ever resumed, repaired or replaced; one without is foreign and left
byte-for-byte as it is unless the user says ``--overwrite --force``. A replaced file is
never deleted: it is renamed to a ``.bak`` beside it. The output is never the input,
also through symbolic or hard links (compared by device and inode).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

SIDECAR_VERSION = 1
MIB = 1024 * 1024

Fingerprint = dict[str, Any]


class Refused(Exception):
    """The command would harm a file, or cannot run as asked; the message is one line that says why."""


def sidecar_path(output: str) -> str:
    head, tail = os.path.split(output)
    return os.path.join(head, f".{tail}.gearshift")


def fingerprint(path: str) -> Fingerprint | None:
    """Size and SHA-256 of the first and last MiB: cheap at any size, and changes with any edit at either end.

    None for stdin (a pipe cannot be read twice).
    """
    if path == "-":
        return None
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        head = hashlib.sha256(stream.read(MIB)).hexdigest()
        stream.seek(max(0, size - MIB))
        tail = hashlib.sha256(stream.read(MIB)).hexdigest()
    return {"size": size, "head": head, "tail": tail}


def read_sidecar(output: str) -> dict[str, Any] | None:
    """The sidecar's contents; None when there is none (or it is not one of ours)."""
    try:
        with open(sidecar_path(output), encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("gearshift_results") != SIDECAR_VERSION:
        return None
    return data


def write_sidecar(output: str, input_path: str, command: list[str], backup: dict[str, Any] | None = None) -> None:
    """Write the sidecar atomically (a new file renamed over the old), before the output exists."""
    data = {
        "gearshift_results": SIDECAR_VERSION,
        "note": "written by `gearshift run`: marks the file beside it as its results file",
        "command": command,
        "input": "-" if input_path == "-" else os.path.abspath(input_path),
        "fingerprint": fingerprint(input_path),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if backup is not None:
        data["backup"] = backup
    path = sidecar_path(output)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=1)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    sync_dir(path)


def sync_dir(path: str) -> None:
    """fsync the folder holding ``path``, so a rename in it survives a power cut."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _is_our_backup(path: str, sidecar: dict[str, Any] | None) -> bool:
    recorded = (sidecar or {}).get("backup")
    if not isinstance(recorded, dict) or recorded.get("path") != os.path.basename(path):
        return False
    try:
        return _identity(path) == recorded
    except OSError:
        return False


def same_file(a: str, b: str) -> bool:
    """Whether two paths are one file (symbolic and hard links included)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def backup_path(output: str, input_path: str, sidecar: dict[str, Any] | None) -> str:
    """Where the old file goes: ``out.jsonl.bak``, unless that is someone else's file (then ``.bak.1``...)."""
    for n in range(1000):
        candidate = f"{output}.bak" if n == 0 else f"{output}.bak.{n}"
        if input_path != "-" and same_file(candidate, input_path):
            continue
        if not os.path.lexists(candidate) or _is_our_backup(candidate, sidecar):
            return candidate
    raise Refused(f"{output}.bak, .bak.1 ... .bak.999 all exist; clear some away")


Mode = Literal["fresh", "resume", "overwrite"]


@dataclass
class Plan:
    """What the run does with its output, decided before anything is written."""

    output: str
    mode: Mode
    sidecar: bool  # write (or keep) a sidecar: a regular file, not stdout or a device
    notes: list[str]
    backup: str | None = None


def _describe(output: str) -> str:
    return f"{output} was not written by gearshift (it has no {os.path.basename(sidecar_path(output))} beside it)"


def plan_output(
    output: str, input_path: str, *, resume: bool, overwrite: bool, force: bool
) -> Plan:
    """Decide what may be done to ``output``; raise Refused (one line) when the run would harm a file."""
    if output == "-":
        return Plan(output, "fresh", sidecar=False, notes=[])
    if input_path != "-" and same_file(output, input_path):
        raise Refused(f"--output {output} is the input file {input_path} (the same file, maybe through a link); "
                      "write the results to another file")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise Refused(f"the folder of --output {output} does not exist ({folder})")
    try:
        st = os.stat(output)
    except FileNotFoundError:
        if os.path.islink(output):
            raise Refused(f"--output {output} is a link to a missing file; give the file itself") from None
        return Plan(output, "resume" if resume else "fresh", sidecar=True, notes=[])
    if not stat.S_ISREG(st.st_mode):  # /dev/null, a FIFO: written to, never resumed or replaced
        if resume:
            raise Refused(f"--resume needs a regular --output file; {output} is not one")
        return Plan(output, "fresh", sidecar=False, notes=[])
    sidecar = read_sidecar(output)
    ours = sidecar is not None
    if resume:
        if not ours:
            if st.st_size == 0:
                return Plan(output, "resume", sidecar=True, notes=[])
            raise Refused(f"{_describe(output)}; --resume continues only gearshift's own results files: "
                          "give another --output")
        return Plan(output, "resume", sidecar=True, notes=[])
    if st.st_size == 0 and not overwrite:
        return Plan(output, "fresh", sidecar=True, notes=[])
    if not overwrite:
        if ours:
            raise Refused(f"{output} already holds results; add --resume to continue that run, "
                          f"or --overwrite to start afresh (the old file is kept as {output}.bak)")
        raise Refused(f"{_describe(output)}; give another --output, or --overwrite --force to replace it "
                      f"(it is kept as {output}.bak)")
    if not ours and not force:
        raise Refused(f"{_describe(output)}; --overwrite replaces only gearshift's own results files: "
                      f"add --force to replace it anyway (it is kept as {output}.bak)")
    backup = backup_path(output, input_path, sidecar)
    return Plan(output, "overwrite", sidecar=True, notes=[], backup=backup)


def check_same_input(output: str, input_path: str, *, force: bool) -> str | None:
    """On --resume: refuse (Refused) when the input is not the one the results were made from.

    Returns a warning to print when the check was overridden (--force) or could not be made.
    """
    sidecar = read_sidecar(output)
    if sidecar is None:
        return None
    then = sidecar.get("fingerprint")
    before = sidecar.get("input", "?")
    if input_path == "-":
        if then is None:
            return None  # stdin then and now: there is nothing to compare
        reason = f"these results were made from {before}, and stdin cannot be checked against it"
    else:
        now = fingerprint(input_path)
        if then == now:
            return None
        if then is None:
            reason = "these results were made from stdin, which cannot be checked against this file"
        else:
            reason = _difference(before, then, now)
    if not force:
        raise Refused(f"--resume: {reason}; records are matched by input position, so resuming over another "
                      "input would mix results up (--force resumes anyway)")
    return f"--resume --force: {reason}; resuming anyway"


def _difference(before: str, then: Fingerprint, now: Fingerprint | None) -> str:
    if now is None:
        return f"the input is not the one these results were made from ({before})"
    if then.get("size") != now["size"]:
        return f"the input changed since these results were made from {before} " \
               f"(size {then.get('size')} -> {now['size']} bytes)"
    return f"the input changed since these results were made from {before} (same size, different contents)"


def start_output(plan: Plan, input_path: str, command: list[str]) -> None:
    """Move an overwritten file to its backup and write the sidecar, before the output is opened.

    On a resume the sidecar is rewritten only when the input changed (after ``--force``), so
    that it describes the input now used; its record of our backup is kept.
    """
    if not plan.sidecar:
        return
    old = read_sidecar(plan.output)
    if plan.mode == "overwrite" and plan.backup is not None:
        os.replace(plan.output, plan.backup)
        sync_dir(plan.output)
        plan.notes.append(f"the old {plan.output} is kept as {plan.backup}")
        write_sidecar(plan.output, input_path, command, backup=_identity(plan.backup))
        return
    if plan.mode == "resume" and old is not None:
        if old.get("fingerprint") == fingerprint(input_path):
            return
        write_sidecar(plan.output, input_path, command, backup=old.get("backup"))
        return
    write_sidecar(plan.output, input_path, command)


def keep_backup(output: str, input_path: str) -> str:
    """Keep the results file as it is now in its backup (a hard link, else a copy) before a rewrite."""
    import shutil

    backup = backup_path(output, input_path, read_sidecar(output))
    if os.path.lexists(backup):
        os.remove(backup)
    try:
        os.link(output, backup)
    except OSError:
        shutil.copy2(output, backup)
    old = read_sidecar(output) or {}
    recorded = old.get("command")
    command = [str(a) for a in recorded] if isinstance(recorded, list) else command_line()
    write_sidecar(output, input_path, command, backup=_identity(backup))
    return backup


def command_line() -> list[str]:
    """The command as typed, for the sidecar (what made this file)."""
    return ["gearshift", *sys.argv[1:]]
