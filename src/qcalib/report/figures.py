"""The report's figures, each a PNG (bytes) drawn with matplotlib's Agg canvas.

Choices: figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot
state, no display needed, safe in threads and tests); every function returns None when
the runs hold nothing to draw, so the page says so instead of showing an empty plot.
Runs that differ only in the seed form one *setting* (``RunRecord.setting``); a figure
over settings shows their mean and spread, a figure of one run's internals (per-layer
curves, projection) shows each setting's lowest seed.
"""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from collections.abc import Callable

from matplotlib.figure import Figure

from qcalib.report.runs import RunRecord

__all__ = [
    "FIGURES",
    "layer_mismatch",
    "layer_sqnr",
    "metric_vs_bits",
    "pool_projection",
    "seed_spread",
]

METRIC_LABELS = {
    "top1": "top-1 accuracy (%)",
    "perplexity": "perplexity",
    "embedding_cosine": "embedding cosine to FP",
}
MAX_CURVES = 6
MAX_PROJECTIONS = 4


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _settings(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.bits_key, r.calibrator, r.selector, r.seed)):
        groups[r.setting].append(r)
    return dict(groups)


def _metric(records: list[RunRecord]) -> str:
    return records[0].metric if records else "top1"


def metric_lines(records: list[RunRecord]) -> dict[str, dict[tuple[int, int], tuple]]:
    """What :func:`metric_vs_bits` draws: ``{"calibrator / selector": {(wbits, abits):
    (mean, std)}}`` over the seeds of the evaluated runs, lines and points in sorted order
    (std: population std, 0 for one seed)."""
    lines: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.quant_value is not None:
            lines[f"{r.calibrator} / {r.selector}"][r.bits_key].append(r.quant_value)
    return {
        label: {
            k: (statistics.fmean(v), statistics.pstdev(v) if len(v) > 1 else 0.0)
            for k, v in sorted(by_bits.items())
        }
        for label, by_bits in sorted(lines.items())
    }


def spread_groups(records: list[RunRecord]) -> dict[str, list[float]]:
    """What :func:`seed_spread` draws: the evaluated seeds' values per setting, settings in
    (bits, calibrator, selector) order, so each setting's selectors stand side by side."""
    groups = {
        k: [r.quant_value for r in v if r.quant_value is not None]
        for k, v in _settings(records).items()
    }
    return {k: v for k, v in groups.items() if v}


