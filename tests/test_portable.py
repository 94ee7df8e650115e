"""Every failure comes back intact from another process (issue 12).

Unit tests of ``gearshift._portable`` and of the pickling of gearshift's own errors, plus
end-to-end tests through the process gear, which pass once the worker calls
``portable_exception`` / ``portable_value`` and the gear ``unpicklable_item``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import gearshift as gs
from gearshift import _pickling, _portable
from gearshift._portable import portable_exception, portable_value, unpicklable_item

DUMPERS = [pytest.param(pickle.dumps, id="pickle"), pytest.param(cloudpickle.dumps, id="cloudpickle")]
BIG = 10 * 1024 * 1024


# -- exceptions users raise ------------------------------------------------------------------


class TwoArgError(Exception):
    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} (code {code})")
        self.what = what
        self.code = code


class KeywordOnlyError(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code


class Reworded(Exception):
    """One argument, but ``__init__`` rewrites it: pickle would reword it again."""

    def __init__(self, x: int) -> None:
        super().__init__(f"bad value {x}")


class LockedError(Exception):
    """Holds a lock: no pickler can send it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class NeedsToken(Exception):
    """Cannot be created again from its args at all: ``__new__`` wants a keyword."""

    def __new__(cls, *args: Any, token: object = None) -> NeedsToken:
        if token is None:
            raise TypeError("NeedsToken needs a token")
        return super().__new__(cls, *args)

    def __init__(self, *args: Any, token: object = None) -> None:
        super().__init__(*args)


class TwoArgExit(SystemExit):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(code)
        self.why = why


class ResultWithBadReduce:
    def __reduce__(self) -> Any:
        raise LockedError("this result refuses to be pickled")


def raised(exc: BaseException) -> tuple[BaseException, str]:
    """``exc`` raised and caught, with its formatted traceback, as a worker sees it."""
    try:
        raise exc
    except BaseException as caught:
        return caught, "".join(traceback.format_exception(caught))


def round_trip(obj: Any, dumps: Any = _pickling.dumps) -> Any:
    """Through the wire's pickling (shielded from what tblib may have installed: see _pickling)."""
    return pickle.loads(dumps(obj, protocol=5))


def broken_by_plain_pickle(exc: BaseException) -> bool:
    """The bug: pickle dumps it, then cannot load it, or loads it with another message."""
    try:
        back = round_trip(exc)
    except TypeError:
        return True
    return str(back) != str(exc)


def assert_same(back: BaseException, exc: BaseException) -> None:
    assert type(back) is type(exc)
    assert back.args == exc.args and str(back) == str(exc)
    assert {k: v for k, v in vars(back).items()} == {k: v for k, v in vars(exc).items() if k != "__reduce_ex__"}


# -- portable_exception: kept as itself --------------------------------------------------------


@pytest.mark.parametrize("dumps", DUMPERS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: TwoArgError("disk full", 28),
        lambda: KeywordOnlyError(code=7),
        lambda: Reworded(3),
    ],
    ids=["two-arg", "keyword-only", "reworded"],
)
def test_init_that_does_not_take_its_args_is_rebuilt_as_itself(make: Any, dumps: Any) -> None:
    exc, tb = raised(make())
    assert broken_by_plain_pickle(exc)
    out = portable_exception(exc, tb)
    assert out is exc
    assert_same(round_trip(out, dumps), exc)


def test_rebuilt_exception_keeps_attributes_and_notes() -> None:
    exc, tb = raised(TwoArgError("disk full", 28))
    exc.add_note("while writing part 3")
    back = round_trip(portable_exception(exc, tb))
    assert (back.what, back.code) == ("disk full", 28)
    assert back.__notes__ == ["while writing part 3"]
    assert "__reduce_ex__" not in vars(back)


