"""Uniform affine fake quantization as pure tensor math.

``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = (q - z) * s``. Rounding uses a
straight-through estimator, so gradients reach ``x`` (inside the clipping range) and the
step size ``s`` (LSQ-style), which is what reconstruction methods rely on.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int) -> None:
    from qcalib.errors import QCalibError

    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QCalibError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid: signed ``[-2^(b-1), 2^(b-1)-1]`` when symmetric, else ``[0, 2^b-1]``."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with an identity gradient."""
    return (x.round() - x).detach() + x


def broadcast_param(p: torch.Tensor, x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """Reshape a per-channel parameter of shape ``[C]`` so it broadcasts along ``ch_axis``."""
    if p.numel() == 1:
        return p.reshape(())
    if p.shape == x.shape:  # element-wise (grouped weights, per-token activations)
        return p
    if p.dim() != 1 or x.dim() == 0 or p.numel() != x.shape[ch_axis]:
        dim = x.shape[ch_axis] if x.dim() else "none"
        raise ValueError(
            f"per-channel parameter of shape {tuple(p.shape)} does not match tensor of shape "
            f"{tuple(x.shape)} along ch_axis={ch_axis} ({dim} channels)"
        )
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return p.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int = 0,
) -> torch.Tensor:
    """Quantize and dequantize ``x``; per-channel when ``scale`` has one entry per channel.

    Clipping happens on ``x / s`` *before* rounding, against the integer bounds
    ``qmin - z`` and ``qmax - z``. The forward value equals ``clamp(round(x/s) + z)``
    (rounding is monotone and the bounds are integers), but the gradient differs where it
    matters: clipping after rounding zeroes the gradient for inputs up to half a step
    *inside* the range (they round onto ``qmin``/``qmax``). The clip is written with
    ``torch.where`` rather than ``torch.clamp`` because clamp's gradient exactly at a bound
    is version-dependent (0 for scalar bounds, 0.5 for tensor bounds in torch 2.x); here it
    is 1 on the closed range ``[(qmin - z) s, (qmax - z) s]`` and 0 outside, where the
    gradient goes to the bound instead (so ``s`` gets the LSQ gradient ``qmax - z``).
    """
    s = broadcast_param(scale, x, ch_axis)
    z = broadcast_param(zero_point, x, ch_axis)
    v = x / s
    lo, hi = qmin - z, qmax - z
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or scale.requires_grad or zero_point.requires_grad
    )
    if not needs_grad:
        # Inference path (evaluation dominates benchmark time): the same values in three
        # in-place passes instead of ~nine allocating ones. Rounding before clipping is
        # identical here because the bounds are integers.
        v.round_()
        if isinstance(lo, torch.Tensor):
            v = torch.maximum(v, lo, out=v) if lo.dim() else v.clamp_(min=float(lo))
            v = torch.minimum(v, hi, out=v) if hi.dim() else v.clamp_(max=float(hi))
        else:
            v.clamp_(lo, hi)
        return v.mul_(s)
    v = torch.where(v < lo, lo, torch.where(v > hi, hi, v))
    return round_ste(v) * s


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` onto the grid.

    The range is widened to contain 0 so that zero is exactly representable (padding and
    ReLU outputs stay exact). Symmetric grids use ``max(|lo|, |hi|)`` on both sides with
    ``z = 0``. Works element-wise, so per-channel ranges give per-channel parameters.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (2 * amax / (qmax - qmin)).clamp_min(eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point
