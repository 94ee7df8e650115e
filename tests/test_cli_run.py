"""``gearshift run`` end to end, through a real subprocess: durability, resume, bad input."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cli_funcs import cli_env, read_records, wait_for_lines

GS = [sys.executable, "-m", "gearshift"]


def gs(*args: str, cwd: Path | None = None, stdin: str | None = None, env: dict[str, str] | None = None,
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GS, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120, env=env or cli_env(),
    )


def numbers(path: Path, n: int) -> Path:
    path.write_text("".join(f"{i}\n" for i in range(n)))
    return path


def assert_exactly_once(out: Path, n: int, expect: object = None) -> list[dict[str, object]]:
    records = read_records(str(out))
    indexes = [r["index"] for r in records]
    assert len(indexes) == len(set(indexes)), "duplicate records"
    assert sorted(indexes) == list(range(n))
    for r in records:
        assert "error" not in r, r
        value = r["result"][0] if isinstance(r["result"], list) else r["result"]
        assert value == r["index"] ** 2
    return records


def pids_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    """Those of ``pids`` still alive after ``timeout`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    alive.discard(pid)
            except psutil.NoSuchProcess:
                alive.discard(pid)
        time.sleep(0.05)
    return alive


def test_sigkill_mid_run_then_resume_gives_each_result_exactly_once(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 5000), tmp_path / "out.jsonl"
    args = ["run", "cli_funcs:square_with_pid", "-i", str(inp), "-o", str(out), "--gear", "process", "-w", "2"]
    proc = subprocess.Popen([*GS, *args], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_lines(str(out), 300, proc)
        workers = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert workers, "the process gear should have had worker processes"
    assert not pids_gone(workers), "worker processes outlived their killed run"
    before = out.read_bytes().split(b"\n")[:-1]
    assert 300 <= len(before) < 5000
    done = gs(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert_exactly_once(out, 5000)


def test_torn_last_line_is_cut_before_resuming(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 50), tmp_path / "out.jsonl"
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--ordered").returncode == 0
    good = out.read_bytes().split(b"\n")[:10]  # gearshift's own file (its sidecar stays), as a kill leaves it
    out.write_bytes(b"\n".join(good) + b'\n{"index": 10, "line": 11, "inp')
    done = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    assert "torn last line" in done.stderr
    assert "10 inputs already" in done.stderr
    assert_exactly_once(out, 50)


def test_resume_of_a_finished_run_runs_nothing(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 20), tmp_path / "out.jsonl"
    assert gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out)).returncode == 0
    again = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    assert "0 inputs in" in again.stderr
    assert_exactly_once(out, 20)


def test_existing_output_needs_resume_or_overwrite(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 5), tmp_path / "out.jsonl"
    assert gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "-o", str(out)).returncode == 1  # 0 % 7 fails
    refused = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out))
    assert refused.returncode == 2
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    fresh = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--overwrite")
    assert fresh.returncode == 0, fresh.stderr
    assert_exactly_once(out, 5)


@pytest.mark.parametrize(
    ("signum", "code", "word", "gear"),
    [
        (signal.SIGINT, 130, "interrupted", "thread"),
        (signal.SIGINT, 130, "interrupted", "process"),
        (signal.SIGTERM, 143, "terminated", "process"),
    ],
)
def test_signal_exits_130_or_143_with_a_resume_command_that_finishes_exactly_once(
    tmp_path: Path, signum: int, code: int, word: str, gear: str
) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 5000), tmp_path / "out.jsonl"
    args = ["run", "cli_funcs:square_with_pid", "-i", str(inp), "-o", str(out), "--gear", gear, "-w", "3"]
    proc = subprocess.Popen([*GS, *args], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(str(out), 200, proc)
        workers = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert word in err
    assert not pids_gone(workers), "worker processes outlived their run"
    command = next(line for line in err.splitlines() if line.startswith("to finish the run: "))
    argv = shlex.split(command.removeprefix("to finish the run: "))
    assert argv[-1] == "--resume"
    assert len(read_records(str(out))) < 5000
    done = subprocess.run(argv, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(out, 5000)


def test_malformed_lines_are_named_and_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('1\n2\n{"oops\n\n4\n[1, 2\n6\n')
    done = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--ordered")
    assert done.returncode == 1, done.stderr  # some inputs have a failure record
    assert f"{inp}:3: malformed JSON" in done.stderr
    assert f"{inp}:6: malformed JSON" in done.stderr
    records = read_records(str(out))
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4, 5]  # the blank line takes no index
    assert [r["line"] for r in records] == [1, 2, 3, 5, 6, 7]
    bad = [r for r in records if "error" in r]
    assert [(r["line"], r["error"]["type"]) for r in bad] == [(3, "MalformedInput"), (6, "MalformedInput")]
    assert bad[0]["input"] == '{"oops'
    assert [r["result"] for r in records if "result" in r] == [1, 4, 16, 36]
    assert "4 succeeded, 2 failed (MalformedInput x2)" in done.stderr


def test_errors_raise_stops_at_the_first_failure_with_exit_1(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("1\n2\nnot json\n" + "".join(f"{i}\n" for i in range(4, 2000)))
    done = gs("run", "cli_funcs:square", "-i", str(inp), "-o", str(out), "--errors", "raise", "--ordered",
              "--gear", "serial")
    assert done.returncode == 1
    assert "stopped at the first failure" in done.stderr and f"{inp}:3" in done.stderr
    records = read_records(str(out))
    assert records[-1]["error"]["type"] == "MalformedInput"
    assert len(records) == 3
    assert "--resume" in done.stderr


def test_errors_skip_leaves_failures_unrecorded_for_a_resume(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 30), tmp_path / "out.jsonl"
    done = gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "-o", str(out), "--errors", "skip")
    assert done.returncode == 1, done.stderr  # 5 inputs have no record
    assert "5 of 30 inputs have no record" in done.stderr and "--resume" in done.stderr
    assert "5 failed (ValueError x5)" in done.stderr
    assert sorted(r["index"] for r in read_records(str(out))) == [i for i in range(30) if i % 7]
    again = gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "-o", str(out), "--resume")
    assert "5 inputs in" in again.stderr  # only the failed ones ran again
    errors = [r for r in read_records(str(out)) if "error" in r]
    assert sorted(r["index"] for r in errors) == [0, 7, 14, 21, 28]
    assert "multiple of 7" in errors[0]["error"]["message"]
    assert 'raise ValueError' in errors[0]["error"]["traceback"]
    assert "gearshift" not in errors[0]["error"]["traceback"]  # only the user's frames


def test_resume_with_retry_failed_runs_the_failures_again(tmp_path: Path) -> None:
    inp, out = numbers(tmp_path / "in.jsonl", 30), tmp_path / "out.jsonl"
    assert gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "-o", str(out)).returncode == 1  # failures
    assert sum("error" in r for r in read_records(str(out))) == 5
    (tmp_path / "fixed.py").write_text("def f(x):\n    return x\n")  # the bug, fixed
    again = gs("run", "fixed:f", "-i", str(inp), "-o", str(out), "--resume", "--retry-failed", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "dropped 5 failure records" in again.stderr and "5 inputs in" in again.stderr
    records = read_records(str(out))
    assert sorted(r["index"] for r in records) == list(range(30))
    assert all(r["result"] == r["index"] for r in records)
    assert not list(tmp_path.glob("*.gearshift-tmp"))
    kept = read_records(f"{out}.bak")  # the dropped failure records are not lost
    assert sorted(r["index"] for r in kept if "error" in r) == [0, 7, 14, 21, 28]


@pytest.mark.parametrize(
    ("target", "expect"),
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("cli_funcs:nope", "module 'cli_funcs'"),
        ("cli_funcs:NOT_CALLABLE", "is a int, not something callable"),
        ("cli_funcs", "expected MODULE:FUNC"),
        ("broken_mod:f", "cannot import module 'broken_mod'"),
    ],
)
def test_bad_module_func_is_a_one_line_error_and_exit_2(tmp_path: Path, target: str, expect: str) -> None:
    (tmp_path / "broken_mod.py").write_text("def f(:\n")
    inp = numbers(tmp_path / "in.jsonl", 3)
    done = gs("run", target, "-i", str(inp), cwd=tmp_path)
    assert done.returncode == 2
    assert expect in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert gs("run", "cli_funcs:square", "-i", str(tmp_path / "missing.jsonl")).returncode == 2
    inp = numbers(tmp_path / "in.dat", 3)
    unknown = gs("run", "cli_funcs:square", "-i", str(inp))
    assert unknown.returncode == 2 and "--format" in unknown.stderr
    assert gs("run", "cli_funcs:square", "-i", str(inp), "--format", "jsonl", "--gear", "warp").returncode == 2


def test_stdin_and_stdout(tmp_path: Path) -> None:
    done = gs("run", "cli_funcs:square", "-i", "-", "-o", "-", "--ordered", stdin="3\n4\n5\n")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["index"], r["input"], r["result"]) for r in records] == [(0, 3, 9), (1, 4, 16), (2, 5, 25)]
    assert "3 succeeded" in done.stderr


def test_csv_rows_are_keyword_arguments(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text('a,b\n1,2\n"x, y",z\nonly-one\n3,4\n')
    done = gs("run", "cli_funcs:add", "-i", str(inp), "--ordered")
    assert done.returncode == 1, done.stderr  # some inputs have a failure record
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r.get("result") for r in records] == ["12", "x, yz", None, "34"]
    assert records[2]["error"]["type"] == "MalformedInput" and records[2]["line"] == 4
    assert f"{inp}:4: expected 2 fields" in done.stderr
    assert records[0]["input"] == {"a": "1", "b": "2"}


def test_text_lines(tmp_path: Path) -> None:
    inp = tmp_path / "in.txt"
    inp.write_text("alpha\nbeta\n\ngamma\n")
    done = gs("run", "cli_funcs:shout", "-i", str(inp), "--ordered", "--no-echo-input")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["line"], r["result"]) for r in records] == [(1, "ALPHA"), (2, "BETA"), (4, "GAMMA")]
    assert all("input" not in r for r in records)


def test_jsonl_objects_as_kwargs(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"a": 1, "b": 2}\n[1, 2]\n{"a": "x", "b": "y"}\n')
    done = gs("run", "cli_funcs:add", "-i", str(inp), "--kwargs", "--ordered")
    assert done.returncode == 1, done.stderr  # some inputs have a failure record
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r.get("result") for r in records] == [3, None, "xy"]
    assert "needs a JSON object" in records[1]["error"]["message"]


def test_module_in_the_current_directory_runs_in_worker_processes(tmp_path: Path) -> None:
    (tmp_path / "localjob.py").write_text("import os\n\ndef triple(x):\n    return [3 * x, os.getpid()]\n")
    numbers(tmp_path / "in.jsonl", 40)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = gs("run", "localjob:triple", "-i", "in.jsonl", "--gear", "process", "-w", "2", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(r["result"][0] for r in records) == [3 * i for i in range(40)]
    assert len({r["result"][1] for r in records}) >= 1


def test_async_function_in_the_async_gear(tmp_path: Path) -> None:
    inp = numbers(tmp_path / "in.jsonl", 100)
    done = gs("run", "cli_funcs:asquare", "-i", str(inp), "--gear", "async", "-w", "20")
    assert done.returncode == 0, done.stderr
    results = sorted(json.loads(line)["result"] for line in done.stdout.splitlines())
    assert results == [i * i for i in range(100)]
    assert "async gear" in done.stderr


def test_timeout_kills_the_item_and_is_recorded(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("1\n-1\n2\n")
    done = gs("run", "cli_funcs:hang_if_negative", "-i", str(inp), "--gear", "process", "-w", "2",
              "--timeout", "1", "--ordered")
    assert done.returncode == 1, done.stderr  # some inputs have a failure record
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r.get("result") for r in records] == [1, None, 2]
    assert records[1]["error"]["type"] == "TaskTimeout"
    assert "TaskTimeout x1" in done.stderr


def test_retries_are_recorded(tmp_path: Path) -> None:
    inp = numbers(tmp_path / "in.jsonl", 10)
    done = gs("run", "cli_funcs:fail_on_sevens", "-i", str(inp), "--retries", "2", "--ordered")
    assert done.returncode == 1, done.stderr  # some inputs have a failure record
    records = [json.loads(line) for line in done.stdout.splitlines()]
    failed = [r for r in records if "error" in r]
    assert [(r["index"], r["attempts"]) for r in failed] == [(0, 3), (7, 3)]


def test_closed_stdout_stops_the_run_quietly(tmp_path: Path) -> None:
    inp = numbers(tmp_path / "in.jsonl", 100_000)
    proc = subprocess.Popen([*GS, "run", "cli_funcs:square", "-i", str(inp)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["index"] >= 0
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 1
    assert "output was closed" in err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_input_is_streamed_not_read_whole(tmp_path: Path) -> None:
    """Records appear while stdin is still open: the run does not wait for the whole input."""
    out = tmp_path / "out.jsonl"
    # A 2 ms function keeps batches at one item: a fast one would wait for a batch of lines to arrive.
    args = ["run", "cli_funcs:square_slowly", "-i", "-", "-o", str(out), "--gear", "thread", "-w", "1"]
    quiet = subprocess.DEVNULL
    proc = subprocess.Popen([*GS, *args], env=cli_env(), stdin=subprocess.PIPE, stdout=quiet, stderr=quiet)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"".join(b"%d\n" % i for i in range(20)))
        proc.stdin.flush()
        wait_for_lines(str(out), 10, proc, timeout=30)  # stdin is still open
        proc.stdin.write(b"20\n21\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(r["index"] for r in read_records(str(out))) == list(range(22))


def test_then_runs_a_pipeline_and_a_killed_one_resumes_exactly_once(tmp_path: Path) -> None:
    """--then: square (processes) -> isqrt_or_fail (threads); failures of the later stage are recorded
    with their input's index; a SIGKILL mid-run then --resume leaves each input's record exactly once."""
    n = 3000
    inp, out = numbers(tmp_path / "in.jsonl", n), tmp_path / "out.jsonl"
    args = ["run", "cli_funcs:square_slowly", "-i", str(inp), "-o", str(out), "--gear", "process", "-w", "2",
            "--then", "cli_funcs:isqrt_or_fail@thread", "--then", "cli_funcs:aidentity@async"]
    proc = subprocess.Popen([*GS, *args], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_lines(str(out), 200, proc)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = gs(*args, "--resume")
    assert done.returncode == 1, done.stderr  # the multiples of 7 failed
    assert "resuming" in done.stderr and "isqrt_or_fail" in done.stderr  # the report names the stages
    records = read_records(str(out))
    indexes = [r["index"] for r in records]
    assert len(indexes) == len(set(indexes)) and sorted(indexes) == list(range(n))
    for r in records:
        if r["index"] % 7 == 0:
            assert r["error"]["type"] == "ValueError" and "multiple of 7" in r["error"]["message"], r
        else:
            assert r["result"] == r["index"], r
