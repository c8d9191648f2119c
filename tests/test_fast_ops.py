"""The fast reconstruction ops (issue 14) against the formulations they replace.

Each reference below is the former code, kept here verbatim in spirit: the selecting
drop (``torch.where``), the nested-``where`` fake quantization (still
``qcalib.quant.functional.fake_quantize``), and AdaRound's ``floor(w/s) + h(V) + z`` with
the regularizer computing its own ``h(V)``. Values and gradients must agree on random
inputs, at the clipping bounds, for p = 0 / 1, asymmetric zero points, per-channel grids,
2 and 8 bits.
"""

from __future__ import annotations

import math

import pytest
import torch

from qcalib.calibrate.lsq import ReconActQuantizer
from qcalib.calibrate.reconstruct import FrozenWeightQuantizer
from qcalib.calibrate.rounding import AdaRoundQuantizer, rectified_sigmoid
from qcalib.quant.functional import broadcast_param, fake_quantize, qparams_from_range, qrange
from qcalib.quant.fused import fake_quantize_learnable, scalar_bounds
from qcalib.quant.quantizer import ActQuantizer, QuantSpec, WeightQuantizer

# -- references (the former formulations) ------------------------------------------------


def reference_drop(q: ReconActQuantizer, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The former ``ReconActQuantizer.forward``."""
    if not q.active or q.drop_prob == 0.0:
        return x
    xq = fake_quantize(x, q.scale, q.zero_point, q.spec.qmin, q.spec.qmax, q.spec.ch_axis)
    if q.drop_prob == 1.0:
        return xq
    keep_q = reference_keep(q.drop_prob, x.shape, gen)
    return torch.where(keep_q, xq, x)


def reference_keep(p: float, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Which elements are quantized, drawn as the quantizer draws them: one random byte per
    element (8 per 64-bit draw, little-endian) when 256 p is an integer, else a float."""
    if (256 * p) % 1 == 0:
        n = math.prod(shape)
        words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None, generator=gen)
        as_bytes = [(int(w) >> (8 * i)) & 0xFF for w in words.tolist() for i in range(8)][:n]
        return (torch.tensor(as_bytes) < 256 * p).reshape(shape)
    return torch.rand(shape, generator=gen) < p


def reference_adaround(q: AdaRoundQuantizer, w: torch.Tensor) -> torch.Tensor:
    """The former ``AdaRoundQuantizer.forward`` (soft)."""
    s = broadcast_param(q.scale, w, 0)
    z = broadcast_param(q.zero_point, w, 0)
    h = rectified_sigmoid(q.v)
    return (torch.clamp(torch.floor(w / s) + h + z, q.qmin, q.qmax) - z) * s


def reference_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def _grads(out: torch.Tensor, upstream: torch.Tensor, *leaves: torch.Tensor) -> list:
    return list(torch.autograd.grad(out, leaves, upstream, allow_unused=True))


# -- fused learnable fake quantization ---------------------------------------------------


def _grid_input(bits: int, symmetric: bool, zero: float, scale: float, n: int, seed: int):
    """Random values over the grid and beyond, plus every bound, half a step inside and
    beyond each bound, and zero."""
    qmin, qmax = qrange(bits, symmetric)
    g = torch.Generator().manual_seed(seed)
    lo, hi = (qmin - zero) * scale, (qmax - zero) * scale
    span = hi - lo
    x = torch.rand(n, generator=g) * 1.6 * span + lo - 0.3 * span
    edges = torch.tensor([lo, hi, lo - scale / 2, hi + scale / 2, lo + scale / 2, 0.0])
    edges = torch.cat([edges, hi - torch.tensor([scale / 2])])
    return torch.cat([x, edges]), qmin, qmax


