"""Run CPython's own tests for its pools against gearshift's drop-ins.

    python scripts/cpython_suites.py [SUITE ...] [--json FILE]

The suites are CPython 3.13's (its ``test`` package, from the pyenv 3.13 on this machine):
concurrent.futures' executor, wait and as_completed tests against ``gs.ThreadPoolExecutor``
and ``gs.ProcessPoolExecutor``, and multiprocessing's ``_TestPool`` against ``gs.Pool``.
Each suite runs in its own 3.13 interpreter (a venv, ``.venv313``, made with
``pip install -e .`` when missing), in which the stdlib names are replaced by gearshift's
before the tests are imported; a suite that hangs is stopped after ``SUITE_TIMEOUT``.
Prints a pass/fail summary per suite and exits non-zero if any test fails.

A test the drop-ins cannot pass for a principled reason is in ``SKIP``, with its reason.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv313"
SUITE_TIMEOUT = 900
#: A test still running after this many seconds is a hang: the suite stops there, the test fails.
TEST_TIMEOUT = 60

#: name -> (test modules, test classes to keep (None: all), what replaces what)
SUITES: dict[str, tuple[list[str], str | None, str]] = {
    "thread": (
        ["test.test_concurrent_futures.test_thread_pool"],
        None,
        "executors",
    ),
    "process": (
        ["test.test_concurrent_futures.test_process_pool"],
        None,
        "executors",
    ),
    "wait": (["test.test_concurrent_futures.test_wait"], None, "executors"),
    "as_completed": (["test.test_concurrent_futures.test_as_completed"], None, "executors"),
    "pool-fork": (["test.test_multiprocessing_fork.test_processes"], "WithProcessesTestPool", "pool"),
    "pool-forkserver": (["test.test_multiprocessing_forkserver.test_processes"], "WithProcessesTestPool", "pool"),
    "threadpool": (["test.test_multiprocessing_fork.test_threads"], "WithThreadsTestPool", "pool"),
}

#: Test ids (or their method names, for every class) the drop-ins skip, each with why.
SKIP: dict[str, str] = {
    "test_idle_process_reuse_one": "the process gear starts all its workers with the pool (forked before any "
    "thread runs user code), not one by one on demand",
    "test_idle_process_reuse_multiple": "the same: all workers start with the pool",
}


# -- the outer side: a 3.13 venv, one child interpreter per suite -------------------------------
def python313() -> str:
    """The machine's CPython 3.13 (pyenv), which ships its ``test`` package."""
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    for root in filter(None, roots):
        found = sorted(glob.glob(os.path.join(root, "versions", "3.13*", "bin", "python3.13")))
        if found:
            return found[-1]
    raise SystemExit("cpython_suites: no CPython 3.13 found under ~/.pyenv/versions (or $PYENV_ROOT)")


