"""``gearshift lab``: every experiment at its smallest size, the verdict rule on injected numbers, the outputs, Ctrl-C.

The machine running the suite is shared and loaded, so no test asserts the verdict of a real
measurement: only its structure. The verdict logic is tested on measurements we inject.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from cli_funcs import cli_env

import gearshift as gs
from gearshift._lab import claim_ids
from gearshift._lab._core import (
    REGISTRY,
    SIZES,
    VERDICTS,
    Context,
    Effect,
    Finding,
    Machine,
    combine,
    judge,
    judge_same,
    q,
    this_machine,
)
from gearshift._lab.aio import judge_event_loop
from gearshift._lab.cpu import judge_free_threading, judge_processes_for_cpu
from gearshift._lab.report import html_page, json_text, table

ISSUE_IDS = {
    "processes-for-cpu", "threads-for-io", "async-vs-threads", "free-threading", "upper-bound", "event-loop",
    "task-groups", "await-vs-task", "to-thread", "daemon-threads", "cancellation", "thread-pool", "locks",
    "fine-grained-locks", "process-pool", "compiled-kernel", "process-cost",
}
GS = [sys.executable, "-m", "gearshift"]


def machine(**facts: Any) -> Machine:
    base = Machine(cores=2, python="3.14.0", implementation="CPython", free_threaded_build=False, gil_enabled=True,
                   loop="uvloop 0.21.0", uvloop="0.21.0", start_method="forkserver", platform="test")
    return replace(base, **facts)


def well_formed(f: Finding, claim_id: str) -> None:
    assert f.id == claim_id and f.claim == REGISTRY[claim_id].claim
    assert f.verdict in VERDICTS
    assert not f.explanation.startswith("the experiment failed"), f.explanation
    assert f.explanation and f.meaning
    if f.verdict != "not measurable here":
        assert f.measured, "a verdict without numbers"
        assert f.repeats >= 2 and "repeats" in f.noise
    for m in f.measured:
        assert m.name and isinstance(m.unit, str) and m.values, m
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values), m
    json.loads(json_text(gs.LabReport(this_machine(), "smallest", [f])), parse_constant=_reject)


def _reject(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def test_every_claim_of_the_issue_has_an_experiment() -> None:
    assert set(claim_ids()) >= ISSUE_IDS
    assert claim_ids()[: len(ISSUE_IDS)] == [i for i in claim_ids() if i in ISSUE_IDS]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("claim_id", claim_ids())
def test_each_experiment_at_its_smallest_size(claim_id: str) -> None:
    """Runs for real, returns well-formed numbers, and leaves no thread behind (processes: conftest)."""
    threads_before = set(threading.enumerate())
    exp = REGISTRY[claim_id]
    found = exp.run(Context(SIZES["smallest"], this_machine(), id=exp.id, claim=exp.claim))
    well_formed(found, claim_id)
    left = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not left, f"{claim_id} left threads running: {left}"


def test_self_checks_are_real() -> None:
    """The lost-update count and the bank's invariant come from the run, not from assumptions."""
    exp = REGISTRY["locks"]
    found = exp.run(Context(SIZES["smallest"], this_machine(), id=exp.id, claim=exp.claim))
    assert found.value("updates lost with a Lock").values == (0.0, 0.0)
    from gearshift._lab import threads as t

    class LeakyBank(t._Bank):
        def _move(self, a: int, b: int, amount: int) -> None:
            self.balances[a] -= amount  # money leaves and never arrives

    real = t._Bank
    t._Bank = LeakyBank  # type: ignore[misc]
    try:
        with pytest.raises(AssertionError, match="total changed"):
            t._run_bank(False, 2, 100, 10, 0)
    finally:
        t._Bank = real  # type: ignore[misc]


# The verdict rule, on injected measurements.

def test_judge_holds_beyond_the_noise_and_depends_within_it() -> None:
    assert judge(Effect(1.9, 0.1), 1.0, "above") == "holds"
    assert judge(Effect(0.6, 0.1), 1.0, "above") == "does not hold"
    assert judge(Effect(1.05, 0.1), 1.0, "above") == "depends"
    assert judge(Effect(0.95, 0.1), 1.0, "above") == "depends"
    assert judge(Effect(0.02, 0.01), 0.10, "below") == "holds"
    assert judge(Effect(0.5, 0.01), 0.10, "below") == "does not hold"
    assert judge(Effect(float("nan"), 0.0), 1.0, "above") == "depends"


def test_effect_is_taken_per_paired_repeat() -> None:
    slow, fast = q("a", "s", [2.0, 4.0, 6.0]), q("b", "s", [1.0, 2.0, 3.0])  # load drifted, the ratio did not
    eff = Effect.ratio(slow, fast)
    assert eff.value == 2.0 and eff.noise == 0.0
    assert judge(eff, 1.0, "above") == "holds"
    noisy = Effect.ratio(q("a", "s", [1.0, 1.3]), q("b", "s", [1.2, 1.0]))
    assert judge(noisy, 1.0, "above") == "depends"


