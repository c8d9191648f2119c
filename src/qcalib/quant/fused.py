"""Fake quantization with a learnable step as one autograd node (the reconstruction hot path).

:func:`fake_quantize_learnable` computes exactly the function and the gradients of
:func:`~qcalib.quant.functional.fake_quantize` when gradients are needed, with fewer
elementwise passes and no selection ops:

* forward: ``round(clamp(x / s, qmin - z, qmax - z)) * s``, three passes in place on one
  buffer (the bounds are integers, so clamping before or after rounding gives the same
  value; the reference's ``round_ste`` adds ``round(v) - v`` back onto ``v``, which is
  exact in float for every ``|v| <= 2^22``, so the values agree bit for bit);
* backward from ``v = x / s`` kept by the forward (no division again):
  ``dL/dx = g`` on the closed range ``[(qmin - z) s, (qmax - z) s]`` and 0 outside;
  ``dL/ds = sum(g * (round(v) - v))`` inside and ``sum(g * (qmin - z))`` /
  ``sum(g * (qmax - z))`` below / above (LSQ's gradient, *without* LSQ's gradient scaling,
  as the reference: the project's activation learning rate plays that part, see
  :mod:`qcalib.calibrate.lsq`). The zero point gets no gradient: a zero point that
  requires one is routed to the reference formulation.

For a per-tensor grid the bounds are Python numbers, and the backward uses only float
kernels with scalar arguments: ``hardtanh``'s backward with the bounds moved out by one
ulp (open interval there = the closed one here) and two dot products for ``dL/ds``
(``sum(g round(clamp(v))) - sum(dL/dx * v)``). On one CPU thread a boolean mask, a
multiply by it, or a ``where`` each cost 5-30x a float kernel of the same size, and a
clamp with tensor bounds 6x one with scalar bounds; the per-channel path keeps tensor
bounds and a mask (small tensors: weights, or a GPU where it does not matter).

:func:`drop_fake_quantize_learnable` is QDrop's mix ``lerp(x, fq(x), m)`` (``m`` a 0/1 float
mask) as one node too: forward as the two ops; backward from ``g m`` once,
``dL/dx = (g - g m) + [inside] g m`` and ``dL/ds`` the function above of ``g m``. For
``m`` in {0, 1} these are bit for bit the gradients autograd gets through ``lerp`` and the
node above (``g - g m`` is ``g (1 - m)`` exactly, and at each element one of the two
summands is zero), without lerp's backward, the second gradient buffer and their sum: on
one CPU thread the pair's forward + backward on a 400k-element activation took a third
to a half of the time of the two nodes.

Why not ``torch._fake_quantize_learnable_per_tensor_affine``: it decides "inside" on the
*rounded* value ``round(x / s + z)``, so inputs up to half a step beyond a bound still
get gradient 1 (the reference gives 0 there, see ``fake_quantize``), it always computes
and multiplies a zero-point gradient, and it multiplies by ``1 / s`` instead of dividing;
its gradients are not the project's function.
"""

from __future__ import annotations

from math import inf
from typing import Any

import torch

from qcalib.quant.functional import broadcast_param, fake_quantize

__all__ = ["drop_fake_quantize_learnable", "fake_quantize_learnable", "scalar_bounds"]


def scalar_bounds(qmin: int, qmax: int, zero_point: float, dtype: torch.dtype) -> tuple:
    """A per-tensor grid's bounds for :func:`fake_quantize_learnable`'s ``bounds``:
    ``(qmin - z, qmax - z)``, the representable values of ``dtype`` just outside them,
    and ``dtype``. Computed once per grid (a caller with a fixed zero point keeps it), so
    the hot path handles plain numbers only.

    The outward values make ``hardtanh``'s open-interval backward the closed range: exact
    in the default floating-point mode; with denormals-are-zero switched on
    (``torch.set_flush_denormal(True)``) a bound of 0 would lose its closed end.
    """
    return _closed(float(qmin - zero_point), float(qmax - zero_point), dtype)


def _closed(lo: float, hi: float, dtype: torch.dtype) -> tuple:
    out = torch.nextafter(
        torch.tensor([lo, hi], dtype=dtype), torch.tensor([-inf, inf], dtype=dtype)
    )
    return lo, hi, float(out[0]), float(out[1]), dtype


