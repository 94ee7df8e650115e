"""A rate per key (``rate={key: rate}``, ``rate_key=``): each key's bucket is kept, and an item
waiting for its key's token never holds up items of other keys."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Hashable, Iterator
from typing import Any

import pytest

import gearshift as gs
from gearshift._rate import BURST_SECONDS

# Starts, by key: (key, monotonic time) recorded by the functions below (threads and the loop).
STARTS: list[tuple[Hashable, float]] = []
_lock = threading.Lock()


def key_of(item: tuple[str, int]) -> str:
    return item[0]


def note_start(item: tuple[str, int]) -> tuple[str, int]:
    with _lock:
        STARTS.append((item[0], time.monotonic()))
    return item


async def anote_start(item: tuple[str, int]) -> tuple[str, int]:
    note_start(item)
    await asyncio.sleep(0.001)
    return item


@pytest.fixture(autouse=True)
def _clear() -> Iterator[None]:
    STARTS.clear()
    yield
    STARTS.clear()


def starts_of(key: str) -> list[float]:
    return sorted(t for k, t in STARTS if k == key)


def assert_within_rate(times: list[float], per_second: float) -> None:
    """Starts in any stretch of T seconds never exceed rate * T + burst (the bucket's promise)."""
    burst = max(1.0, per_second * BURST_SECONDS)
    for i, j in itertools.combinations(range(len(times)), 2):
        allowed = per_second * (times[j] - times[i]) + burst + 1e-6
        assert j - i + 1 <= allowed + 1, f"{j - i + 1} starts in {times[j] - times[i]:.3f}s at {per_second}/s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gear", ["thread", "async", "serial"])
def test_a_slow_key_never_holds_up_the_others(gear: str) -> None:
    # The slow key's items come first: a limiter that queued in input order would make the
    # fast key wait a second per slow item.
    items = [("slow", i) for i in range(3)] + [("fast", i) for i in range(300)]
    fn = anote_start if gear == "async" else note_start
    workers = None if gear == "serial" else 4
    out = gs.map(fn, items, gear=gear, workers=workers, rate={"slow": "2/s"}, rate_key=key_of)
    assert out == items, "results come back in input order"
    slow, fast = starts_of("slow"), starts_of("fast")
    assert len(slow) == 3 and len(fast) == 300
    assert fast[-1] < slow[2], "every fast item started before the slow key's third token (1 s in)"
    assert_within_rate(slow, 2.0)


@pytest.mark.timeout(60)
def test_unordered_a_slow_key_holds_up_no_number_of_other_items() -> None:
    # Unordered, nothing waits for the slow key's results: many more fast items than an
    # ordered run's reorder allowance all start before its second token.
    items = [("slow", i) for i in range(2)] + [("fast", i) for i in range(5000)]
    out = gs.map(note_start, items, gear="thread", workers=4, rate={"slow": "0.5/s"}, rate_key=key_of, ordered=False)
    assert sorted(out) == sorted(items)
    slow, fast = starts_of("slow"), starts_of("fast")
    assert fast[-1] < slow[1], "5000 fast items started before the slow key's second token (2 s in)"


@pytest.mark.timeout(60)
def test_each_key_keeps_its_own_rate_over_a_run() -> None:
    items = [("a", i) for i in range(30)] + [("b", i) for i in range(60)] + [("c", i) for i in range(40)]
    out = gs.map(note_start, items, gear="thread", workers=8, rate={"a": "20/s", "*": "50/s"}, rate_key=key_of,
                 ordered=False)
    assert sorted(out) == sorted(items)
    assert_within_rate(starts_of("a"), 20.0)
    assert_within_rate(starts_of("b"), 50.0)
    assert_within_rate(starts_of("c"), 50.0)  # "*": a bucket of its own, not shared with b
    a, b = starts_of("a"), starts_of("b")
    # 30 at 20/s take >= 1.4 s; 60 at 50/s >= 1.18 s: the keys ran side by side, not one after another.
    assert b[0] < a[-1] and starts_of("c")[0] < a[-1]


def test_keys_not_listed_and_no_star_are_not_limited() -> None:
    items = [("free", i) for i in range(2000)] + [("capped", 0), ("capped", 1)]
    start = time.monotonic()
    out = gs.map(note_start, items, gear="thread", workers=4, rate={"capped": "1/s"}, rate_key=key_of)
    assert out == items
    free = starts_of("free")
    assert len(free) == 2000
    capped = starts_of("capped")
    assert capped[1] - capped[0] >= 0.9, "the listed key waits for its token"
    assert free[-1] - start < capped[1] - start, "2000 unlisted items started before the capped key's second"


def bad_key(item: tuple[str, int]) -> str:
    if item[1] == 3:
        raise LookupError("no key for 3")
    return item[0]


