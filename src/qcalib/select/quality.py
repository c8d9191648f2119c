"""Calibration-set quality: per-layer activation mismatch between a calibration set and its pool.

:func:`calibration_mismatch` measures, for any calibration set (selected by a strategy or
given by the user, as pool indices or as a separate dataset), how far its activations at
the inputs of the quantized layers are from the pool's: the claim SelectQ makes
(design.md §3, "Measured quality"). One row per layer plus the average;
:func:`format_report` prints them.

Per layer (activation = input of the quantized layer, per tensor like the activation
quantizer, masked tokens excluded)
-----------------------------------------------------------------------------------
* ``range_gap``: ``(|min_set - min_pool| + |max_set - max_pool|) / (max_pool - min_pool)``:
  how much of the pool's min-max range the set misses (or overshoots). Exact running
  min/max on both sides. It is what min-max calibration sees, and it is large for a set
  that misses the pool's extremes as well as for one made of outliers.
* ``quantile_gap``: ``mean_q |Q_set(q) - Q_pool(q)| / std_pool`` over
  ``q in quantiles`` (default 0.001, 0.01, 0.5, 0.99, 0.999), in units of the pool's
  per-tensor standard deviation (the IQR is 0 for many post-ReLU inputs, where more than
  half the values are 0; the range is dominated by the pool's single largest value).
  Quantiles come from bounded seeded uniform subsamples (the bottom-k sampler of
  :class:`~qcalib.quant.observers.PercentileObserver`, ``max_samples`` values per layer
  and side, exact while the data fit).
* ``moment_distance``: treat each channel as a Gaussian ``N(m_c, s_c^2)`` (mean and std
  over samples and positions) for the set and for the pool;
  ``sqrt( mean_c [(m_set,c - m_pool,c)^2 + (s_set,c - s_pool,c)^2] / mean_c s_pool,c^2 )``:
  the root-mean-square per-channel 2-Wasserstein distance relative to the RMS pool
  channel std (dead channels with zero variance cannot blow it up). Streaming moments in
  float64 (Chan et al. merges).
* ``mismatch``: the mean of the three (all three are 0 for a set equal to the pool and
  of order 1 for a set far from it).

The *average* row is the plain mean over layers of every column.

The mismatch describes the set; it does not say which set calibrates better (in the
committed grids it is not monotone in accuracy). :func:`calibration_score` does.

Calibration score (:func:`calibration_score`, one number per set, lower is better)
-------------------------------------------------------------------------------
What matters is the quantized model the set produces, so the score builds it and
measures it, forward-only and label-free:

1. The model is wrapped as the run's :class:`~qcalib.config.QuantConfig` says and
   calibrated **on the set** with the run's observers (:data:`SCORE_OBSERVERS`: min-max,
   percentile, MSE as their calibrators use them; GPTQ's min-max grids and min-max
   activation ranges, without its rounding). Reconstruction is not run (minutes per
   set): it gets the MSE observers as a proxy (:data:`SCORE_PROXY`), the
   distribution-reading calibration closest to a fit to the set. For a weight-only
   config the observer pass reads nothing from the set and the score is the same for
   every set: it cannot rank sets for GPTQ weight-only runs, unless the caller passes
   the run's calibrator itself (``calibrate=``, :func:`qcalib.pipeline.score_calibration`;
   ``qcalib inspect-calib --score-run-calibrator``), which then sets the parameters, at
   the cost of one calibration per set. A config with
   ``smoothquant_alpha`` smooths a copy of the model with the set's channel maxima
   first, as a run does (:func:`~qcalib.model.smooth.apply_smoothquant`).
2. A fixed seeded sample of ``eval_samples`` pool samples (the same for every set of a
   seed, so scores of different sets compare; it may share samples with a set, which
   only matters for pools not much larger than the set) runs through the FP and the
   quantized model.
3. The score is the mean output divergence of the quantized model from the FP one
   (:func:`output_divergence`): ``KL(softmax(fp) || softmax(q))`` per sample for
   classifiers, per real token for causal LMs, ``1 - cos(fp, q)`` per sample for
   encoders (``task == "embedding"``) and for any output that is not logits (a model
   whose output has no class axis).

Cost per set: the observer pass over the set plus two forwards over ``eval_samples``.

Memory: the pool streams in batches; per layer and side the state is O(C) moments plus
at most ``2 * max_samples`` sampled values (12 bytes each). ``max_pool`` compares with a
seeded uniform subsample of the pool instead of the whole pool (a full pass over
ImageNet is a long forward-only job).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qcalib.config import CalibConfig, QuantConfig
from qcalib.data.pool import Pool
from qcalib.data.tokens import is_token_batch, unpack_tokens
from qcalib.errors import QCalibError
from qcalib.model.observe import (
    build_quant_model,
    calibrate_activations,
    calibrate_weights,
    observer_params,
)
from qcalib.model.smooth import apply_smoothquant
from qcalib.quant.observers import PercentileObserver
from qcalib.select.stats import ActivationTap, check_finite_site

__all__ = [
    "DEFAULT_QUANTILES",
    "SCORE_OBSERVERS",
    "SCORE_PROXY",
    "score_observers",
    "LayerMismatch",
    "MismatchReport",
    "calibration_mismatch",
    "calibration_score",
    "format_report",
    "output_divergence",
]

#: ``(weight observer, activation observer)`` :func:`calibration_score` calibrates with,
#: per calibrator name: those the observer calibrators use (``qcalib.calibrate.base``).
SCORE_OBSERVERS = {
    "minmax": ("minmax", "minmax"),
    "percentile": ("minmax", "percentile"),
    "mse": ("mse", "mse"),
    # GPTQ fixes min-max grids before its rounding and sets static activation ranges by
    # min-max after it (GPTQCalibrator's observers): the set reaches the score through
    # those ranges; the rounding's own use of the set (its Hessians) is not modelled.
    "gptq": ("minmax", "minmax"),
}
#: Any other calibrator (reconstruction): the MSE observers as a proxy.
SCORE_PROXY = ("mse", "mse")


def score_observers(calibrator: str) -> tuple[str, str]:
    """``(weight, activation)`` observers :func:`calibration_score` calibrates with for
    ``calibrator``: its own (:data:`SCORE_OBSERVERS`), else the proxy."""
    return SCORE_OBSERVERS.get(calibrator, SCORE_PROXY)


DEFAULT_QUANTILES = (0.001, 0.01, 0.5, 0.99, 0.999)
#: Values sampled per layer and side for the quantiles: 0.999 of 2**16 values leaves ~65
#: values in the tail; 2 sides x ~20 layers x 2**17 x 12 bytes ~ 60 MB at the peak.
DEFAULT_MAX_SAMPLES = 2**16
_EPS = 1e-12


class _Summary:
    """Streaming per-tensor summary of one layer's activation on one side (set or pool)."""

    def __init__(self, max_samples: int, seed: int) -> None:
        self.count = 0
        self.mean: Tensor | None = None  # [C] float64
        self.m2: Tensor | None = None
        self.sampler = PercentileObserver(100.0, max_samples=max_samples, seed=seed)

    def update(self, v: Tensor, site: str) -> None:
        """Merge values ``v`` ``[N, C]`` (positions x channels)."""
        if v.shape[0] == 0:
            return
        if v.dtype in (torch.float16, torch.bfloat16):
            v = v.float()
        # Batch moments in the activation's precision (torch's var_mean is numerically
        # stable and needs no float64 copy of a possibly huge batch), merged in float64.
        var_b, mean_b = torch.var_mean(v, dim=0, correction=0)
        n_b = v.shape[0]
        mean_b = mean_b.to("cpu", torch.float64)
        m2_b = var_b.to("cpu", torch.float64) * n_b
        check_finite_site(mean_b, site, "activations")
        check_finite_site(m2_b, site, "activations (variance overflow)")
        if self.mean is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
        else:
            n = self.count + n_b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (n_b / n)
            self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / n)
            self.count = n
        self.sampler(v)

    @property
    def empty(self) -> bool:
        return self.mean is None

    def channel_std(self) -> Tensor:
        assert self.m2 is not None
        return (self.m2 / self.count).sqrt()

    def tensor_std(self) -> float:
        assert self.mean is not None and self.m2 is not None
        var_c = self.m2 / self.count
        return float((var_c.mean() + (self.mean - self.mean.mean()).square().mean()).sqrt())

    def quantiles(self, qs: Tensor) -> Tensor:
        s = self.sampler.sample().flatten().to(torch.float64)
        return torch.quantile(s, qs) if s.numel() <= 2**24 else _kth_quantiles(s, qs)

    def range(self) -> tuple[float, float]:
        return float(self.sampler.min_val.min()), float(self.sampler.max_val.max())


