"""``gearshift run``: inputs as people have them, odd values, and exit codes that tell the truth (issue 19).

Each through a real subprocess: a CSV with a byte-order mark and CRLF, sniffed dialects,
gzip'd inputs (files and stdin), stdin streamed record by record; a result JSON cannot
hold, lone surrogates and control characters never stop a run; a task's SystemExit fails
its input in every gear; exit 0 only when every input has a success record.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_funcs import cli_env, read_records, wait_for_lines

GS = [sys.executable, "-m", "gearshift"]


def gs(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*GS, *args], input=stdin, capture_output=True, timeout=120, env=cli_env())


def records_of(done: subprocess.CompletedProcess[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in done.stdout.splitlines()]


# -- inputs as people have them ------------------------------------------------------------------

SPREADSHEET_CSV = b'\xef\xbb\xbfname,greeting\r\nAda,hi\r\n"Grace, Admiral",hello\r\n'


@pytest.mark.parametrize("dialect", ["comma", "semicolon", "tab"])
def test_csv_with_a_byte_order_mark_and_crlf_in_any_common_dialect(tmp_path: Path, dialect: str) -> None:
    sep = {"comma": b",", "semicolon": b";", "tab": b"\t"}[dialect]
    inp = tmp_path / "people.csv"
    inp.write_bytes(SPREADSHEET_CSV.replace(b",", sep).replace(b"Grace" + sep + b" Admiral", b"Grace, Admiral"))
    done = gs("run", "cli_funcs:greet", "-i", str(inp), "--ordered")
    assert done.returncode == 0, done.stderr.decode()
    records = records_of(done)
    assert [r["result"] for r in records] == ["hi, Ada!", "hello, Grace, Admiral!"]
    assert records[0]["input"] == {"name": "Ada", "greeting": "hi"}
    assert [r["line"] for r in records] == [2, 3]


def test_text_and_jsonl_with_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    txt, jsonl = tmp_path / "in.txt", tmp_path / "in.jsonl"
    txt.write_bytes(b"\xef\xbb\xbfalpha\r\nbeta\r\n")
    jsonl.write_bytes(b'\xef\xbb\xbf{"a": 1, "b": 2}\r\n{"a": 3, "b": 4}\r\n')
    text = gs("run", "cli_funcs:shout", "-i", str(txt), "--ordered")
    assert text.returncode == 0, text.stderr.decode()
    assert [r["result"] for r in records_of(text)] == ["ALPHA", "BETA"]
    objs = gs("run", "cli_funcs:add", "-i", str(jsonl), "--kwargs", "--ordered")
    assert objs.returncode == 0, objs.stderr.decode()
    assert [r["result"] for r in records_of(objs)] == [3, 7]


@pytest.mark.parametrize(
    ("name", "content", "fn", "expect"),
    [
        ("in.jsonl.gz", b"1\n2\n3\n", "cli_funcs:square", [1, 4, 9]),
        ("people.csv.gz", SPREADSHEET_CSV, "cli_funcs:greet", ["hi, Ada!", "hello, Grace, Admiral!"]),
        ("words.txt.gz", b"a\nb\n", "cli_funcs:shout", ["A", "B"]),
    ],
)
def test_gzip_inputs(tmp_path: Path, name: str, content: bytes, fn: str, expect: list[Any]) -> None:
    inp, out = tmp_path / name, tmp_path / "out.jsonl"
    inp.write_bytes(gzip.compress(content))
    done = gs("run", fn, "-i", str(inp), "-o", str(out), "--ordered")
    assert done.returncode == 0, done.stderr.decode()
    assert [r["result"] for r in read_records(str(out))] == expect
    again = gs("run", fn, "-i", str(inp), "-o", str(out), "--resume")  # the fingerprint is of the file as it is
    assert again.returncode == 0 and b"0 inputs in" in again.stderr


def test_gzip_on_stdin(tmp_path: Path) -> None:
    done = gs("run", "cli_funcs:square", "-i", "-", "--ordered", stdin=gzip.compress(b"5\n6\n"))
    assert done.returncode == 0, done.stderr.decode()
    assert [r["result"] for r in records_of(done)] == [25, 36]


def test_stdin_delivers_records_as_they_finish_for_a_fast_function(tmp_path: Path) -> None:
    """A fast function from a pipe that stays open: records come out before the input ends."""
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([*GS, "run", "cli_funcs:square", "-i", "-", "-o", str(out)], env=cli_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"1\n2\n3\n")
        proc.stdin.flush()
        wait_for_lines(str(out), 3, proc, timeout=60)  # the pipe is still open
        proc.stdin.write(b"4\n")
        proc.stdin.flush()
        wait_for_lines(str(out), 4, proc, timeout=60)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(r["result"] for r in read_records(str(out))) == [1, 4, 9, 16]


# -- one odd value never stops a run ---------------------------------------------------------


def test_a_result_json_cannot_hold_is_recorded_as_its_repr_with_a_note(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(f"{i}\n" for i in range(50)))
    done = gs("run", "cli_funcs:tuple_keys", "-i", str(inp), "-o", str(out), "--gear", "process", "-w", "2")
    assert done.returncode == 0, done.stderr.decode()
    records = read_records(str(out))
    assert sorted(r["index"] for r in records) == list(range(50))
    first = next(r for r in records if r["index"] == 7)
    assert first["result"] == "{(7, 'k'): 7}"
    assert "recorded as its repr" in first["note"] and "tuple" in first["note"]
    broken = gs("run", "cli_funcs:unshowable", "-i", str(inp), "--gear", "thread")
    assert broken.returncode == 0, broken.stderr.decode()
    assert all("repr() raised RuntimeError" in r["result"] for r in records_of(broken))


def test_lone_surrogates_and_control_characters_are_escaped_never_fatal(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b'"\\ud800"\n"bell\\u0007 escape\\u001b[31m red"\n"plain \xc3\xa9"\n')
    done = gs("run", "cli_funcs:identity", "-i", str(inp), "-o", str(out), "--ordered")
    assert done.returncode == 0, done.stderr.decode()
    raw = out.read_bytes()
    raw.decode("utf-8")  # valid UTF-8 throughout
    assert b"\x1b" not in raw and b"\x07" not in raw
    assert [r["result"] for r in read_records(str(out))] == ["\ud800", "bell\x07 escape\x1b[31m red", "plain é"]


def test_odd_failure_messages_reach_the_terminal_escaped(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'"\\ud800\\u001b[2J"\n')
    done = gs("run", "cli_funcs:reject", "-i", str(inp), "--errors", "raise")
    assert done.returncode == 1
    assert b"\x1b[2J" not in done.stderr
    assert b"\\x1b[2J" in done.stderr and b"\\ud800" in done.stderr


# -- exit codes tell the truth ---------------------------------------------------------------


@pytest.mark.parametrize(("gear", "fn"), [("serial", "exit_on_twos"), ("thread", "exit_on_twos"),
                                          ("process", "exit_on_twos"), ("async", "aexit_on_twos")])
def test_a_tasks_system_exit_fails_its_input_in_every_gear(tmp_path: Path, gear: str, fn: str) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("1\n2\n3\n4\n")
    done = gs("run", f"cli_funcs:{fn}", "-i", str(inp), "-o", str(out), "--gear", gear, "-w", "2")
    assert done.returncode == 1, done.stderr.decode()
    records = {r["index"]: r for r in read_records(str(out))}
    assert sorted(records) == [0, 1, 2, 3]
    assert records[1]["error"]["type"] == "TaskExit" and "sys.exit(0)" in records[1]["error"]["message"]
    assert records[2]["result"] == 3
    assert b"--retry-failed" in done.stderr


def test_exit_codes(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(f"{i}\n" for i in range(1, 15)))
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out)).returncode == 0
    failing = tmp_path / "f.jsonl"
    collect = gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "-o", str(failing))
    assert collect.returncode == 1 and b"2 of 14 inputs have a failure record" in collect.stderr
    resumed = gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "-o", str(failing), "--resume")
    assert resumed.returncode == 1  # nothing ran, but two inputs still have only a failure record
    skipped = gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "-o", str(tmp_path / "s.jsonl"),
                 "--errors", "skip")
    assert skipped.returncode == 1 and b"2 of 14 inputs have no record" in skipped.stderr
    assert b"to finish the run: " in skipped.stderr
