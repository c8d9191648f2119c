"""AdaRound rounding, its regularizer and schedule, hardening, and the reconstruction-time
activation quantizer (learned step, QDrop), against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qcalib.calibrate.lsq import ReconActQuantizer
from qcalib.calibrate.rounding import (
    AdaRoundQuantizer,
    BetaSchedule,
    harden,
    install_adaround,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    rounding_regularizer,
)
from qcalib.model.qmodules import QuantConv2d
from qcalib.quant.functional import qparams_from_range
from qcalib.quant.quantizer import ActQuantizer, QuantSpec, UniformQuantizer, WeightQuantizer

LOG3, LOG11 = math.log(3.0), math.log(11.0)


def _weight_quantizer(w: torch.Tensor, bits: int = 3, symmetric: bool = False, shrink=1.0):
    spec = QuantSpec(bits, symmetric, per_channel=True, ch_axis=0)
    flat = w.reshape(w.shape[0], -1)
    scale, zp = qparams_from_range(
        flat.min(1).values * shrink, flat.max(1).values * shrink, spec.qmin, spec.qmax, symmetric
    )
    q = WeightQuantizer(spec)
    q.set_qparams(scale, zp)
    return q


def test_rectified_sigmoid_hand_values():
    v = torch.tensor([0.0, LOG3, -LOG3, LOG11, -LOG11, 50.0, -50.0, 3.0, -3.0])
    # sigmoid(log 3) = 3/4 -> 0.75 * 1.2 - 0.1 = 0.8; sigmoid(log 11) = 11/12 -> exactly 1.
    expected = torch.tensor([0.5, 0.8, 0.2, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    assert torch.allclose(rectified_sigmoid(v), expected, atol=1e-6)


def test_inverse_rectified_sigmoid_hand_values_and_round_trip():
    # h = 0: -log(1.2 / 0.1 - 1) = -log 11; h = 0.5: -log(1.2 / 0.6 - 1) = 0.
    h = torch.tensor([0.0, 0.5, 0.8, 0.2])
    assert torch.allclose(inverse_rectified_sigmoid(h), torch.tensor([-LOG11, 0.0, LOG3, -LOG3]))
    grid = torch.linspace(0, 0.999, 1000)
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(grid)), grid, atol=1e-6)


def test_regularizer_hand_values():
    v = torch.tensor([0.0, LOG3, -LOG3, 50.0])  # h = 0.5, 0.8, 0.2, 1
    # beta = 2: 1 - (2h - 1)^2 -> 1, 0.64, 0.64, 0
    assert rounding_regularizer(v, 2.0).item() == pytest.approx(2.28, abs=1e-5)
    # beta = 20: 1 - 0.6^20 twice, 1 at h = 0.5, 0 at h = 1
    assert rounding_regularizer(v, 20.0).item() == pytest.approx(3 - 2 * 0.6**20, abs=1e-5)
    assert rounding_regularizer(torch.full((7,), 9.0), 2.0).item() == 0.0


def test_beta_schedule_warmup_boundary_and_end():
    s = BetaSchedule(iters=100, warmup=0.2, start=20.0, end=2.0)
    assert not s.active(19) and s.active(20)
    assert s(1) == 20.0 and s(19) == 20.0 and s(20) == 20.0
    assert s(60) == pytest.approx(11.0)  # half-way through the decay
    assert s(100) == pytest.approx(2.0)
    no_warmup = BetaSchedule(iters=10, warmup=0.0)
    assert no_warmup.active(1) and no_warmup(10) == pytest.approx(2.0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_initial_soft_weight_equals_fp_weight_inside_range(symmetric):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    base = _weight_quantizer(w, bits=3, symmetric=symmetric)
    ada = AdaRoundQuantizer(base, w)
    s, z = base.scale.view(-1, 1, 1, 1), base.zero_point.view(-1, 1, 1, 1)
    frac = w / s - torch.floor(w / s)
    assert torch.allclose(ada.h(), frac, atol=1e-5)
    # Inside the grid's range (the rounded zero point can leave an extreme just outside).
    inside = (w >= (base.qmin - z) * s) & (w <= (base.qmax - z) * s)
    assert inside.float().mean() > 0.9
    assert torch.allclose(ada(w)[inside], w[inside], atol=1e-5 * float(s.max()))


def test_initial_soft_weight_is_clipped_outside_range():
    torch.manual_seed(1)
    w = torch.randn(4, 8)
    base = _weight_quantizer(w, bits=2, shrink=0.5)  # clip half of the range
    ada = AdaRoundQuantizer(base, w)
    s, z = base.scale.view(-1, 1), base.zero_point.view(-1, 1)
    lo, hi = (base.qmin - z) * s, (base.qmax - z) * s
    assert torch.allclose(ada(w), torch.minimum(torch.maximum(w, lo), hi), atol=1e-5)


def test_hard_rounding_lands_on_the_grid_and_is_floor_or_ceil():
    torch.manual_seed(2)
    w = torch.randn(5, 4, 3, 3)
    base = _weight_quantizer(w, bits=2)
    ada = AdaRoundQuantizer(base, w)
    with torch.no_grad():
        ada.v.normal_(0, 3)
    hard = ada.hard_weight(w)
    s, z = base.scale.view(-1, 1, 1, 1), base.zero_point.view(-1, 1, 1, 1)
    k = torch.round(hard / s)
    assert torch.equal(k * s, hard)  # exactly representable grid points
    assert (hard / s - k).abs().max() < 1e-5
    assert ((k + z) >= base.qmin).all() and ((k + z) <= base.qmax).all()
    up = (rectified_sigmoid(ada.v) >= 0.5).float()
    assert torch.equal(up, (ada.v >= 0).float())
    expected = torch.clamp(torch.floor(w / s) + up + z, base.qmin, base.qmax) - z
    assert torch.equal(k, expected)
    ada.soft = False
    assert torch.equal(ada(w), hard)


def test_harden_is_exact_and_restores_a_plain_quantizer():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    wq = _weight_quantizer(conv.weight.detach(), bits=2)
    layer = QuantConv2d(conv, wq, None)
    ada = install_adaround(layer)
    with torch.no_grad():
        ada.v.normal_(0, 2)
    x = torch.randn(2, 3, 5, 5)
    ada.soft = False
    expected = layer(x)
    bias = layer.bias.detach().clone()
    param = layer.weight
    harden(layer)
    assert layer.weight is param  # same Parameter object
    assert type(layer.weight_quantizer) is WeightQuantizer
    assert layer.weight_quantizer is wq
    assert torch.equal(layer(x), expected)
    assert torch.equal(wq(layer.weight), layer.weight)  # grid values map onto themselves
    assert torch.equal(layer.bias, bias)
    # A fresh layer loading the state dict computes the same function.
    fresh = QuantConv2d(nn.Conv2d(3, 4, 3, padding=1), WeightQuantizer(wq.spec), None)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), expected)


def test_adaround_gradient_reaches_only_v():
    torch.manual_seed(4)
    w = torch.randn(3, 5, requires_grad=False)
    ada = AdaRoundQuantizer(_weight_quantizer(w), w)
    (ada(w).square().sum() + ada.regularization(2.0)).backward()
    assert ada.v.grad is not None and ada.v.grad.abs().sum() > 0
    assert [n for n, p in ada.named_parameters()] == ["v"]
    assert "v" in ada.state_dict() and "base" not in str(list(ada.state_dict()))


def _act_quantizer(x: torch.Tensor, bits: int = 3) -> ActQuantizer:
    q = ActQuantizer(QuantSpec(bits))
    scale, zp = qparams_from_range(x.min(), x.max(), q.qmin, q.qmax, False)
    q.set_qparams(scale, zp)
    return q


def test_drop_probability_zero_is_float_and_one_is_the_plain_quantizer():
    torch.manual_seed(5)
    x = torch.randn(4, 3, 6, 6)
    base = _act_quantizer(x)
    assert torch.equal(ReconActQuantizer(base, drop_prob=0.0)(x), x)
    assert torch.equal(ReconActQuantizer(base, learn_scale=True, drop_prob=1.0)(x), base(x))


def test_drop_mixes_elementwise_with_probability_p():
    x = torch.randn(64, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    base = _act_quantizer(x, bits=2)
    gen = torch.Generator().manual_seed(1)
    out = ReconActQuantizer(base, drop_prob=0.3, generator=gen)(x)
    xq = base(x)
    is_q, is_f = out == xq, out == x
    assert bool((is_q | is_f).all())
    frac = float((is_q & ~is_f).sum()) / float((xq != x).sum())
    assert frac == pytest.approx(0.3, abs=0.01)
    again = ReconActQuantizer(base, drop_prob=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again(x), out)  # seeded


def test_learned_step_gets_gradient_stays_positive_and_commits():
    torch.manual_seed(6)
    x = torch.randn(8, 4) * 3
    base = _act_quantizer(x)
    before = base.scale.clone()
    act = ReconActQuantizer(base, learn_scale=True, drop_prob=1.0)
    (act(x) - x).square().sum().backward()
    assert act.scale.grad is not None and act.scale.grad.abs() > 0
    with torch.no_grad():
        act.scale.fill_(-0.25)
    act.project()
    assert act.scale.item() == 0.25
    committed = act.commit()
    assert committed is base and base.scale.item() == 0.25 and before.item() != 0.25
    # Not learned: the base quantizer is returned untouched.
    base2 = _act_quantizer(x)
    s2 = base2.scale.clone()
    assert torch.equal(ReconActQuantizer(base2, learn_scale=False).commit().scale, s2)


def test_uncalibrated_activation_quantizer_passes_through():
    base = UniformQuantizer(QuantSpec(4))
    x = torch.randn(3, 3)
    act = ReconActQuantizer(base, learn_scale=True, drop_prob=1.0)
    assert torch.equal(act(x), x) and not act.learn_scale
