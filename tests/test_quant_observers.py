"""Observers (minmax / percentile / mse) and the quantizer's observe -> quantize cycle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcalib.errors import QCalibError
from qcalib.quant import (
    OBSERVERS,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    QuantSpec,
    UniformQuantizer,
    fake_quantize,
    make_observer,
    qparams_from_range,
)

T = torch.tensor
ALL = ["minmax", "percentile", "mse"]
A4 = QuantSpec(bits=4, symmetric=False)
A8 = QuantSpec(bits=8, symmetric=False)
S8 = QuantSpec(bits=8, symmetric=True)
S4 = QuantSpec(bits=4, symmetric=True)


def feed(obs, *batches):
    for b in batches:
        obs(b)
    return obs


def sq_error(x, spec, scale, zp, ch_axis=0):
    return (fake_quantize(x, scale, zp, spec.qmin, spec.qmax, ch_axis) - x).square().sum()


# -- registry / factory ------------------------------------------------------------------


def test_registry_and_factory():
    assert OBSERVERS.names() == ["minmax", "mse", "percentile"]
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    obs = make_observer("percentile", percentile=99.9, per_channel=True, ch_axis=1, seed=3)
    assert isinstance(obs, PercentileObserver)
    assert (obs.percentile, obs.per_channel, obs.ch_axis, obs.seed) == (99.9, True, 1, 3)
    assert isinstance(make_observer("mse", num_candidates=10, p=2.4), MSEObserver)


def test_factory_errors_name_the_fix():
    with pytest.raises(QCalibError, match="minmax, mse, percentile"):
        make_observer("histogram")
    with pytest.raises(QCalibError, match="percentil.*takes: per_channel, ch_axis"):
        make_observer("minmax", percentil=99.0)
    with pytest.raises(QCalibError, match="percentile"):
        make_observer("percentile", percentile=20.0)
    with pytest.raises(QCalibError, match="num_candidates"):
        make_observer("mse", num_candidates=0)
    with pytest.raises(QCalibError, match="max_samples"):
        make_observer("mse", max_samples=0)


# -- common behaviour --------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_empty_observer_raises(name):
    obs = make_observer(name)
    obs(torch.empty(0, 3))  # an empty batch does not count as data
    with pytest.raises(RuntimeError, match="not observed any data"):
        obs.calculate_qparams(A8)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("bad", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_input_raises_and_leaves_state_untouched(name, bad, word):
    obs = make_observer(name)
    with pytest.raises(ValueError, match=f"1 {word}"):
        obs(T([1.0, bad, 2.0]))
    assert obs.is_empty
    obs(T([1.0, -1.0]))
    with pytest.raises(ValueError, match=word):
        obs(T([-bad, 0.0]))
    assert obs.min_val.item() == -1.0 and obs.max_val.item() == 1.0


@pytest.mark.parametrize("name", ALL)
def test_forward_is_identity_and_returns_the_input(name):
    x = torch.randn(4, 5)
    assert make_observer(name)(x) is x


@pytest.mark.parametrize("name", ALL)
def test_spec_must_match_observer_granularity(name):
    per_tensor = feed(make_observer(name), torch.randn(3, 4))
    with pytest.raises(ValueError, match="per_channel=True"):
        per_tensor.calculate_qparams(QuantSpec(8, per_channel=True))
    per_channel = feed(make_observer(name, per_channel=True, ch_axis=1), torch.randn(3, 4))
    with pytest.raises(ValueError, match="per-tensor"):
        per_channel.calculate_qparams(A8)
    with pytest.raises(ValueError, match="ch_axis"):
        per_channel.calculate_qparams(QuantSpec(8, per_channel=True, ch_axis=0))
    # -1 and 1 are the same axis of a 2-D tensor
    scale, _ = per_channel.calculate_qparams(QuantSpec(8, per_channel=True, ch_axis=-1))
    assert scale.shape == (4,)


@pytest.mark.parametrize("name", ALL)
def test_channel_count_must_not_change(name):
    obs = feed(make_observer(name, per_channel=True, ch_axis=0), torch.randn(3, 4))
    with pytest.raises(ValueError, match="3 channels before, now 5"):
        obs(torch.randn(5, 4))


@pytest.mark.parametrize("name", ALL)
def test_reset_forgets(name):
    obs = feed(make_observer(name), T([5.0, -5.0]))
    obs.reset()
    assert obs.is_empty
    obs(T([1.0, -1.0]))
    assert obs.max_val.item() == 1.0


@pytest.mark.parametrize("name", ALL)
def test_half_precision_input(name):
    x = torch.linspace(-2, 2, 101).half()
    scale, zp = feed(make_observer(name), x).calculate_qparams(A8)
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert 0 < scale.item() <= 4 / 255 + 1e-6
    # not collapsed by the half input: the range [-2, 2] is read (min-max exactly: step
    # 4/255, zero point round(2 / step) = 127, as float32's step makes that 127.49999;
    # the clipping observers keep most of the range)
    if name == "minmax":
        assert scale.item() == pytest.approx(4 / 255, rel=1e-6) and int(zp) == 127
    else:
        assert scale.item() >= 0.5 * 4 / 255


@pytest.mark.parametrize("name", ALL)
def test_observer_state_stays_out_of_state_dict(name):
    obs = feed(make_observer(name), torch.randn(100))
    assert obs.state_dict() == {}


# -- minmax ------------------------------------------------------------------------------


def test_minmax_accumulates_across_batches():
    obs = feed(MinMaxObserver(), T([1.0, -2.0, 3.0]), T([[0.5, 4.0], [-1.0, 0.0]]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-2.0, 4.0)
    scale, zp = obs.calculate_qparams(A4)
    assert scale.shape == () and zp.shape == ()
    assert scale.item() == pytest.approx(6 / 15)  # 0.4
    assert zp.item() == 5  # 0 - round(-2 / 0.4)
    scale, zp = obs.calculate_qparams(QuantSpec(bits=4, symmetric=True))
    assert scale.item() == pytest.approx(2 * 4.0 / 15)
    assert zp.item() == 0


def test_minmax_per_channel_values():
    obs = MinMaxObserver(per_channel=True, ch_axis=0)
    feed(obs, T([[-1.0, 0.5, 2.0], [-4.0, 1.0, 0.0]]), T([[0.0, 0.0], [3.0, -2.0]]))
    assert torch.equal(obs.min_val, T([-1.0, -4.0]))
    assert torch.equal(obs.max_val, T([2.0, 3.0]))
    scale, zp = obs.calculate_qparams(QuantSpec(4, per_channel=True, ch_axis=0))
    torch.testing.assert_close(scale, T([3 / 15, 7 / 15]))
    assert torch.equal(zp, T([5.0, 9.0]))  # round(1 / 0.2) = 5, round(4 / (7/15)) = 9


def test_minmax_per_channel_activation_layout():
    x = torch.randn(2, 3, 4, 5)
    obs = feed(MinMaxObserver(per_channel=True, ch_axis=1), x)
    assert torch.equal(obs.min_val, x.amin(dim=(0, 2, 3)))
    assert torch.equal(obs.max_val, x.amax(dim=(0, 2, 3)))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=20), min_size=1))
def test_minmax_equals_global_min_max(batches):
    obs = feed(MinMaxObserver(), *[T(b) for b in batches])
    flat = [v for b in batches for v in b]
    assert obs.min_val.item() == min(flat) and obs.max_val.item() == max(flat)


# -- percentile --------------------------------------------------------------------------


def test_percentile_exact_on_arange():
    x = torch.arange(10001, dtype=torch.float32)  # 0..10000
    lo, hi = feed(PercentileObserver(percentile=99.0), x).calculate_range(A8)
    assert (lo.item(), hi.item()) == (pytest.approx(100.0), pytest.approx(9900.0))


def test_percentile_interpolates_like_torch_quantile():
    x = torch.arange(11, dtype=torch.float32)  # positions 0.05 * 10 = 0.5 and 9.5
    lo, hi = feed(PercentileObserver(percentile=95.0), x).calculate_range(A8)
    assert lo.item() == pytest.approx(0.5) and hi.item() == pytest.approx(9.5)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(5000, generator=g)
    lo, hi = feed(PercentileObserver(percentile=99.7), y).calculate_range(A8)
    torch.testing.assert_close(lo, torch.quantile(y, 0.003)[None])
    torch.testing.assert_close(hi, torch.quantile(y, 0.997)[None])


def test_percentile_symmetric_uses_abs():
    x = torch.arange(-100, 101, dtype=torch.float32)  # |x| sorted: 0, 1, 1, 2, 2, ...
    lo, hi = feed(PercentileObserver(percentile=90.0), x).calculate_range(S8)
    assert (lo.item(), hi.item()) == (-90.0, 90.0)  # |x| at position 0.9 * 200 = 180
    scale, zp = feed(PercentileObserver(percentile=90.0), x).calculate_qparams(S8)
    assert scale.item() == pytest.approx(2 * 90 / 255) and zp.item() == 0


def test_percentile_pools_batches_instead_of_averaging():
    a, b = torch.zeros(1000), torch.arange(1000, dtype=torch.float32)
    _, hi = feed(PercentileObserver(percentile=99.0), a, b).calculate_range(A8)
    # union sorted: 1001 zeros then 1..999; position 0.99 * 1999 = 1979.01 -> 979.01
    assert hi.item() == pytest.approx(979.01, abs=1e-3)
    assert hi.item() == pytest.approx(torch.quantile(torch.cat([a, b]), 0.99).item(), abs=1e-3)
    averaged = (0.0 + 0.99 * 999) / 2  # 494.5: what per-batch averaging would give
    assert abs(hi.item() - averaged) > 400


def test_percentile_100_is_exact_minmax_even_when_subsampled():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1000, generator=g) for _ in range(5)]
    pct = feed(PercentileObserver(percentile=100.0, max_samples=64), *batches)
    mm = feed(MinMaxObserver(), *batches)
    for spec in (A8, S8):
        s1, z1 = pct.calculate_qparams(spec)
        s2, z2 = mm.calculate_qparams(spec)
        assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_percentile_per_channel():
    x = torch.stack([torch.arange(11.0), 10 * torch.arange(11.0)], dim=1)  # [11, 2]
    obs = feed(PercentileObserver(percentile=95.0, per_channel=True, ch_axis=1), x)
    lo, hi = obs.calculate_range(QuantSpec(8, per_channel=True, ch_axis=1))
    torch.testing.assert_close(lo, T([0.5, 5.0]))
    torch.testing.assert_close(hi, T([9.5, 95.0]))
    scale, zp = obs.calculate_qparams(QuantSpec(8, per_channel=True, ch_axis=1))
    assert scale.shape == (2,) and zp.shape == (2,)


# -- the pooled subsample ----------------------------------------------------------------


def test_sample_is_all_data_while_it_fits():
    a, b = torch.randn(30), torch.randn(2, 10)
    obs = feed(PercentileObserver(max_samples=50), a, b)
    got = torch.sort(obs.sample().flatten()).values
    assert torch.equal(got, torch.sort(torch.cat([a, b.flatten()])).values)


@pytest.mark.parametrize("per_channel", [False, True])
def test_sample_is_the_bottom_k_of_the_seeded_keys(per_channel):
    """The streaming reservoir keeps exactly the values a one-shot bottom-k would keep."""
    k, seed = 300, 7
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(40 * (i % 4 + 1), 3, generator=g) for i in range(30)]
    obs = PercentileObserver(max_samples=k, seed=seed, per_channel=per_channel, ch_axis=1)
    feed(obs, *batches)
    # Replay the key stream: one torch.rand([C, N]) per batch from the same generator.
    keygen = torch.Generator().manual_seed(seed)
    rows = [b.T if per_channel else b.reshape(1, -1) for b in batches]
    keys = torch.cat([torch.rand(r.shape, generator=keygen, dtype=torch.float64) for r in rows], 1)
    vals = torch.cat(rows, dim=1)
    idx = torch.topk(keys, k, dim=1, largest=False).indices
    expected = torch.sort(torch.gather(vals, 1, idx), dim=1).values
    assert torch.equal(torch.sort(obs.sample(), dim=1).values, expected)


def test_subsample_is_uniform_across_batches():
    # 10 batches of 2000 values, value = batch index: each should fill ~1/10 of the sample.
    batches = [torch.full((2000,), float(i)) for i in range(10)]
    obs = feed(PercentileObserver(max_samples=3000, seed=0), *batches)
    counts = torch.bincount(obs.sample().flatten().long(), minlength=10)
    assert obs.sample().shape == (1, 3000)
    assert int(counts.min()) > 200 and int(counts.max()) < 400  # expected 300 each


def test_percentile_on_subsample_is_close():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(20000, generator=g) for _ in range(5)]
    lo, hi = feed(PercentileObserver(percentile=99.0, max_samples=20000), *batches).calculate_range(
        A8
    )
    assert lo.item() == pytest.approx(0.01, abs=0.004)
    assert hi.item() == pytest.approx(0.99, abs=0.004)


@pytest.mark.parametrize("name", ["percentile", "mse"])
def test_deterministic_for_a_seed(name):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3000, generator=g) for _ in range(4)]

    def run(seed):
        obs = feed(make_observer(name, max_samples=1000, seed=seed), *batches)
        return obs.sample().clone(), obs.calculate_qparams(A4)

    s1, q1 = run(5)
    s2, q2 = run(5)
    assert torch.equal(s1, s2) and torch.equal(q1[0], q2[0]) and torch.equal(q1[1], q2[1])
    s3, _ = run(6)
    assert not torch.equal(torch.sort(s1).values, torch.sort(s3).values)
    # reset() re-seeds: the same observer gives the same sample again
    obs = feed(make_observer(name, max_samples=1000, seed=5), *batches)
    obs.reset()
    assert torch.equal(feed(obs, *batches).sample(), s1)


def test_stored_sample_does_not_alias_the_input():
    x = torch.ones(10)
    obs = feed(PercentileObserver(), x)
    x.mul_(100)  # e.g. a later in-place ReLU / add on the same activation
    assert obs.sample().max().item() == 1.0


# -- mse ---------------------------------------------------------------------------------


def _outlier_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[123] = 50.0  # a 50-sigma outlier
    return x


# Clipping one outlier of size A costs ~A^2 while it refines the grid for all N values, so
# it pays when N * (grid step)^2 outweighs A^2: here at 3-4 bits (at 8 bits it would take
# N of a few 100k, and the search rightly keeps the outlier).
@pytest.mark.parametrize("spec", [A4, S4, QuantSpec(bits=3, symmetric=True)])
def test_mse_clips_a_huge_outlier_and_beats_minmax(spec):
    x = _outlier_data()
    mse = feed(MSEObserver(), x)
    ratio = mse.search_ratio(spec)
    assert ratio.shape == (1,)
    assert ratio.item() < 0.5  # minmax is ratio 1.0
    e_mse = sq_error(x, spec, *mse.calculate_qparams(spec))
    e_minmax = sq_error(x, spec, *feed(MinMaxObserver(), x).calculate_qparams(spec))
    assert e_mse < 0.5 * e_minmax


def test_mse_keeps_the_full_range_without_outliers():
    x = torch.linspace(-1, 1, 4001)
    assert feed(MSEObserver(), x).search_ratio(A8).item() >= 0.95
    assert feed(MSEObserver(), x).search_ratio(S4).item() >= 0.95


def test_mse_candidate_grid_and_tie_break():
    obs = feed(MSEObserver(num_candidates=4), torch.zeros(10))
    assert obs.search_ratio(A8).item() == 1.0  # every ratio ties: prefer no clipping
    x = _outlier_data()
    obs = feed(MSEObserver(num_candidates=4), x)
    assert obs.search_ratio(A8).item() in (0.25, 0.5, 0.75, 1.0)


def test_mse_is_the_best_candidate_under_fake_quantize():
    """The search's error matches fake_quantize's: no candidate does better."""
    x = _outlier_data()
    obs = feed(MSEObserver(num_candidates=20), x)
    best = sq_error(x, A4, *obs.calculate_qparams(A4))
    for k in range(1, 21):
        r = k / 20
        s, z = qparams_from_range(r * x.min(), r * x.max(), A4.qmin, A4.qmax, False)
        assert best <= sq_error(x, A4, s, z) * (1 + 1e-6)


def test_mse_per_channel_picks_per_channel():
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(-1, 1, 2000)
    spiky = torch.randn(2000, generator=g)
    spiky[7] = 20.0
    x = torch.stack([smooth, spiky])  # [2, N], channels on axis 0
    spec = QuantSpec(4, symmetric=True, per_channel=True, ch_axis=0)
    obs = feed(MSEObserver(per_channel=True, ch_axis=0), x)
    ratio = obs.search_ratio(spec)
    assert ratio.shape == (2,)
    assert ratio[0] >= 0.95 and ratio[1] < 0.5
    # each channel gets exactly what a per-tensor search on that channel alone picks
    for c in range(2):
        alone = feed(MSEObserver(), x[c]).search_ratio(S4)
        assert ratio[c].item() == alone.item()
    scale, zp = obs.calculate_qparams(spec)
    assert scale.shape == (2,) and zp.shape == (2,)
    per_tensor = feed(MSEObserver(), x).calculate_qparams(S4)
    assert sq_error(x, spec, scale, zp) < sq_error(x, S4, *per_tensor)


def test_mse_norm_parameter_changes_the_choice():
    x = _outlier_data()
    r2 = feed(MSEObserver(p=2.0), x).search_ratio(S4).item()
    r_high = feed(MSEObserver(p=6.0), x).search_ratio(S4).item()
    assert r_high > r2  # a higher norm weighs the clipped outlier more


# -- quantizer ---------------------------------------------------------------------------


def test_quantizer_observe_then_quantize():
    q = UniformQuantizer(A4, observer=MinMaxObserver())
    x = T([-1.0, 0.1, 0.35, 2.0])
    assert torch.equal(q(x), x)  # not initialized: pass-through
    q.observer_enabled = True
    q.fake_quant_enabled = False
    q(T([-1.0, 0.0]))
    q(T([2.0, 1.0]))
    q.compute_qparams()
    q.observer_enabled, q.fake_quant_enabled = False, True
    assert q.scale.item() == pytest.approx(0.2) and q.zero_point.item() == 5
    assert bool(q.initialized)
    torch.testing.assert_close(q(x), T([-1.0, 0.0, 0.4, 2.0]))
    torch.testing.assert_close(q.quantize(T([5.0])), T([2.0]))


def test_quantizer_per_channel_state_dict_round_trip():
    spec = QuantSpec(4, symmetric=True, per_channel=True, ch_axis=0)
    w = torch.randn(6, 3, 3, 3)
    q = UniformQuantizer(spec, observer=make_observer("mse", per_channel=True, ch_axis=0))
    q.observer_enabled = True
    q(w)
    q.compute_qparams()
    assert q.scale.shape == (6,)
    sd = q.state_dict()
    assert set(sd) == {"scale", "zero_point", "initialized"}

    fresh = UniformQuantizer(spec, observer=make_observer("mse", per_channel=True, ch_axis=0))
    assert fresh.scale.shape == ()
    fresh.load_state_dict(sd)
    assert fresh.scale.shape == (6,) and bool(fresh.initialized)
    assert torch.equal(fresh.scale, q.scale) and torch.equal(fresh.zero_point, q.zero_point)
    assert torch.equal(fresh(w), q(w))
    assert not torch.equal(fresh(w), w)


def test_quantizer_without_observer():
    q = UniformQuantizer(A8)
    with pytest.raises(RuntimeError, match="no observer"):
        q.compute_qparams()
