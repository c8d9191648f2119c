"""The report page: one self-contained HTML file (PNG figures inlined as base64)."""

from __future__ import annotations

import base64
import html
import statistics
from collections.abc import Iterable

from qcalib.report.figures import METRIC_LABELS
from qcalib.report.runs import RunRecord

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
figure { margin: 1.5em 0; } img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; font-style: italic; }
"""


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if metric == "top1" else f"{value:.4g}"


def _table(head: list[str], rows: Iterable[list[str]], left: int = 1) -> str:
    def cells(tag: str, values: list[str]) -> str:
        return "".join(
            f"<{tag}{' class=l' if i < left else ''}>{html.escape(v)}</{tag}>"
            for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', head)}</tr>{body}</table>"


def summary_table(records: list[RunRecord]) -> str:
    """One row per setting: seeds, mean ± std of the quantized metric, FP figure."""
    groups: dict[str, list[RunRecord]] = {}
    for r in sorted(records, key=lambda r: (r.bits_key, r.calibrator, r.selector, r.seed)):
        groups.setdefault(r.setting, []).append(r)
    rows = []
    for setting, runs in groups.items():
        metric = runs[0].metric
        vals = [r.quant_value for r in runs if r.quant_value is not None]
        fps = [r.fp_value for r in runs if r.fp_value is not None]
        mean = _fmt(statistics.fmean(vals), metric) if vals else "–"
        std = _fmt(statistics.stdev(vals), metric) if len(vals) > 1 else "–"
        secs = statistics.fmean(sum(r.result.get("seconds", {}).values()) for r in runs)
        rows.append([
            setting, runs[0].result.get("model", "?"), METRIC_LABELS.get(metric, metric),
            ",".join(str(r.seed) for r in runs), mean, std,
            _fmt(statistics.fmean(fps), metric) if fps else "–", f"{secs:.1f}",
        ])  # fmt: skip
    head = ["setting", "model", "metric", "seeds", "mean", "std", "FP", "seconds/run"]
    return _table(head, rows, left=4)


def runs_table(records: list[RunRecord]) -> str:
    rows = [
        [str(r.path), r.setting, str(r.seed), _fmt(r.quant_value, r.metric),
         "yes" if r.layer_stats else "no"]
        for r in records
    ]  # fmt: skip
    return _table(["run directory", "setting", "seed", "quantized", "diagnostics"], rows, left=2)


def render(records: list[RunRecord], figures: list[tuple[str, str, bytes | None, str]]) -> str:
    """The page: summary, figures (or a note naming what a missing one needs), runs."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>qcalib report</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>qcalib report</h1><p>{len(records)} run(s).</p>",
        "<h2>Summary</h2>",
        summary_table(records),
    ]
    for anchor, heading, png, needs in figures:
        parts.append(f'<h2 id="{anchor}">{html.escape(heading)}</h2>')
        if png is None:
            parts.append(f'<p class="note">Not drawn: needs {html.escape(needs)}.</p>')
            continue
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="{html.escape(heading)}" src="data:image/png;base64,{data}">'
            "</figure>"
        )
    parts += ["<h2>Runs</h2>", runs_table(records), "</body></html>"]
    return "\n".join(parts)