@pytest.mark.parametrize(
    ("bits", "symmetric", "zero", "scale"),
    [(2, False, 1.0, 0.25), (4, False, 3.0, 0.1), (8, False, 37.0, 0.0173), (8, True, 0.0, 0.5),
     (2, True, 0.0, 0.3), (3, False, 0.0, 1.0)],
)  # fmt: skip
def test_fused_fake_quantize_per_tensor_matches_reference(bits, symmetric, zero, scale):
    x0, qmin, qmax = _grid_input(bits, symmetric, zero, scale, 4000, seed=bits)
    g = torch.Generator().manual_seed(99)
    upstream = torch.randn(x0.shape, generator=g)
    results = []
    for fn in (fake_quantize, fake_quantize_learnable):
        x = x0.clone().requires_grad_()
        s = torch.tensor(scale, requires_grad=True)
        z = torch.tensor(zero)
        out = fn(x, s, z, qmin, qmax)
        results.append((out.detach(), *_grads(out, upstream, x, s)))
    (ref, ref_gx, ref_gs), (new, new_gx, new_gs) = results
    assert torch.equal(new, ref)  # bit for bit
    # The reference passes g * s / s (a rounding each way), the fused node g itself.
    assert torch.equal(new_gx != 0, ref_gx != 0)
    torch.testing.assert_close(new_gx, ref_gx, rtol=1e-6, atol=0)
    torch.testing.assert_close(new_gs, ref_gs, rtol=1e-5, atol=1e-5)
    # The gradient w.r.t. x really is 0/1 with both values present, and the bounds are in.
    assert set(new_gx.div(upstream).unique().tolist()) == {0.0, 1.0}
    n = len(x0) - 7
    assert new_gx[n : n + 2].div(upstream[n : n + 2]).tolist() == [1.0, 1.0]  # lo, hi
    assert new_gx[n + 2 : n + 4].abs().sum() == 0  # half a step beyond
    assert torch.equal(new_gx[n + 4], upstream[n + 4])  # half a step inside


