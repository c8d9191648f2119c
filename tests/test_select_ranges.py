"""Static min-max ranges from per-sample extremes (qcalib.select.ranges) and SelectQ's
``ranges="median"`` rule: hand cases, exhaustive draws, planted outliers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qcalib.data.pool import Pool
from qcalib.errors import QCalibError
from qcalib.select import SelectQSelector
from qcalib.select.ranges import (
    ExtremesSketch,
    match_ranges,
    median_draw_rank,
    range_mismatch,
    set_ranges,
)
from qcalib.select.selectq import auto_ranges
from qcalib.select.stats import (
    ActivationStatsCollector,
    activation_extremes_masked,
    extremes_key,
)
from test_selectq import small_net


def test_median_draw_rank_hand_cases():
    # N = 4, n = 2: 3 of the 6 pairs hold the largest value -> P = 1/2 already at j = 1.
    assert median_draw_rank(4, 2) == 1
    # One draw of 10: the median is the 5th largest (P(top 5) = 5/10).
    assert median_draw_rank(10, 1) == 5
    assert median_draw_rank(7, 7) == 1  # the whole pool: its own maximum
    with pytest.raises(ValueError, match=r"need 1 <= n <= pool size, got n=6, pool 5"):
        median_draw_rank(5, 6)
    with pytest.raises(ValueError, match=r"got n=0, pool 5"):
        median_draw_rank(5, 0)


@pytest.mark.parametrize(("pool_size", "n"), [(8, 3), (9, 2), (12, 5), (10, 1)])
def test_median_draw_rank_is_the_median_over_every_draw(pool_size, n):
    values = list(range(pool_size, 0, -1))  # the j-th largest is pool_size + 1 - j
    maxima = sorted(max(d) for d in itertools.combinations(values, n))
    j = median_draw_rank(pool_size, n)
    x = pool_size + 1 - j
    # x is the largest value with P(max >= x) >= 1/2, so the next one above is below 1/2.
    assert sum(m >= x for m in maxima) / len(maxima) >= 0.5
    if j > 1:
        assert sum(m >= x + 1 for m in maxima) / len(maxima) < 0.5


def test_sketch_reference_equals_the_full_sort():
    g = torch.Generator().manual_seed(0)
    ext = torch.randn(300, 5, 2, generator=g)
    ext[..., 1] += 3.0
    n = 16
    sketch = ExtremesSketch(median_draw_rank(300, n))
    for part in torch.split(ext, 37):
        sketch.push(part)
    lo, hi = sketch.reference(n)
    j = median_draw_rank(300, n)
    assert torch.equal(hi, ext[..., 1].to(torch.float64).sort(0, descending=True).values[j - 1])
    assert torch.equal(lo, ext[..., 0].to(torch.float64).sort(0).values[j - 1])
    with pytest.raises(ValueError, match="keeps"):
        sketch.reference(1)  # the median single draw needs rank 150


def test_set_ranges_and_mismatch_hand_case():
    members = torch.tensor([[[-1.0, 1.0], [0.5, 4.0]], [[-0.5, 0.5], [1.0, 2.0]]])
    lo, hi = set_ranges(members)
    assert lo.tolist() == [-1.0, 0.5] and hi.tolist() == [1.0, 4.0]
    # Widths include 0: site 0 is 2 vs 4, site 1 is 4 vs 2 -> |log 1/2| and |log 2|.
    value = range_mismatch(lo, hi, torch.tensor([-1.0, 0.0]), torch.tensor([3.0, 2.0]))
    assert value == pytest.approx(math.log(2.0))
    # A site whose reference width is 0 (a constant-zero input) is left out.
    assert range_mismatch(lo, hi, torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0])) == 0.0


def test_match_ranges_swaps_the_outlier_out_and_keeps_group_sizes():
    # One site; group 0 holds a member with a max of 50 where random's median is 3.
    ref_lo, ref_hi = torch.tensor([-1.0]), torch.tensor([3.0])
    g0 = torch.tensor([[[-1.0, 50.0]], [[-1.0, 2.9]], [[-0.5, 2.0]], [[-0.9, 3.0]]])
    g1 = torch.tensor([[[-1.0, 1.0]], [[-0.2, 0.5]]])
    chosen = [torch.tensor([0, 2]), torch.tensor([1])]
    before = range_mismatch(*set_ranges(torch.cat([g0[[0, 2]], g1[[1]]])), ref_lo, ref_hi)
    picks, swaps = match_ranges(chosen, [g0, g1], ref_lo, ref_hi)
    assert [p.numel() for p in picks] == [2, 1]
    assert 0 not in picks[0].tolist() and swaps >= 1
    after = range_mismatch(*set_ranges(torch.cat([g0[picks[0]], g1[picks[1]]])), ref_lo, ref_hi)
    assert after < before and after == pytest.approx(0.0)
    # A set already at the reference is left alone.
    same, none = match_ranges([torch.tensor([3])], [g0], ref_lo, ref_hi)
    assert none == 0 and same[0].tolist() == [3]


def test_cap_only_narrows_sites_wider_than_the_reference():
    ref_lo, ref_hi = torch.tensor([-1.0, -1.0]), torch.tensor([3.0, 3.0])
    # Candidates: [0] wide at site 0, [1] narrow everywhere, [2] at the reference, [3]
    # narrow at site 0 but at the reference width at site 1.
    g = torch.tensor([
        [[-1.0, 50.0], [-1.0, 1.0]],
        [[-0.5, 1.0], [-0.5, 1.0]],
        [[-1.0, 3.0], [-1.0, 3.0]],
        [[-0.5, 1.0], [-1.0, 3.0]],
    ])  # fmt: skip
    # Narrower than the reference: cap keeps it, median widens it.
    kept, none = match_ranges([torch.tensor([1])], [g], ref_lo, ref_hi, excess_only=True)
    assert none == 0 and kept[0].tolist() == [1]
    widened, one = match_ranges([torch.tensor([1])], [g], ref_lo, ref_hi)
    assert one == 1 and widened[0].tolist() == [2]
    # Wider at site 0: cap swaps the wide member out; of the members that leave no
    # excess it takes the one closest to the reference on both sites ([2] over [1], [3]).
    picks, swaps = match_ranges([torch.tensor([0])], [g], ref_lo, ref_hi, excess_only=True)
    assert swaps == 1 and picks[0].tolist() == [2]
    lo, hi = set_ranges(g[picks[0]])
    assert range_mismatch(lo, hi, ref_lo, ref_hi, excess_only=True) == 0.0
    # The excess only counts widths above the reference: log(51 / 4) / 2 sites here.
    lo, hi = set_ranges(g[[0]])
    assert range_mismatch(lo, hi, ref_lo, ref_hi, excess_only=True) == pytest.approx(
        math.log(51.0 / 4.0) / 2
    )


def test_extremes_rows_skip_padding_and_match_min_max():
    x = torch.tensor([[[1.0, -2.0], [9.0, 9.0], [0.5, 3.0]], [[4.0, 0.0], [-7.0, 1.0], [2.0, 2.0]]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    rows = activation_extremes_masked(x, -1, mask)
    assert rows.tolist() == [[-2.0, 3.0], [-7.0, 4.0]]  # sample 0's 9s are padding
    conv = torch.randn(3, 4, 5, 5)
    rows = activation_extremes_masked(conv, 1)
    assert torch.equal(rows[:, 0], conv.flatten(1).amin(1))
    assert torch.equal(rows[:, 1], conv.flatten(1).amax(1))


def test_collector_extremes_are_the_layer_inputs_min_and_max():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    x = torch.randn(4, 2, 9, 9)
    seen = {}

    def keep_input(_m: nn.Module, args: tuple) -> None:
        seen["in"] = args[0].detach()  # the last call: the collector's batch

    net[2].register_forward_pre_hook(keep_input)
    out = ActivationStatsCollector(net, extremes=True)(x)
    assert list(out) == ["0", extremes_key("0"), "2", extremes_key("2")]
    assert torch.equal(out[extremes_key("0")][:, 1], x.flatten(1).amax(1))
    assert torch.allclose(out[extremes_key("2")][:, 0], seen["in"].flatten(1).amin(1))
    assert list(ActivationStatsCollector(net)(x)) == ["0", "2"]  # off by default


def _planted_pool():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, 8, 8, generator=g)
    x += torch.randint(0, 4, (400, 1, 1, 1), generator=g).float() * 0.8
    # 3% of the pool carry a bright patch: far in the statistics, so the KD trim drops
    # them, yet a random draw of 40 holds one or more in 7 of 10 seeds (its median range
    # includes the patch).
    spikes = torch.randperm(400, generator=g)[:12]
    x[spikes, :, :4, :4] = 8.0
    return Pool(TensorDataset(x), name="spiky"), spikes


def _pool_extremes(model, pool):  # noqa: ANN001, ANN202
    collector = ActivationStatsCollector(model, extremes=True)
    rows = collector(pool.get(torch.arange(len(pool))))
    return torch.stack([rows[extremes_key(s)] for s in collector.sites], 1)  # [N, S, 2]


def test_selectq_ranges_median_matches_random_ranges_better_than_any_draw():
    pool, spikes = _planted_pool()
    model = small_net()
    ext = _pool_extremes(model, pool)
    sketch = ExtremesSketch(len(pool))
    sketch.push(ext)
    ref = sketch.reference(40)
    draws = [
        torch.randperm(400, generator=torch.Generator().manual_seed(k))[:40] for k in range(10)
    ]
    random_mismatch = [range_mismatch(*set_ranges(ext[d]), *ref) for d in draws]
    for seed in (0, 1):
        kw = {"seed": seed, "num_clusters": 4, "batch_size": 50, "init_size": 100}
        off = SelectQSelector(within="matched", ranges="off", **kw).fit(pool, model=model)
        a = off.select(40)
        on = SelectQSelector(within="matched", ranges="median", **kw).fit(pool, model=model)
        b = on.select(40)
        s_off, s_on = off.selection_, on.selection_
        assert (s_off["ranges"], s_on["ranges"]) == ("off", "median")
        # Off: the extremes are not even read (they cost selection time).
        assert s_off["range_swaps"] == 0 and s_off["range_mismatch"] is None
        assert not off._collector.extremes and on._collector.extremes
        # The recorded mismatches are the sets' own, from the pool's extremes: before the
        # swaps that is the off set (the within rule's), after them the returned one.
        off_mismatch = range_mismatch(*set_ranges(ext[a]), *ref)
        assert s_on["range_mismatch_within"] == pytest.approx(off_mismatch, abs=1e-6)
        assert s_on["range_mismatch"] == pytest.approx(
            range_mismatch(*set_ranges(ext[b]), *ref), abs=1e-6
        )
        assert s_on["range_swaps"] >= 1 and not torch.equal(a, b)
        assert s_on["quotas"] == s_off["quotas"]  # swaps stay inside clusters
        assert b.numel() == 40 and b.unique().numel() == 40
        assert s_on["range_mismatch"] < off_mismatch < min(random_mismatch)
        assert 1 <= int(torch.isin(b, spikes).sum()) <= 3
    off.ranges = "cap"  # a rule switched on after a fit that did not read the extremes
    with pytest.raises(QCalibError, match="needs the extremes that fit did not read"):
        off.select(40)


def test_ranges_parameter_is_checked_and_auto_caps_only_range_readers_on_tokens():
    with pytest.raises(QCalibError, match="ranges must be one of auto, off, median, cap"):
        SelectQSelector(ranges="widest")
    assert SelectQSelector().resolved_ranges() == "off"  # unfitted: need unknown
    table = {(r, t): auto_ranges(r, token_pool=t)
             for r in ("range", "distribution", "fit", None) for t in (False, True)}  # fmt: skip
    assert {k for k, v in table.items() if v != "off"} == {("range", True)}
    assert table[("range", True)] == "cap"
    assert SelectQSelector(ranges="median").resolved_ranges() == "median"
