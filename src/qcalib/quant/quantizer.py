"""Fake-quantizer modules: a quantization grid, its parameters, and an optional observer.

Split the way torch.ao splits it: an *observer* watches tensors and proposes a range;
a *quantizer* owns the scale / zero point and applies fake quantization. Two flags
select the mode: ``observer_enabled`` (collect statistics) and ``fake_quant_enabled``
(apply the grid once parameters exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcalib.quant.functional import check_bits, fake_quantize, qrange


@dataclass(frozen=True)
class QuantSpec:
    """What grid a tensor is quantized to."""

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    ch_axis: int = 0

    def __post_init__(self) -> None:
        check_bits(self.bits)

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
    """Quantizer for a layer's weight (per output channel by default)."""


class ActQuantizer(UniformQuantizer):
    """Quantizer for a layer's input activation (per tensor)."""