def test_fused_fake_quantize_scale_gradient_hand_values():
    # s = 0.5, z = 1, 2-bit asymmetric: grid q in [0, 3], v bounds [-1, 2].
    x = torch.tensor([0.3, 2.0, -4.0, 1.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    out = fake_quantize_learnable(x, s, torch.tensor(1.0), 0, 3)
    out.sum().backward()
    # v = [0.6, 4, -8, 2]: round(0.6) - 0.6 = 0.4; above -> hi = 2; below -> lo = -1;
    # at the bound 2: round(2) - 2 = 0.
    assert out.tolist() == pytest.approx([0.5, 1.0, -0.5, 1.0])
    assert s.grad.item() == pytest.approx(0.4 + 2.0 - 1.0 + 0.0)
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(("bits", "ch_axis"), [(2, 0), (8, 1), (4, 1)])
def test_fused_fake_quantize_per_channel_matches_reference(bits, ch_axis):
    g = torch.Generator().manual_seed(bits)
    x0 = torch.randn(6, 5, 4, 3, generator=g) * 2
    spec = QuantSpec(bits, symmetric=False, per_channel=True, ch_axis=ch_axis)
    c = x0.shape[ch_axis]
    dims = [d for d in range(4) if d != ch_axis]
    lo, hi = x0.amin(dim=dims) * 0.7, x0.amax(dim=dims) * 0.7  # clip some values
    scale0, zp = qparams_from_range(lo, hi, spec.qmin, spec.qmax, False)
    assert zp.shape == (c,) and (zp != 0).any()
    upstream = torch.randn(x0.shape, generator=g)
    results = []
    for fn in (fake_quantize, fake_quantize_learnable):
        x = x0.clone().requires_grad_()
        s = scale0.clone().requires_grad_()
        out = fn(x, s, zp, spec.qmin, spec.qmax, ch_axis)
        results.append((out.detach(), *_grads(out, upstream, x, s)))
    (ref, ref_gx, ref_gs), (new, new_gx, new_gs) = results
    assert torch.equal(new, ref)
    assert torch.equal(new_gx != 0, ref_gx != 0)
    torch.testing.assert_close(new_gx, ref_gx, rtol=1e-6, atol=0)
    assert new_gs.shape == (c,)
    torch.testing.assert_close(new_gs, ref_gs, rtol=1e-5, atol=1e-5)


def test_fused_fake_quantize_gradient_only_where_needed():
    x = torch.randn(50, requires_grad=True)
    s = torch.tensor(0.1)  # fixed step: only x gets a gradient
    out = fake_quantize_learnable(x, s, torch.tensor(0.0), -8, 7)
    out.sum().backward()
    assert x.grad is not None and s.grad is None
    x2 = torch.randn(50)
    s2 = torch.tensor(0.1, requires_grad=True)  # fixed input: only the step
    fake_quantize_learnable(x2, s2, torch.tensor(0.0), -8, 7).sum().backward()
    assert s2.grad is not None
    ref = torch.tensor(0.1, requires_grad=True)
    fake_quantize(x2, ref, torch.tensor(0.0), -8, 7).sum().backward()
    torch.testing.assert_close(s2.grad, ref.grad)


def test_fused_fake_quantize_trainable_zero_point_uses_reference():
    # Inputs on both sides of the grid [0, 15] (step 0.2, zero point 2): x / s + z spans -3
    # to 19.5. The output is s * (clamp(round(x / s) + z) - z), so the zero point's
    # gradient is 0 inside the range and -s for every clipped element.
    x = torch.linspace(-1.0, 3.5, 20)
    grads = {}
    for name, fn in (("fused", fake_quantize_learnable), ("reference", fake_quantize)):
        xi = x.clone().requires_grad_(True)
        s = torch.tensor(0.2, requires_grad=True)
        z = torch.tensor(2.0, requires_grad=True)
        out = fn(xi, s, z, 0, 15)
        out.sum().backward()
        grads[name] = (out.detach(), xi.grad, s.grad, z.grad)
    q = torch.round(x / 0.2) + 2
    clipped = int(((q < 0) | (q > 15)).sum())
    assert 0 < clipped < x.numel()
    assert float(grads["fused"][3]) == pytest.approx(-0.2 * clipped, rel=1e-6)
    for got, want in zip(grads["fused"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want)


# -- the drop ------------------------------------------------------------------------------


def _act_quantizer(bits: int, zero_shift: float) -> ActQuantizer:
    q = ActQuantizer(QuantSpec(bits, symmetric=False))
    scale, zp = qparams_from_range(torch.tensor(-1.0 + zero_shift), torch.tensor(2.5), *qrange(
        bits, False), False)  # fmt: skip
    q.set_qparams(scale, zp)
    return q


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize(("bits", "zero_shift"), [(2, 0.0), (4, 0.2), (8, -0.5)])
def test_drop_matches_selecting_reference(p, bits, zero_shift):
    base = _act_quantizer(bits, zero_shift)
    assert float(base.zero_point) != 0.0
    x0 = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 2
    upstream = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for which in ("ref", "new"):
        gen = torch.Generator().manual_seed(123)
        q = ReconActQuantizer(base, learn_scale=True, drop_prob=p, generator=gen)
        x = x0.clone().requires_grad_()
        out = reference_drop(q, x, gen) if which == "ref" else q(x)
        results.append((out.detach(), *_grads(out, upstream, x, q.scale)))
    (ref, ref_gx, ref_gs), (new, new_gx, new_gs) = results
    assert torch.equal(new, ref)  # the same random stream, lerp exact at 0 and 1
    assert torch.equal(new_gx != 0, ref_gx != 0)
    torch.testing.assert_close(new_gx, ref_gx, rtol=1e-6, atol=0)
    if p == 0.0:
        assert new_gs is None and ref_gs is None
        assert torch.equal(new, x0)
    else:
        torch.testing.assert_close(new_gs, ref_gs, rtol=1e-5, atol=1e-6)
    if 0.0 < p < 1.0:  # really a mix: some elements float, some quantized
        xq = fake_quantize(x0, base.scale, base.zero_point, base.qmin, base.qmax)
        differs = xq != x0
        assert (new[differs] == x0[differs]).any() and (new[differs] == xq[differs]).any()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_drop_node_is_bit_identical_to_lerp_of_the_fused_quantizer(per_channel, dtype):
    from qcalib.quant.fused import drop_fake_quantize_learnable

    g = torch.Generator().manual_seed(3)
    x0 = (torch.randn(8, 4, 6, 6, generator=g) * 2).to(dtype)
    upstream = torch.randn(x0.shape, generator=g).to(dtype)
    mask = (torch.rand(x0.shape, generator=g) < 0.5).to(dtype)
    if per_channel:
        scale0, zp = torch.tensor([0.1, 0.3, 0.2, 0.05]), torch.tensor([3.0, 0.0, 8.0, 15.0])
    else:
        scale0, zp = torch.tensor(0.25), torch.tensor(5.0)
    results = []
    for fused in (False, True):
        x = x0.clone().requires_grad_()
        scale = scale0.clone().requires_grad_()
        if fused:
            out = drop_fake_quantize_learnable(x, scale, zp, 0, 15, mask, ch_axis=1)
        else:
            out = torch.lerp(x, fake_quantize_learnable(x, scale, zp, 0, 15, ch_axis=1), mask)
        out.backward(upstream)
        results.append((out.detach(), x.grad, scale.grad))
    (ref, ref_gx, ref_gs), (new, new_gx, new_gs) = results
    assert torch.equal(new, ref) and torch.equal(new_gx, ref_gx)
    assert torch.equal(new_gs, ref_gs) if not per_channel else torch.allclose(new_gs, ref_gs)
    assert (mask == 0).any() and (new_gx[mask == 0] == upstream[mask == 0]).all()
    with torch.no_grad():  # no graph: the plain two-op value
        plain = drop_fake_quantize_learnable(x0, scale0, zp, 0, 15, mask, ch_axis=1)
    assert torch.equal(plain, ref)


@pytest.mark.parametrize(("p", "byte_threshold"), [(0.25, 64), (0.5, 128), (0.3, None),
                                                   (255 / 256, 255), (1e-3, None)])  # fmt: skip
def test_drop_mask_rate_and_dtype(p, byte_threshold):
    base = _act_quantizer(4, 0.0)
    q = ReconActQuantizer(base, drop_prob=p, generator=torch.Generator().manual_seed(0))
    assert q.byte_threshold == byte_threshold
    m = q.drop_mask(torch.empty(400_001))  # not a multiple of the 8 bytes of a draw
    assert m.dtype == torch.float32 and m.shape == (400_001,)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    se = math.sqrt(p * (1 - p) / m.numel())
    assert abs(m.mean().item() - p) < 5 * se
    # Every byte of a draw is used and uniform: the mask's 8 interleaved sub-streams
    # (element i mod 8) each keep the rate, so no byte position is biased.
    if byte_threshold is not None:
        for lane in range(8):
            lane_mean = m[lane::8].mean().item()
            assert abs(lane_mean - p) < 5 * math.sqrt(p * (1 - p) / m[lane::8].numel()), lane


def test_drop_mask_is_the_generator_stream_and_float64_keeps_its_dtype():
    base = _act_quantizer(4, 0.0)
    masks = []
    for dtype in (torch.float32, torch.float64, torch.float32):
        q = ReconActQuantizer(base, drop_prob=0.5, generator=torch.Generator().manual_seed(7))
        masks.append(q.drop_mask(torch.empty(3, 5, 7, dtype=dtype)))
    assert masks[1].dtype == torch.float64
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[0], masks[1].float())
    keep = reference_keep(0.5, (3, 5, 7), torch.Generator().manual_seed(7))
    assert torch.equal(masks[0].bool(), keep)


def test_drop_reduced_precision_input_keeps_float32_grid():
    base = _act_quantizer(4, 0.0)
    q = ReconActQuantizer(base, learn_scale=True, drop_prob=0.5)
    x = torch.randn(4, 10).to(torch.bfloat16)
    out = q(x)
    ref = ReconActQuantizer(base, learn_scale=True, drop_prob=1.0)(x.float())
    assert out.dtype == torch.float32
    assert ((out == ref) | (out == x.float())).all()


# -- AdaRound ------------------------------------------------------------------------------


def _ada(bits: int, symmetric: bool, shrink: float, seed: int, scale_v: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, 3, 3, generator=g)
    spec = QuantSpec(bits, symmetric, per_channel=True, ch_axis=0)
    flat = w.reshape(6, -1)
    scale, zp = qparams_from_range(
        flat.min(1).values * shrink, flat.max(1).values * shrink, spec.qmin, spec.qmax, symmetric
    )
    base = WeightQuantizer(spec)
    base.set_qparams(scale, zp)
    ada = AdaRoundQuantizer(base, w)
    with torch.no_grad():  # move V off its initialization, some to saturation (h = 0 / 1)
        ada.v.add_(torch.randn(ada.v.shape, generator=g) * scale_v)
        ada.v.view(-1)[:5] = torch.tensor([-20.0, 20.0, 0.0, 2.398, -2.398])
    return ada, w


@pytest.mark.parametrize(
    ("bits", "symmetric", "shrink"),
    [(2, False, 1.0), (2, True, 0.6), (8, False, 0.8), (4, True, 1.0)],
)
def test_adaround_soft_weight_and_regularizer_match_reference(bits, symmetric, shrink):
    ada, w = _ada(bits, symmetric, shrink, seed=bits)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    beta = 7.5
    ref_out = reference_adaround(ada, w)
    ref_total = (ref_out * upstream).sum() + reference_regularizer(ada.v, beta)
    (ref_gv,) = torch.autograd.grad(ref_total, ada.v)
    new_out = ada(w)
    new_total = (new_out * upstream).sum() + ada.regularization(beta)
    (new_gv,) = torch.autograd.grad(new_total, ada.v)
    # floor(w/s) + z is added first (two integers, exact): one rounding fewer than before,
    # so the grid value q may differ by an ulp of |q| <= 2^bits.
    ulp_q = 2.0**bits * 2.0**-23
    torch.testing.assert_close(new_out, ref_out, rtol=0, atol=ulp_q * float(ada.scale.max()))
    torch.testing.assert_close(new_total, ref_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_gv, ref_gv, rtol=1e-5, atol=1e-7)
    assert (ref_gv == 0).any() and (ref_gv != 0).any()  # clamps and saturation covered


def test_adaround_hard_weight_is_bit_identical_and_caches_follow_updates():
    ada, w = _ada(3, False, 0.7, seed=0)
    s = ada.scale.view(-1, 1, 1, 1)
    z = ada.zero_point.view(-1, 1, 1, 1)
    hard_ref = (torch.clamp(torch.floor(w / s) + (ada.v >= 0).float() + z, 0, 7) - z) * s
    assert torch.equal(ada.hard_weight(w), hard_ref)
    first = ada(w)
    with torch.no_grad():
        ada.v.add_(0.5)  # an optimizer step: V's version changes, h(V) is recomputed
    torch.testing.assert_close(ada(w), reference_adaround(ada, w), rtol=0, atol=1e-6)
    assert not torch.equal(ada(w), first)
    w2 = w.clone()
    w2.mul_(0.5)  # another weight (another tensor) gets its own grid base
    torch.testing.assert_close(ada(w2), reference_adaround(ada, w2), rtol=0, atol=1e-6)


def test_adaround_h_cache_respects_grad_mode():
    ada, w = _ada(4, False, 1.0, seed=1)
    with torch.no_grad():
        ada(w)
    reg = ada.regularization(4.0)  # must not reuse the no-grad h
    assert reg.requires_grad


def test_frozen_weight_quantizer_returns_plain_values_once():
    ada, w = _ada(4, False, 0.8, seed=2)
    base = ada.base[0]
    frozen = FrozenWeightQuantizer(base)
    out = frozen(w)
    assert torch.equal(out, base(w))
    assert frozen(w) is out  # no recomputation while the weight is unchanged
    w.mul_(2.0)
    assert torch.equal(frozen(w), base(w))


def test_fused_fake_quantize_float64_and_explicit_bounds():
    # float64 values one float64-ulp outside a bound: the closed range is exact per dtype.
    lo_v, hi_v = -2.0, 5.0  # z = 2, 3-bit asymmetric grid [0, 7], s = 1
    eps = 2.0**-50
    x0 = torch.tensor([lo_v, lo_v - eps, hi_v, hi_v + eps, 0.3, -7.0], dtype=torch.float64)
    upstream = torch.arange(1.0, 7.0, dtype=torch.float64)
    results = []
    f32 = scalar_bounds(0, 7, 2.0, torch.float32)  # prepared for float32: recomputed
    for kw in ({"ref": True}, {}, {"bounds": scalar_bounds(0, 7, 2.0, torch.float64)},
               {"bounds": f32}):  # fmt: skip
        x = x0.clone().requires_grad_()
        s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        z = torch.tensor(2.0, dtype=torch.float64)
        fn = fake_quantize if kw.pop("ref", False) else fake_quantize_learnable
        out = fn(x, s, z, 0, 7, **kw)
        results.append((out.detach(), *_grads(out, upstream, x, s)))
    ref = results[0]
    assert ref[1].tolist() == [1.0, 0.0, 3.0, 0.0, 5.0, 0.0]
    for got in results[1:]:
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[2], ref[2])


def test_drop_float64_input_keeps_its_precision_and_the_stream():
    base = _act_quantizer(4, 0.0)
    x0 = torch.randn(6, 40, dtype=torch.float64)
    outs = []
    for which in ("ref", "new"):
        gen = torch.Generator().manual_seed(5)
        q = ReconActQuantizer(base, learn_scale=True, drop_prob=0.5, generator=gen)
        x = x0.clone().requires_grad_()
        out = reference_drop(q, x, gen) if which == "ref" else q(x)
        out.sum().backward()
        outs.append((out.detach(), x.grad, q.scale.grad))
    assert outs[1][0].dtype == torch.float64
    assert torch.equal(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])
    torch.testing.assert_close(outs[1][2], outs[0][2])


