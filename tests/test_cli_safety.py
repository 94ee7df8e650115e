"""``gearshift run`` never harms the user's files (issue 19), through real subprocesses.

The output is never the input (also through links); a file gearshift did not write is
left byte-for-byte intact unless --overwrite --force (and then kept as .bak); only a torn
last line is ever cut; --resume refuses a changed input; kill -9 at random moments then
--resume ends with each input's record exactly once and no torn line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_funcs import cli_env, count_lines, read_records, wait_for_lines

GS = [sys.executable, "-m", "gearshift"]


def gs(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GS, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env or cli_env())


def numbers(path: Path, n: int) -> Path:
    path.write_text("".join(f"{i}\n" for i in range(n)))
    return path


def one_line_refusal(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def sidecar(out: Path) -> Path:
    return out.parent / f".{out.name}.gearshift"


# -- the output is never the input ------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
@pytest.mark.parametrize("mode", [[], ["--resume"], ["--overwrite"], ["--overwrite", "--force"]])
def test_output_that_is_the_input_is_refused_and_the_input_untouched(
    tmp_path: Path, how: str, mode: list[str]
) -> None:
    inp = numbers(tmp_path / "data.jsonl", 20)
    original = inp.read_bytes()
    out = inp
    if how == "symlink":
        out = tmp_path / "link.jsonl"
        out.symlink_to(inp.name)
    elif how == "hard link":
        out = tmp_path / "hard.jsonl"
        os.link(inp, out)
    done = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), *mode)
    one_line_refusal(done, "is the input file")
    assert inp.read_bytes() == original
    assert not sidecar(out).exists() and not Path(f"{out}.bak").exists()


# -- a file gearshift did not write ---------------------------------------------------------


FOREIGN = b'{"index": 0, "note": "my own notes"}\nline two, no JSON\n{"index": 1}\nlast line without newline'


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ([], ["was not written by gearshift", "--overwrite --force"]),
        (["--resume"], ["was not written by gearshift", "--resume continues only"]),
        (["--overwrite"], ["was not written by gearshift", "--force"]),
        (["--resume", "--force"], ["was not written by gearshift"]),
    ],
)
def test_a_foreign_output_file_is_left_byte_for_byte_intact(tmp_path: Path, mode: list[str], words: list[str]) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 10), tmp_path / "notes.jsonl"
    out.write_bytes(FOREIGN)
    done = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), *mode)
    one_line_refusal(done, *words)
    assert out.read_bytes() == FOREIGN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "notes.jsonl"]


def test_overwrite_force_replaces_a_foreign_file_and_keeps_it_as_bak(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 10), tmp_path / "notes.jsonl"
    out.write_bytes(FOREIGN)
    done = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--overwrite", "--force")
    assert done.returncode == 0, done.stderr
    assert f"kept as {out}.bak" in done.stderr
    assert Path(f"{out}.bak").read_bytes() == FOREIGN
    assert sorted(r["index"] for r in read_records(str(out))) == list(range(10))
    assert json.loads(sidecar(out).read_text())["gearshift_results"] == 1


def test_overwrite_keeps_our_old_results_as_bak_and_never_replaces_a_foreign_bak(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 5), tmp_path / "out.jsonl"
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--ordered").returncode == 0
    first = out.read_bytes()
    assert gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "-o", str(out), "--overwrite").returncode == 1
    assert Path(f"{out}.bak").read_bytes() == first
    second = out.read_bytes()
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--overwrite").returncode == 0
    assert Path(f"{out}.bak").read_bytes() == second  # our own .bak is replaced by the newer one
    Path(f"{out}.bak").write_bytes(b"the user's own backup\n")  # now it is someone else's
    third = out.read_bytes()
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--overwrite").returncode == 0
    assert Path(f"{out}.bak").read_bytes() == b"the user's own backup\n"
    assert Path(f"{out}.bak.1").read_bytes() == third


def test_an_empty_file_and_a_device_are_fine_outputs(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 5), tmp_path / "out.jsonl"
    out.touch()  # mktemp, touch: nothing to harm
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out)).returncode == 0
    assert len(read_records(str(out))) == 5
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", os.devnull).returncode == 0
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(inp), "-o", os.devnull, "--resume"), "regular")


def test_resume_never_cuts_a_complete_line(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 20), tmp_path / "out.jsonl"
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--ordered").returncode == 0
    lines = out.read_bytes().splitlines(keepends=True)
    edited = b"".join(lines[:5]) + b"a note the user typed in\n" + lines[5].rstrip(b"\n")  # no newline at the end
    out.write_bytes(edited)
    done = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    assert f"{out}:6: not a record, left as it is" in done.stderr
    data = out.read_bytes()
    assert data.startswith(edited + b"\n")  # the whole record kept, given its newline
    records = [json.loads(line) for line in data.splitlines() if line.startswith(b"{")]
    assert sorted(r["index"] for r in records) == list(range(20))


# -- usage errors: one line, --debug for the traceback -----------------------------------------


def test_missing_folders_and_unreadable_inputs_are_one_line(tmp_path: Path) -> None:
    inp = numbers(tmp_path / "in.jsonl", 3)
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(tmp_path / "nodir" / "out.jsonl")),
                     "folder of --output", "does not exist")
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(tmp_path / "nodir" / "in.jsonl")), "does not exist")
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(tmp_path)), "directory")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(tmp_path / "broken.jsonl.gz")), "cannot read")
    one_line_refusal(gs("run", "cli_funcs:square"), "Missing option")
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(inp), "--force"), "--force goes with")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission_is_one_line(tmp_path: Path) -> None:
    inp = numbers(tmp_path / "in.jsonl", 3)
    inp.chmod(0)
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(inp)), "permission")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    inp = numbers(tmp_path / "in.jsonl", 3)
    plain = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(tmp_path / "nodir" / "o.jsonl"))
    debug = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(tmp_path / "nodir" / "o.jsonl"), "--debug")
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr and "Refused" in debug.stderr
    target = gs("--debug", "run", "nowhere_xyz:f", "-i", str(inp))
    assert target.returncode == 2 and "Traceback" in target.stderr


# -- --resume over the same input only -------------------------------------------------------


def test_resume_refuses_a_changed_input_unless_forced(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 30), tmp_path / "out.jsonl"
    first = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--errors", "raise")
    assert first.returncode == 0, first.stderr
    results = out.read_bytes()
    inp.write_text("".join(f"{i}\n" for i in reversed(range(30))))  # same size, other order
    refused = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume")
    one_line_refusal(refused, "the input changed", "same size", "--force")
    numbers(inp, 31)  # one more line
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume"), "size")
    assert out.read_bytes() == results
    forced = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "resuming anyway" in forced.stderr and "1 inputs in" in forced.stderr
    again = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume")  # the sidecar moved on
    assert again.returncode == 0, again.stderr
    assert sorted(r["index"] for r in read_records(str(out))) == list(range(31))


def test_resume_of_a_stdin_run_from_a_file_needs_force(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 10), tmp_path / "out.jsonl"
    piped = subprocess.run([*GS, "run", "cli_funcs:square", "-i", "-", "-o", str(out)], input=inp.read_text(),
                           capture_output=True, text=True, timeout=120, env=cli_env())
    assert piped.returncode == 0, piped.stderr
    assert json.loads(sidecar(out).read_text())["fingerprint"] is None
    one_line_refusal(gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume"), "stdin")


# -- kill -9 at random moments, then --resume -------------------------------------------------


def test_kill_9_at_random_moments_then_resume_gives_each_record_exactly_once(tmp_path: Path) -> None:
    n = 2000
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    inp, out = numbers(tmp_path / "in.jsonl", n), tmp_path / "out.jsonl"
    gears = ["thread", "serial", "process", "thread", "async", "thread", "serial", "thread", "process", "thread"]
    kills = 0
    for gear in gears:
        have = count_lines(str(out))
        if have >= n:
            break
        fn = "cli_funcs:asquare_slowly" if gear == "async" else "cli_funcs:square_slowly"
        args = ["run", fn, "-i", str(inp), "-o", str(out), "--gear", gear, "-w", "3", "--resume"]
        proc = subprocess.Popen([*GS, *args], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            target = have + rng.randrange(0, max(1, (n - have) // 3))  # 0: killed while starting up
            if target > have:
                wait_for_lines(str(out), target, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kills += 1
        records = read_records_tolerating_a_torn_tail(out)
        indexes = [r["index"] for r in records]
        assert len(indexes) == len(set(indexes)), f"duplicates after kill {kills} (seed {seed})"
    assert kills >= 8, f"seed {seed}"
    done = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume")
    assert done.returncode == 0, f"seed {seed}: {done.stderr}"
    data = out.read_bytes()
    assert data.endswith(b"\n"), f"seed {seed}"
    records = [json.loads(line) for line in data.splitlines()]  # every line whole: no torn line anywhere
    assert sorted(r["index"] for r in records) == list(range(n)), f"seed {seed}"
    assert all(r["result"] == r["index"] ** 2 for r in records)


def read_records_tolerating_a_torn_tail(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    whole, tail = lines[:-1], lines[-1]
    assert all(line.startswith(b"{") and line.endswith(b"}") for line in whole), "a torn line in the middle"
    records = [json.loads(line) for line in whole]
    try:
        record = json.loads(tail) if tail else None
    except ValueError:
        record = None  # a record cut short by the kill: --resume cuts it
    return [*records, record] if isinstance(record, dict) else records
