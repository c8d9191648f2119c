"""Observers: watch calibration tensors and propose a quantization range.

Same contract as ``torch.ao`` observers: ``observer(x)`` folds a batch into running
statistics (and returns ``x``), ``calculate_qparams(spec)`` turns them into a scale and zero
point, ``reset()`` forgets everything.

Design notes shared by all observers:

* Granularity is fixed at construction (``per_channel``, ``ch_axis``) because an observer
  must know *what* to keep while it watches: per-channel statistics cannot be recovered
  from per-tensor ones, and keeping both would double the cost of the sampled observers.
  ``calculate_qparams`` checks that the spec it receives agrees and fails loudly otherwise.
* Internally every batch is viewed as a ``[C, N]`` matrix (``C = 1`` per tensor), so each
  statistic is computed once, vectorized over channels, and per-tensor results are just
  squeezed to 0-dim at the end.
* Statistics are kept in float32, whatever the input dtype, and are *non-persistent*
  buffers: they follow ``.to(device)`` but stay out of ``state_dict``. They are calibration
  scaffolding (the sampled observers hold megabytes); what a checkpoint needs is the
  quantizer's scale and zero point, and leaving observer state out means a calibrated
  checkpoint loads into a freshly built model whatever its observers are.
* NaN/Inf in a batch raises ``ValueError`` instead of being skipped: a single NaN would
  silently poison min/max (or the quantiles), and it almost always means a broken model or
  input pipeline that the user should see.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from qcalib.distributed import all_gather_rows, all_reduce_max, all_reduce_min, is_distributed
from qcalib.errors import QCalibError
from qcalib.quant.functional import qparams_from_range
from qcalib.quant.quantizer import QuantSpec
from qcalib.registry import Registry

OBSERVERS: Registry[type[Observer]] = Registry("observer")

DEFAULT_MAX_SAMPLES = 2**21
# The MSE search touches every sample once per candidate (100 passes by default), so it
# evaluates a smaller sample: 2**18 values pin a clipping ratio on a 1% grid just as well.
DEFAULT_MSE_MAX_SAMPLES = 2**18
# Elements per temporary in the MSE search; bounds peak memory to a few hundred MB.
_MSE_CHUNK_ELEMS = 2**23


def _raise_non_finite(x: torch.Tensor) -> None:
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    what = [f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
    if not what:  # finite in its own dtype but not in float32
        what = ["values beyond the float32 range"]
    raise ValueError(
        f"observer input contains non-finite values ({', '.join(what)} out of {x.numel()}); "
        "check the model and calibration data for NaN/Inf"
    )


class Observer(nn.Module):
    """Base class: input validation, the ``[C, N]`` view, spec checks and qparams.

    Subclasses extend ``_observe(rows, lo, hi)`` (``rows`` is the batch as float32
    ``[C, N]``, ``lo``/``hi`` its per-row min/max) and implement ``_range(spec)`` returning
    ``(lo, hi)`` of shape ``[C]``.
    """

    def __init__(self, per_channel: bool = False, ch_axis: int = 0) -> None:
        super().__init__()
        self.per_channel = bool(per_channel)
        self.ch_axis = int(ch_axis)
        self.register_buffer("min_val", None, persistent=False)
        self.register_buffer("max_val", None, persistent=False)
        self._ndim: int | None = None
        self.num_batches = 0

    # -- watching ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = x.detach()
        if data.numel() == 0:  # an empty batch carries no information
            return x
        with torch.no_grad():
            rows = self._rows(data)
            lo, hi = torch.aminmax(rows, dim=1)
            # NaN propagates through min/max and an Inf becomes the min or the max, so the
            # per-row range doubles as a free finiteness check (no extra pass over x).
            if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                _raise_non_finite(data)
            self._observe(rows, lo, hi)
        if self._ndim is None:
            self._ndim = data.dim()
        self.num_batches += 1
        return x

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return x.reshape(1, -1).to(torch.float32)
        if x.dim() == 0 or not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(
                f"per-channel observer with ch_axis={self.ch_axis} got a tensor of shape "
                f"{tuple(x.shape)}"
            )
        channels = x.shape[self.ch_axis]
        if self.min_val is not None and self.min_val.shape[0] != channels:
            raise ValueError(
                f"per-channel observer saw {self.min_val.shape[0]} channels before, now "
                f"{channels} (shape {tuple(x.shape)}, ch_axis={self.ch_axis})"
            )
        return x.movedim(self.ch_axis, 0).reshape(channels, -1).to(torch.float32)

    def _observe(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        # Every observer tracks the exact running range: minmax is built from it, and the
        # sampled observers use it so that ratio 1.0 / percentile 100 mean the true range
        # of *all* data rather than of the subsample.
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo.to(self.min_val.device))
            self.max_val = torch.maximum(self.max_val, hi.to(self.max_val.device))

    def reset(self) -> None:
        """Forget all statistics (the observer can then watch a new calibration run)."""
        self.min_val = None
        self.max_val = None
        self._ndim = None
        self.num_batches = 0

    @property
    def is_empty(self) -> bool:
        return self.min_val is None

    def reduce_across_ranks(self) -> None:
        """Merge what every rank observed into every rank's observer (no-op in one process).

        The running range is an exact all-reduce (min of mins, max of maxes), so a
        min-max observer ends with the very range one process would have seen. Every
        rank must have observed something (the calibration set is split so that each
        rank gets at least one sample).
        """
        if not is_distributed():
            return
        if self.min_val is None:
            raise RuntimeError(f"{type(self).__name__}: a rank observed nothing to reduce")
        self.min_val = all_reduce_min(self.min_val)
        self.max_val = all_reduce_max(self.max_val)

    # -- proposing ----------------------------------------------------------------------

    def _check_ready(self, spec: QuantSpec) -> None:
        name = type(self).__name__
        if self.is_empty:
            raise RuntimeError(
                f"{name} has not observed any data; run calibration batches through it "
                "(quantizer.observer_enabled = True) before computing qparams"
            )
        if spec.per_channel != self.per_channel:
            want = "per-channel" if spec.per_channel else "per-tensor"
            have = "per-channel" if self.per_channel else "per-tensor"
            raise ValueError(
                f"spec asks for {want} qparams but the {name} was built {have}; build it "
                f"with per_channel={spec.per_channel}, ch_axis={spec.ch_axis}"
            )
        if self.per_channel:
            nd = self._ndim or 1
            if spec.ch_axis % nd != self.ch_axis % nd:
                raise ValueError(
                    f"spec has ch_axis={spec.ch_axis} but the {name} was built with "
                    f"ch_axis={self.ch_axis}"
                )

    def _range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def calculate_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """The proposed clipping range ``(lo, hi)``, shape ``[C]`` (``[1]`` per tensor).

        :func:`~qcalib.quant.functional.qparams_from_range` turns it into the grid (it
        widens the range to contain zero and, for symmetric specs, uses ``max(|lo|, |hi|)``).
        """
        self._check_ready(spec)
        return self._range(spec)

    def calculate_qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point: 0-dim per tensor, ``[C]`` per channel."""
        lo, hi = self.calculate_range(spec)
        scale, zero_point = qparams_from_range(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
        if not self.per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return scale, zero_point

    def extra_repr(self) -> str:
        if self.per_channel:
            return f"per_channel=True, ch_axis={self.ch_axis}"
        return "per_channel=False"


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """Running min / max over every value seen: no clipping, so no outlier is ever lost,
    at the price of a coarse grid when the distribution has long tails."""

    def _range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class _SampledObserver(Observer):
    """Observer that also keeps a bounded uniform random subsample of the data.

    Range estimates that depend on the whole distribution (quantiles, clipping error) must
    pool all calibration batches: averaging per-batch quantiles is biased (the mean of
    per-batch 99.99th percentiles is not the 99.99th percentile of the union, e.g. when
    one batch holds all the large values). Storing everything is unbounded, so the observer
    keeps a *bottom-k sample*: every value gets an i.i.d. uniform key and the ``max_samples``
    values with the smallest keys are kept (per channel). That is a uniform sample without
    replacement of everything seen so far, and it is exact (no sampling at all) while at
    most ``max_samples`` values per channel have been seen.

    Cost: once ``max_samples`` values are held, a new value can only matter if its key is
    below the current k-th smallest key, so a batch only appends those few (their expected
    number shrinks like ``k / seen``). Trimming back to ``k`` (a ``topk``) is deferred until
    ``2 k`` are held, and done once more before the sample is used; deferring never drops
    a value that belongs to the final bottom-k, so the result does not depend on when the
    trims happen. Memory peaks at ``2 * C * max_samples * 12`` bytes (float32 value +
    float64 key) plus one batch.

    Keys are float64 so that ties are negligible, and come from a ``torch.Generator``
    seeded with ``seed`` on the device of the first batch: the same batches in the same
    order give the same sample (for a given device), and ``reset()`` re-seeds.
    """

    def __init__(
        self,
        per_channel: bool = False,
        ch_axis: int = 0,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        seed: int = 0,
    ) -> None:
        super().__init__(per_channel=per_channel, ch_axis=ch_axis)
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise QCalibError(f"max_samples must be a positive integer, got {max_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise QCalibError(f"seed must be an integer, got {seed!r}")
        self.max_samples = max_samples
        self.seed = seed
        self.register_buffer("samples", None, persistent=False)
        self.register_buffer("keys", None, persistent=False)
        self.register_buffer("threshold", None, persistent=False)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._held = 0
        self._generator: torch.Generator | None = None

    def reset(self) -> None:
        super().reset()
        self.samples = None
        self.keys = None
        self.threshold = None
        self._pending = []
        self._held = 0
        self._generator = None

    def _random_keys(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        gen = self._generator
        keys = torch.rand(shape, generator=gen, device=gen.device, dtype=torch.float64)
        return keys.to(device)

    def _observe(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super()._observe(rows, lo, hi)
        keys = self._random_keys(rows.shape, rows.device)
        if self.threshold is None:
            # ``rows`` may be a view of the caller's tensor, which an in-place op could
            # change later; the filtered branches below already produce copies.
            rows = rows.clone()
        else:
            below = keys < self.threshold.to(keys.device)[:, None]
            if rows.shape[0] == 1:
                idx = torch.nonzero(below[0]).squeeze(1)  # cheaper than two masked selects
                rows, keys = rows[:, idx], keys[:, idx]
            else:
                n_new = int(below.sum(dim=1).max())
                if n_new < keys.shape[1] // 2:
                    # Ragged counts per channel: take the n_new smallest keys of every row.
                    # Extra entries above a row's threshold are real data and get trimmed.
                    keys, idx = torch.topk(keys, n_new, dim=1, largest=False, sorted=False)
                    rows = torch.gather(rows, 1, idx)
                else:
                    rows = rows.clone()
            if rows.shape[1] == 0:
                return
        # Chunks are concatenated only when trimming, so appending costs O(batch) rather
        # than O(reservoir).
        self._pending.append((rows, keys))
        self._held += rows.shape[1]
        if self._held > 2 * self.max_samples:
            self._consolidate()

    def _consolidate(self) -> None:
        """Concatenate pending chunks and trim to the ``max_samples`` smallest keys."""
        if self._pending:
            vals = [v for v, _ in self._pending]
            keys = [k for _, k in self._pending]
            if self.samples is not None:
                vals.insert(0, self.samples)
                keys.insert(0, self.keys)
            device = vals[0].device
            self.samples = torch.cat([v.to(device) for v in vals], dim=1)
            self.keys = torch.cat([k.to(device) for k in keys], dim=1)
            self._pending = []
        k = self.max_samples
        if self.samples is not None and self.samples.shape[1] > k:
            self.keys, idx = torch.topk(self.keys, k, dim=1, largest=False, sorted=False)
            self.samples = torch.gather(self.samples, 1, idx)
            self.threshold = self.keys.amax(dim=1)
        self._held = 0 if self.samples is None else self.samples.shape[1]

    def reduce_across_ranks(self) -> None:
        """Also merge the ranks' subsamples: the union of their ``(value, key)`` pairs,
        trimmed to the ``max_samples`` smallest keys.

        While everything fits (at most ``max_samples`` values per channel over all ranks)
        the merged sample is all the data, so the percentile / MSE range equals the
        single-process one up to the order of a float sum (MSE) or exactly (percentile).
        Beyond that it is a uniform bottom-k sample of the union, as in one process, but a
        different one: each rank draws its own keys (the caller seeds every rank
        differently, so no two ranks share a key sequence), hence the range agrees with
        the single-process run only within the sampling error of ``max_samples`` values.
        """
        super().reduce_across_ranks()
        if not is_distributed():
            return
        self._consolidate()
        assert self.samples is not None and self.keys is not None
        # all_gather_rows concatenates along dim 0: gather [m, C] and transpose back.
        samples = all_gather_rows(self.samples.T.contiguous()).T
        keys = all_gather_rows(self.keys.T.contiguous()).T
        self.samples, self.keys, self.threshold = samples.contiguous(), keys.contiguous(), None
        self._held = self.samples.shape[1]
        if self._held > self.max_samples:
            self._consolidate()

    def sample(self) -> torch.Tensor:
        """The pooled subsample, ``[C, m]`` with ``m <= max_samples`` (all data if it fit)."""
        self._consolidate()
        if self.samples is None:
            raise RuntimeError(f"{type(self).__name__} has not observed any data")
        return self.samples


def _row_quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """Exact per-row quantile with linear interpolation (``torch.quantile``'s default).

    ``torch.quantile`` refuses inputs above 2**24 elements and sorts everything; two
    ``kthvalue`` selections are linear time and have no size limit.
    """
    n = v.shape[1]
    pos = q * (n - 1)
    i = math.floor(pos)
    frac = pos - i
    below = torch.kthvalue(v, i + 1, dim=1).values
    if frac == 0.0:
        return below
    above = torch.kthvalue(v, min(i + 2, n), dim=1).values
    return torch.lerp(below, above, frac)


@OBSERVERS.register("percentile")
class PercentileObserver(_SampledObserver):
    """Clip the range at a percentile of the pooled calibration data.

    Asymmetric specs clip both tails: ``[P_{100-p}, P_p]``. Symmetric specs use
    ``P_p(|x|)``: a symmetric grid has one magnitude, and taking the quantile of ``|x|``
    spends the clipped ``(100 - p)%`` on whichever tail is actually heavier, rather than
    clipping each side separately and then widening to the larger one (which would clip
    less than asked). ``percentile=100`` returns the exact running range, not the maximum
    of the subsample.
    """

    def __init__(
        self,
        percentile: float = 99.99,
        per_channel: bool = False,
        ch_axis: int = 0,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        seed: int = 0,
    ) -> None:
        super().__init__(
            per_channel=per_channel, ch_axis=ch_axis, max_samples=max_samples, seed=seed
        )
        if isinstance(percentile, bool) or not 50.0 <= float(percentile) <= 100.0:
            raise QCalibError(f"percentile must be in [50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        if spec.symmetric:
            if q == 1.0:
                amax = torch.maximum(-self.min_val, self.max_val)
            else:
                amax = _row_quantile(self.sample().abs(), q).to(self.min_val.device)
            return -amax, amax
        if q == 1.0:
            return self.min_val, self.max_val
        lo = _row_quantile(self.sample(), 1.0 - q).to(self.min_val.device)
        hi = _row_quantile(self.sample(), q).to(self.min_val.device)
        return lo, hi

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, {super().extra_repr()}"


@OBSERVERS.register("mse")
class MSEObserver(_SampledObserver):
    """Choose the clipping that minimizes the quantization error ``sum |x - fq(x)|^p``.

    Candidates shrink the observed range ``[min, max]`` by ratios ``k / num_candidates``,
    ``k = 1..num_candidates``; both ends are scaled (for asymmetric grids too) so the
    search stays one-dimensional and ratio 1.0 is exactly minmax. Hence the result is
    never worse than minmax on the evaluation sample. Ties go to the *largest* ratio:
    with equal error on the sample, clipping less is the safer bet on unseen data.

    The error is evaluated on the bounded subsample (exact while the data fits), with the
    same arithmetic as :func:`~qcalib.quant.functional.fake_quantize`. Per channel, the
    errors for all candidates and channels are one ``[R, C]`` matrix (computed in chunks
    of candidates to bound memory) and every channel takes its own argmin. The grid
    depends on the spec (bits, symmetric), so the search runs in ``calculate_qparams``
    (cost ``num_candidates`` passes over the sample, hence the smaller default
    ``max_samples``), not while observing.
    """

    def __init__(
        self,
        num_candidates: int = 100,
        p: float = 2.0,
        per_channel: bool = False,
        ch_axis: int = 0,
        max_samples: int = DEFAULT_MSE_MAX_SAMPLES,
        seed: int = 0,
    ) -> None:
        super().__init__(
            per_channel=per_channel, ch_axis=ch_axis, max_samples=max_samples, seed=seed
        )
        if (
            isinstance(num_candidates, bool)
            or not isinstance(num_candidates, int)
            or num_candidates < 1
        ):
            raise QCalibError(f"num_candidates must be a positive integer, got {num_candidates!r}")
        if isinstance(p, bool) or not float(p) > 0:
            raise QCalibError(f"p must be a positive number, got {p!r}")
        self.num_candidates = num_candidates
        self.p = float(p)

    def search_ratio(self, spec: QuantSpec) -> torch.Tensor:
        """Best clipping ratio of ``[min, max]`` per row, shape ``[C]`` (``[1]`` per tensor)."""
        self._check_ready(spec)
        x = self.sample()
        device = x.device
        n = self.num_candidates
        ratios = torch.arange(n, 0, -1, device=device, dtype=torch.float32) / n  # descending
        lo = ratios[:, None] * self.min_val.to(device)[None, :]  # [R, C]
        hi = ratios[:, None] * self.max_val.to(device)[None, :]
        scale, zp = qparams_from_range(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
        channels, m = x.shape
        chunk = max(1, _MSE_CHUNK_ELEMS // max(1, channels * m))
        errors = []
        for start in range(0, n, chunk):
            s = scale[start : start + chunk, :, None]
            z = zp[start : start + chunk, :, None]
            # Same ops, same order as fake_quantize (clip x/s to integer bounds, round,
            # times s) so the error measured here is the error the quantizer will make.
            # In-place after the division: the search is memory-bound.
            v = (x / s).clamp_(spec.qmin - z, spec.qmax - z).round_().mul_(s).sub_(x)
            v = v.square_() if self.p == 2.0 else v.abs_().pow_(self.p)
            errors.append(v.sum(dim=-1))
        best = torch.argmin(torch.cat(errors, dim=0), dim=0)  # first min = largest ratio
        return ratios[best]

    def _range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = self.search_ratio(spec).to(self.min_val.device)
        return ratio * self.min_val, ratio * self.max_val

    def extra_repr(self) -> str:
        return f"num_candidates={self.num_candidates}, p={self.p}, {super().extra_repr()}"


def make_observer(name: str, **params: object) -> Observer:
    """Build a registered observer by name, e.g. ``make_observer("percentile", percentile=99.9)``.

    Unknown parameter names raise :class:`QCalibError` listing the accepted ones (they
    usually come from a user's config, where a typo should not pass silently).
    """
    cls = OBSERVERS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise QCalibError(
            f"observer {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        )
    return cls(**params)
