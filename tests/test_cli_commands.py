"""``gearshift`` advise, bench, demo, info and --help, end to end through a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_funcs import cli_env

GS = [sys.executable, "-m", "gearshift"]


def gs_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GS, *args], capture_output=True, text=True, timeout=120, env=env or cli_env())


@pytest.mark.parametrize("command", [[], ["run"], ["advise"], ["bench"], ["demo"], ["lab"], ["info"]])
def test_help_on_everything(command: list[str]) -> None:
    done = gs_cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: gearshift" in done.stdout
    assert "Exit codes" in done.stdout


def test_no_colours_when_not_a_terminal(tmp_path: Path) -> None:
    done = gs_cli("run", "cli_funcs:nope", "-i", str(tmp_path / "x.jsonl"))
    assert done.returncode == 2
    assert "\x1b[" not in done.stderr


def test_info_names_the_interpreter_gil_cores_and_engines() -> None:
    done = gs_cli("info")
    assert done.returncode == 0, done.stderr
    for key in ("python", "GIL", "cores", "event loop", "start method", "uvloop", "dask", "ray", "matplotlib"):
        assert any(line.startswith(key) for line in done.stdout.splitlines()), key
    assert sys.version.split()[0] in done.stdout


def test_demo_runs_every_workload() -> None:
    done = gs_cli("demo", "--scale", "0.05")
    assert done.returncode == 0, done.stderr
    for name in ("cpu", "hash", "sleep", "async", "tiny"):
        assert any(line.startswith(name) for line in done.stdout.splitlines()), name
    assert done.stdout.count("       gear: ") == 5
    assert done.stdout.count("speedup") == 5


def test_demo_rejects_an_unknown_workload() -> None:
    done = gs_cli("demo", "--only", "cpu,warp")
    assert done.returncode == 2 and "warp" in done.stderr


def test_bench_prints_a_table_and_draws_the_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(f"{i}\n" for i in range(20)))
    png = tmp_path / "speedup.png"
    done = gs_cli("bench", "cli_funcs:square", "-i", str(inp), "--gears", "thread,process", "--workers", "1,2",
                  "--plot", str(png))
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [r[:2] for r in rows if r and r[0] in {"serial", "thread", "process"}] == [
        ["serial", "1"], ["thread", "1"], ["thread", "2"], ["process", "1"], ["process", "2"],
    ]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("1\n2\n")
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from gearshift.cli import main\n"
        f"main(['bench', 'cli_funcs:square', '-i', {str(inp)!r}, '--plot', 'x.png'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=cli_env(),
                          cwd=tmp_path)
    assert done.returncode == 1
    assert "gearshift[plot]" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_bench_rejects_unknown_gears_and_bad_worker_lists(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("1\n")
    assert gs_cli("bench", "cli_funcs:square", "-i", str(inp), "--gears", "warp").returncode == 2
    assert gs_cli("bench", "cli_funcs:square", "-i", str(inp), "--workers", "0,x").returncode == 2


def test_advise_prints_the_advisors_report(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(f"{i}\n" for i in range(30)))
    done = gs_cli("advise", "cli_funcs:square", "-i", str(inp), "--sample", "20")
    assert done.returncode == 0, done.stderr
    assert "cli_funcs:square" in done.stdout
    assert "gear" in done.stdout


def test_advise_with_a_bad_target_exits_2(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("1\n")
    done = gs_cli("advise", "nowhere_xyz:f", "-i", str(inp))
    assert done.returncode == 2 and "nowhere_xyz" in done.stderr
