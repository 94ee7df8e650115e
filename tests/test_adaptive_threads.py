"""Adaptive concurrency in the thread gear (issue 15): blocking I/O sized by measurement.

Given no ``workers``, the thread gear starts at 16 threads at work and adapts as the async
gear does. Simulated blocking services (thread-safe): one that answers in a fixed time, one
that queues past a knee, one that refuses past a limit; and CPU work that holds the GIL,
where more threads buy nothing and the limit must not run away.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from typing import Any

import pytest

import gearshift as gs


def peak_and_final(report: gs.Report) -> tuple[int, int]:
    note = next(r for r in report.reasons if r.startswith("concurrency adapted"))
    match = re.search(r"(\d+) threads at work at the end \(peak (\d+)", note)
    assert match, note
    return int(match.group(1)), int(match.group(2))


class Service:
    """A blocking service: ``base`` seconds up to ``knee`` calls at once, then shared
    (``base * in_flight / knee``); refuses (503) past ``refuse_at`` in flight if given."""

    def __init__(self, base: float, knee: int | None = None, refuse_at: int | None = None) -> None:
        self.base, self.knee, self.refuse_at = base, knee, refuse_at
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.calls = 0
        self.refused = 0
        self.latencies: list[float] = []

    def __call__(self, x: int) -> int:
        with self.lock:
            self.calls += 1
            if self.refuse_at is not None and self.in_flight >= self.refuse_at:
                self.refused += 1
                raise Refused(f"503 for {x}")
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            crowd = self.in_flight
        start = time.monotonic()
        try:
            time.sleep(self.base * (max(1.0, crowd / self.knee) if self.knee else 1.0))
        finally:
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            self.latencies.append(time.monotonic() - start)
        return x


class Refused(Exception):
    status = 503


@pytest.mark.timeout(60)
def test_blocking_waits_raise_the_thread_count_far_past_the_fixed_default() -> None:
    service = Service(base=0.02)
    out = gs.map(service, range(4000), gear="thread")
    assert out == list(range(4000))
    _, peak = peak_and_final(out.report)
    # Quiet, it reaches the cap (512); a fixed pool would hold min(32, 4 * cores + 4).
    assert peak >= 100 and service.peak >= 100, (service.peak, out.report.reasons)
    assert out.report.gear == "thread gear, adaptive concurrency"


@pytest.mark.timeout(60)
def test_a_queueing_blocking_service_settles_near_its_knee() -> None:
    calibration = Service(base=0.01, knee=40)
    gs.map(calibration, range(160), gear="thread", workers=16)
    unloaded = statistics.mean(calibration.latencies)
    service = Service(base=0.01, knee=40)
    out = gs.map(service, range(4000), gear="thread")
    assert out == list(range(4000))
    final, _ = peak_and_final(out.report)
    late = service.latencies[len(service.latencies) // 2 :]
    assert statistics.mean(late) <= 2.0 * unloaded, (statistics.mean(late), unloaded, out.report.reasons)
    assert 20 <= final <= 120, out.report.reasons


@pytest.mark.timeout(60)
def test_a_refusing_blocking_service_gets_every_item_done_with_few_refusals() -> None:
    service = Service(base=0.01, refuse_at=50)
    out = gs.map(service, range(4000), gear="thread", retries=gs.Retry(attempts=30, backoff=0.005))
    assert out == list(range(4000))
    assert service.refused / service.calls < 0.05, (service.refused, service.calls, out.report.reasons)
    final, _ = peak_and_final(out.report)
    assert final <= 80, out.report.reasons


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


@pytest.mark.timeout(60)
def test_cpu_work_that_holds_the_gil_does_not_run_the_thread_count_away() -> None:
    out = gs.map(spin, [20_000] * 2000, gear="thread")
    assert out == [spin(20_000)] * 2000
    final, peak = peak_and_final(out.report)
    # More threads only queue for the GIL: latency climbs with them and the limit backs off.
    assert final <= 64 and peak <= 200, out.report.reasons


def test_a_fixed_thread_count_stays_fixed_and_drop_ins_are_not_adaptive() -> None:
    fixed = gs.map(spin, [10] * 50, gear="thread", workers=8)
    assert fixed.report.gear == "thread gear, 8 workers"
    assert not any(r.startswith("concurrency adapted") for r in fixed.report.reasons)
    with gs.ThreadPoolExecutor() as ex:
        service = Service(base=0.01)
        list(ex.map(service, range(400)))
    assert service.peak <= ex._max_workers  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_the_executor_without_max_workers_adapts_across_submissions() -> None:
    service = Service(base=0.05)
    with gs.Executor("thread") as ex:
        futures = [ex.submit(service, i) for i in range(600)]
        assert [f.result() for f in futures] == list(range(600))
    assert service.peak > 32, f"at most {service.peak} at once: the fixed default would give 12"


def hang_until_cancelled(x: int) -> int:
    if x % 4 == 0:
        while not gs.cancelled():
            time.sleep(0.005)
        raise RuntimeError("cancelled")
    return x


@pytest.mark.timeout(60)
def test_timed_out_calls_cut_the_limit_and_never_hold_the_gate() -> None:
    # A quarter of the calls hang until their cancel token is set at the deadline. Each timeout
    # cuts the limit; if stuck calls kept their places at the gate, the run would stall below it.
    out = gs.map(hang_until_cancelled, range(200), gear="thread", timeout=0.3, errors="collect")
    assert [o for o in out if not isinstance(o, gs.Failure)] == [x for x in range(200) if x % 4]
    failures = [o for o in out if isinstance(o, gs.Failure)]
    assert len(failures) == 50 and all(isinstance(f.exception, gs.TaskTimeout) for f in failures)
    assert any("refused or timed out" in r for r in out.report.reasons), out.report.reasons


def raise_sometimes(x: int) -> Any:
    if x == 7:
        raise KeyError("seven")
    time.sleep(0.001)
    return x


def test_an_error_stops_an_adaptive_run_promptly_and_leaves_no_thread() -> None:
    with pytest.raises(KeyError):
        gs.map(raise_sometimes, range(10_000), gear="thread")


RELEASE = threading.Event()


def hang_ignoring_the_token(x: int) -> int:
    if x < 40:
        RELEASE.wait(30)  # ignores gs.cancelled(): the thread stays stuck until the test ends
    return x


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:gearshift. .* thread")
def test_calls_stuck_past_their_deadline_do_not_count_against_the_limit() -> None:
    # The first 40 calls (all the first 16 at work) outlive their deadline and never come back,
    # and the timeouts cut the limit. Were stuck calls still counted at the gate, no thread could
    # pass it again: the rest of the run must go on.
    RELEASE.clear()
    try:
        out = gs.map(hang_ignoring_the_token, range(300), gear="thread", timeout=0.2, errors="collect", ordered=False)
        done = sorted(o for o in out if not isinstance(o, gs.Failure))
        assert done == list(range(40, 300))
        assert sum(isinstance(o, gs.Failure) for o in out) == 40
    finally:
        RELEASE.set()
