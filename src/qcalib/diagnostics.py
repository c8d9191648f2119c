"""What ``qcalib report`` draws besides the results: measured while the model is loaded.

``qcalib report`` reads run directories only and never loads a model, so the figures
that need one are computed at the end of a run (``qcalib run``, or
:func:`write_diagnostics` after :func:`qcalib.pipeline.quantize`) and stored beside
``result.json``:

``layer_stats.json``
    One row per quantized layer, in execution order:

    * ``weight_sqnr_db``: ``10 log10(||W||^2 / ||W - Q(W)||^2)`` of the (BN-folded)
      weight against its calibrated fake-quantized version (AdaRound's learned rounding
      included).
    * ``output_sqnr_db``: the same ratio for the layer's *output* in the fully quantized
      model against the same layer's output with every quantizer off (the folded FP
      network), on the first ``sqnr_samples`` calibration samples. It accumulates the
      error of every layer before it: what the network actually carries, which is why the
      curve falls with depth. The model is the calibrated one, so the two passes differ by
      quantization only (SmoothQuant's rescaling is part of both).
    * ``mismatch`` and its parts ``range_gap``, ``quantile_gap``, ``moment_distance``:
      :func:`qcalib.select.quality.calibration_mismatch` of the calibration set against a
      seeded ``samples``-sized subsample of the pool (FP model), by layer name.

``pool_projection.json``
    A 2-D PCA of the pool's per-sample activation statistics (per layer and channel the
    mean and std over positions, the rows SelectQ clusters; FP model) for a seeded
    subsample of ``samples`` pool samples plus every selected sample, with a flag per
    point. Each statistic is standardized over the points before the PCA so wide layers do
    not dominate by scale. Deep / wide models: at most :data:`MAX_PROJECTION_LAYERS` layers
    (evenly spaced in execution order) enter the projection, to bound its memory.

Both passes are forward-only over at most ``samples + num_calib`` samples: a few seconds for
the reference CNNs on CPU.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcalib.config_file import DiagnosticsConfig
from qcalib.data.pool import Pool
from qcalib.model.stop import forward_until_stopped, stop_before, unread_output_head
from qcalib.model.wrap import QuantModel
from qcalib.select.quality import calibration_mismatch
from qcalib.select.stats import ActivationStatsCollector

__all__ = [
    "LAYER_STATS_FILE",
    "MAX_PROJECTION_LAYERS",
    "PROJECTION_FILE",
    "layer_sqnr",
    "pool_projection",
    "write_diagnostics",
]

log = logging.getLogger(__name__)

LAYER_STATS_FILE, PROJECTION_FILE = "layer_stats.json", "pool_projection.json"
MAX_PROJECTION_LAYERS = 8
_EPS = 1e-30


def _sqnr_db(signal: float, noise: float) -> float | None:
    # None (JSON null) for an exact match: infinite SQNR has no place on a plot axis.
    if noise <= _EPS:
        return None
    return 10.0 * math.log10(max(signal, _EPS) / noise)


@torch.no_grad()
def layer_sqnr(qmodel: QuantModel, calib: Tensor, batch_size: int = 8) -> list[dict[str, Any]]:
    """Per quantized layer: weight SQNR and output SQNR (dB) on ``calib`` (see module doc).

    The quantizers' on/off flags are restored afterwards.
    """
    layers = qmodel.quant_modules()
    saved = [(m.use_weight_quant, m.use_act_quant) for _, m in layers]
    signal = dict.fromkeys((n for n, _ in layers), 0.0)
    noise = dict.fromkeys(signal, 0.0)
    fp_out: dict[str, Tensor] = {}
    mode = {"quantized": False}

    def make_hook(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _args: Any, out: Tensor) -> None:
            # A copy: the next op may be an in-place ReLU that rewrites this very tensor.
            out = out.detach().float().clone()
            if not mode["quantized"]:
                fp_out[name] = out
                return
            ref = fp_out.pop(name)
            signal[name] += float(ref.square().sum())
            noise[name] += float((out - ref).square().sum())

        return hook

    # Only the quantized layers' outputs are read: the forwards end at a float output head.
    head = unread_output_head(qmodel.model, (m for _, m in layers))
    was_training = qmodel.training
    qmodel.eval()
    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers]
    try:
        for start in range(0, calib.shape[0], batch_size):
            batch = calib[start : start + batch_size]
            mode["quantized"] = False
            qmodel.set_quant_state(False, False)
            with stop_before(head):
                forward_until_stopped(qmodel, batch)
            mode["quantized"] = True
            for (_, m), (w, a) in zip(layers, saved, strict=True):
                m.set_quant_state(w, a)
            with stop_before(head):
                forward_until_stopped(qmodel, batch)
            fp_out.clear()
    finally:
        for h in handles:
            h.remove()
        for (_, m), (w, a) in zip(layers, saved, strict=True):
            m.set_quant_state(w, a)
        qmodel.train(was_training)
    rows = []
    for name, m in layers:
        weight = m.weight.detach().float()
        wq = m.weight_quantizer(m.weight).detach().float() if m.use_weight_quant else weight
        rows.append(
            {
                "layer": name,
                "weight_sqnr_db": _sqnr_db(
                    float(weight.square().sum()), float((wq - weight).square().sum())
                ),
                "output_sqnr_db": _sqnr_db(signal[name], noise[name]),
            }
        )
    return rows


def _subsample(n_pool: int, size: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_pool, generator=gen)[: min(size, n_pool)].sort().values


@torch.no_grad()
def pool_projection(
    model: nn.Module,
    pool: Pool,
    selected: Sequence[int] | Tensor,
    samples: int = 1024,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, Any]:
    """2-D PCA of per-sample activation statistics; see the module doc for the choices."""
    selected_t = torch.as_tensor(selected).long().flatten()
    points = torch.cat([_subsample(len(pool), samples, seed), selected_t]).unique()
    collector = ActivationStatsCollector(model)
    rows: list[Tensor] = []
    keep: list[str] | None = None
    for start in range(0, points.numel(), batch_size):
        idx = points[start : start + batch_size]
        stats = collector(pool.get(idx))
        if keep is None:
            sites = list(stats)
            step = max(1, math.ceil(len(sites) / MAX_PROJECTION_LAYERS))
            keep = sites[::step][:MAX_PROJECTION_LAYERS]
        rows.append(torch.cat([stats[s] for s in keep], dim=1))
    x = torch.cat(rows).double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    # Principal axes from the SVD of the centred data; signs fixed so reruns agree.
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:2] * torch.sign(vh[:2].sum(1, keepdim=True) + 1e-30)
    xy = x @ axes.T
    var = s.square()
    explained = (var[:2] / var.sum().clamp_min(1e-30)).tolist()
    is_selected = torch.isin(points, selected_t)
    return {
        "indices": points.tolist(),
        "xy": [[round(float(a), 5), round(float(b), 5)] for a, b in xy.tolist()],
        "selected": is_selected.tolist(),
        "explained_variance": [round(e, 5) for e in explained],
        "layers": keep or [],
        "pool_size": len(pool),
    }


def write_diagnostics(
    out: str | Path,
    fp_model: nn.Module,
    qmodel: QuantModel,
    pool: Pool,
    indices: Sequence[int] | Tensor,
    cfg: DiagnosticsConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> None:
    """Write ``layer_stats.json`` and ``pool_projection.json`` into the run directory."""
    out = Path(out)
    idx = torch.as_tensor(indices).long().flatten()
    calib = pool.get(idx[: cfg.sqnr_samples]).to(device)
    rows = layer_sqnr(qmodel, calib)
    log.info("diagnostics: per-layer SQNR on %d samples", calib.shape[0])
    report = calibration_mismatch(fp_model, pool, idx, max_pool=cfg.samples, seed=seed)
    by_layer = {r.layer: r for r in report.layers}
    for row in rows:
        m = by_layer.get(row["layer"])
        for col in ("mismatch", "range_gap", "quantile_gap", "moment_distance"):
            value = None if m is None else getattr(m, col)
            row[col] = None if value is None or not math.isfinite(value) else value
    (out / LAYER_STATS_FILE).write_text(json.dumps({"layers": rows}, indent=1))
    projection = pool_projection(fp_model, pool, idx, cfg.samples, seed)
    (out / PROJECTION_FILE).write_text(json.dumps(projection))
    log.info("diagnostics: %d layers, projection of %d points", len(rows), len(projection["xy"]))