def _kth_quantiles(s: Tensor, qs: Tensor) -> Tensor:
    n = s.numel()
    out = []
    for q in qs.tolist():
        pos = q * (n - 1)
        i = int(pos)
        lo = torch.kthvalue(s, i + 1).values
        hi = torch.kthvalue(s, min(i + 2, n)).values
        out.append(torch.lerp(lo, hi, pos - i))
    return torch.stack(out)


@dataclass
class LayerMismatch:
    """One layer's row of the report (see the module notes for the definitions)."""

    layer: str
    range_gap: float
    quantile_gap: float
    moment_distance: float
    mismatch: float
    pool_min: float
    pool_max: float
    set_min: float
    set_max: float


@dataclass
class MismatchReport:
    """Per-layer mismatch rows, their average, and what was compared."""

    layers: list[LayerMismatch]
    average: dict[str, float]
    n_set: int
    n_pool: int
    quantiles: tuple[float, ...]
    pool_name: str = "pool"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def mismatch(self) -> float:
        """The average mismatch over layers (the headline number)."""
        return self.average["mismatch"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


_COLUMNS = ("range_gap", "quantile_gap", "moment_distance", "mismatch")


def format_report(report: MismatchReport) -> str:
    """One line per layer plus the average, as a fixed-width table."""
    width = max([len("average"), *(len(r.layer) for r in report.layers)])
    head = f"{'layer':<{width}}  " + "  ".join(f"{c:>15}" for c in _COLUMNS)
    lines = [
        f"calibration set: {report.n_set} samples vs pool {report.pool_name!r} "
        f"({report.n_pool} samples); quantiles {', '.join(str(q) for q in report.quantiles)}",
        head,
    ]
    for r in report.layers:
        vals = "  ".join(f"{getattr(r, c):>15.4f}" for c in _COLUMNS)
        lines.append(f"{r.layer:<{width}}  {vals}")
    vals = "  ".join(f"{report.average[c]:>15.4f}" for c in _COLUMNS)
    lines.append(f"{'average':<{width}}  {vals}")
    return "\n".join(lines)


def _rows(x: Tensor, cdim: int, mask: Tensor | None, sel: Tensor | None) -> Tensor:
    """The activation as ``[positions, C]`` for the batch rows ``sel`` (valid tokens only)."""
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    if sel is not None:
        x = x[sel]
        mask = None if mask is None else mask[sel]
    if mask is not None and cdim != 1 and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(torch.bool)]
    x = x.movedim(cdim % x.dim(), -1)
    return x.reshape(-1, x.shape[-1])