def test_ratios_spread_on_a_log_scale() -> None:
    """10x, 100x, 1000x: wildly noisy, but even the worst repeat beats 1x by far: it holds."""
    eff = Effect.ratio(q("inline", "ms", [10.0, 100.0, 1000.0]), q("to_thread", "ms", [1.0, 1.0, 1.0]))
    assert eff.value == 100.0 and math.isclose(eff.low, 10.0) and math.isclose(eff.high, 1000.0)
    assert judge(eff, 1.0, "above") == "holds"
    straddles = Effect.ratio(q("a", "s", [0.5, 2.0]), q("b", "s", [1.0, 1.0]))
    assert judge(straddles, 1.0, "above") == "depends"


def test_same_speed_holds_only_when_the_whole_spread_is_within_the_tolerance() -> None:
    def ratio(*values: float) -> Effect:
        return Effect.ratio(q("a", "s", list(values)), q("b", "s", [1.0] * len(values)))

    assert judge_same(ratio(0.97, 1.0, 1.03), 0.10) == "holds"
    assert judge_same(ratio(1.5, 1.6, 1.7), 0.10) == "does not hold"
    assert judge_same(ratio(0.6, 0.65, 0.7), 0.10) == "does not hold"
    assert judge_same(ratio(0.95, 1.05, 1.3), 0.10) == "depends"


def test_combine_one_part_against_decides() -> None:
    assert combine(["holds", "holds"]) == "holds"
    assert combine(["holds", "depends"]) == "depends"
    assert combine(["holds", "does not hold"]) == "does not hold"
    assert combine(["holds", "not measurable here"]) == "holds"
    assert combine(["not measurable here"]) == "not measurable here"


def test_uvloop_losing_does_not_hold() -> None:
    m = machine()
    verdict, why = judge_event_loop(m, Effect(0.7, 0.05), Effect(0.8, 0.05))
    assert verdict == "does not hold", why
    assert judge_event_loop(m, Effect(1.8, 0.1), Effect(2.2, 0.1))[0] == "holds"
    assert judge_event_loop(m, Effect(1.02, 0.1), Effect(0.97, 0.1))[0] == "depends"
    verdict, why = judge_event_loop(m, Effect(1.8, 0.1), Effect(0.7, 0.05))
    assert verdict == "depends" and "kind of event" in why
    verdict, why = judge_event_loop(machine(uvloop=None, loop="asyncio"), None, None)
    assert verdict == "not measurable here" and "uvloop is not installed" in why


def test_free_threading_is_judged_only_where_the_gil_is_off() -> None:
    gain = Effect(1.9, 0.1)
    verdict, why = judge_free_threading(machine(python="3.11.7"), Effect(1.0, 0.02))
    assert verdict == "not measurable here" and "build with a GIL" in why and "1.00x" in why
    verdict, why = judge_free_threading(machine(free_threaded_build=True, gil_enabled=True), gain)
    assert verdict == "not measurable here" and "turned back on" in why
    assert judge_free_threading(machine(free_threaded_build=True, gil_enabled=False), gain)[0] == "holds"
    assert judge_free_threading(machine(free_threaded_build=True, gil_enabled=False), Effect(0.8, 0.05))[0] \
        == "does not hold"
    assert judge_free_threading(machine(free_threaded_build=True, gil_enabled=False, cores=1), gain)[0] \
        == "not measurable here"


def test_processes_for_cpu_needs_two_cores_and_a_gil() -> None:
    assert judge_processes_for_cpu(machine(), Effect(1.9, 0.1), Effect(1.0, 0.03))[0] == "holds"
    assert judge_processes_for_cpu(machine(cores=1), Effect(1.0, 0.1), Effect(1.0, 0.03))[0] \
        == "not measurable here"
    verdict, why = judge_processes_for_cpu(machine(gil_enabled=False), Effect(1.9, 0.1), Effect(1.9, 0.1))
    assert verdict == "does not hold" and "GIL is off" in why
    assert judge_processes_for_cpu(machine(), Effect(1.05, 0.1), Effect(1.0, 0.03))[0] == "depends"


def test_injected_machine_facts_reach_the_verdicts() -> None:
    report = gs.lab(["free-threading", "event-loop"], "smallest",
                    machine=replace(this_machine(), free_threaded_build=True, gil_enabled=False,
                                    uvloop=None, loop="asyncio"))
    assert "GIL is off" in report.finding("free-threading").explanation
    assert report.finding("free-threading").verdict != "not measurable here"
    loop = report.finding("event-loop")
    assert loop.verdict == "not measurable here" and "uvloop is not installed" in loop.explanation
    assert any(m.name.startswith("asyncio") for m in loop.measured)  # asyncio's own rate is still measured


def test_lab_rejects_unknown_ids_and_sizes() -> None:
    with pytest.raises(ValueError, match="warp"):
        gs.lab(["locks", "warp"])
    with pytest.raises(ValueError, match="size"):
        gs.lab(["locks"], "huge")  # type: ignore[arg-type]


def test_a_failing_experiment_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from gearshift._lab._core import Experiment

    def broken(ctx: Context) -> Finding:
        raise OSError("no such device")

    monkeypatch.setitem(REGISTRY, "locks", Experiment("locks", REGISTRY["locks"].claim, broken))
    found = gs.lab(["locks"], "smallest").finding("locks")
    assert found.verdict == "not measurable here" and "OSError: no such device" in found.explanation


