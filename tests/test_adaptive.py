"""Adaptive concurrency in the async gear (issue 15): found by measurement when the user fixes none.

Simulated services on the test's own loop: one that answers in a fixed time however many
calls are in flight, one that queues past a knee (latency grows with what is in flight),
one that refuses past a limit (503). The limit must rise on the first, settle near the knee
on the second (latency held within 2x of unloaded), and back off on the third.
"""

from __future__ import annotations

import asyncio
import re
import statistics
from typing import Any

import pytest

import gearshift as gs
from gearshift._gears._adaptive import AdaptiveLimit, is_refusal


def peak_and_final(report: gs.Report) -> tuple[int, int]:
    note = next(r for r in report.reasons if r.startswith("concurrency adapted"))
    match = re.search(r"(\d+) in flight at the end \(peak (\d+)", note)
    assert match, note
    return int(match.group(1)), int(match.group(2))


async def fixed_wait(x: int) -> int:
    await asyncio.sleep(0.02)
    return x


@pytest.mark.timeout(60)
def test_pure_waits_raise_the_limit_far_past_its_start() -> None:
    out = gs.map(fixed_wait, range(20_000), gear="async")
    assert out == list(range(20_000))
    _, peak = peak_and_final(out.report)
    # Quiet, it passes 4000 (16 -> 64 -> 256 -> 1024 -> 4096 a round trip apart). With two other
    # busy processes on two cores the loop itself saturates near 700 and the limit rightly stops.
    assert peak >= 400, out.report.reasons
    assert out.report.gear == "async gear, adaptive concurrency"


@pytest.mark.timeout(60)
def test_auto_gives_coroutines_adaptive_concurrency_and_a_fixed_one_stays_fixed() -> None:
    out = gs.map(fixed_wait, range(3000))
    assert out == list(range(3000))
    assert any(r.startswith("concurrency adapted") for r in out.report.reasons), out.report.reasons
    fixed = gs.map(fixed_wait, range(300), gear="async", concurrency=50)
    assert fixed.report.gear == "async gear, 50 workers"
    assert not any(r.startswith("concurrency adapted") for r in fixed.report.reasons)


class Queueing:
    """Answers in ``base`` seconds up to ``knee`` calls in flight; past it, each call takes
    ``base * in_flight / knee`` (the calls share the service): throughput is capped at knee/base."""

    def __init__(self, knee: int, base: float) -> None:
        self.knee, self.base = knee, base
        self.in_flight = 0
        self.latencies: list[float] = []

    async def __call__(self, x: int) -> int:
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        start = loop.time()
        try:
            await asyncio.sleep(self.base * max(1.0, self.in_flight / self.knee))
        finally:
            self.in_flight -= 1
        self.latencies.append(loop.time() - start)
        return x