class _LearnableFakeQuantize(torch.autograd.Function):
    """``x``, broadcast step ``s`` and integer bounds ``lo = qmin - z``, ``hi = qmax - z``,
    either Python numbers (per-tensor grid: scalar kernels, no boolean tensors) or
    tensors broadcasting against ``x`` (per-channel grid).

    ``forward`` takes ``ctx`` itself rather than a ``setup_context``: with one, every
    ``apply`` binds the inputs to the signature through ``inspect`` (~25 us a call, in
    each iteration of every reconstruction)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: torch.Tensor, lo, hi, bounds):  # noqa: ANN001, ANN205
        v = torch.div(x, s)
        _save_grid(ctx, v, s, lo, hi, bounds)
        return torch.clamp(v, lo, hi).round_().mul_(s), v

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_v: torch.Tensor | None):  # noqa: ANN205
        grad_in, grad_s = _grads(ctx, grad, ctx.needs_input_grad[1])
        return (grad_in if ctx.needs_input_grad[0] else None), grad_s, None, None, None


def _save_grid(ctx: Any, v: torch.Tensor, s: torch.Tensor, lo: Any, hi: Any,
               bounds: tuple | None, *extra: torch.Tensor) -> None:  # fmt: skip
    """Keep what :func:`_grads` reads: ``v = x / s``, ``s``, the bounds (as numbers in
    ``ctx.bounds`` for a per-tensor grid, else as saved tensors), then ``extra`` tensors."""
    ctx.scalar = bounds is not None
    ctx.bounds = bounds
    ctx.save_for_backward(*((v, s) if ctx.scalar else (v, s, lo, hi)), *extra)
    ctx.mark_non_differentiable(v)


def _grads(ctx: Any, grad: torch.Tensor, need_s: bool) -> tuple[torch.Tensor, Any]:
    """``(dL/dx, dL/ds)`` of the fake quantization given ``grad = dL/d out``, from the
    ``v = x / s`` (and ``s``, bounds) that the forward saved in ``ctx``."""
    if ctx.scalar:
        v, s = ctx.saved_tensors[:2]
        lo, hi, lo_out, hi_out, dtype = ctx.bounds
        if dtype != v.dtype:  # the bounds were prepared for another precision
            lo, hi, lo_out, hi_out, _ = _closed(lo, hi, v.dtype)
        # hardtanh's backward passes the gradient on the *open* interval; the next
        # representable values outside the bounds make it exactly the closed range.
        grad_in = torch.ops.aten.hardtanh_backward(grad, v, lo_out, hi_out)
    else:
        v, s, lo, hi = ctx.saved_tensors[:4]
        grad_in = grad * (torch.clamp(v, lo, hi) == v)
    grad_s = None
    if need_s:
        # sum(g * round(clamp(v))) - sum(g * v) over the inside: per element round(v) - v
        # inside and the bound outside (where round(clamp(v)) is the bound itself).
        r = torch.clamp(v, lo, hi).round_()
        if s.numel() == 1:
            gs = torch.dot(grad.reshape(-1), r.reshape(-1))
            gs = gs - torch.dot(grad_in.reshape(-1), v.reshape(-1))
            grad_s = gs.reshape(s.shape)
        else:
            grad_s = (grad * r - grad_in * v).sum_to_size(s.shape)
    return grad_in, grad_s


class _DropLearnableFakeQuantize(torch.autograd.Function):
    """``lerp(x, fq(x), mask)`` with the fake quantization of :class:`_LearnableFakeQuantize`
    (same arguments, plus the 0/1 ``mask`` in ``x``'s dtype, saved for the backward)."""

    @staticmethod
    def forward(ctx: Any, x, s, lo, hi, bounds, mask):  # noqa: ANN001, ANN205
        v = torch.div(x, s)
        _save_grid(ctx, v, s, lo, hi, bounds, mask)
        return torch.lerp(x, torch.clamp(v, lo, hi).round_().mul_(s), mask), v

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_v: torch.Tensor | None):  # noqa: ANN205
        mask = ctx.saved_tensors[-1]
        grad_q = grad * mask
        grad_in, grad_s = _grads(ctx, grad_q, ctx.needs_input_grad[1])
        grad_x = (grad - grad_q).add_(grad_in) if ctx.needs_input_grad[0] else None
        return grad_x, grad_s, None, None, None, None


def _learnable_args(x, scale, zero_point, qmin, qmax, ch_axis, bounds):  # noqa: ANN001, ANN202
    """``(s, lo, hi, bounds)`` for the fused nodes (see :func:`fake_quantize_learnable`)."""
    s = broadcast_param(scale, x, ch_axis)
    if bounds is None and zero_point.numel() == 1 and zero_point.device.type == "cpu":
        dtype = torch.promote_types(x.dtype, s.dtype)
        bounds = scalar_bounds(qmin, qmax, float(zero_point), dtype)
    if bounds is not None:
        return s, bounds[0], bounds[1], bounds
    z = broadcast_param(zero_point, x, ch_axis)
    return s, (qmin - z).to(s.dtype), (qmax - z).to(s.dtype), None


def fake_quantize_learnable(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int = 0,
    bounds: tuple | None = None,
) -> torch.Tensor:
    """:func:`~qcalib.quant.functional.fake_quantize` through one fused autograd node.

    Same arguments, values and gradients (see the module docs); per tensor or per channel.
    ``bounds`` (from :func:`scalar_bounds`) lets a per-tensor caller whose zero point is
    fixed (:class:`~qcalib.calibrate.lsq.ReconActQuantizer`) skip reading the zero point
    back from the device at every call; a per-tensor zero point on the CPU is read
    directly. Without gradients (or with a trainable zero point) it is ``fake_quantize``
    itself.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
    if not needs_grad or zero_point.requires_grad:
        return fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
    s, lo, hi, bounds = _learnable_args(x, scale, zero_point, qmin, qmax, ch_axis, bounds)
    return _LearnableFakeQuantize.apply(x, s, lo, hi, bounds)[0]


def drop_fake_quantize_learnable(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    mask: torch.Tensor,
    ch_axis: int = 0,
    bounds: tuple | None = None,
) -> torch.Tensor:
    """``torch.lerp(x, fake_quantize_learnable(x, ...), mask)`` (QDrop: ``mask`` is 1.0 where
    an element is quantized, 0.0 where it stays float, in ``x``'s dtype) as one node, with
    the same values and gradients (module docs)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
    if not needs_grad or zero_point.requires_grad:
        return torch.lerp(x, fake_quantize_learnable(x, scale, zero_point, qmin, qmax, ch_axis,
                                                     bounds), mask)  # fmt: skip
    s, lo, hi, bounds = _learnable_args(x, scale, zero_point, qmin, qmax, ch_axis, bounds)
    return _DropLearnableFakeQuantize.apply(x, s, lo, hi, bounds, mask)[0]
