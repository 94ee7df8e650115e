"""gearshift's benchmark suite: every workload, every contender, side by side, one command.

    python bench/run.py [--quick] [--repeat N] [--only NAME[,NAME]] [--json FILE]

Contenders of a workload run interleaved in one process: repeat 1 of each, then
repeat 2 of each, ... (the order rotates by one each repeat), so machine noise spreads
over all of them. Reported per contender: median and min of the repeats, speed-up
over the serial loop and against the best peer (both: higher is better), then the
targets from the issues. See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Workers started by spawn/forkserver (loky, 3.14's default) must import `workloads` too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)

import psutil  # noqa: E402
import workloads as wl  # noqa: E402
from peers import BASELINE, GEARSHIFT, INFO, PEER, Contender, contenders, loky_shutdown  # noqa: E402

import gearshift as gs  # noqa: E402

PACKAGES = ("gearshift", "joblib", "mpire", "numpy", "uvloop", "cloudpickle", "psutil")
#: Child processes that belong to the interpreter's machinery, not to a contender's pool.
INFRA = ("resource_tracker", "semaphore_tracker", "forkserver")
#: Seconds after which a run is reported as slow (it is not stopped).
SLOW_RUN = 60.0


# --- the machine ----------------------------------------------------------------------


def gil_enabled() -> bool:
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": usable,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "gil_enabled": gil_enabled(),
        "mp_start_method": multiprocessing.get_start_method(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "gearshift_commit": git_commit(),
        "packages": {p: version(p) for p in PACKAGES},
    }


def auto_status() -> str | None:
    """None when gear="auto" works, else why it is skipped."""
    try:
        gs.map(abs, [1, -2], gear="auto")
    except ValueError as exc:
        return f'gear="auto" is not available yet ({exc})'
    except Exception as exc:
        return f'gear="auto" failed on a trivial map: {type(exc).__name__}: {exc}'
    return None


# --- one timed run ----------------------------------------------------------------------


def spot_checks(fn: Any, items: list[Any]) -> dict[int, Any]:
    """Expected results at a few positions, computed untimed, to catch a wrong answer."""
    import asyncio
    import inspect

    out = {}
    for i in sorted({0, len(items) // 2, len(items) - 1}):
        value = fn(items[i])
        out[i] = asyncio.run(value) if inspect.isawaitable(value) else value
    return out


def infra(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(word in cmdline for word in INFRA)


def leftovers(threads_before: set[int]) -> list[str]:
    """Notes on processes or threads a contender left behind; stray processes are killed."""
    notes = []
    kids = [p for p in psutil.Process().children(recursive=True) if not infra(p)]
    _, alive = psutil.wait_procs(kids, timeout=3)
    if alive:
        notes.append(f"left {len(alive)} child process(es) running; killed them")
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=3)
    deadline = time.monotonic() + 2
    while True:
        extra = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if extra:
        notes.append(f"left {len(extra)} thread(s) alive: {', '.join(sorted({t.name for t in extra}))[:120]}")
    return notes


def what_ran(results: Any) -> str | None:
    """For gearshift: the gear, workers and final chunk size its report shows (auto's choice)."""
    report = getattr(results, "report", None)
    if report is None:
        return None
    text = f"ran: {report.gear}, chunks of {report.chunksize}"
    speedup = getattr(getattr(report, "advice", None), "speedup", None)
    if isinstance(speedup, float) and speedup > 0:  # 0: chosen without a prediction (coroutines)
        text += f", predicted {speedup:.2f}x"
    return text


def run_once(c: Contender, items: list[Any], expected: dict[int, Any]) -> tuple[float | None, str | None, list[str]]:
    """One setup -> timed run -> teardown; returns (seconds, error, notes)."""
    notes: list[str] = []
    threads_before = {t.ident for t in threading.enumerate() if t.ident is not None}
    seconds = error = None
    # No way to stop a hung pool from outside it; at least say which contender hangs.
    watchdog = threading.Timer(SLOW_RUN, lambda: print(
        f"  ... {c.label} still running after {SLOW_RUN:g} s (Ctrl-C stops the suite)", file=sys.stderr))
    watchdog.daemon = True
    watchdog.start()
    try:
        if c.setup is not None:
            c.setup(items)
        gc.collect()
        start = time.perf_counter()
        results = c.run(items)
        seconds = time.perf_counter() - start
        ran = what_ran(results)
        if ran:
            notes.append(ran)
        if len(results) != len(items):
            error = f"wrong answer: {len(results)} results for {len(items)} items"
        else:
            wrong = [i for i, value in expected.items() if results[i] != value]
            if wrong:
                error = f"wrong answer at position(s) {wrong}"
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(limit=4, file=sys.stderr)
    finally:
        watchdog.cancel()
        watchdog.join()
        if c.teardown is not None:
            try:
                c.teardown()
            except Exception as exc:
                error = error or f"teardown: {type(exc).__name__}: {exc}"
    return (None if error else seconds), error, notes + leftovers(threads_before)


# --- a workload -------------------------------------------------------------------------


def run_workload(w: wl.Workload, args: argparse.Namespace, auto_note: str | None, free: bool) -> dict[str, Any]:
    items = w.make_items(args.quick)
    cons = contenders(w, args.workers, free)
    if args.contender:
        cons = [c for c in cons if c.group == BASELINE or any(s in c.key for s in args.contender)]
    notes: list[str] = []
    if auto_note:
        cons = [c for c in cons if c.key != "gs-auto"]
        notes.append(f"gs auto skipped: {auto_note}")
    prepared = {c.key: c.prepare(items) if c.prepare else items for c in cons}
    expected = spot_checks(w.fn, items)
    times: dict[str, list[float]] = {c.key: [] for c in cons}
    errors: dict[str, str] = {}
    run_notes: dict[str, list[str]] = {c.key: [] for c in cons}
    for r in range(args.repeat):
        shift = r % len(cons)
        for c in cons[shift:] + cons[:shift]:
            if c.key in errors:
                continue  # a failed contender is not retried: its error is reported once
            seconds, error, left = run_once(c, prepared[c.key], expected)
            for note in left:
                if note not in run_notes[c.key]:
                    run_notes[c.key].append(note)
            if error:
                errors[c.key] = error
                print(f"  ! {c.label}: {error}", file=sys.stderr)
            elif seconds is not None:
                times[c.key].append(seconds)
        print(f"  {w.name}: repeat {r + 1}/{args.repeat} done", file=sys.stderr)
    loky_shutdown()

    rows = []
    for c in cons:
        ts = times[c.key]
        rows.append({
            "key": c.key, "label": c.label, "group": c.group, "times": [round(t, 6) for t in ts],
            "median": statistics.median(ts) if ts else None, "min": min(ts) if ts else None,
            "error": errors.get(c.key), "notes": run_notes[c.key],
        })
    by_key = {row["key"]: row for row in rows}
    serial_row = by_key.get("serial")
    if serial_row and serial_row["median"]:
        serial, serial_kind = serial_row["median"], "measured"
    elif w.ideal_serial is not None:
        serial, serial_kind = w.ideal_serial(items), "ideal (sum of the waits; not run)"
    else:
        serial, serial_kind = None, "none"
    best_peer = _best(rows, PEER)
    best_gear = _best(rows, GEARSHIFT)
    for row in rows:
        m = row["median"]
        row["x_serial"] = serial / m if serial and m else None
        row["x_best_peer"] = best_peer["median"] / m if best_peer and m else None
    return {
        "name": w.name, "what": w.what, "items": len(items), "fn": w.fn.__name__,
        "threads": w.threads or args.workers, "processes": args.workers,
        "serial_seconds": serial, "serial_kind": serial_kind,
        "best_peer": best_peer["key"] if best_peer else None,
        "best_gear": best_gear["key"] if best_gear else None,
        "contenders": rows, "targets": targets(w, rows, serial), "notes": notes,
    }


def _best(rows: list[dict[str, Any]], group: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["group"] == group and r["median"]]
    return min(ok, key=lambda r: r["median"]) if ok else None


def targets(w: wl.Workload, rows: list[dict[str, Any]], serial: float | None) -> list[dict[str, Any]]:
    """Each target of the workload (and the auto target) checked on medians."""
    by_key = {r["key"]: r for r in rows}
    out = []
    for t in (*w.targets, wl.AUTO_TARGET):
        row = by_key.get(t.contender)
        if t.kind == "speedup":
            ref, ref_label = serial, "serial"
        elif t.kind == "best_peer":
            best = _best(rows, PEER)
            ref, ref_label = (best["median"], best["label"]) if best else (None, "best peer")
        elif t.kind == "peer":
            best = _best([r for r in rows if r["key"].startswith(t.other)], PEER)
            ref, ref_label = (best["median"], best["label"]) if best else (None, t.other)
        elif t.kind == "gear":
            other = by_key.get(t.other)
            ref, ref_label = (other["median"], other["label"]) if other else (None, t.other)
        elif t.kind == "manual":
            best = _best(rows, GEARSHIFT)
            ref, ref_label = (best["median"], best["label"]) if best else (None, "best manual gear")
        else:
            raise ValueError(f"unknown target kind {t.kind!r}")
        if row is None or not row["median"] or not ref:
            out.append({"source": t.source, "contender": t.contender, "ok": None, "text": "not measured"})
            continue
        if t.kind == "speedup":
            value = ref / row["median"]
            ok = value >= t.bound
            text = f"{value:.2f}x {ref_label} (needs >= {t.bound:g}x)"
        else:
            value = row["median"] / ref
            ok = value <= t.bound
            text = f"{value:.2f}x the time of {ref_label} (needs <= {t.bound:g}x)"
        out.append({"source": t.source, "contender": t.contender, "ok": ok, "value": round(value, 4), "text": text})
    return out


# --- output -------------------------------------------------------------------------------


def fmt_s(x: float | None) -> str:
    """Seconds to 3 significant digits (quick runs and tiny workloads go well below 1 ms)."""
    if x is None:
        return "-"
    return f"{x:.3f}" if x >= 0.1 else f"{x:.3g}"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_machine(m: dict[str, Any], args: argparse.Namespace, auto_note: str | None) -> None:
    print("gearshift benchmark suite" + (" (--quick: smoke-run sizes, numbers mean nothing)" if args.quick else ""))
    print(f"  date (UTC)   {m['date_utc']}   commit {m['gearshift_commit']}")
    print(f"  CPU          {m['cpu_model']}: {m['cores_physical']} physical / {m['cores_logical']} logical cores, "
          f"{m['cores_usable']} usable; {m['memory_gb']} GB RAM")
    print(f"  OS           {m['os']}")
    print(f"  Python       {m['implementation']} {m['python']}, GIL {'enabled' if m['gil_enabled'] else 'disabled'}, "
          f"multiprocessing start method {m['mp_start_method']}")
    print("  packages     " + ", ".join(f"{k} {v or '-'}" for k, v in m["packages"].items()))
    print(f"  load average {m['load_average_start']} at start; repeats {args.repeat}; process workers {args.workers}")
    if m["load_average_start"][0] > 0.5 * (m["cores_usable"] or 1):
        print("  WARNING: the machine is busy (1-minute load average above half the cores): timings are noisy")
    if auto_note:
        print(f"  NOTE: {auto_note}; its contender is skipped")
    print()


def print_workload(res: dict[str, Any]) -> None:
    print(f"== {res['name']}: {res['what']} ({res['items']} items, fn={res['fn']})")
    if res["serial_kind"] != "measured":
        print(f"   serial reference: {fmt_s(res['serial_seconds'])} s, {res['serial_kind']}")
    header = f"   {'contender':<44}{'median s':>10}{'min s':>10}{'x serial':>10}{'x best peer':>13}  runs  note"
    print(header)
    print("   " + "-" * (len(header) - 3))
    for r in res["contenders"]:
        tags = []
        if r["key"] == res["best_peer"]:
            tags.append("best peer")
        if r["key"] == res["best_gear"]:
            tags.append("best gear")
        if r["group"] == INFO:
            tags.append("info: warm pool, not compared")
        if r["error"]:
            tags.append(f"FAILED: {r['error']}"[:100])
        tags.extend(r["notes"])
        print(f"   {r['label']:<44}{fmt_s(r['median']):>10}{fmt_s(r['min']):>10}{fmt_x(r['x_serial']):>10}"
              f"{fmt_x(r['x_best_peer']):>13}  {len(r['times']):>4}  {'; '.join(tags)}")
    for t in res["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["ok"]]
        print(f"   target {mark} {t['contender']}: {t['text']}  [{t['source']}]")
    for note in res["notes"]:
        print(f"   note: {note}")
    print()


def print_summary(results: list[dict[str, Any]]) -> None:
    print("== targets")
    for res in results:
        for t in res["targets"]:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["ok"]]
            print(f"   {mark}  {res['name']:<14}{t['contender']:<12}{t['text']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = ", ".join(w.name for w in wl.WORKLOADS)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shrink every workload ~10x (smoke runs; numbers mean nothing)")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed runs per contender (default 5); median and min reported")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these workloads (repeat or comma-separate): {names}")
    p.add_argument("--contender", action="append", default=[], metavar="KEY",
                   help="run only contenders whose key contains KEY (the serial loop always runs), e.g. gs-,loky")
    p.add_argument("--workers", type=int, default=2, help="workers of every process pool (default 2)")
    p.add_argument("--json", metavar="FILE", help="also write the machine, settings and every timing as JSON")
    p.add_argument("--list", action="store_true", help="list workloads and their contenders, run nothing")
    args = p.parse_args(argv)
    args.only = [n for chunk in args.only for n in chunk.split(",") if n]
    args.contender = [n for chunk in args.contender for n in chunk.split(",") if n]
    if args.repeat < 1 or args.workers < 1:
        p.error("--repeat and --workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = wl.by_name(args.only)
    free = not gil_enabled()
    if args.list:
        for w in chosen:
            print(f"{w.name}: {w.what}")
            for c in contenders(w, args.workers, free):
                print(f"    {c.key:<16}{c.label:<44}{c.group}")
        return 0
    m = machine()
    auto_note = auto_status()
    print_machine(m, args, auto_note)
    results = []
    started = time.perf_counter()
    interrupted = False
    try:
        for w in chosen:
            res = run_workload(w, args, auto_note, free)
            print_workload(res)
            results.append(res)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: the workloads finished so far are reported below", file=sys.stderr)
    finally:
        loky_shutdown()
    print_summary(results)
    m["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    m["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(f"\nload average {m['load_average_end']} at the end; {m['wall_seconds']} s in all")
    if args.json:
        payload = {"machine": m, "settings": {"quick": args.quick, "repeat": args.repeat, "workers": args.workers,
                                              "only": args.only, "contender": args.contender},
                   "auto_note": auto_note, "interrupted": interrupted, "workloads": results}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
