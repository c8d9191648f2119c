"""Activation quantizers during reconstruction: learned step sizes and QDrop.

:class:`ReconActQuantizer` stands in for a layer's :class:`~qcalib.quant.ActQuantizer`
while a block is reconstructed:

* **Learned step size** (LSQ-style, as BRECQ and QDrop do it): the scale becomes a
  parameter trained by the straight-through gradient of
  :func:`~qcalib.quant.functional.fake_quantize`; the zero point stays fixed. The BRECQ /
  QDrop code uses no LSQ gradient scaling (its own learning rate of 4e-5 plays that
  part), neither do we. After each optimizer step :meth:`project` keeps the scale
  positive (``abs`` then ``clamp(min=1e-8)``, as the QDrop code does).
* **Drop** (QDrop): with ``drop_prob = p`` each element is fake-quantized with
  probability ``p`` and passed in float otherwise; ``p = 0`` is exactly the float input,
  ``p = 1`` exactly the plain quantizer's output (no random numbers are drawn for those).

Speed (issue 14), same mathematics: the quantization is the fused autograd node
:func:`~qcalib.quant.fused.fake_quantize_learnable` (one node, clamps, no selects), and the
drop is arithmetic on a float mask, ``torch.lerp(x, x_q, m)`` with ``m`` in {0, 1}, fused
with the quantization into one node (:func:`~qcalib.quant.fused.drop_fake_quantize_learnable`): lerp
returns ``x`` and ``x_q`` exactly at 0 and 1 and its gradients are ``g (1 - m)`` and
``g m``, the gradients of the former ``torch.where(keep, x_q, x)``, at a fraction of a
select's cost. The mask's random numbers come in the cheapest dtype that represents
``p`` exactly: when ``256 p`` is an integer (QDrop's 0.5 among them) one random byte per
element, ``byte < 256 p`` (8 bytes per 64-bit draw of the generator, compared straight
into the float mask: on one CPU thread about a fifth of ``torch.rand``'s cost on a
400k-element activation); any other ``p`` draws ``torch.rand(...) < p`` as before. Both
are exact Bernoulli(p) masks from the stage's seeded generator, but the byte stream is
not the float one, so runs at such ``p`` differ by seed noise from those of qcalib
before this change (``bench/results/recon-rerun.md`` reruns them). A fresh mask per
call rather than one reused buffer: autograd keeps the mask for the backward, and a
block that runs its forward twice before one backward would find a reused buffer
overwritten.

:meth:`commit` writes the learned scale back into the original quantizer and returns it.
"""

from __future__ import annotations

import torch
from torch import nn

from qcalib.quant.fused import (
    drop_fake_quantize_learnable,
    fake_quantize_learnable,
    scalar_bounds,
)
from qcalib.quant.quantizer import UniformQuantizer

__all__ = ["ReconActQuantizer"]

_EPS = 1e-8


class ReconActQuantizer(nn.Module):
    def __init__(
        self,
        base: UniformQuantizer,
        learn_scale: bool = False,
        drop_prob: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
        self.base = [base]  # kept out of children / state_dict
        self.spec = base.spec
        self.active = bool(base.initialized)  # an uncalibrated quantizer passes through
        self.learn_scale = learn_scale and self.active
        self.scale = nn.Parameter(base.scale.detach().clone(), requires_grad=self.learn_scale)
        self.register_buffer("zero_point", base.zero_point.detach().clone())
        self.drop_prob = float(drop_prob)
        # 256 p when it is an integer: the mask is drawn one random byte per element.
        byte = self.drop_prob * 256
        self.byte_threshold = int(byte) if byte == int(byte) and 0 < byte < 256 else None
        # The zero point stays fixed here: its grid bounds as numbers, read back once.
        zp = self.zero_point
        self.bounds = (
            scalar_bounds(self.spec.qmin, self.spec.qmax, float(zp), self.scale.dtype)
            if zp.numel() == 1
            else None
        )
        self.generator = generator
        # QuantModule._apply reads these when the quantizer is switched off.
        self.observer = None
        self.observer_enabled = False

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return fake_quantize_learnable(
            x, self.scale, self.zero_point, s.qmin, s.qmax, s.ch_axis, bounds=self.bounds
        )

    def drop_mask(self, x: torch.Tensor) -> torch.Tensor:
        """1.0 where an element is quantized (probability ``drop_prob``), else 0.0, in
        ``x``'s dtype."""
        if self.byte_threshold is not None:
            n = x.numel()
            # The full 64-bit range: every byte of every draw is uniform.
            words = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device)
            words.random_(-(2**63), None, generator=self.generator)
            uniform_bytes = words.view(torch.uint8)[:n].view(x.shape)
            return torch.lt(uniform_bytes, self.byte_threshold, out=torch.empty_like(x))
        mask = torch.rand(x.shape, generator=self.generator, device=x.device).lt_(self.drop_prob)
        return mask if mask.dtype == x.dtype else mask.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or self.drop_prob == 0.0:
            return x
        if x.dtype.itemsize < self.scale.dtype.itemsize:
            # Mixed precision: the grid arithmetic (and the drop mix) stays in the step's
            # precision; only the layers' own FP work runs in the reduced one.
            x = x.to(self.scale.dtype)
        if self.drop_prob == 1.0:
            return self.quantize(x)
        s = self.spec
        mask = self.drop_mask(x)
        return drop_fake_quantize_learnable(
            x, self.scale, self.zero_point, s.qmin, s.qmax, mask, s.ch_axis, bounds=self.bounds
        )

    @torch.no_grad()
    def project(self) -> None:
        if self.learn_scale:
            self.scale.abs_().clamp_(min=_EPS)

    @torch.no_grad()
    def commit(self) -> UniformQuantizer:
        """The original quantizer, holding the learned scale when it was learned."""
        base = self.base[0]
        if self.learn_scale:
            base.set_qparams(self.scale.detach().clamp(min=_EPS), base.zero_point)
        return base

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, learn_scale={self.learn_scale}, drop_prob={self.drop_prob}"
