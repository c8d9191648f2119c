"""AdaRound: learned rounding of weights onto a fixed uniform grid (Nagel et al. 2020).

Every weight gets a rounding variable ``V``; its rectified sigmoid
``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` with ``zeta = 1.1``,
``gamma = -0.1`` decides between rounding down (0) and up (1)::

    soft:  w_hat = s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z)
    hard:  w_hat = s * (clamp(floor(w / s) + [V >= 0] + z, qmin, qmax) - z)

(``h(V) >= 0.5`` exactly when ``V >= 0``). ``V`` starts where ``h(V)`` equals the
fractional part of ``w / s``, so the soft weight starts equal to the FP weight inside the
clipping range. The regularizer ``sum(1 - |2 h(V) - 1|^beta)`` pushes every ``h(V)`` to 0
or 1 as ``beta`` is annealed (:class:`BetaSchedule`).

:class:`AdaRoundQuantizer` is called like the :class:`~qcalib.quant.UniformQuantizer` it
replaces (``quantizer(weight)``), so it drops into a
:class:`~qcalib.model.qmodules.QuantModule` during reconstruction. :func:`harden` bakes the
final rounding into the layer: the weight parameter receives the hard-rounded,
dequantized values (they lie on the grid) and the original quantizer comes back; the
plain quantizer maps grid values onto themselves exactly, so the layer computes the same
function and saves / loads like any other calibrated layer.

Per-iteration cost (issue 14), same function and gradients: ``floor(w / s) + z`` depends
only on the frozen weight and grid, so it is computed once per weight version (the
weight's ``_version`` changes with any in-place write) instead of every iteration; the
soft weight is then ``s * (clamp(base + h(V), qmin, qmax) - z)``, its value within one
ulp of the former ``floor(w / s) + h(V) + z`` ordering (two integers are added first,
exactly). ``h(V)`` is computed once per iteration: the forward keeps it, keyed on ``V``'s
version and the grad mode, and the regularizer of the same iteration reuses it (one node
in the graph, whose gradient is the sum of both paths, as with two separate copies).
"""

from __future__ import annotations

import torch
from torch import nn

from qcalib.model.qmodules import QuantModule
from qcalib.quant.functional import broadcast_param
from qcalib.quant.quantizer import UniformQuantizer

__all__ = [
    "GAMMA",
    "ZETA",
    "AdaRoundQuantizer",
    "BetaSchedule",
    "harden",
    "inverse_rectified_sigmoid",
    "rectified_sigmoid",
    "regularizer_of_offsets",
    "rounding_regularizer",
]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``h`` in ``[0, 1)``: ``-log((zeta - gamma) / (h - gamma) - 1)``.

    Finite on the whole of ``[0, 1)`` (``h = 0`` gives ``-log(11)``), which is the range of
    a fractional part; this is the initialization of the AdaRound / BRECQ code.
    """
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(V) - 1|^beta)``: 0 when every ``h(V)`` is 0 or 1, 1 per weight at 0.5."""
    return regularizer_of_offsets(rectified_sigmoid(v), beta)


