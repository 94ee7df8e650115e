"""The lab's findings as a terminal table, JSON, and one self-contained HTML page with a plot per claim."""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from collections import Counter
from typing import TYPE_CHECKING, Any

from gearshift._lab._core import VERDICTS, Finding, Quantity, fmt

if TYPE_CHECKING:
    from gearshift._lab import LabReport

PM = "\u00b1"
COLOURS = {"holds": "#2e7d32", "does not hold": "#c62828", "depends": "#ef6c00", "not measurable here": "#616161"}


def machine_line(report: LabReport) -> str:
    m = report.machine
    gil = "GIL enabled" if m.gil_enabled else "GIL disabled (free-threaded)"
    return (f"{m.implementation} {m.python}, {gil}, {m.cores} cores, loop {m.loop}, "
            f"processes start by {m.start_method}")


def summary(report: LabReport) -> str:
    counts = Counter(f.verdict for f in report.findings)
    return ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])


def table(report: LabReport, width: int = 110) -> str:
    """One block per claim: verdict and id, the claim in the notes' words, what was measured, what it means."""
    verdict_w = max(len(v) for v in VERDICTS)
    id_w = max([len(f.id) for f in report.findings] + [5])
    indent = " " * (verdict_w + id_w + 4)
    lines = [f"gearshift lab ({report.size}): {machine_line(report)}", ""]
    for f in report.findings:
        lines.append(f"{f.verdict:<{verdict_w}}  {f.id:<{id_w}}  {f.claim}")
        measured = f.explanation + (f" ({f.noise})" if f.noise else "")
        for label, text in (("measured", measured), ("means", f.meaning)):
            wrapped = textwrap.wrap(text, max(40, width - len(indent) - 10)) or [""]
            lines.append(f"{indent}{label + ':':<10}{wrapped[0]}")
            lines.extend(f"{indent}{'':<10}{rest}" for rest in wrapped[1:])
    state = "interrupted after" if report.interrupted else "done in"
    lines += ["", f"{len(report.findings)} claims: {summary(report)}; {state} {report.seconds:.1f}s"]
    return "\n".join(lines)