@pytest.mark.parametrize(
    "exc",
    [
        KeyError(3),
        ValueError("bad"),
        ZeroDivisionError("division by zero"),
        OSError(2, "No such file", "a.txt"),
        SystemExit(3),
        KeyboardInterrupt(),
        GeneratorExit(),
        StopIteration(5),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_builtin_exceptions_are_kept(exc: BaseException) -> None:
    caught, tb = raised(exc)
    assert portable_exception(caught, tb) is caught
    back = round_trip(caught)
    assert type(back) is type(caught) and str(back) == str(caught)


def test_builtin_fast_path_does_not_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(obj: Any, protocol: int) -> bytes:
        raise pickle.PicklingError("refused")

    monkeypatch.setattr(_portable, "_DUMPERS", (refuse,))
    exc = ValueError("plain")
    exc.add_note("a note")
    assert portable_exception(exc, "") is exc
    assert portable_exception(SystemExit(2), "") is not None
    # A user's class is tried: with the refusing dumper it cannot be sent.
    assert isinstance(portable_exception(TwoArgError("x", 1), ""), gs.RemoteError)
    assert isinstance(portable_exception(KeyError(("a", [1])), ""), gs.RemoteError)  # not plain args


def test_base_exceptions_raised_by_a_task_stay_what_they_are() -> None:
    exc, tb = raised(TwoArgExit(4, "told to stop"))
    out = portable_exception(exc, tb)
    assert out is exc
    back = round_trip(out)
    assert type(back) is TwoArgExit and back.code == 4 and back.why == "told to stop"


def test_notes_survive() -> None:
    exc = ValueError("plain")
    exc.add_note("first")
    exc.add_note("second")
    assert round_trip(portable_exception(exc, "")).__notes__ == ["first", "second"]


def test_a_chain_does_not_stop_pickling_and_the_traceback_keeps_it() -> None:
    def fail() -> None:
        try:
            raise LockedError("the cause holds a lock")
        except LockedError as cause:
            raise TwoArgError("wrapped", 1) from cause

    try:
        fail()
    except TwoArgError as caught:
        exc, tb = caught, "".join(traceback.format_exception(caught))
    out = portable_exception(exc, tb)
    assert out is exc
    back = round_trip(out)
    assert type(back) is TwoArgError and back.__cause__ is None
    assert "the cause holds a lock" in tb and "direct cause" in tb


def test_a_locally_defined_class_comes_back_by_value() -> None:
    class LocalError(Exception):
        pass

    exc, tb = raised(LocalError("from a function"))
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(exc)
    out = portable_exception(exc, tb)
    assert out is exc  # cloudpickle sends the class by value (the wire falls back to it)
    back = round_trip(out, cloudpickle.dumps)
    assert type(back) is LocalError and str(back) == "from a function"


# -- portable_exception: a RemoteError stands in ----------------------------------------------


def test_unpicklable_attribute_becomes_remote_error_with_the_message() -> None:
    exc, tb = raised(LockedError("the original message"))
    exc.add_note("a note of the original")
    out = portable_exception(exc, tb)
    assert isinstance(out, gs.RemoteError) and isinstance(out, gs.GearshiftError)
    assert out.type_name == "test_portable.LockedError"
    assert out.message == "the original message"
    assert out.traceback == tb and "raised" in tb
    assert "lock" in out.reason
    assert str(out).startswith("test_portable.LockedError: the original message (could not be sent back intact: ")
    assert out.__notes__ == ["a note of the original"]
    back = round_trip(out)
    assert type(back) is gs.RemoteError and str(back) == str(out) and back.traceback == tb
    assert back.__notes__ == ["a note of the original"]


def test_a_local_class_with_an_unpicklable_attribute_is_named_in_full() -> None:
    class LocalLocked(LockedError):
        pass

    out = portable_exception(LocalLocked("x"), "")
    assert isinstance(out, gs.RemoteError)
    assert out.type_name.endswith("<locals>.LocalLocked") and out.type_name.startswith("test_portable.")


def test_an_exception_that_cannot_be_rebuilt_becomes_remote_error() -> None:
    exc, tb = raised(NeedsToken("no way back", token=1))
    out = portable_exception(exc, tb)
    assert isinstance(out, gs.RemoteError)
    assert out.message == str(exc) and out.type_name == "test_portable.NeedsToken"
    assert "needs a token" in out.reason
    assert "__reduce_ex__" not in vars(exc)  # the trial reduction is not left behind


def test_a_broken_str_does_not_break_the_stand_in() -> None:
    class BadStr(LockedError):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    out = portable_exception(BadStr("x"), "")
    assert isinstance(out, gs.RemoteError) and "str() failed" in out.message


def test_remote_error_of_a_builtin_uses_the_bare_name() -> None:
    exc = ValueError("v")
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    out = portable_exception(exc, "")
    assert isinstance(out, gs.RemoteError) and out.type_name == "ValueError"


def test_ten_megabyte_messages_are_fine() -> None:
    big = ValueError("x" * BIG)
    assert portable_exception(big, "") is big
    exc, tb = raised(TwoArgError("y" * BIG, 1))
    assert portable_exception(exc, tb) is exc and len(str(round_trip(exc))) > BIG
    out = portable_exception(LockedError("z" * BIG), "")
    assert isinstance(out, gs.RemoteError) and len(round_trip(out).message) == BIG


# -- gearshift's own errors --------------------------------------------------------------------


def own_errors() -> list[Any]:
    remote = gs.RemoteError("pkg.Custom", "it broke", "Traceback ...\n", "TypeError: cannot pickle")
    return [
        gs.TaskTimeout(2.5, item="slow", index=3),
        gs.WorkerCrashed(-9, item=("a", 1), index=7),
        gs.TaskCancelled(item="coro", index=4),
        gs.InitializerError("initializer raised"),
        gs.UnpicklableError("cannot send function f"),
        remote,
        gs.RemoteTraceback("Traceback (most recent call last):\n  ...\n"),
        gs.GearshiftError("plain"),
    ]


@pytest.mark.parametrize("dumps", DUMPERS)
@pytest.mark.parametrize("which", range(len(own_errors())), ids=[type(e).__name__ for e in own_errors()])
def test_every_gearshift_error_round_trips_with_its_attributes_and_notes(which: int, dumps: Any) -> None:
    error = own_errors()[which]
    error.add_note("noted on the way")
    back = round_trip(error, dumps)
    assert type(back) is type(error)
    assert back.args == error.args and str(back) == str(error) and repr(back) == repr(error)
    assert vars(back) == vars(error)
    assert back.__notes__ == ["noted on the way"]
    assert portable_exception(error, "") is error


@pytest.mark.parametrize("dumps", DUMPERS)
def test_failure_round_trips(dumps: Any) -> None:
    error = gs.TaskTimeout(1.5, item=[1, 2], index=9)
    error.add_note("n")
    failure = gs.Failure([1, 2], error, "Traceback ...", 9, 2)
    back = round_trip(failure, dumps)
    assert (back.item, back.traceback, back.index, back.attempts) == ([1, 2], "Traceback ...", 9, 2)
    assert type(back.exception) is gs.TaskTimeout and vars(back.exception) == vars(error)
    assert str(back) == str(failure)


def test_specific_attributes_survive() -> None:
    timeout = round_trip(gs.TaskTimeout(2.5, item="slow", index=3))
    assert (timeout.timeout, timeout.item, timeout.index) == (2.5, "slow", 3)
    assert isinstance(timeout, TimeoutError)
    crashed = round_trip(gs.WorkerCrashed(-9, item="x", index=1))
    assert crashed.exitcode == -9 and "SIGKILL" in str(crashed)
    remote = round_trip(gs.RemoteError("a.B", "m", "tb", "why"))
    assert (remote.type_name, remote.message, remote.traceback, remote.reason) == ("a.B", "m", "tb", "why")
    assert round_trip(gs.RemoteTraceback("the tb")).tb == "the tb"


# -- portable_value ----------------------------------------------------------------------------


def test_plain_values_pass() -> None:
    value = {"a": [1, 2.5, "x"], "b": b"\0" * 10}
    assert portable_value(value) == (True, value)


def test_values_only_cloudpickle_can_send_pass() -> None:
    offset = 3
    ok, value = portable_value(lambda x: x + offset)
    assert ok and value(1) == 4


def test_an_unpicklable_result_fails_with_the_pickling_error_naming_its_type() -> None:
    ok, error = portable_value({"lock": threading.Lock()})
    assert not ok
    assert type(error) is TypeError and "cannot pickle '_thread.lock' object" in str(error)
    notes = "\n".join(error.__notes__)
    assert "a dict object" in notes and "gear='thread'" in notes
    assert portable_exception(error, "") is error and round_trip(error).__notes__ == error.__notes__


def test_a_result_whose_pickling_error_cannot_travel_becomes_remote_error() -> None:
    ok, error = portable_value(ResultWithBadReduce())
    assert not ok and isinstance(error, gs.RemoteError)
    assert error.type_name == "test_portable.LockedError" and "refuses" in error.message
    assert any("test_portable.ResultWithBadReduce" in note for note in error.__notes__)
    round_trip(error)


def test_an_exception_returned_as_a_value_is_made_portable() -> None:
    ok, value = portable_value(TwoArgError("returned", 5))
    assert ok and type(round_trip(value)) is TwoArgError and round_trip(value).code == 5


# -- unpicklable_item --------------------------------------------------------------------------


def pickling_error(obj: Any) -> Exception:
    try:
        pickle.dumps(obj, protocol=5)
    except Exception as exc:
        return exc
    raise AssertionError(f"{obj!r} pickled")


def test_an_unpicklable_item_keeps_the_pickling_errors_type_and_message() -> None:
    item = ("data", threading.Lock())
    exc = pickling_error(item)
    out = unpicklable_item(exc, item, 3)
    assert out is exc and type(out) is TypeError
    assert str(out) == "cannot pickle '_thread.lock' object"
    notes = "\n".join(out.__notes__)
    assert "item #3 ('data', <unlocked _thread.lock" in notes and "gear='thread'" in notes
    with pytest.raises(TypeError, match="#3"):  # pytest matches notes too
        raise out


def test_a_local_object_item_keeps_its_own_error_type() -> None:
    def local() -> None:
        pass

    exc = pickling_error(local)
    kind = type(exc)
    out = unpicklable_item(exc, local, None)
    assert type(out) is kind and any(note.startswith("an item <function") for note in out.__notes__)  # 3.14 adds notes


def test_notes_set_to_a_non_list_do_not_hide_the_error() -> None:
    exc = TypeError("x")
    exc.__notes__ = "not a list"  # type: ignore[assignment]
    assert unpicklable_item(exc, 1, 0).__notes__[0].startswith("item #0 1")


def test_unpicklable_error_is_still_a_type_error() -> None:
    assert issubclass(gs.UnpicklableError, TypeError) and issubclass(gs.UnpicklableError, gs.GearshiftError)


# -- end to end, through the process gear -------------------------------------------------------



def two_arg_on_3(x: int) -> int:
    if x == 3:
        raise TwoArgError("item three is bad", x)
    return x * 2


def locked_on_3(x: int) -> int:
    if x == 3:
        raise LockedError(f"item {x} holds a lock")
    return x * 2


def test_e2e_two_arg_exception_is_collected_in_place() -> None:
    out = gs.map(two_arg_on_3, range(10), gear="process", workers=2, errors="collect")
    assert [v for i, v in enumerate(out) if i != 3] == [i * 2 for i in range(10) if i != 3]
    failure = out[3]
    assert isinstance(failure, gs.Failure) and failure.index == 3
    assert isinstance(failure.exception, (TwoArgError, gs.RemoteError))
    assert "item three is bad" in str(failure.exception) and "two_arg_on_3" in failure.traceback


def test_e2e_unpicklable_attribute_comes_back_as_remote_error() -> None:
    out = gs.map(locked_on_3, range(10), gear="process", workers=2, errors="collect")
    assert [v for i, v in enumerate(out) if i != 3] == [i * 2 for i in range(10) if i != 3]
    error = out[3].exception
    assert isinstance(error, gs.RemoteError) and "item 3 holds a lock" in error.message
    assert error.type_name == "test_portable.LockedError" and "locked_on_3" in error.traceback


def test_e2e_raise_gives_the_original_type_with_the_worker_traceback() -> None:
    with pytest.raises(TwoArgError) as info:
        gs.map(two_arg_on_3, range(10), gear="process", workers=2)
    assert info.value.code == 3
    cause = info.value.__cause__
    assert isinstance(cause, gs.RemoteTraceback) and "two_arg_on_3" in cause.tb


def test_e2e_unpicklable_item_fails_only_that_item() -> None:
    items: list[Any] = [(0,), (1,), (2, threading.Lock()), (3,)]
    out = gs.map(repr, items, gear="process", workers=2, errors="collect")
    assert [out[0], out[1], out[3]] == ["(0,)", "(1,)", "(3,)"]
    failure = out[2]
    assert isinstance(failure, gs.Failure) and type(failure.exception) is TypeError
    assert any("#2" in note for note in failure.exception.__notes__)


def test_e2e_unpicklable_item_under_raise_is_the_pickling_error_noted() -> None:
    with pytest.raises(TypeError, match="#1") as info:
        gs.map(repr, [(0,), (1, threading.Lock()), (2,)], gear="process", workers=2)
    assert type(info.value) is TypeError and "gear='thread'" in "\n".join(info.value.__notes__)


def test_e2e_a_class_defined_in_the_callers_function_is_caught_as_itself() -> None:
    """The closure travels by value with cloudpickle, its class too; the exception comes back as that class."""

    class Oops(Exception):
        def __init__(self, what: str, x: int) -> None:
            super().__init__(f"{what}: {x}")

    def work(x: int) -> int:
        if x == 2:
            raise Oops("local", x)
        return x

    with pytest.raises(Oops, match="local: 2"):
        gs.map(work, range(5), gear="process", workers=2)


TBLIB_SCRIPT = """
import sys
import gearshift as gs
import distributed  # installs tblib's reducers for every exception class, process-wide
from tests_portable_helpers import raise_it
out = gs.map(raise_it, ["unicode", "exit", "group"], gear="process", workers=1, errors="collect")
for f in out:
    e = f.exception
    print(type(e).__name__, repr(str(e)) if not isinstance(e, SystemExit) else e.code)
"""


def test_exceptions_survive_when_dask_has_installed_tblib(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    (tmp_path / "tests_portable_helpers.py").write_text(
        "def raise_it(kind):\n"
        "    if kind == 'unicode':\n"
        "        raise UnicodeDecodeError('utf-8', b'\\xff', 0, 1, 'bad')\n"
        "    if kind == 'exit':\n"
        "        raise SystemExit(3)\n"
        "    raise BaseExceptionGroup('group', [KeyboardInterrupt(), ValueError('v')])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", TBLIB_SCRIPT], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "UnicodeDecodeError \"'utf-8' codec can't decode byte 0xff in position 0: bad\"", lines
    assert lines[1] == "SystemExit 3", lines
    assert lines[2].startswith("BaseExceptionGroup 'group"), lines
