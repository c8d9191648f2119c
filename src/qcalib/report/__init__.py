"""``qcalib report RUN... --out report.html``: a self-contained HTML page of finished runs.

It reads run directories only (``result.json``, and the ``layer_stats.json`` /
``pool_projection.json`` that :mod:`qcalib.diagnostics` writes at quantize time) and never
loads a model or torch: a report of a hundred runs takes seconds, on any machine. Figures
are PNGs drawn with matplotlib's Agg canvas and inlined as base64, so the page is one file
that opens offline. A figure whose data no run holds is replaced by a note naming what it
needs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from qcalib.errors import QCalibError
from qcalib.report.figures import FIGURES
from qcalib.report.html import render
from qcalib.report.runs import RunRecord, load_runs

__all__ = ["RunRecord", "build_report", "load_runs", "write_report"]

log = logging.getLogger(__name__)


def build_report(records: list[RunRecord], progress: bool = False) -> str:
    """The HTML page of ``records``."""
    if not records:
        raise QCalibError("no runs to report; give finished run directories")
    metrics = {r.metric for r in records}
    if len(metrics) > 1:
        raise QCalibError(
            f"the runs are measured by different metrics ({', '.join(sorted(metrics))}); "
            "report image and text runs separately"
        )
    drawn = []
    for anchor, heading, draw, needs in tqdm(FIGURES, desc="figures", disable=not progress):
        drawn.append((anchor, heading, draw(records), needs))
    return render(records, drawn)


def write_report(runs: list[str | Path], out: str | Path, progress: bool = False) -> Path:
    """Write the report of every run under ``runs`` to ``out``; returns its path."""
    records = load_runs(list(runs))
    log.info("report of %d run(s)", len(records))
    page = build_report(records, progress)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise QCalibError(f"cannot write {out}: {e.strerror}; choose another --out") from None
    return out
