"""Streamed activation statistics at the inputs of the quantized layers (SelectQ pass 1/2).

What is observed (design.md §3)
-------------------------------
*Sites* are the inputs of the layers this package quantizes (``Conv2d`` / ``Linear``, as
decided by :func:`qcalib.model.is_quantizable`; layers inside a float unit such as
``nn.MultiheadAttention`` are skipped because the unit never calls them), which is where
the activation quantizers sit and so what calibration measures ranges on. Sites are
ordered by execution: a probe forward on the first sample of the first batch records the
order of the calls (as :func:`qcalib.model.execution_order` does), so the selection of
layers is resolved before any statistic is computed. A layer called
more than once per forward (weight sharing) gives one site per call: ``name``,
``name#2``, ``name#3`` ... since each call has its own activation distribution.

Per sample and per channel the collector computes the mean and the (population) standard
deviation of the activation (:func:`activation_stats_masked`), laid out as the rows
``[mu_1..mu_C, sigma_1..sigma_C]`` of :mod:`qcalib.select.distance`:

* ``Conv2d`` input ``[B, C, H, W]``: over the ``H x W`` spatial positions;
* ``Linear`` input ``[B, T, C]`` (sequence models): over the ``T`` tokens, restricted to
  the valid ones when an attention mask ``[B, T]`` (true / 1 = valid) is given; inputs
  ``[B, *, C]`` with more token dimensions are reduced over all of them (the mask
  applies only when the token shape matches it);
* ``Linear`` input ``[B, C]``: one position, ``sigma = 0``.

``stats="mean"`` keeps the layout but sets every sigma to 0 (the sigma statistics are
then constant over the pool, so the W2 Knowledge Distance gives them weight 0 and it
becomes a distance between means only).

Streaming: the statistics are computed inside the forward hook and only the ``[B, 2C]``
rows leave it (moved to CPU, float32); the activation itself is released by the forward
as usual. Hooks are registered for one forward and removed right after it, so the model
is never left with hooks attached, even when a forward raises.

Non-finite values: the rows are checked per site; NaN/Inf (or an overflow of the
statistics) raises :class:`NonFiniteActivationError` naming the layer. Checking the
per-sample means and stds is enough, because any NaN/Inf in the activation reaches them.

Packed text batches: when the inputs are a token batch ``[B, 2, L]``
(:mod:`qcalib.data.tokens`) and no mask is given, the mask comes from the model's
``token_mask(x)`` (the HF adapters of :mod:`qcalib.zoo.hf`), else from the batch's own mask
row, so padding tokens never enter the statistics of any selector (SelectQ, k-center,
herding, the quality report). A selected sample is still a whole sequence.

Extremes (``extremes=True``): each site also returns per-sample ``[min, max]`` rows
``[B, 2]`` over its channels and valid positions, under :func:`extremes_key` (SelectQ's
range matching, :mod:`qcalib.select.ranges`): what a static per-tensor min-max observer
reads, so the range of any subset is known without a forward.

Reuse across selectors (:class:`StatRowCache`, opt-in): the rows of a sample depend only
on the model, the sample, ``layers`` and ``stats``, not on the seed or the budget, so a
caller that runs many selections on one model and pool (a benchmark: seeds x budgets x
selectors) can keep them in memory and forward each sample once. The rows it returns are
those of the forward that first computed them (batch composition can move float32 sums
in the last bit; selections are then equal up to such ties).

Assumptions: the batch dimension is first in every activation (``batch_first`` models);
a site whose activation does not start with the batch size raises a clear error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qcalib.data.tokens import is_token_batch, unpack_tokens
from qcalib.errors import QCalibError
from qcalib.files import atomic_write_text, write_failed
from qcalib.model.qmodules import is_conv
from qcalib.model.stop import forward_until_stopped, stop_before, unread_output_head
from qcalib.model.wrap import probe_mode, quantizable_layers
from qcalib.select.distance import join_stats

log = logging.getLogger(__name__)

__all__ = [
    "EXTREMES_SUFFIX",
    "STATS_KINDS",
    "ActivationStatsCollector",
    "ActivationTap",
    "NonFiniteActivationError",
    "StatRowCache",
    "activation_extremes_masked",
    "activation_stats_masked",
    "extremes_key",
    "resolve_layers",
    "stat_batches",
]

STATS_KINDS = ("mean_std", "mean")
#: Suffix of a site's extremes rows (``#`` already marks repeated calls of one layer).
EXTREMES_SUFFIX = "@extremes"


class NonFiniteActivationError(QCalibError, ValueError):
    """NaN/Inf in the activation feeding a layer (a ``QCalibError`` and a ``ValueError``)."""


def check_finite_site(x: Tensor, site: str, what: str = "activation statistics") -> None:
    """Raise :class:`NonFiniteActivationError` naming ``site`` if ``x`` has NaN/Inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        kinds = " and ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "Inf")) if n > 0)
        raise NonFiniteActivationError(
            f"the input of layer {site!r} has non-finite {what} ({kinds} value(s)); check "
            "the model weights and the pool's inputs (overflow, division by zero, a "
            "corrupt image) or leave the layer out with layers=..."
        )