def _check_indices(indices: Any, n_pool: int) -> Tensor:
    idx = torch.as_tensor(indices).long().flatten()
    if idx.numel() == 0:
        raise QCalibError("the calibration set is empty; give at least one index")
    if int(idx.min()) < 0 or int(idx.max()) >= n_pool:
        raise QCalibError(
            f"calibration index out of range for a pool of {n_pool} samples "
            f"(got {int(idx.min())}..{int(idx.max())}); indices are 0-based pool positions"
        )
    if idx.unique().numel() != idx.numel():
        raise QCalibError("the calibration indices contain duplicates; list each sample once")
    return idx.sort().values


@dataclass
class PoolReference:
    """The pool side of :func:`calibration_mismatch`, measured once by :func:`pool_reference`.

    Passing it as ``reference=`` compares any number of calibration sets of the same model
    with the same pool while streaming only the sets: the pool side costs a pass over
    the pool (or its ``max_pool`` subsample) plus the quantile sampling, several forward
    passes' worth, so a benchmark that scores hundreds of sets measures it once. The
    set side then uses the reference's ``layers``, ``max_samples`` and ``seed``.
    """

    summaries: dict[str, _Summary]
    sites: list[str]
    n_pool: int  # samples summarized (the max_pool subsample, or the whole pool)
    pool_size: int  # len(pool) when measured: the set's indices must address that pool
    pool_name: str
    layers: Any
    max_samples: int
    max_pool: int | None
    seed: int