def test_report_renders_nan_as_null_and_every_plot_as_a_data_uri() -> None:
    pytest.importorskip("matplotlib")
    findings = [
        Finding("upper-bound", "c", "holds", [q("speedup", "x", [1.4, 1.5])], "e", "m", 2, "2 repeats",
                plot={"kind": "amdahl", "share": 0.3, "cores": 2, "points": {"1": [1.0, 1.0], "2": [1.4, 1.5]}}),
        Finding("locks", "c", "depends", [q("lost", "updates", [0.0, 3.0]), q("odd", "x", float("nan"))], "e", "m",
                2, "2 repeats"),
        Finding("aiofiles", "c", "not measurable here", [], "aiofiles is not installed", "m", 2),
    ]
    report = gs.LabReport(machine(), "smallest", findings)
    data = json.loads(json_text(report), parse_constant=_reject)
    assert data["claims"][1]["measured"]["odd"]["median"] is None
    page = html_page(report)
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 3 and all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    text = table(report)
    assert all(v in text for v in ("holds", "depends", "not measurable here"))


# The command, end to end.

def test_cli_writes_valid_json_and_a_self_contained_html(tmp_path: Path) -> None:
    """The HTML part needs matplotlib (gearshift[plot]); the JSON is checked either way."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots = False
    else:
        plots = True
    out_json, out_html = tmp_path / "lab.json", tmp_path / "lab.html"
    ids = ["await-vs-task", "locks", "upper-bound"]
    html = ["--html", str(out_html)] if plots else []
    done = subprocess.run([*GS, "lab", "--size", "smallest", "--only", ",".join(ids), "--json", str(out_json),
                           *html], capture_output=True, text=True, timeout=90, env=cli_env())
    assert done.returncode == 0, done.stderr
    for claim_id in ids:
        assert any(line.split()[-len(claim_id.split()):] and claim_id in line for line in done.stdout.splitlines())
    data = json.loads(out_json.read_text(), parse_constant=_reject)
    assert {"cores", "python", "gil_enabled", "loop", "start_method"} <= set(data["machine"])
    assert [c["id"] for c in data["claims"]] == ids
    for claim in data["claims"]:
        assert {"id", "claim", "measured", "verdict", "explanation"} <= set(claim)
        assert claim["verdict"] in VERDICTS
        for m in claim["measured"].values():
            assert isinstance(m["unit"], str) and isinstance(m["median"], float)
    if not plots:
        pytest.skip("matplotlib is not installed: the HTML report was not checked")
    page = out_html.read_text()
    assert page.count("data:image/png;base64,") == len(ids)
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_cli_rejects_an_unknown_claim_and_lists_them() -> None:
    done = subprocess.run([*GS, "lab", "--only", "locks,warp"], capture_output=True, text=True, timeout=60,
                          env=cli_env())
    assert done.returncode == 2 and "warp" in done.stderr
    listed = subprocess.run([*GS, "lab", "--list"], capture_output=True, text=True, timeout=60, env=cli_env())
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == claim_ids()


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
@pytest.mark.parametrize(("signum", "stage", "code", "said"), [
    (signal.SIGINT, "process-pool", 130, "interrupted"),  # while multiprocessing.Pool starts its workers
    (signal.SIGINT, "processes-for-cpu", 130, "interrupted"),  # while a ProcessPoolExecutor starts or works
    (signal.SIGTERM, "process-pool", 143, "terminated"),
])
def test_ctrl_c_stops_the_lab_cleanly(signum: int, stage: str, code: int, said: str) -> None:
    """Ctrl-C (or SIGTERM) while worker processes run: exit 130 (143), the claims so far printed, nothing left."""
    proc = subprocess.Popen([*GS, "lab", "--quick", "--only", "process-pool,processes-for-cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            start_new_session=True)  # its own group: a worker forked late is found too

    def in_group() -> list[psutil.Process]:
        mine = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    mine.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        return mine

    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # blocks until the lab says it has started measuring
            if f"{stage}: measuring" in line:
                break
        lab = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        seen: list[psutil.Process] = []
        while not seen and time.monotonic() < deadline and proc.poll() is None:
            seen = lab.children(recursive=True)  # wait for worker processes to exist
        assert seen, "the lab never started a worker process"
        proc.send_signal(signum)
        proc.wait(timeout=60)  # not communicate(): a stranded worker would hold the pipes open
        _gone, alive = psutil.wait_procs([*seen, *in_group()], timeout=10)
        assert not alive, f"left running after Ctrl-C: {[(p.pid, p.cmdline()) for p in alive]}"
        out, err = proc.communicate(timeout=10)
    finally:
        for p in [proc, *in_group()]:  # only what this test started, by id
            try:
                p.kill()
            except (ProcessLookupError, psutil.Error):
                pass
        proc.wait()
    assert proc.returncode == code, err
    assert said in err
    assert "gearshift lab (quick)" in out  # the (partial) table was still printed
