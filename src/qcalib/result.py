"""The record of one run (``OUT/result.json``): :class:`RunResult`.

Its own module, below both the pipeline that fills it and the artifact code that writes
and reads it, so that neither of those imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunResult:
    config: dict[str, Any]
    model: str
    fp_top1: float | None  # None: not evaluated (eval_data "none")
    quant_top1: float | None
    calib_indices: list[int]
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    calib_stats: dict[str, Any] = field(default_factory=dict)
    # The run's metric (one of pipeline.METRICS) and its FP / quantized figures; for "top1"
    # they repeat fp_top1 / quant_top1. eval_tokens: tokens scored (perplexity) or held in
    # the evaluation set (embedding cosine); None for images. Defaults keep old result.json.
    metric: str = "top1"
    fp_metric: float | None = None
    quant_metric: float | None = None
    eval_tokens: int | None = None
    # What the selector reported about its set (SelectQ: cluster masses and quotas, the
    # ranking rule, the set's static-range mismatch to random's median draw); empty for
    # given indices and for selectors that report nothing.
    selection: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        q = self.config["quant"]
        head = (
            f"{self.model} W{q['wbits']}A{q['abits']} {self.config['calib']['calibrator']} "
            f"({self.config['select']['selector']}, n={len(self.calib_indices)}): "
        )
        if self.metric == "top1":
            if self.fp_top1 is None or self.quant_top1 is None:
                return head + "not evaluated"
            return head + f"FP {self.fp_top1:.2f}% -> quantized {self.quant_top1:.2f}%"
        if self.fp_metric is None or self.quant_metric is None:
            return head + "not evaluated"
        return head + (
            f"{self.metric} FP {self.fp_metric:.4g} -> quantized {self.quant_metric:.4g} "
            f"({self.eval_tokens} tokens)"
        )