def _check_common(quantiles: Sequence[float], batch_size: Any, pool: Pool) -> tuple[float, ...]:
    qs = tuple(float(q) for q in quantiles)
    if not qs or not all(0.0 <= q <= 1.0 for q in qs):
        raise QCalibError(f"quantiles must be in [0, 1], got {quantiles!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QCalibError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(pool) == 0:
        raise QCalibError("the pool is empty; point --data at a non-empty dataset")
    return qs


def _pool_subsample(n_pool: int, max_pool: int | None, seed: int) -> Tensor | None:
    if max_pool and n_pool > max_pool:
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(n_pool, generator=gen)[:max_pool].sort().values
    return None


def _stream(
    tap: ActivationTap,
    data: Pool,
    stream: Tensor | None,
    batch_size: int,
    sides: Sequence[tuple[dict[str, _Summary], Tensor | None]],
    max_samples: int,
    seed: int,
) -> None:
    """Stream ``data`` (the rows ``stream``, or all) once; each ``(side, members)`` pair
    summarizes the batch rows whose index is in ``members`` (``None``: every row)."""

    def summary(side: dict[str, _Summary], site: str) -> _Summary:
        if site not in side:
            side[site] = _Summary(max_samples, seed)
        return side[site]

    for idx, x in data.batches(batch_size, stream):
        sel_rows = [(side, None if m is None else torch.isin(idx, m)) for side, m in sides]

        def fn(
            site: str,
            act: Tensor,
            cdim: int,
            mask: Tensor | None,
            sel_rows: list[tuple[dict[str, _Summary], Tensor | None]] = sel_rows,
        ) -> None:
            for side, sel in sel_rows:
                if sel is not None:
                    if not bool(sel.any()):
                        continue
                    sel = None if bool(sel.all()) else sel.to(act.device)
                summary(side, site).update(_rows(act, cdim, mask, sel), site)

        tap.run(x, fn)


def pool_reference(
    model: nn.Module,
    pool: Pool,
    *,
    layers: Any = None,
    batch_size: int = 128,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    max_pool: int | None = None,
    seed: int = 0,
    device: str | None = None,
) -> PoolReference:
    """Measure the pool side of :func:`calibration_mismatch` once, for ``reference=``.

    The arguments mean what they mean there; with the same ones, a report computed with
    the reference has the same pool side as one computed without it.
    """
    _check_common(DEFAULT_QUANTILES, batch_size, pool)
    n_pool = len(pool)
    pool_idx = _pool_subsample(n_pool, max_pool, seed)
    tap = ActivationTap(model, layers, device)
    side: dict[str, _Summary] = {}
    _stream(tap, pool, pool_idx, batch_size, [(side, None)], max_samples, seed)
    return PoolReference(
        summaries=side,
        sites=list(tap.sites or ()),
        n_pool=n_pool if pool_idx is None else pool_idx.numel(),
        pool_size=n_pool,
        pool_name=getattr(pool, "name", "pool"),
        layers=layers,
        max_samples=max_samples,
        max_pool=max_pool,
        seed=seed,
    )


def calibration_mismatch(
    model: nn.Module,
    pool: Pool,
    indices: Sequence[int] | Tensor | None = None,
    *,
    calib: Pool | None = None,
    layers: Any = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    batch_size: int = 128,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    max_pool: int | None = None,
    seed: int = 0,
    device: str | None = None,
    reference: PoolReference | None = None,
) -> MismatchReport:
    """Per-layer activation mismatch of a calibration set against ``pool``.

    The set is either ``indices`` into the pool or a separate dataset ``calib`` (e.g. a
    user's list of image files); exactly one of them. ``layers`` restricts the layers as
    in :class:`~qcalib.select.stats.ActivationStatsCollector`; ``max_pool`` compares with
    a seeded subsample of the pool of that size (default: the whole pool). The model runs
    in eval mode without gradients; it is not changed.

    ``reference`` (from :func:`pool_reference` on the same model and pool) skips the pass
    over the pool: only the set is streamed, and ``layers``, ``max_samples``,
    ``max_pool`` and ``seed`` are the reference's (the arguments given here are unused).
    """
    if (indices is None) == (calib is None):
        raise QCalibError(
            "give the calibration set either as indices into the pool or as calib=, not both"
        )
    qs = _check_common(quantiles, batch_size, pool)
    n_pool = len(pool)
    set_idx = None if indices is None else _check_indices(indices, n_pool)
    set_side: dict[str, _Summary] = {}
    if reference is not None:
        if reference.pool_size != n_pool:
            raise QCalibError(
                f"the pool reference was measured on a pool of {reference.pool_size} samples, "
                f"this pool has {n_pool}; measure pool_reference() on this pool"
            )
        layers, max_samples = reference.layers, reference.max_samples
        max_pool, seed = reference.max_pool, reference.seed
        tap = ActivationTap(model, layers, device)
        pool_side = reference.summaries
        sites = reference.sites
        n_pool_used = reference.n_pool
        if set_idx is not None:
            _stream(tap, pool, set_idx, batch_size, [(set_side, None)], max_samples, seed)
    else:
        pool_idx = _pool_subsample(n_pool, max_pool, seed)
        tap = ActivationTap(model, layers, device)
        pool_side = {}
        # One pass over the pool, which also yields the set when it is part of the pool.
        if set_idx is not None:
            stream = None
            if pool_idx is not None:
                stream = torch.cat([pool_idx, set_idx]).unique()
            sides = [(pool_side, pool_idx), (set_side, set_idx)]
        else:
            stream = pool_idx
            sides = [(pool_side, pool_idx)]
        _stream(tap, pool, stream, batch_size, sides, max_samples, seed)
        sites = list(tap.sites or ())
        n_pool_used = n_pool if pool_idx is None else pool_idx.numel()
    n_set = 0 if set_idx is None else set_idx.numel()
    if calib is not None:
        if len(calib) == 0:
            raise QCalibError("the calibration set is empty; give at least one sample")
        n_set = len(calib)
        _stream(tap, calib, None, batch_size, [(set_side, None)], max_samples, seed)

    q_t = torch.tensor(qs, dtype=torch.float64)
    rows = []
    for site in sites:
        p, s = pool_side.get(site), set_side.get(site)
        if p is None or s is None or p.empty or s.empty:
            continue
        assert p.mean is not None and s.mean is not None
        p_lo, p_hi = p.range()
        s_lo, s_hi = s.range()
        span = p_hi - p_lo
        range_gap = (abs(s_lo - p_lo) + abs(s_hi - p_hi)) / span if span > _EPS else 0.0
        if span <= _EPS and (abs(s_lo - p_lo) + abs(s_hi - p_hi)) > _EPS:
            range_gap = float("inf")
        std = p.tensor_std()
        q_diff = float((s.quantiles(q_t) - p.quantiles(q_t)).abs().mean())
        quantile_gap = q_diff / std if std > _EPS else (0.0 if q_diff <= _EPS else float("inf"))
        p_std, s_std = p.channel_std(), s.channel_std()
        w2 = float(((s.mean - p.mean).square() + (s_std - p_std).square()).mean())
        ref = float(p_std.square().mean())
        moment = (w2 / ref) ** 0.5 if ref > _EPS else (0.0 if w2 <= _EPS else float("inf"))
        rows.append(
            LayerMismatch(
                layer=site,
                range_gap=range_gap,
                quantile_gap=quantile_gap,
                moment_distance=moment,
                mismatch=(range_gap + quantile_gap + moment) / 3.0,
                pool_min=p_lo,
                pool_max=p_hi,
                set_min=s_lo,
                set_max=s_hi,
            )
        )
    if not rows:
        raise QCalibError("no layer was observed on both the pool and the calibration set")
    average = {c: sum(getattr(r, c) for r in rows) / len(rows) for c in _COLUMNS}
    return MismatchReport(
        layers=rows,
        average=average,
        n_set=n_set,
        n_pool=n_pool_used,
        quantiles=qs,
        pool_name=getattr(pool, "name", "pool"),
        info={"max_samples": max_samples, "max_pool": max_pool, "seed": seed},
    )


def output_divergence(fp: Tensor, q: Tensor, x: Tensor | None = None, task: str | None = None):
    """``(sum, count)`` of the per-item divergence of outputs ``q`` from ``fp``.

    ``task="embedding"`` or outputs without a class axis (1-D): ``1 - cos`` per sample
    (flattened). Otherwise the last axis holds logits: ``KL(softmax(fp) || softmax(q))``
    per row, i.e. per sample ``[B, C]`` or per token ``[B, L, V]``, where a token batch
    ``x`` (``[B, 2, L]``) drops the padded positions. Sums in float64.
    """
    fp, q = fp.detach().float(), q.detach().float()
    if task == "embedding" or fp.dim() < 2:
        a, b = fp.reshape(fp.shape[0], -1), q.reshape(q.shape[0], -1)
        d = 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
        return float(d.double().sum()), d.numel()
    log_p = torch.log_softmax(fp, -1)
    log_q = torch.log_softmax(q, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # one value per row of logits
    if fp.dim() == 3 and x is not None and is_token_batch(x):
        mask = unpack_tokens(x)[1].to(torch.bool).to(kl.device)
        kl = kl[mask]
    return float(kl.double().sum()), kl.numel()


@torch.no_grad()
def calibration_score(
    model: nn.Module,
    pool: Pool,
    indices: Sequence[int] | Tensor,
    quant_config: QuantConfig,
    calibrator: str = "minmax",
    *,
    calib_config: CalibConfig | None = None,
    eval_samples: int = 512,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    calibrate: Callable[[nn.Module, Tensor], None] | None = None,
) -> float:
    """Label-free quality of the calibration set ``indices``: lower is better.

    The mean output divergence from the FP model, on a fixed seeded sample of
    ``eval_samples`` pool samples, of ``model`` quantized by ``quant_config`` and
    calibrated on the set with ``calibrator``'s observers (see the module notes; the
    observers' parameters, e.g. the percentile, come from ``calib_config``). The model
    is not changed.

    ``calibrate(qmodel, set_data)``, when given, sets the quantized model's parameters
    instead of the observers: the run's own calibrator (the pipeline's
    :func:`~qcalib.pipeline.score_calibration`), for calibrators whose use of the set
    the observers do not model (GPTQ's Hessians, which also make weight-only sets
    rankable). Such a calibrator fits the set, so the set's own samples are left out of
    the evaluation sample (the next samples of the same seeded order stand in).
    """
    if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 1:
        raise QCalibError(f"eval_samples must be a positive integer, got {eval_samples!r}")
    _check_common(DEFAULT_QUANTILES, batch_size, pool)
    set_idx = _check_indices(indices, len(pool))
    cfg = calib_config or CalibConfig(calibrator=calibrator)
    w_obs, a_obs = score_observers(calibrator)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        set_data = pool.get(set_idx).to(device)
        base = model
        if quant_config.smoothquant_alpha is not None:
            # The set also decides SmoothQuant's scales: scoring the unsmoothed model
            # would rank sets for a different quantized model than the run builds.
            base = copy.deepcopy(model)
            apply_smoothquant(base, set_data, quant_config.smoothquant_alpha,
                              pairs=quant_config.smoothquant_pairs)  # fmt: skip
        qmodel = build_quant_model(base, quant_config, pool.example().to(device)).eval()
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(pool), generator=gen)
        if calibrate is None:
            calibrate_weights(qmodel, w_obs, **observer_params(w_obs, cfg, seed))
            calibrate_activations(
                qmodel, set_data, a_obs, cfg.batch_size, False,
                **observer_params(a_obs, cfg, seed),
            )  # fmt: skip
        else:
            calibrate(qmodel, set_data)
            qmodel.eval()
            order = order[~torch.isin(order, set_idx)]
        eval_idx = order[:eval_samples].sort().values
        if eval_idx.numel() == 0:
            raise QCalibError("no pool sample is left to evaluate on; use a larger pool")
        task = getattr(model, "task", None)
        total, count = 0.0, 0
        for _, x in pool.batches(batch_size, eval_idx):
            x = x.to(device)
            d, c = output_divergence(model(x), qmodel(x), x, task)
            total, count = total + d, count + c
    finally:
        model.train(was_training)
    if count == 0:
        raise QCalibError("the score's evaluation sample has no real tokens; use a larger pool")
    return total / count