def test_a_rate_key_that_raises_fails_its_item_alone_under_collect() -> None:
    items = [("k", i) for i in range(6)]
    out = gs.map(note_start, items, gear="thread", workers=2, rate={"*": "1000/s"}, rate_key=bad_key,
                 errors="collect", retries=3)
    assert [o for o in out if not isinstance(o, gs.Failure)] == [it for it in items if it[1] != 3]
    failure = out[3]
    assert isinstance(failure, gs.Failure) and isinstance(failure.exception, LookupError)
    assert failure.item == ("k", 3) and failure.attempts == 1, "a key that cannot be computed is not retried"
    assert len(STARTS) == 5, "the item without a key never ran"


def test_a_rate_key_that_raises_is_named_under_raise() -> None:
    with pytest.raises(LookupError) as info:
        gs.map(note_start, [("k", i) for i in range(6)], gear="thread", workers=2, rate={"*": "1000/s"},
               rate_key=bad_key)
    assert any("rate_key failed on item #3" in note for note in getattr(info.value, "__notes__", []))


class Flaky:
    """Fails each item's first attempt (thread gear: state shared by the threads)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.lock = threading.Lock()

    def __call__(self, item: tuple[str, int]) -> tuple[str, int]:
        note_start(item)
        with self.lock:
            first = item not in self.seen
            self.seen.add(item)
        if first:
            raise ConnectionResetError(f"first try of {item}")
        return item


@pytest.mark.timeout(60)
def test_retries_take_their_keys_tokens_too() -> None:
    items = [("a", i) for i in range(10)] + [("b", i) for i in range(10)]
    out = gs.map(Flaky(), items, gear="thread", workers=4, rate={"*": "40/s"}, rate_key=key_of,
                 retries=gs.Retry(attempts=2, backoff=0.0, on=(ConnectionResetError,)))
    assert out == items
    assert len(starts_of("a")) == 20 and len(starts_of("b")) == 20
    assert_within_rate(starts_of("a"), 40.0)
    assert_within_rate(starts_of("b"), 40.0)


class Endless:
    def __init__(self) -> None:
        self.read = 0

    def __iter__(self) -> Endless:
        return self

    def __next__(self) -> tuple[str, int]:
        self.read += 1
        return ("one", self.read)


@pytest.mark.timeout(60)
def test_an_endless_input_of_one_throttled_key_is_read_a_bounded_amount() -> None:
    source = Endless()
    it = gs.imap(note_start, source, gear="thread", workers=2, rate={"one": "5/s"}, rate_key=key_of)
    try:
        assert next(it) == ("one", 1)
        # The parked items fill up and the input stops being read; a reader that parked without
        # bound would read on for as long as we watch (and fail at the deadline).
        read = source.read
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            before = read
            time.sleep(0.25)
            read = source.read
            if read == before:
                break
        else:
            pytest.fail(f"the input was still being read after 10 s ({read} items)")
        assert read < 5_000, f"{read} items read for 1 delivered at 5/s"
    finally:
        it.close()


def test_a_pipeline_stage_takes_a_rate_per_key() -> None:
    items = [("slow", i) for i in range(2)] + [("fast", i) for i in range(200)]
    pipe = (gs.Pipeline(items)
            .map(note_start, gear="thread", workers=4, rate={"slow": "2/s"}, rate_key=key_of)
            .map(key_of, gear="serial"))
    assert list(pipe) == [k for k, _ in items]
    assert starts_of("fast")[-1] < starts_of("slow")[1]


def test_amap_takes_a_rate_per_key() -> None:
    async def main() -> list[Any]:
        items = [("slow", i) for i in range(2)] + [("fast", i) for i in range(100)]
        return [r async for r in gs.amap(anote_start, items, rate={"slow": "2/s", "*": "10000/s"}, rate_key=key_of)]

    out = asyncio.run(main())
    assert len(out) == 102
    assert starts_of("fast")[-1] < starts_of("slow")[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": {"a": "1/s"}}, "needs rate_key="),
        ({"rate_key": key_of}, "rate_key= needs rate= a mapping"),
        ({"rate": "1/s", "rate_key": key_of}, "rate_key= needs rate= a mapping"),
        ({"rate": {"a": "fast"}, "rate_key": key_of}, "rate must look like"),
        ({"rate": {}, "rate_key": key_of}, "non-empty mapping"),
        ({"rate": {"a": -1}, "rate_key": key_of}, "positive"),
    ],
)
def test_bad_rates_per_key_are_refused_before_any_work(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gs.map(note_start, [("a", 1)], gear="thread", **kwargs)
    with pytest.raises(ValueError, match=message):
        gs.Pipeline([("a", 1)]).map(note_start, **kwargs)
    assert not STARTS


def test_a_rate_key_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="rate_key must be a function"):
        gs.map(note_start, [("a", 1)], rate={"a": "1/s"}, rate_key="host")  # type: ignore[arg-type]


def test_the_executor_refuses_a_rate_per_key_with_a_reason() -> None:
    with gs.Executor("thread", max_workers=2) as ex:
        assert ex.submit(note_start, ("a", 1)).result() == ("a", 1)
    with pytest.raises((ValueError, TypeError), match="rate"):
        gs.Executor("thread", max_workers=2, rate={"a": "1/s"})  # type: ignore[arg-type]