def metric_vs_bits(records: list[RunRecord]) -> bytes | None:
    """The quantized metric against the bit widths, one line per calibrator + selector
    (mean over seeds, error bar one standard deviation); the FP figure dashed."""
    evaluated = [r for r in records if r.quant_value is not None]
    if not evaluated:
        return None
    metric = _metric(evaluated)
    bits = sorted({r.bits_key for r in evaluated})
    x_of = {b: i for i, b in enumerate(bits)}
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for label, points in metric_lines(evaluated).items():
        keys = list(points)
        means, stds = zip(*points.values(), strict=True)
        ax.errorbar([x_of[k] for k in keys], means, yerr=stds, marker="o", capsize=3, label=label)
    fps = [r.fp_value for r in evaluated if r.fp_value is not None]
    if fps and metric != "embedding_cosine":
        ax.axhline(statistics.fmean(fps), color="gray", linestyle="--", label="FP")
    ax.set_xticks(range(len(bits)), [f"W{w}A{a}" for w, a in bits])
    ax.set_xlabel("bits (weights / activations)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def seed_spread(records: list[RunRecord]) -> bytes | None:
    """Box plots of the metric over seeds, per setting, the selectors side by side."""
    values = spread_groups(records)
    if not any(len(v) > 1 for v in values.values()):
        return None
    groups = {k: v for k, v in _settings(records).items() if k in values}
    selectors = sorted({v[0].selector for v in groups.values()})
    colors = {s: f"C{i}" for i, s in enumerate(selectors)}
    fig = Figure(figsize=(max(6.4, 0.9 * len(groups) + 2), 4.2))
    ax = fig.add_subplot()
    data = list(values.values())
    boxes = ax.boxplot(data, patch_artist=True, showmeans=True)
    for patch, runs in zip(boxes["boxes"], groups.values(), strict=True):
        patch.set_facecolor(colors[runs[0].selector])
        patch.set_alpha(0.5)
    for i, values in enumerate(data, start=1):
        ax.plot([i] * len(values), values, "k.", markersize=4)
    labels = [
        f"{v[0].bits} {v[0].calibrator}\n{v[0].selector} ({len(v)} seeds)" for v in groups.values()
    ]
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_ylabel(METRIC_LABELS.get(_metric(records), _metric(records)))
    ax.set_title("seed spread (box: quartiles, triangle: mean, dots: seeds)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _first_runs(records: list[RunRecord], has: Callable[[RunRecord], bool]) -> list[RunRecord]:
    out = []
    for runs in _settings(records).values():
        with_data = [r for r in runs if has(r)]
        if with_data:
            out.append(with_data[0])
    return out[:MAX_CURVES]


def _layer_axis(ax, names: list[str]) -> None:  # noqa: ANN001
    ax.set_xlabel("quantized layer (execution order)")
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.grid(alpha=0.3)


def layer_sqnr(records: list[RunRecord]) -> bytes | None:
    """Per-layer SQNR (dB) of the calibrated model: output (solid) and weight (dashed)."""
    runs = _first_runs(records, lambda r: bool(r.layer_stats))
    if not runs:
        return None
    fig = Figure(figsize=(7.5, 4.4))
    ax = fig.add_subplot()
    names: list[str] = []
    for i, r in enumerate(runs):
        rows = r.layer_stats or []
        names = names if len(names) >= len(rows) else [row["layer"] for row in rows]
        x = range(len(rows))
        out = [row["output_sqnr_db"] for row in rows]
        w = [row["weight_sqnr_db"] for row in rows]
        label = f"{r.setting} (seed {r.seed})"
        ax.plot(x, [float("nan") if v is None else v for v in out], "-o", ms=3, color=f"C{i}",
                label=f"{label}: output")  # fmt: skip
        ax.plot(x, [float("nan") if v is None else v for v in w], "--", color=f"C{i}", alpha=0.6,
                label=f"{label}: weight")  # fmt: skip
    ax.set_ylabel("SQNR (dB)")
    _layer_axis(ax, names)
    ax.legend(fontsize=7)
    return _png(fig)


def layer_mismatch(records: list[RunRecord]) -> bytes | None:
    """Per-layer calibration-set mismatch against the pool, mean over seeds per setting."""
    groups = {
        k: [
            r
            for r in v
            if r.layer_stats and any(row.get("mismatch") is not None for row in r.layer_stats)
        ]
        for k, v in _settings(records).items()
    }
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return None
    fig = Figure(figsize=(7.5, 4.4))
    ax = fig.add_subplot()
    names: list[str] = []
    for i, (setting, runs) in enumerate(list(groups.items())[:MAX_CURVES]):
        rows = runs[0].layer_stats or []
        names = names if len(names) >= len(rows) else [row["layer"] for row in rows]
        means = []
        for j in range(len(rows)):
            vals = [r.layer_stats[j].get("mismatch") for r in runs if len(r.layer_stats or []) > j]
            vals = [v for v in vals if v is not None]
            means.append(statistics.fmean(vals) if vals else float("nan"))
        ax.plot(
            range(len(rows)),
            means,
            "-o",
            ms=3,
            color=f"C{i}",
            label=f"{setting} ({len(runs)} seeds)",
        )
    ax.set_ylabel("mismatch to the pool (0 = same distribution)")
    _layer_axis(ax, names)
    ax.legend(fontsize=7)
    return _png(fig)


def pool_projection(records: list[RunRecord]) -> bytes | None:
    """2-D PCA of the pool's activation statistics, the selected samples marked."""
    # Runs that differ only in the bits share their selection: one panel per selection.
    runs, shown = [], set()
    for r in _first_runs(records, lambda r: r.projection is not None):
        key = (r.selector, tuple(r.result["calib_indices"]))
        if key not in shown:
            shown.add(key)
            runs.append(r)
    runs = runs[:MAX_PROJECTIONS]
    if not runs:
        return None
    cols = min(2, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig = Figure(figsize=(4.6 * cols, 4.0 * rows), layout="constrained")
    for i, r in enumerate(runs):
        p = r.projection or {}
        ax = fig.add_subplot(rows, cols, i + 1)
        xy, sel = p["xy"], p["selected"]
        pool_pts = [pt for pt, s in zip(xy, sel, strict=True) if not s]
        chosen = [pt for pt, s in zip(xy, sel, strict=True) if s]
        if pool_pts:
            ax.scatter(*zip(*pool_pts, strict=True), s=4, c="lightgray", label="pool sample")
        if chosen:
            ax.scatter(*zip(*chosen, strict=True), s=14, c="crimson", label="selected")
        ev = p.get("explained_variance", [0.0, 0.0])
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% var.)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}% var.)")
        ax.set_title(f"{r.selector}, seed {r.seed}, n={r.num_calib}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


# (anchor, heading, drawing function, what the figure needs when it is missing)
FIGURES: list[tuple[str, str, Callable[[list[RunRecord]], bytes | None], str]] = [
    ("metric-vs-bits", "Quantized metric vs bits, per calibrator", metric_vs_bits,
     "evaluated runs (not --eval-data none)"),
    ("seed-spread", "Seed spread, per selector", seed_spread, "two or more seeds of one setting"),
    ("layer-sqnr", "Per-layer quantization error (SQNR)", layer_sqnr,
     "layer_stats.json (runs made by qcalib run with diagnostics on)"),
    ("layer-mismatch", "Per-layer calibration-set mismatch", layer_mismatch,
     "layer_stats.json (runs made by qcalib run with diagnostics on)"),
    ("pool-projection", "Pool activation statistics, 2-D PCA, selected samples marked",
     pool_projection, "pool_projection.json (runs made by qcalib run with diagnostics on)"),
]  # fmt: skip