@pytest.mark.parametrize("p", [1.0, 1.5, 2.4, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_abs_pow_matches_autograd_of_abs_pow(p, dtype):
    from qcalib.calibrate.lp_loss import abs_pow

    g = torch.Generator().manual_seed(3)
    d = torch.randn(4, 7, 5, generator=g, dtype=dtype) * 3
    # Zeros: gradient 0; 1e-40 is a float32 denormal, which the fused power clamps to the
    # smallest normal number before its log (values and gradients ~0 either way).
    d[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-40], dtype=dtype)
    w = torch.randn(d.shape, generator=g, dtype=dtype)
    a = d.clone().requires_grad_(True)
    b = d.clone().requires_grad_(True)
    ref = a.abs().pow(p)
    out = abs_pow(b, p)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    torch.testing.assert_close(out, ref, **tol)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, **tol)
    fused = "AbsPow" in type(out.grad_fn).__name__
    assert fused == (p > 1.0)  # p = 1 keeps abs's subgradient 0 at 0: the plain op
    with torch.no_grad():  # no node without a gradient, and p < 1 stays the plain op
        assert abs_pow(b, p).grad_fn is None
    assert "AbsPow" not in type(abs_pow(b, 0.5).grad_fn).__name__


@pytest.mark.parametrize("p", [2.0, 2.4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lp_channel_sum_mean_matches_autograd(p, layout):
    from qcalib.calibrate.lp_loss import channel_sum_mean, lp_channel_sum_mean

    g = torch.Generator().manual_seed(5)
    d = torch.randn(3, 6, 5, 4, generator=g) * 2
    d[0, 0, 0, :2] = 0.0  # |d|^(p-1) at 0: exp(-inf) = 0, gradient 0
    if layout == "channels_last":
        d = d.contiguous(memory_format=torch.channels_last)
    a = d.clone().requires_grad_(True)
    b = d.clone().requires_grad_(True)
    ref = channel_sum_mean(a.square() if p == 2.0 else a.abs().pow(p))
    out = lp_channel_sum_mean(b, p)
    assert "LpChannelSumMean" in type(out.grad_fn).__name__
    # By hand: the mean over N * H * W of the per-position channel sums of |d|^p.
    by_hand = (d.double().abs() ** p).sum() / (3 * 5 * 4)
    assert out.item() == pytest.approx(by_hand.item(), rel=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    ref.backward(torch.tensor(0.7))
    out.backward(torch.tensor(0.7))
    if p == 2.0:  # the same float operations as autograd's: equal to the bit
        assert torch.equal(b.grad, a.grad)
    else:
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    assert b.grad[0, 0, 0, :2].eq(0).all()


def test_lp_channel_sum_mean_falls_back_to_the_plain_ops():
    from qcalib.calibrate.lp_loss import channel_sum_mean, lp_channel_sum_mean

    d = torch.randn(4, 3, 6)
    strided = d.transpose(1, 2).requires_grad_(True)  # not dense in any layout we view
    out = lp_channel_sum_mean(strided, 2.4)
    assert "LpChannelSumMean" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, channel_sum_mean(strided.abs().pow(2.4)))
    with torch.no_grad():
        assert lp_channel_sum_mean(d, 2.0).item() == pytest.approx(
            d.square().sum(1).mean().item(), rel=1e-6
        )
    # p = 1 keeps abs's subgradient 0 at 0.
    x = torch.tensor([[0.0, -2.0], [1.0, 3.0]], requires_grad=True)
    lp_channel_sum_mean(x, 1.0).backward()
    assert x.grad.tolist() == [[0.0, -0.5], [0.5, 0.5]]


def test_signed_pow_is_exact_at_zero_and_matches_pow_on_mostly_zero_errors():
    from qcalib.calibrate.lp_loss import _signed_pow

    # Half the elements exactly 0, as the error of two ReLU outputs: the power keeps them
    # out of the log (slow there) and must still give exactly 0, with the sign of d.
    g = torch.Generator().manual_seed(8)
    d = torch.relu(torch.randn(64, 33, generator=g)) - torch.relu(torch.randn(64, 33, generator=g))
    assert d.eq(0).float().mean() > 0.2
    for e in (0.4, 1.4, 2.0):
        t = _signed_pow(d, e)
        assert t[d == 0].eq(0).all()
        ref = d.double().abs().pow(e) * d.double().sign()
        torch.testing.assert_close(t.double(), ref, rtol=2e-6, atol=0)
    assert _signed_pow(d, 1.0) is d