def ensure_venv() -> Path:
    """``.venv313`` with gearshift installed (editable); made on first use, repaired if broken."""
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import gearshift.dropins, test.test_concurrent_futures"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"cpython_suites: making {VENV} (python 3.13, pip install -e .)", flush=True)
    subprocess.run([python313(), "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True, env=env)
    subprocess.run(check, check=True)
    return python


def run_suite(python: Path, name: str) -> dict[str, Any]:
    """One suite in its own interpreter (the patches and the start method stay in it).

    A test that hangs stops that interpreter; the suite goes on in a fresh one without the
    tests already done, so one hang does not hide the rest.
    """
    total: dict[str, Any] = {"passed": [], "failed": {}, "skipped": {}}
    started = time.monotonic()
    while True:
        done = [*total["passed"], *total["failed"], *total["skipped"]]
        result, code, log = run_once(python, name, done)
        total["passed"] += result.get("passed", [])
        total["failed"].update(result.get("failed", {}))
        total["skipped"].update(result.get("skipped", {}))
        hung = result.get("running")
        if hung:
            total["failed"][hung] = f"hung (still running after {TEST_TIMEOUT}s)\n{log[-3000:]}"
            if time.monotonic() - started < SUITE_TIMEOUT:
                continue
        elif not out_ok(result, code):
            total["failed"]["<suite>"] = f"the suite's interpreter ended with {code}:\n{log[-4000:]}"
        total["seconds"] = round(time.monotonic() - started, 1)
        return total


def run_once(python: Path, name: str, exclude: list[str]) -> tuple[dict[str, Any], int | str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        excluded = Path(tmp) / "exclude.json"
        excluded.write_text(json.dumps(exclude))
        cmd = [str(python), __file__, "--inside", name, "--json", str(out), "--exclude", str(excluded)]
        try:
            proc = subprocess.run(cmd, cwd=tmp, timeout=SUITE_TIMEOUT, capture_output=True, text=True)
            code: int | str = proc.returncode
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code = f"timed out after {SUITE_TIMEOUT}s"
            parts = (exc.stdout, exc.stderr)
            log = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in parts)
        result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    return result, code, log


def out_ok(result: dict[str, Any], code: int | str) -> bool:
    return code in (0, 1) and bool(result.get("done"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    parser.add_argument("--exclude", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="print each failure's traceback")
    args = parser.parse_args(argv)
    if args.inside:
        exclude = set(json.loads(Path(args.exclude).read_text())) if args.exclude else set()
        return inside(args.inside, args.json, exclude)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    python = ensure_venv()
    results = {}
    for name in args.suites or list(SUITES):
        print(f"== {name}", flush=True)
        results[name] = result = run_suite(python, name)
        print(summary_line(name, result), flush=True)
        for test, why in result["failed"].items():
            print(f"   FAIL {test}" + (f"\n{why}" if args.verbose else f": {why.strip().splitlines()[-1]}"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("== summary")
    for name, result in results.items():
        print(summary_line(name, result))
    return 1 if any(result["failed"] for result in results.values()) else 0


def summary_line(name: str, result: dict[str, Any]) -> str:
    passed, failed, skipped = len(result["passed"]), len(result["failed"]), len(result["skipped"])
    return f"{name:16} {passed:3} passed {failed:3} failed {skipped:3} skipped  ({result['seconds']} s)"


# -- the inner side: the patched 3.13 interpreter ------------------------------------------------
def patch(kind: str) -> None:
    """Put gearshift's pools where the tests take the stdlib's, before the tests are imported."""
    import concurrent.futures as cf
    import concurrent.futures.process as cfp
    import concurrent.futures.thread as cft

    import gearshift as gs
    from gearshift.dropins import ProcessPoolExecutor, ThreadPoolExecutor

    if kind == "executors":
        cf.ThreadPoolExecutor = cft.ThreadPoolExecutor = ThreadPoolExecutor  # type: ignore[misc]
        cf.ProcessPoolExecutor = cfp.ProcessPoolExecutor = ProcessPoolExecutor  # type: ignore[misc]
        return
    import multiprocessing
    import multiprocessing.dummy

    def process_pool(
        processes: int | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        maxtasksperchild: int | None = None,
    ) -> gs.Pool:
        # As multiprocessing.Pool (the default context's method) does: in the current context.
        return gs.Pool(processes, initializer, initargs, maxtasksperchild, multiprocessing.get_context())

    def thread_pool(processes: int | None = None, initializer: Any = None, initargs: tuple[Any, ...] = ()) -> gs.Pool:
        return gs.Pool(processes, initializer, initargs, gear="thread")

    multiprocessing.Pool = process_pool  # type: ignore[assignment]
    multiprocessing.dummy.Pool = thread_pool  # type: ignore[assignment]


def tests_of(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from tests_of(test)
        else:
            yield test


def skip_reason(test: unittest.TestCase) -> str | None:
    return SKIP.get(test.id()) or SKIP.get(test.id().rsplit(".", 1)[-1])


class Recorder(unittest.TextTestResult):
    """Writes the outcome so far after each test, and the test running now: a hang is named."""

    out: Path | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passed: list[str] = []

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.passed.append(test.id())

    def startTest(self, test: unittest.TestCase) -> None:
        import faulthandler

        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)  # a hang shows where it hangs
        self.save(running=test.id())
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)
        self.save()

    def save(self, running: str | None = None, done: bool = False) -> None:
        if self.out is None:
            return
        failed = {test.id(): text for test, text in self.failures + self.errors}
        failed.update({test.id(): "unexpected success" for test in self.unexpectedSuccesses})
        skipped = {test.id(): why for test, why in self.skipped}
        record = {"ran": self.testsRun, "passed": self.passed, "failed": failed, "skipped": skipped}
        record.update({"running": running, "done": done})
        self.out.write_text(json.dumps(record))


def inside(name: str, out: str | None, exclude: set[str]) -> int:
    modules, keep, kind = SUITES[name]
    patch(kind)
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for module in modules:
        for test in tests_of(loader.loadTestsFromName(module)):
            if (keep is not None and type(test).__name__ != keep) or test.id() in exclude:
                continue
            reason = skip_reason(test)
            if reason is not None:
                method = test._testMethodName
                setattr(test, method, unittest.skip(f"gearshift: {reason}")(getattr(test, method)))
            suite.addTest(test)
    Recorder.out = Path(out) if out else None
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stderr, resultclass=Recorder).run(suite)
    assert isinstance(result, Recorder)
    result.save(done=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal exit: a failed test may leave calls blocked forever (test_saturation's), and
    # exit would wait for them, as the stdlib's executors' exit does. The results are saved.
    os._exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
