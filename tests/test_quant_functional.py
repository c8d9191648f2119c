"""Uniform fake quantization: hand-computed grids, gradients and algebraic properties."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcalib.errors import QCalibError
from qcalib.quant import QuantSpec, fake_quantize, qparams_from_range, qrange, round_ste
from qcalib.quant.functional import check_bits

T = torch.tensor


def fq(x, scale, zp, qmin, qmax, ch_axis=0):
    return fake_quantize(x, torch.as_tensor(scale), torch.as_tensor(zp), qmin, qmax, ch_axis)


# -- grids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "symmetric", "expected"),
    [
        (2, True, (-2, 1)),
        (2, False, (0, 3)),
        (4, True, (-8, 7)),
        (4, False, (0, 15)),
        (8, True, (-128, 127)),
        (8, False, (0, 255)),
    ],
)
def test_qrange(bits, symmetric, expected):
    assert qrange(bits, symmetric) == expected


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, 4.0, "8", None])
def test_bits_outside_2_to_8_raise(bits):
    message = rf"bits must be an integer from 2 to 8, got {re.escape(repr(bits))}"
    with pytest.raises(QCalibError, match=message):
        check_bits(bits)
    with pytest.raises(QCalibError, match=message):
        QuantSpec(bits=bits)


@given(st.integers().filter(lambda b: not 2 <= b <= 8))
def test_bits_outside_range_property(bits):
    with pytest.raises(QCalibError):
        qrange(bits, symmetric=False)


def test_quantspec_grid():
    spec = QuantSpec(bits=4, symmetric=True)
    assert (spec.qmin, spec.qmax) == (-8, 7)


# -- hand-computed values ----------------------------------------------------------------


def test_asymmetric_4bit_range_minus1_to_2():
    scale, zp = qparams_from_range(T(-1.0), T(2.0), 0, 15, symmetric=False)
    assert scale.item() == pytest.approx(0.2)
    assert zp.item() == 5
    # x/s:        -7.5  -5   -1.55  -1.45  0    0.5  1.75  2.25  2.75  9.75  10   12.5
    x = T([-1.5, -1.0, -0.31, -0.29, 0.0, 0.1, 0.35, 0.45, 0.55, 1.95, 2.0, 2.5])
    # codes q = clamp(round(x/s) + 5, 0, 15); 0.5 is a tie and rounds half to even (-> 0)
    codes = T([0.0, 0, 3, 4, 5, 5, 7, 7, 8, 15, 15, 15])
    out = fake_quantize(x, scale, zp, 0, 15)
    torch.testing.assert_close(out, (codes - 5) * 0.2, atol=1e-6, rtol=0)
    torch.testing.assert_close(out / scale + zp, codes, atol=1e-5, rtol=0)


def test_symmetric_2bit_grid():
    scale, zp = qparams_from_range(T(-1.5), T(1.5), -2, 1, symmetric=True)
    assert scale.item() == 1.0  # 2 * 1.5 / (1 - (-2))
    assert zp.item() == 0
    x = T([-3.0, -2.0, -1.4, -0.6, 0.4, 0.6, 1.0, 1.4, 3.0])
    # grid {-2, -1, 0, 1}: the signed grid has one more step below zero than above
    expected = T([-2.0, -2.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert torch.equal(fake_quantize(x, scale, zp, -2, 1), expected)


def test_qparams_widen_range_to_contain_zero():
    scale, zp = qparams_from_range(T(1.0), T(3.0), 0, 15, symmetric=False)
    assert scale.item() == pytest.approx(0.2)  # range becomes [0, 3]
    assert zp.item() == 0
    scale, zp = qparams_from_range(T(-3.0), T(-1.0), 0, 15, symmetric=False)
    assert scale.item() == pytest.approx(0.2)  # range becomes [-3, 0]
    assert zp.item() == 15


def test_qparams_degenerate_range_gives_positive_scale():
    scale, zp = qparams_from_range(T(0.0), T(0.0), 0, 255, symmetric=False)
    assert scale.item() > 0
    x = T([0.0, 1.0, -1.0])
    assert fake_quantize(x, scale, zp, 0, 255)[0].item() == 0.0


def test_per_channel_two_ranges():
    # channel 0: [0, 3] on 2 bits -> s=1, z=0; channel 1: [-6, 0] -> s=2, z=3
    scale, zp = qparams_from_range(T([0.0, -6.0]), T([3.0, 0.0]), 0, 3, symmetric=False)
    assert torch.equal(scale, T([1.0, 2.0]))
    assert torch.equal(zp, T([0.0, 3.0]))
    x = T([[0.4, 1.6, 5.0], [-5.2, -0.9, 1.0]])
    expected = T([[0.0, 2.0, 3.0], [-6.0, 0.0, 0.0]])
    assert torch.equal(fake_quantize(x, scale, zp, 0, 3, ch_axis=0), expected)
    # the same channels laid out along the last axis
    assert torch.equal(fake_quantize(x.T, scale, zp, 0, 3, ch_axis=1), expected.T)
    assert torch.equal(fake_quantize(x.T, scale, zp, 0, 3, ch_axis=-1), expected.T)


def test_per_channel_matches_per_tensor_on_each_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g) * T([0.1, 1.0, 10.0])[None, :, None]
    scale = T([0.01, 0.1, 1.0])
    zp = T([3.0, 0.0, 7.0])
    out = fake_quantize(x, scale, zp, 0, 15, ch_axis=1)
    for c in range(3):
        ref = fake_quantize(x[:, c], scale[c], zp[c], 0, 15)
        assert torch.equal(out[:, c], ref)


def test_per_channel_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="ch_axis"):
        fq(torch.zeros(2, 3), T([1.0, 1.0, 1.0]), T([0.0, 0.0, 0.0]), 0, 15, ch_axis=0)


def test_single_element_parameter_acts_per_tensor():
    x = T([[0.3, 0.7], [1.1, -0.2]])
    a = fq(x, T([0.5]), T([0.0]), -8, 7)
    b = fq(x, T(0.5), T(0.0), -8, 7)
    assert torch.equal(a, b)


# -- gradients ---------------------------------------------------------------------------


def test_round_ste_forward_rounds_backward_is_identity():
    x = T([-1.5, -0.4, 0.5, 1.5, 2.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, T([-2.0, -0.0, 0.0, 2.0, 3.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_gradient_wrt_x_is_one_inside_clip_range_zero_outside():
    scale, zp = T(0.2), T(5.0)  # 4-bit grid on [-1, 2]
    # -0.99 and 1.95 are inside the range but round onto qmin / qmax: still gradient 1.
    x = T([-1.5, -1.01, -1.0, -0.99, 0.0, 0.35, 1.95, 2.0, 2.01, 2.5], requires_grad=True)
    fake_quantize(x, scale, zp, 0, 15).sum().backward()
    assert torch.equal(x.grad, T([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))


def test_gradient_reaches_scale_lsq_style():
    # d fq / d s = round(x/s) - x/s inside the range, and the clipped bound outside.
    cases = {-1.2: -5.0, 0.35: 2.0 - 1.75, 0.45: 2.0 - 2.25, 2.3: 10.0}
    for x, expected in cases.items():
        scale = T(0.2, requires_grad=True)
        fake_quantize(T([x]), scale, T(5.0), 0, 15).sum().backward()
        assert scale.grad.item() == pytest.approx(expected, abs=1e-5), x


def test_gradient_reaches_per_channel_scale():
    x = T([[0.35, 2.3], [0.45, -9.0]])
    scale = T([0.2, 1.0], requires_grad=True)
    fake_quantize(x, scale, T([5.0, 0.0]), 0, 15, ch_axis=0).sum().backward()
    # channel 0: 0.25 + (upper bound 10); channel 1: 0.45 rounds to 0 -> -0.45; -9 clips to 0
    torch.testing.assert_close(scale.grad, T([10.25, -0.45]), atol=1e-5, rtol=0)


# -- properties --------------------------------------------------------------------------

floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
grids = st.tuples(st.integers(2, 8), st.booleans())


@st.composite
def quantizers(draw):
    bits, symmetric = draw(grids)
    a, b = draw(floats), draw(floats)
    lo, hi = min(a, b), max(a, b)
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = qparams_from_range(T(lo), T(hi), qmin, qmax, symmetric)
    return lo, hi, scale, zp, qmin, qmax


@settings(max_examples=200, deadline=None)
@given(quantizers(), st.lists(st.floats(0, 1), min_size=1, max_size=32))
def test_round_trip_error_at_most_half_step_inside_range(q, us):
    lo, hi, scale, zp, qmin, qmax = q
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the grid always covers zero
    x = T(lo) + T(us) * (T(hi) - T(lo))
    err = (fake_quantize(x, scale, zp, qmin, qmax) - x).abs()
    tol = scale.item() * 1e-4 + x.abs().max().item() * 1e-6
    assert err.max().item() <= scale.item() / 2 + tol


@settings(max_examples=200, deadline=None)
@given(quantizers())
def test_zero_is_exactly_representable(q):
    _, _, scale, zp, qmin, qmax = q
    assert fake_quantize(T([0.0]), scale, zp, qmin, qmax).item() == 0.0


@settings(max_examples=200, deadline=None)
@given(quantizers(), st.lists(floats, min_size=1, max_size=32))
def test_idempotent(q, xs):
    _, _, scale, zp, qmin, qmax = q
    once = fake_quantize(T(xs), scale, zp, qmin, qmax)
    assert torch.equal(fake_quantize(once, scale, zp, qmin, qmax), once)


@settings(max_examples=200, deadline=None)
@given(quantizers(), st.lists(floats, min_size=2, max_size=32))
def test_monotone(q, xs):
    _, _, scale, zp, qmin, qmax = q
    x = torch.sort(T(xs)).values
    out = fake_quantize(x, scale, zp, qmin, qmax)
    assert bool((out[1:] >= out[:-1]).all())


@settings(max_examples=100, deadline=None)
@given(quantizers(), st.lists(floats, min_size=1, max_size=32))
def test_output_lies_on_the_grid(q, xs):
    _, _, scale, zp, qmin, qmax = q
    codes = fake_quantize(T(xs), scale, zp, qmin, qmax) / scale + zp
    assert bool((codes >= qmin - 1e-3).all() and (codes <= qmax + 1e-3).all())
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