def _finite(obj: Any) -> Any:
    """NaN and infinities become null, so the JSON stays strict JSON."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def json_text(report: LabReport) -> str:
    return json.dumps(_finite(report.to_json()), indent=2, allow_nan=False)


def _bars(ax: Any, items: list[Quantity], unit: str) -> None:
    names = [m.name for m in items]
    medians = [m.median for m in items]
    low = [m.median - min(m.values) for m in items]
    high = [max(m.values) - m.median for m in items]
    ys = list(range(len(items)))
    ax.barh(ys, medians, xerr=[low, high], color="#5c88c4", ecolor="black", capsize=3)
    for y, m in zip(ys, items, strict=True):
        ax.plot(list(m.values), [y] * len(m.values), "k.", markersize=4, alpha=0.6)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel(unit or "ratio", fontsize=8)
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    if unit == "x":  # ratios: the line where neither side wins
        ax.axvline(1.0, color="#c62828", linewidth=1, linestyle="--")
    if medians and min(medians) > 0 and max(medians) / min(medians) > 100:
        ax.set_xscale("log")


def plot_png(finding: Finding) -> bytes:
    """One figure: the Amdahl curve for upper-bound, else bars per unit (median, min-max, each repeat a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if finding.plot.get("kind") == "amdahl":
        fig, ax = plt.subplots(figsize=(6.5, 3.2), dpi=90)
        share, cores = float(finding.plot["share"]), int(finding.plot["cores"])
        points = {int(k): v for k, v in finding.plot["points"].items()}
        top = max([*points, cores, 2])
        xs = [1 + (top - 1) * i / 50 for i in range(51)]
        ax.plot(xs, [1 / (share + (1 - share) / min(x, cores)) for x in xs], "--", color="black",
                label=f"Amdahl bound, serial share {share:.0%} on {cores} cores")
        ax.plot(xs, xs, ":", color="grey", label="linear")
        for w, vals in sorted(points.items()):
            ax.plot([w] * len(vals), vals, "o", color="#5c88c4", alpha=0.7)
        ax.set_xlabel("processes", fontsize=8)
        ax.set_ylabel("speedup over serial", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    else:
        groups: dict[str, list[Quantity]] = {}
        for m in finding.measured:
            if m.values and all(v == v for v in m.values):
                groups.setdefault(m.unit, []).append(m)
        groups = dict(list(groups.items())[:3])
        n = max(1, len(groups))
        height = max(1.6, 0.45 * max([len(v) for v in groups.values()] + [1]) + 0.9)
        fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.5, height), dpi=90, squeeze=False)
        for ax, (unit, items) in zip(axes[0], groups.items(), strict=False):
            _bars(ax, items, unit)
        if not groups:
            axes[0][0].text(0.5, 0.5, "nothing measured", ha="center", va="center")
            axes[0][0].set_axis_off()
    fig.suptitle(f"{finding.id}: {finding.verdict}", fontsize=9, color=COLOURS[finding.verdict])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def html_page(report: LabReport) -> str:
    """A self-contained page: no file or network besides itself (plots are data URIs)."""
    e = html.escape
    rows, sections = [], []
    for f in report.findings:
        colour = COLOURS[f.verdict]
        badge = f'<span class="badge" style="background:{colour}">{e(f.verdict)}</span>'
        rows.append(f'<tr><td><a href="#{e(f.id)}">{e(f.id)}</a></td><td>{badge}</td><td>{e(f.explanation)}</td></tr>')
        measured = "".join(
            f"<tr><td>{e(m.name)}</td><td>{e(fmt(m.median, m.unit))}</td>"
            f"<td>{e(', '.join(fmt(v) for v in m.values))}</td>"
            f"<td>{'' if len(m.values) < 2 else f'{PM}{m.spread:.0%}'}</td></tr>"
            for m in f.measured)
        png = base64.b64encode(plot_png(f)).decode("ascii")
        noise = f.noise.replace("+-", PM)
        sections.append(f"""
<section id="{e(f.id)}">
  <h2>{e(f.id)} {badge}</h2>
  <p class="claim">&ldquo;{e(f.claim)}&rdquo;</p>
  <p><b>Measured:</b> {e(f.explanation)} <span class="noise">({e(noise)}, {f.seconds:.1f}s)</span></p>
  <p><b>What it means:</b> {e(f.meaning)}</p>
  <img alt="plot of {e(f.id)}" src="data:image/png;base64,{png}">
  <table class="m"><tr><th>quantity</th><th>median</th><th>repeats</th><th>spread</th></tr>{measured}</table>
</section>""")
    state = "interrupted after" if report.interrupted else "done in"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gearshift lab</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; color: #222; }}
.badge {{ color: white; border-radius: 4px; padding: 1px 7px; font-size: 0.8em; white-space: nowrap; }}
table {{ border-collapse: collapse; }} td, th {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left;
  vertical-align: top; font-size: 0.9em; }}
section {{ border-top: 2px solid #eee; margin-top: 1.2em; }}
.claim {{ font-style: italic; }} .noise {{ color: #777; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>gearshift lab</h1>
<p>Each claim of the course notes, measured on this machine: {e(machine_line(report))}.
Size {e(report.size)}; {len(report.findings)} claims: {e(summary(report))}; {state} {report.seconds:.1f}s.</p>
<p>A claim <b>holds</b> when its effect goes the way the notes say by more than the noise (the spread of
the repeats), <b>does not hold</b> when it goes the other way by more than the noise, and <b>depends</b>
when it stays within the noise.</p>
<table><tr><th>claim</th><th>verdict</th><th>measured</th></tr>{''.join(rows)}</table>
{''.join(sections)}
</body></html>
"""


def write_html(report: LabReport, path: str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write(html_page(report))