def regularizer_of_offsets(h: torch.Tensor, beta: float) -> torch.Tensor:
    """:func:`rounding_regularizer` from already computed offsets ``h = h(V)``."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


class BetaSchedule:
    """The regularizer's exponent, as in the BRECQ / QDrop code (``LinearTempDecay``).

    ``step`` counts optimizer iterations from 1 to ``iters``. For ``step < warmup * iters``
    the regularizer is off (:meth:`active`); from there ``beta`` falls linearly from
    ``start`` to ``end``, reaching ``end`` at ``step == iters``.
    """

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
        self.iters = iters
        self.warmup = warmup
        self.start = start
        self.end = end
        self.start_step = warmup * iters

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return self.start
        span = self.iters - self.start_step
        rel = (step - self.start_step) / span if span > 0 else 1.0
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)

    def __repr__(self) -> str:
        return (
            f"BetaSchedule(iters={self.iters}, warmup={self.warmup}, start={self.start}, "
            f"end={self.end})"
        )


class AdaRoundQuantizer(nn.Module):
    """Learned-rounding stand-in for an initialized weight quantizer.

    The grid (scale, zero point, bits) is copied from ``base`` and stays fixed; only
    ``v`` (the rounding variables, one per weight) is a parameter. ``soft`` selects the
    relaxed rounding used during optimization; ``soft = False`` rounds hard (``V >= 0``).
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        if not bool(base.initialized):
            raise ValueError("AdaRound needs an initialized weight quantizer (scale / zero point)")
        self.base = [base]  # a list keeps it out of this module's children and state_dict
        self.spec = base.spec
        self.register_buffer("scale", base.scale.detach().clone())
        self.register_buffer("zero_point", base.zero_point.detach().clone())
        self.soft = True
        with torch.no_grad():
            w = weight.detach()
            x = w / self._s(w)
            frac = x - torch.floor(x)
            self.v = nn.Parameter(inverse_rectified_sigmoid(frac).to(w.dtype))
        # (weight identity, weight version) -> floor(w / s) + z; (V version, grad mode) -> h(V)
        self._base: tuple[tuple, torch.Tensor] | None = None
        self._h: tuple[tuple, torch.Tensor] | None = None

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    def _s(self, w: torch.Tensor) -> torch.Tensor:
        return broadcast_param(self.scale, w, self.spec.ch_axis)

    def h(self) -> torch.Tensor:
        """Soft rounding offsets ``h(V)`` in ``[0, 1]`` (computed once per version of ``V``)."""
        key = (self.v._version, torch.is_grad_enabled())
        if self._h is None or self._h[0] != key:
            self._h = (key, rectified_sigmoid(self.v))
        return self._h[1]

    def _grid_base(self, w: torch.Tensor) -> torch.Tensor:
        """``floor(w / s) + z`` of the current weight (no gradient reaches ``w``: floor's
        derivative is 0). Cached for the soft path, the optimization loop, where the weight
        is frozen; the hard path (hardening) always recomputes it, so a weight written
        behind autograd's back (``.data``, which keeps the version) cannot leak in."""
        key = (w.data_ptr(), w._version, w.shape, w.dtype, w.device)
        if not self.soft or self._base is None or self._base[0] != key:
            with torch.no_grad():
                z = broadcast_param(self.zero_point, w, self.spec.ch_axis)
                base = torch.floor(w / self._s(w)) + z
            if not self.soft:
                return base
            self._base = (key, base)
        return self._base[1]

    def hard_offsets(self) -> torch.Tensor:
        """Hard rounding offsets, 0 (down) or 1 (up)."""
        return (self.v >= 0).to(self.v.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self._s(w)
        z = broadcast_param(self.zero_point, w, self.spec.ch_axis)
        offset = self.h() if self.soft else self.hard_offsets()
        q = torch.clamp(self._grid_base(w) + offset, self.qmin, self.qmax)
        return (q - z) * s

    def regularization(self, beta: float) -> torch.Tensor:
        return regularizer_of_offsets(self.h(), beta)

    @torch.no_grad()
    def hard_weight(self, w: torch.Tensor) -> torch.Tensor:
        soft, self.soft = self.soft, False
        try:
            return self.forward(w)
        finally:
            self.soft = soft

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, soft={self.soft}, weights={self.v.numel()}"


def install_adaround(module: QuantModule) -> AdaRoundQuantizer:
    """Swap the module's weight quantizer for an AdaRound quantizer (from the current grid)."""
    q = module.weight_quantizer
    if isinstance(q, AdaRoundQuantizer):
        return q
    ada = AdaRoundQuantizer(q, module.weight).to(module.weight.device)
    module.weight_quantizer = ada
    return ada


@torch.no_grad()
def harden(module: QuantModule) -> None:
    """Bake the hard rounding into ``module`` and restore its plain weight quantizer.

    The weight parameter (same object, so optimizers and references stay valid) receives
    ``s * (q - z)``, which the plain quantizer reproduces bit for bit: ``w_hat / s`` is
    within a few ulps of the integer ``q - z``, the straight-through rounding returns that
    integer exactly, and the product with ``s`` is the same floating-point operation.
    """
    q = module.weight_quantizer
    if not isinstance(q, AdaRoundQuantizer):
        raise TypeError(f"{module.layer_name or 'module'} has no AdaRound quantizer to harden")
    module.weight.data.copy_(q.hard_weight(module.weight))
    module.weight_quantizer = q.base[0]


def restore(module: QuantModule) -> None:
    """Put the plain weight quantizer back without changing the weight (abandoned run)."""
    q = module.weight_quantizer
    if isinstance(q, AdaRoundQuantizer):
        module.weight_quantizer = q.base[0]