@pytest.mark.timeout(60)
def test_a_queueing_service_settles_near_its_knee_with_latency_held() -> None:
    # Unloaded latency as this machine gives it now (a loaded loop adds its own lag): 16 at once.
    calibration = Queueing(knee=40, base=0.01)
    gs.map(calibration, range(160), gear="async", concurrency=16)
    unloaded = statistics.mean(calibration.latencies)
    service = Queueing(knee=40, base=0.01)
    out = gs.map(service, range(4000), gear="async")
    assert out == list(range(4000))
    final, _ = peak_and_final(out.report)
    late = service.latencies[len(service.latencies) // 2 :]
    # Settled at the knee rather than flooding: latency within 2x of unloaded, limit near 40.
    assert statistics.mean(late) <= 2.0 * unloaded, (statistics.mean(late), unloaded, out.report.reasons)
    assert 20 <= final <= 120, out.report.reasons


class Refused(Exception):
    status = 503


class Refusing:
    """Refuses (503) any call beyond ``limit`` in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.calls = 0
        self.refused = 0

    async def __call__(self, x: int) -> int:
        self.calls += 1
        if self.in_flight >= self.limit:
            self.refused += 1
            await asyncio.sleep(0.001)
            raise Refused(f"503 for {x}")
        self.in_flight += 1
        try:
            await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        return x


@pytest.mark.timeout(60)
def test_a_refusing_service_gets_every_item_done_with_few_refusals() -> None:
    service = Refusing(limit=50)
    out = gs.map(service, range(4000), gear="async", retries=gs.Retry(attempts=30, backoff=0.005))
    assert out == list(range(4000))
    assert service.refused / service.calls < 0.05, (service.refused, service.calls, out.report.reasons)
    final, _ = peak_and_final(out.report)
    assert final <= 80, out.report.reasons


def test_a_slack_keeps_sub_millisecond_jitter_from_counting_as_queueing() -> None:
    # A local service answering in 0.2 ms, whose latency rises to 1 ms as the caller's own load
    # grows: by ratios alone that is 5x (queueing: cut to one or two in flight, half the
    # throughput); with the async gear's slack it is within the 3 ms that still "holds".
    for slack, survives in ((0.0, False), (0.010, True)):
        limit = AdaptiveLimit(start=16, cap=1000, slack=slack)
        for _ in range(16):
            limit.busy(limit.limit)
            limit.completed(0.0002, False, seen=16)
        for _ in range(400):
            limit.busy(limit.limit)
            limit.completed(0.001, False, seen=limit.limit)
        assert ("the service queues" not in limit.why) is survives, (slack, limit.limit, limit.why)
        assert (limit.limit > 64) is survives, (slack, limit.limit, limit.why)


def test_refusals_are_recognised() -> None:
    class HTTPError(Exception):
        def __init__(self, status: int) -> None:
            self.status = status

    class Response:
        status_code = 429

    class HTTPXError(Exception):
        response = Response()

    assert is_refusal(HTTPError(503)) and is_refusal(HTTPError(429)) and not is_refusal(HTTPError(404))
    assert is_refusal(HTTPXError()) and is_refusal(TimeoutError()) and is_refusal(ConnectionResetError())
    assert is_refusal(gs.TaskTimeout(1.0, "x", 0)) and not is_refusal(ValueError("bad input"))


def test_the_limit_grows_only_while_it_is_in_use_and_respects_its_cap() -> None:
    limit = AdaptiveLimit(start=16, cap=100)
    for _ in range(64):  # rounds at 16 where only 4 ever ran at once: input-limited, no growth
        limit.busy(4)
        limit.completed(0.01, False)
    assert limit.limit == 16 and limit.min_latency is not None
    for _ in range(100):
        limit.busy(limit.limit)
        limit.completed(0.01, False)
    assert limit.limit == 100 and "capped at 100" in limit.why
    for _ in range(10):  # refusals: one cut a round, to 0.7x, and a ceiling
        limit.completed(0.01, True)
    assert limit.limit == 70 and limit.ceiling == 100 and "refused" in limit.why


async def slow(x: int) -> int:
    await asyncio.sleep(10)
    return x


@pytest.mark.timeout(60)
def test_cancelling_waiters_gives_their_slots_back() -> None:
    """amap broken early while hundreds wait for a slot: nothing leaks, the loop is clean."""

    async def main() -> list[Any]:
        got = []
        agen = gs.amap(fixed_wait, range(2000))
        async for x in agen:
            got.append(x)
            if len(got) == 100:
                break
        await agen.aclose()
        return got

    assert asyncio.run(main()) == list(range(100))


def test_the_report_names_the_event_loop_and_loop_can_be_chosen() -> None:
    out = gs.map(fixed_wait, range(20), gear=gs.AsyncGear(loop="asyncio"))
    assert "event loop: asyncio (its own)" in out.report.reasons
    with pytest.raises(ValueError, match="loop must be one of"):
        gs.AsyncGear(loop="tokio")
    try:
        import uvloop  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="gearshift\\[fast\\]"):
            gs.AsyncGear(loop="uvloop")
    else:
        out = gs.map(fixed_wait, range(20), gear=gs.AsyncGear(loop="uvloop"))
        assert "event loop: uvloop (its own)" in out.report.reasons