def channel_dim_of(module: nn.Module) -> int:
    """1 for convolutions (``[B, C, H, W]``), -1 for linear layers (``[B, *, C]``)."""
    return 1 if is_conv(module) else -1


def parse_layer_list(spec: Any) -> list[str | int] | None:
    """``None``/``"all"`` -> None; ``"a,b"`` / ``"0,-1"`` / a list -> names and ints."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    if isinstance(spec, (str, int)) and not isinstance(spec, bool):
        spec = str(spec).split(",")
    out: list[str | int] = []
    for item in spec:
        if isinstance(item, bool):
            raise QCalibError(f"layer {item!r} is neither a layer name nor an index")
        if isinstance(item, int):
            out.append(item)
            continue
        text = str(item).strip()
        try:
            out.append(int(text))
        except ValueError:
            if text:
                out.append(text)
    if not out:
        raise QCalibError("the layer list is empty; give names or indices, or 'all'")
    return out


def resolve_layers(sites: Sequence[str], spec: Any, what: str = "layers") -> list[str]:
    """The sites selected by ``spec`` (names, indices into ``sites``, or all), in site order.

    A layer name selects every call site of that layer (``name`` and ``name#k``).
    """
    items = parse_layer_list(spec)
    if items is None:
        return list(sites)
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, int):
            if not -len(sites) <= item < len(sites):
                raise QCalibError(
                    f"{what}: index {item} is out of range for {len(sites)} layers; use "
                    f"0..{len(sites) - 1} (or negative indices from the end)"
                )
            chosen.add(sites[item])
            continue
        hits = [s for s in sites if s == item or s.split("#", 1)[0] == item]
        if not hits:
            shown = ", ".join(sites[:12]) + (", ..." if len(sites) > 12 else "")
            raise QCalibError(
                f"{what}: no quantized layer named {item!r}; layers in execution order: {shown}"
            )
        chosen.update(hits)
    return [s for s in sites if s in chosen]


def _mask_for(x: Tensor, channel_dim: int, mask: Tensor | None) -> Tensor | None:
    """The mask ``[B, T]`` if it applies to a ``[B, T, C]`` activation, else None."""
    if mask is None or channel_dim == 1 or x.dim() != 3:
        return None
    if tuple(mask.shape) != tuple(x.shape[:2]):
        return None
    return mask


# One-pass variance E[x^2] - mu^2 is trusted where mu^2 <= this many times the variance:
# float32 sums carry a relative error of ~1e-6 at most, which the subtraction amplifies by
# 1 + mu^2 / var, so the variance stays within ~1e-4 (relative) of the two-pass value
# there; measured errors are ~1e-7 against a float64 two-pass reference.
_ONE_PASS_MAX_CONDITION = 100.0


def _is_channels_last(x: Tensor, channel_dim: int) -> bool:
    """A 4-D convolution activation stored channels-last (``--channels-last``)."""
    return (
        x.dim() == 4
        and channel_dim == 1
        and x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def _mean_square_channels_last(x: Tensor) -> Tensor:
    """``mean(x^2)`` over the last dim of the ``[B, C, P]`` view of a channels-last
    activation (channels adjacent in memory).

    Why not the norm: along that strided dim it ran 3-10x slower on this CPU than squaring
    and summing (MobileNet-like shapes, one thread), whose inner loop runs over adjacent
    channels. The square's temporary is bounded by squaring ~256k values at a time.
    """
    step = max(1, (1 << 18) // max(1, x[0].numel()))
    return torch.cat([part.square().mean(2) for part in x.split(step)])


def _spatial_std(x: Tensor, mu: Tensor, channels_last: bool = False) -> Tensor:
    """Population std over the last dim of ``x`` ``[B, C, P]`` with ``mu`` its mean ``[B, C]``.

    Why not the plain two-pass ``(x - mu)^2``: it writes and re-reads a temporary as large
    as the activation, which at the thin layers of a MobileNet costs as much as the layer
    itself (SelectQ's cost target is a ratio to the plain forward). Reading the activation
    once more for ``|x|^2`` (a norm, no temporary) gives ``E[x^2] - mu^2``; the few rows
    where that subtraction cancels (mean large against the spread, e.g. a near-constant
    channel) are recomputed by two passes, so no std carries the one-pass cancellation.
    """
    p = x.shape[2]
    if channels_last:
        mean_sq = _mean_square_channels_last(x)
    else:
        mean_sq = torch.linalg.vector_norm(x, dim=2).square_().div_(p)
    mu_sq = mu.square()
    var = (mean_sq - mu_sq).clamp_min_(0.0)
    # Not finite: x^2 or mu^2 overflowed float32 where the deviations may not have (and a
    # NaN activation lands here too, and stays NaN for the finiteness check).
    bad = ~((mu_sq <= _ONE_PASS_MAX_CONDITION * var) & var.isfinite())
    if bool(bad.any()):
        rows = x[bad]  # [M, P]: only the ill-conditioned (sample, channel) pairs
        var[bad] = (rows - mu[bad][:, None]).square_().mean(1)
    return var.sqrt_()


def activation_stats_masked(
    x: Tensor, channel_dim: int = 1, mask: Tensor | None = None, kind: str = "mean_std"
) -> Tensor:
    """Per-sample per-channel ``[mu, sigma]`` rows ``[B, 2C]`` of one activation.

    ``mask`` ``[B, T]`` (bool or 0/1) restricts a ``[B, T, C]`` activation with
    ``channel_dim=-1`` to its valid tokens. Population std (``correction=0``) computed in at
    least float32 (:func:`_spatial_std`: one extra read, two passes where the one-pass
    formula would cancel; masked tokens always by two passes). ``kind="mean"``
    returns sigma = 0. A 2-D ``[B, C]`` input has one position: sigma = 0.
    """
    if kind not in STATS_KINDS:
        raise QCalibError(f"unknown stats {kind!r}; choose one of: {', '.join(STATS_KINDS)}")
    if x.dim() < 2:
        raise ValueError(f"expected an activation [B, C, ...], got shape {tuple(x.shape)}")
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    cd = channel_dim % x.dim()
    if cd == 0:
        raise ValueError("channel_dim cannot be the batch dimension 0")
    m = _mask_for(x, channel_dim, mask)
    channels_last = _is_channels_last(x, cd)
    x = x.movedim(cd, 1).reshape(x.shape[0], x.shape[cd], -1)  # [B, C, P]
    if m is None:
        mu = x.mean(2)
        if kind == "mean" or x.shape[2] == 1:
            return join_stats(mu, torch.zeros_like(mu))
        return join_stats(mu, _spatial_std(x, mu, channels_last))
    w = m.to(device=x.device, dtype=x.dtype)[:, None, :]  # [B, 1, T]
    count = w.sum(2)  # [B, 1]
    if bool((count == 0).any()):
        raise QCalibError(
            "a sample has no valid token under the attention mask; drop empty sequences "
            "from the pool"
        )
    mu = (x * w).sum(2) / count
    if kind == "mean":
        return join_stats(mu, torch.zeros_like(mu))
    var = ((x - mu[:, :, None]).square_() * w).sum(2) / count
    return join_stats(mu, var.sqrt_())


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    values = inputs.values() if isinstance(inputs, dict) else inputs
    for v in values:
        if isinstance(v, Tensor) and v.dim() > 0:
            return v.shape[0]
    raise QCalibError("cannot tell the batch size: the inputs hold no tensor")


def _to_device(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _first_sample(inputs: Any) -> Any:
    """The first sample of a batch (every tensor with a batch dimension sliced to 1)."""
    if isinstance(inputs, Tensor):
        return inputs[:1] if inputs.dim() > 0 else inputs
    if isinstance(inputs, dict):
        return {k: _first_sample(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_first_sample(v) for v in inputs)
    return inputs


def token_mask_of(model: nn.Module, inputs: Any) -> Tensor | None:
    """The attention mask ``[B, L]`` of a packed text batch (None for other inputs).

    Asked of the model first (``token_mask``, also through a ``QuantModel``'s ``.model``), so
    an adapter with its own packing rule decides; else the batch's mask row.
    """
    if not is_token_batch(inputs):
        return None
    for m in (model, getattr(model, "model", None)):
        fn = getattr(m, "token_mask", None)
        if callable(fn):
            return fn(inputs)
    return unpack_tokens(inputs)[1]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


# fn(site, activation, channel_dim, mask) is called inside the hook.
SiteFn = Callable[[str, Tensor, int, "Tensor | None"], None]


class ActivationTap:
    """Run a model batch by batch and hand each quantized layer's input to a callback.

    The callback ``fn(site, x, channel_dim, mask)`` runs inside a forward pre-hook, so it
    sees the activation while it exists and must reduce it to something small. The site
    list (execution order) is fixed by the first batch; ``layers`` (names, indices into
    that list, a comma-separated string, or None for all) restricts which sites reach
    the callback. The model runs in eval mode under ``torch.no_grad``, on its own device.
    """

    def __init__(
        self, model: nn.Module, layers: Any = None, device: torch.device | str | None = None
    ) -> None:
        self.model = model
        self.layer_spec = parse_layer_list(layers)
        self.modules = quantizable_layers(model)
        if not self.modules:
            raise QCalibError(
                f"the model ({type(model).__name__}) has no quantizable layer "
                "(Conv2d / Linear); activation statistics need at least one"
            )
        self.device = torch.device(device) if device is not None else model_device(model)
        # The statistics never read the logits: forwards end at the head's input (after
        # the head's own site, if it is one).
        self.head = unread_output_head(model)
        self.all_sites: list[str] | None = None  # every site, execution order
        self.sites: list[str] | None = None  # the selected ones

    def run(self, inputs: Any, fn: SiteFn, mask: Tensor | None = None) -> int:
        """One forward over a batch; returns the batch size.

        Before the first batch, one probe forward on its first sample learns the site
        order (so the callback never sees a site that is not selected).
        """
        inputs = _to_device(inputs, self.device)
        if mask is None and isinstance(inputs, dict):
            mask = inputs.get("attention_mask")
        if mask is None:
            mask = token_mask_of(self.model, inputs)
        if mask is not None:
            mask = mask.to(self.device)
        bsz = _batch_size(inputs)
        if self.all_sites is None:
            self._set_sites(self._forward(_first_sample(inputs), None, None, 1))
        order = self._forward(inputs, fn, mask, bsz)
        if order != self.all_sites:
            raise QCalibError(
                "the quantized layers ran in a different order (or a different number of "
                "times) for this batch than for the first one; activation statistics need "
                "a static call graph"
            )
        return bsz

    def _forward(self, inputs: Any, fn: SiteFn | None, mask: Tensor | None, bsz: int) -> list[str]:
        selected = set(self.sites or ())
        calls: dict[str, int] = {}
        order: list[str] = []
        handles = []

        def make_hook(name: str, cdim: int) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple) -> None:
                k = calls.get(name, 0) + 1
                calls[name] = k
                site = name if k == 1 else f"{name}#{k}"
                order.append(site)
                if fn is None or site not in selected:
                    return
                x = args[0] if args else None
                if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != bsz:
                    shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                    raise QCalibError(
                        f"the input of layer {site!r} has shape {shape}, which does not "
                        f"start with the batch size {bsz}; activation statistics need "
                        "batch-first activations (e.g. batch_first=True)"
                    )
                fn(site, x, cdim, mask)

            return hook

        try:
            for name, m in self.modules.items():
                handles.append(m.register_forward_pre_hook(make_hook(name, channel_dim_of(m))))
            with probe_mode(self.model), stop_before(self.head):
                forward_until_stopped(self.model, inputs)
        finally:
            for h in handles:
                h.remove()
        return order

    def _set_sites(self, order: list[str]) -> None:
        if not order:
            raise QCalibError(
                "no quantizable layer was called by the forward pass; check the model and "
                "its inputs"
            )
        self.all_sites = list(order)
        self.sites = resolve_layers(self.all_sites, self.layer_spec)


def activation_extremes_masked(
    x: Tensor, channel_dim: int = 1, mask: Tensor | None = None
) -> Tensor:
    """Per-sample ``[min, max]`` rows ``[B, 2]`` of one activation over every channel and
    position (the valid tokens only under ``mask``, as :func:`activation_stats_masked`):
    what a static per-tensor min-max observer would read from that sample alone."""
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    m = _mask_for(x, channel_dim % x.dim(), mask)
    if m is not None and not bool(m.all()):
        valid = m.to(device=x.device, dtype=torch.bool)[:, :, None]
        lo = x.masked_fill(~valid, float("inf")).flatten(1).amin(1)
        hi = x.masked_fill(~valid, float("-inf")).flatten(1).amax(1)
        return torch.stack([lo, hi], 1)
    flat = x.reshape(x.shape[0], -1)
    # Two reductions, not torch.aminmax(dim=1): that one is ~15x slower on the CPU here.
    return torch.stack([flat.amin(1), flat.amax(1)], 1)


def extremes_key(site: str) -> str:
    """The row key of ``site``'s per-sample extremes (collectors made with ``extremes=True``)."""
    return site + EXTREMES_SUFFIX


class ActivationStatsCollector:
    """Per-batch activation statistics of the quantized layers' inputs.

    ``collector(inputs)`` runs one batch and returns ``{site: rows [B, 2C] float32 (CPU)}``
    in execution order (see the module notes for the layout and the options). The full
    activations are never kept: only the rows leave the hooks.

    Parameters
    ----------
    model:
        The full-precision network (a :class:`~qcalib.model.QuantModel` works too: its
        quantized layers' inputs are observed before their quantizers).
    layers:
        ``None`` (all sites), layer names, indices into the execution order, or a
        comma-separated string of either.
    stats:
        ``"mean_std"`` (default) or ``"mean"`` (sigma set to 0).
    device:
        Where the forward runs (default: the model's device).
    extremes:
        Also return, under :func:`extremes_key` of each site, the per-sample ``[min, max]``
        rows ``[B, 2]`` (:func:`activation_extremes_masked`): the set's static min-max
        range at a site is then known for any subset without a forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Any = None,
        stats: str = "mean_std",
        device: torch.device | str | None = None,
        extremes: bool = False,
    ) -> None:
        if stats not in STATS_KINDS:
            raise QCalibError(f"unknown stats {stats!r}; choose one of: {', '.join(STATS_KINDS)}")
        self.stats = stats
        self.extremes = extremes
        self.tap = ActivationTap(model, layers, device)

    @property
    def sites(self) -> list[str] | None:
        """Observed sites in execution order (known after the first batch)."""
        return self.tap.sites

    def __call__(
        self, inputs: Any, mask: Tensor | None = None, extremes: bool | None = None
    ) -> dict[str, Tensor]:
        """Rows of one batch; ``extremes`` (default: the collector's) overrides whether the
        extremes rows are computed (a row cache that keeps them asks for them)."""
        with_ext = self.extremes if extremes is None else extremes
        out: dict[str, Tensor] = {}

        def fn(site: str, x: Tensor, cdim: int, m: Tensor | None) -> None:
            rows = activation_stats_masked(x, cdim, m, self.stats).to("cpu", torch.float32)
            check_finite_site(rows, site)
            out[site] = rows
            if with_ext:
                ext = activation_extremes_masked(x, cdim, m).to("cpu", torch.float32)
                out[extremes_key(site)] = ext

        self.tap.run(inputs, fn, mask)
        return {k: out[k] for k in self.row_keys(self.tap.sites or (), with_ext) if k in out}

    def row_keys(self, sites: Sequence[str], extremes: bool | None = None) -> list[str]:
        """The keys of the rows returned for ``sites``: each site, then (with
        ``extremes``, default the collector's) its extremes key."""
        if not (self.extremes if extremes is None else extremes):
            return list(sites)
        return [k for s in sites for k in (s, extremes_key(s))]


@dataclass
class _RowStore:
    """Rows of every sample seen so far, ``{site: [N, D]}``, and which samples they are.
    With a ``folder``, every batch of new rows is also written there as one chunk file,
    and the chunks already there are read back first."""

    size: int
    folder: Path | None = None
    key: str = ""
    extremes: bool = False  # the rows include each site's extremes rows
    sites: list[str] | None = None
    rows: dict[str, Tensor] = field(default_factory=dict)
    have: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.have = torch.zeros(self.size, dtype=torch.bool)
        if self.folder is not None:
            self._read_folder()

    def add(
        self, idx: Tensor, rows: dict[str, Tensor], sites: Sequence[str], write: bool = True
    ) -> None:
        """Keep the rows of pool samples ``idx`` (and, with a folder, write them as a chunk
        unless they were just read from one)."""
        for site, r in rows.items():
            if site not in self.rows:
                self.rows[site] = torch.zeros(self.size, r.shape[1], dtype=r.dtype)
            self.rows[site][idx] = r
        if self.sites is None:
            self.sites = list(sites)
        self.have[idx] = True
        if write and self.folder is not None:
            self._write_chunk(idx, rows)

    def _write_chunk(self, idx: Tensor, rows: dict[str, Tensor]) -> None:
        assert self.folder is not None
        meta = self.folder / _META_FILE
        chunk = self.folder / f"rows-{int(idx[0]):07d}-{idx.numel()}.safetensors"
        tmp = chunk.with_name(chunk.name + ".tmp")
        tensors = {_INDEX_KEY: idx.contiguous(), **{s: r.contiguous() for s, r in rows.items()}}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not meta.is_file():
                atomic_write_text(
                    meta, json.dumps({"key": self.key, "sites": self.sites}), "cache directory"
                )
            # Written whole under a temporary name, then renamed: a crash leaves no torn chunk.
            save_file(tensors, str(tmp))
            os.replace(tmp, chunk)
        except OSError as e:
            raise write_failed(chunk, e, "cache directory") from None

    def _read_folder(self) -> None:
        assert self.folder is not None
        meta = self.folder / _META_FILE
        if not meta.is_file():
            return
        try:
            recorded = json.loads(meta.read_text())
        except ValueError as e:
            raise QCalibError(
                f"the statistic-row cache {meta} is damaged ({e}); delete that folder"
            ) from None
        if not isinstance(recorded, dict) or recorded.get("key") != self.key:
            raise QCalibError(
                f"the statistic-row cache {self.folder} holds rows of another model, pool "
                "or statistics; delete that folder or give another cache directory"
            )
        self.sites = recorded.get("sites")
        for chunk in sorted(self.folder.glob("rows-*.safetensors")):
            try:
                tensors = load_file(str(chunk))
                idx = tensors.pop(_INDEX_KEY).long()
            except (OSError, KeyError, SafetensorError) as e:
                log.warning("ignoring a damaged statistic-row chunk %s (%s)", chunk, e)
                continue
            self.add(idx, tensors, self.sites or list(tensors), write=False)
        if self.have.any():
            log.info("read the statistic rows of %d of %d pool samples from %s",
                     int(self.have.sum()), self.size, self.folder)  # fmt: skip


_META_FILE = "rows.json"
_INDEX_KEY = "__pool_index__"


class StatRowCache:
    """Per-sample statistic rows of one model on one pool, kept across selectors (module
    notes, "Reuse across selectors"). Memory: ``N x sum_sites 2C`` float32 values for the
    samples read (SmolLM2-135M, 1024 windows: about 1.2 GB). Never share one cache
    between models or pools: a store is keyed only by the pool size and the collector's
    layers and statistics, plus ``fingerprint``.

    ``directory`` (optional) makes the rows outlive the process: each batch of new rows is
    written there as it is computed, and a later cache on the same directory and
    ``fingerprint`` reads them back, so a rerun (or a run that crashed in its selection
    pass) forwards only the samples not yet there. The caller's ``fingerprint`` must name
    the model and the pool (a file hash, the pool's token digest): rows are only as valid
    as it is. Single-process streams only; under ``torchrun`` the cache is not used."""

    def __init__(self, directory: str | Path | None = None, fingerprint: str = "") -> None:
        self.directory = None if directory is None else Path(directory)
        self.fingerprint = fingerprint
        self._stores: dict[tuple, _RowStore] = {}

    def store(self, pool_size: int, collector: ActivationStatsCollector) -> _RowStore:
        """The store for ``collector``'s rows. A store that also keeps the extremes serves
        a collector without them (its rows are a superset), so a run that selected with
        range matching once forwards nothing more for the selections without it."""
        base = (pool_size, repr(collector.tap.layer_spec), collector.stats)
        key = (*base, collector.extremes)
        if not collector.extremes and self._exists((*base, True)):
            key = (*base, True)
        if key not in self._stores:
            self._stores[key] = _RowStore(pool_size, self._folder(key), self._text(key), key[-1])
        return self._stores[key]

    def _text(self, key: tuple) -> str:
        return repr((self.fingerprint, *key))

    def _folder(self, key: tuple) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / hashlib.sha256(self._text(key).encode()).hexdigest()[:16]

    def _exists(self, key: tuple) -> bool:
        folder = self._folder(key)
        return key in self._stores or (folder is not None and (folder / _META_FILE).is_file())


def stat_batches(
    pool: Any,
    collector: ActivationStatsCollector,
    batch_size: int,
    order: Tensor | None = None,
    cache: StatRowCache | None = None,
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """``(indices, {site: rows})`` per batch of ``batch_size`` pool samples, in ``order``
    (default: index order). With ``cache``, only the samples not yet in it are forwarded.
    Sites are the collector's (``collector.tap.sites`` once set, e.g. pruned by SelectQ's
    pass 2); a collector that never ran a forward gets the cached sites."""
    if cache is None:
        for idx, x in pool.batches(batch_size, order):
            yield idx, collector(x)
        return
    store = cache.store(len(pool), collector)
    for idx in torch.split(torch.arange(len(pool)) if order is None else order, batch_size):
        missing = idx[~store.have[idx]]
        if missing.numel():
            rows = collector(pool.get(missing), extremes=store.extremes)
            store.add(missing, rows, collector.sites or list(rows))
        if collector.tap.sites is None:
            collector.tap.sites = list(store.sites or ())
        keys = collector.row_keys(collector.tap.sites)
        yield idx, {k: store.rows[k][idx] for k in keys if k in store.rows}
