"""Fake quantization with a learnable step as one autograd node (the reconstruction hot path).

:func:`fake_quantize_learnable` computes exactly the function and the gradients of
:func:`~qcalib.quant.functional.fake_quantize` when gradients are needed, with fewer
elementwise passes and no selection ops:

* forward: ``round(clamp(x / s, qmin - z, qmax - z)) * s``, three passes in place on one
  buffer (the bounds are integers, so clamping before or after rounding gives the same
  value; the reference's ``round_ste`` adds ``round(v) - v`` back onto ``v``, which is
  exact in float for every ``|v| <= 2^22``, so the values agree bit for bit);
* backward (recomputed from the saved input rather than kept from the forward: one
  tensor fewer held per quantizer while the block's graph is alive):
  ``dL/dx = g`` on the closed range ``[(qmin - z) s, (qmax - z) s]`` and 0 outside;
  ``dL/ds = sum(g * (round(v) - v))`` inside and ``sum(g * (qmin - z))`` /
  ``sum(g * (qmax - z))`` below / above (LSQ's gradient, *without* LSQ's gradient scaling,
  as the reference: the project's activation learning rate plays that part, see
  :mod:`qcalib.calibrate.lsq`). The zero point gets no gradient: a zero point that
  requires one is routed to the reference formulation.

Why not ``torch._fake_quantize_learnable_per_tensor_affine``: it decides "inside" on the
*rounded* value ``round(x / s + z)``, so inputs up to half a step beyond a bound still
get gradient 1 (the reference gives 0 there, see ``fake_quantize``), it always computes
and multiplies a zero-point gradient, and it multiplies by ``1 / s`` instead of dividing;
its gradients are not the project's function.
"""

from __future__ import annotations

from typing import Any

import torch

from qcalib.quant.functional import broadcast_param, fake_quantize

__all__ = ["fake_quantize_learnable"]


class _LearnableFakeQuantize(torch.autograd.Function):
    """``x``, broadcast step ``s`` and integer bounds ``lo = qmin - z``, ``hi = qmax - z``."""

    @staticmethod
    def forward(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):  # noqa: ANN205
        out = torch.div(x, s)
        out.clamp_(lo, hi).round_()
        return out.mul_(s)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, s, lo, hi = inputs
        ctx.save_for_backward(x, s, lo, hi)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # noqa: ANN205
        x, s, lo, hi = ctx.saved_tensors
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        v = torch.div(x, s)
        vc = torch.clamp(v, lo, hi)
        inside = vc == v  # closed range: a value exactly at a bound counts as inside
        grad_x = grad * inside if need_x else None
        grad_s = None
        if need_s:
            # round(v) - v inside; the bound itself (round(vc) = vc) outside.
            elem = vc.round_().sub_(v.mul_(inside))
            grad_s = (grad * elem).sum_to_size(s.shape)
        return grad_x, grad_s, None, None


def fake_quantize_learnable(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int = 0,
) -> torch.Tensor:
    """:func:`~qcalib.quant.functional.fake_quantize` through one fused autograd node.

    Same arguments, values and gradients (see the module docs); per tensor or per channel.
    Without gradients (or with a trainable zero point) it is ``fake_quantize`` itself.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
    if not needs_grad or zero_point.requires_grad:
        return fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
    s = broadcast_param(scale, x, ch_axis)
    z = broadcast_param(zero_point, x, ch_axis)
    # The bounds are tiny (one value per channel); building them costs no host round trip.
    lo, hi = qmin - z, qmax - z
    return _LearnableFakeQuantize.apply(x, s, lo.to(s.dtype), hi.to(s.dtype))
