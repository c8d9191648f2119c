"""Fake-quantizer modules: a quantization grid, its parameters, and an optional observer.

Split the way torch.ao splits it: an *observer* watches tensors and proposes a range;
a *quantizer* owns the scale / zero point and applies fake quantization. Two flags
select the mode: ``observer_enabled`` (collect statistics) and ``fake_quant_enabled``
(apply the grid once parameters exist).

Two refinements of the grid, both stated in :class:`QuantSpec`:

* **Groups** (``group_size``, weights only): each output channel's flattened inputs
  (``weight.flatten(1)``, i.e. input channels x kernel positions for a conv, the order GPTQ
  walks columns in) are cut into contiguous groups of ``group_size`` that share one scale /
  zero point; scale and zero point are ``[O, G]``, ``G = ceil(K / group_size)``. A last,
  shorter group is allowed (K need not be a multiple). Groups imply per output channel.
* **Dynamic** (``dynamic``, activations only): scale / zero point are computed at run time
  for every token (every row of the last dimension) from that row's min / max, widened to
  contain zero like every range here; nothing is calibrated, nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcalib.errors import QCalibError
from qcalib.quant.functional import check_bits, fake_quantize, qparams_from_range, qrange


def group_rows(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w [O, ...]`` as ``[O * G, group_size]`` rows, one per group of ``weight.flatten(1)``.

    A shorter last group is padded by repeating its own last value: that changes neither
    its min / max nor which values it holds, so any range observer reads the group's range
    (a sampled observer sees that one value a few more times).
    """
    flat = w.reshape(w.shape[0], -1)
    k = flat.shape[1]
    pad = -k % group_size
    if pad:
        flat = torch.cat([flat, flat[:, -1:].expand(-1, pad)], dim=1)
    return flat.reshape(-1, group_size)


def expand_groups(p: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """A ``[O, G]`` group parameter broadcast to ``w``'s shape (one value per weight)."""
    k = w[0].numel()
    full = p.reshape(w.shape[0], -1).repeat_interleave(group_size, dim=1)[:, :k]
    return full.reshape(w.shape)


@dataclass(frozen=True)
class QuantSpec:
    """What grid a tensor is quantized to."""

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    ch_axis: int = 0
    # Weights: inputs per shared scale along weight.flatten(1); None = one per channel.
    group_size: int | None = None
    # Activations: per-token min/max at run time instead of a calibrated range.
    dynamic: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise QCalibError(f"--group-size must be an integer, got {self.group_size!r}")
            if self.group_size < 1:
                raise QCalibError(f"--group-size must be at least 1, got {self.group_size}")
            if not self.per_channel or self.ch_axis != 0:
                raise QCalibError(
                    "--group-size needs per-output-channel weights; drop --per-tensor-weights"
                )
            if self.dynamic:
                raise QCalibError("a grid is either grouped (weights) or dynamic (activations)")

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]


class UniformQuantizer(nn.Module):
    """Uniform affine fake quantizer with scale / zero point buffers.

    Until :meth:`set_qparams` (or :meth:`compute_qparams` from the observer) has run, the
    quantizer passes tensors through unchanged.
    """

    def __init__(self, spec: QuantSpec, observer: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.observer_enabled = False
        self.fake_quant_enabled = True
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        # Replace rather than copy_: per-channel parameters change the buffer's shape.
        self.scale = scale.detach().clone().to(torch.float32)
        self.zero_point = zero_point.detach().clone().to(torch.float32)
        self.initialized = torch.tensor(True, device=self.scale.device)

    def compute_qparams(self) -> None:
        """Take scale / zero point from the observer's statistics."""
        if self.observer is None:
            raise RuntimeError("quantizer has no observer to compute parameters from")
        scale, zero_point = self.observer.calculate_qparams(self.spec)
        self.set_qparams(scale, zero_point)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize with the current parameters, regardless of the mode flags."""
        return fake_quantize(
            x, self.scale, self.zero_point, self.qmin, self.qmax, self.spec.ch_axis
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled and self.observer is not None:
            self.observer(x.detach())
        if self.fake_quant_enabled and bool(self.initialized):
            return self.quantize(x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Loaded parameters may be per-channel while a fresh module holds scalars.
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                shape = state_dict[key].shape
                setattr(self, name, torch.empty(shape, dtype=cur.dtype, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.spec
        mode = "per_channel" if s.per_channel else "per_tensor"
        sym = "symmetric" if s.symmetric else "asymmetric"
        return f"bits={s.bits}, {sym}, {mode}"


class WeightQuantizer(UniformQuantizer):
    """Quantizer for a layer's weight (per output channel by default, or per group).

    A grouped quantizer's observer watches :meth:`observer_view` of the weight (one row
    per group), so any per-channel observer yields per-group ranges, reshaped to ``[O, G]``.
    """

    def observer_view(self, w: torch.Tensor) -> torch.Tensor:
        gs = self.spec.group_size
        if gs is None:
            return w
        self._out_channels = w.shape[0]  # how compute_qparams reshapes the rows' ranges
        return group_rows(w, gs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled and self.observer is not None:
            self.observer(self.observer_view(x.detach()))
        if self.fake_quant_enabled and bool(self.initialized):
            return self.quantize(x)
        return x

    def compute_qparams(self) -> None:
        """Parameters from the observer; grouped ones come back ``[O, G]``."""
        if self.observer is None:
            raise RuntimeError("quantizer has no observer to compute parameters from")
        scale, zero_point = self.observer.calculate_qparams(self.spec)
        if self.spec.group_size is not None:
            out_channels = getattr(self, "_out_channels", None)
            if out_channels is None:
                raise RuntimeError("a grouped weight quantizer's observer has seen no weight")
            scale = scale.reshape(out_channels, -1)
            zero_point = zero_point.reshape(out_channels, -1)
        self.set_qparams(scale, zero_point)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        gs = self.spec.group_size
        if gs is None:
            return super().quantize(x)
        s = expand_groups(self.scale, x, gs)
        z = expand_groups(self.zero_point, x, gs)
        return fake_quantize(x, s, z, self.qmin, self.qmax, self.spec.ch_axis)

    def extra_repr(self) -> str:
        gs = self.spec.group_size
        return super().extra_repr() + (f", group_size={gs}" if gs is not None else "")


class ActQuantizer(UniformQuantizer):
    """Quantizer for a layer's input activation (per tensor)."""


class DynamicActQuantizer(ActQuantizer):
    """Per-token activation quantizer: every row of the last dimension gets its own
    min / max grid at run time (no observer, no stored range).

    ``initialized`` is true from the start, so calibrators that fill parameters from
    observers leave it alone (they skip quantizers with ``dynamic = True``).
    """

    dynamic = True

    def __init__(self, spec: QuantSpec, observer: nn.Module | None = None) -> None:
        super().__init__(spec, None)
        self.initialized = torch.tensor(True)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        raise QCalibError("a dynamic (per-token) activation quantizer has no static range")

    def compute_qparams(self) -> None:
        raise QCalibError("a dynamic (per-token) activation quantizer has no static range")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        with torch.no_grad():
            lo, hi = torch.aminmax(x.detach().float(), dim=-1, keepdim=True)
            scale, zp = qparams_from_range(lo, hi, self.qmin, self.qmax, self.spec.symmetric)
        # Element-wise parameters (same shape as x), so fake_quantize needs no channel axis.
        return fake_quantize(
            x, scale.expand_as(x).to(x.dtype), zp.expand_as(x).to(x.dtype), self.qmin, self.qmax
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dynamic per-token"
