"""Knowledge Distance: hand-computed values, closed forms, streaming spread, consistency."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from qcalib.errors import QCalibError
from qcalib.select.distance import (
    KnowledgeDistance,
    RunningMoments,
    activation_stats,
    combine_layers,
    join_stats,
    split_stats,
)
from qcalib.select.kmeans import StreamingKMeans

D = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def random_stats(n: int, c: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, c, generator=gen, dtype=D) * torch.linspace(0.1, 10, c, dtype=D)
    sigma = torch.rand(n, c, generator=gen, dtype=D) * 3 + 0.1
    return join_stats(mu, sigma)


def test_layout_split_join_roundtrip():
    s = t([[1, 2, 3, 10, 20, 30]])
    mu, sigma = split_stats(s)
    assert mu.tolist() == [[1, 2, 3]] and sigma.tolist() == [[10, 20, 30]]
    assert torch.equal(join_stats(mu, sigma), s)
    with pytest.raises(ValueError, match="even width"):
        split_stats(torch.zeros(2, 3))


def test_w2_hand_computed():
    # C = 2: sample mu = (1, 2), sigma = (3, 4); centroid mu = (0, 0), sigma = (1, 1);
    # spreads s_mu = (1, 2), s_sigma = (2, 0.5).
    # channel 1: (1-0)^2/1 + (3-1)^2/4 = 2;  channel 2: (2-0)^2/4 + (4-1)^2/0.25 = 37.
    kd = KnowledgeDistance().set_scale(t([1, 2]), t([2, 0.5]))
    d = kd.pairwise(t([[1, 2, 3, 4]]), t([[0, 0, 1, 1], [1, 2, 3, 4]]))
    assert d.tolist() == [[19.5, 0.0]]


def test_kl_hand_computed_and_closed_form():
    # KL(N(1, 2^2) || N(0, 1)) = ln(1/2) + (4 + 1)/2 - 1/2 = 2 - ln 2.
    kd = KnowledgeDistance("kl")
    d = kd.pairwise(t([[1, 2]]), t([[0, 1]]))
    assert d.item() == pytest.approx(2 - math.log(2), rel=1e-14)
    # Averaged over channels, against torch.distributions.
    s, c = random_stats(7, 5, seed=1), random_stats(3, 5, seed=2)
    mu, sig = split_stats(s)
    mu_c, sig_c = split_stats(c)
    ref = kl_divergence(
        Normal(mu[:, None, :], sig[:, None, :]), Normal(mu_c[None, :, :], sig_c[None, :, :])
    ).mean(-1)
    torch.testing.assert_close(kd.pairwise(s, c), ref, rtol=1e-12, atol=1e-12)


def test_kl_floors_sigma():
    kd = KnowledgeDistance("kl", eps=1e-3)
    d = kd.pairwise(t([[1.0, 0.0]]), t([[1.0, 0.0], [1.0, 1e-3]]))
    assert d[0, 0].item() == 0.0  # both floored to eps: identical Gaussians
    assert d[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(kd.pairwise(t([[0.0, 0.0]]), t([[5.0, 0.0]]))).all()


def test_cosine_orthogonal_parallel_opposite():
    kd = KnowledgeDistance("cosine").set_scale(t([1, 1]), t([1, 1]))
    a = t([[1, 0, 0, 0]])
    cents = t([[0, 1, 0, 0], [2, 0, 0, 0], [-1, 0, 0, 0]])
    assert kd.pairwise(a, cents).tolist() == [[1.0, 0.0, 2.0]]
    # Parallel after spread normalisation (spreads scale each coordinate).
    kd.set_scale(t([1, 2]), t([4, 0.5]))
    d = kd.pairwise(t([[1, 2, 3, 4]]), t([[2, 4, 6, 8]]))
    assert d.item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("metric", ["w2", "kl", "cosine"])
def test_zero_distance_to_itself(metric):
    s = random_stats(6, 4)
    kd = KnowledgeDistance(metric).fit_scale([s])
    d = kd.pairwise(s, s)
    assert d.diagonal().abs().max().item() <= 1e-12
    assert bool((d >= 0).all())
    off = d + torch.eye(6, dtype=D)
    assert bool((off > 1e-6).all())  # distinct samples are at positive distance
    labels, nd = kd.nearest(s, s)
    assert labels.tolist() == list(range(6)) and nd.abs().max().item() <= 1e-12


def test_combine_mean_max_subset():
    per_layer = t([[1, 2, 6], [0, 0, 3]])
    assert KnowledgeDistance.combine(per_layer).tolist() == [3, 1]
    assert KnowledgeDistance.combine(per_layer, "max").tolist() == [6, 3]
    assert KnowledgeDistance.combine(per_layer, [0, 2]).tolist() == [3.5, 1.5]
    assert combine_layers(per_layer, [-1]).tolist() == [6, 3]
    with pytest.raises(QCalibError, match="out of range for 3 layers"):
        combine_layers(per_layer, [3])
    with pytest.raises(QCalibError, match="choose 'mean', 'max'"):
        combine_layers(per_layer, "median")
    with pytest.raises(QCalibError, match="empty"):
        combine_layers(per_layer, [])


def test_streaming_spread_equals_torch_std():
    gen = torch.Generator().manual_seed(0)
    # Large offset and small spread: a naive sum-of-squares would lose most digits here.
    full = 1e4 + torch.randn(503, 12, generator=gen, dtype=D) * 1e-2
    sizes = [1, 64, 7, 200, 31, 200]
    chunks = list(torch.split(full, sizes))
    kd = KnowledgeDistance().fit_scale(chunks)
    ref = full.std(0)  # torch.std: sample std (correction=1)
    torch.testing.assert_close(join_stats(kd.mu_spread_, kd.sigma_spread_), ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(kd.pool_mean_, full.mean(0), rtol=1e-14, atol=0)
    rm = RunningMoments()
    for ch in chunks:
        rm.update(ch.float())  # float32 input is accumulated in float64
    torch.testing.assert_close(rm.std(), full.float().double().std(0), rtol=1e-9, atol=0)
    assert rm.count == 503


def test_fit_scale_needs_two_samples():
    with pytest.raises(QCalibError, match="at least 2 samples, got 1"):
        KnowledgeDistance(layer="fc").fit_scale([random_stats(1, 3)])


@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_rejected_with_layer_name(bad, kind):
    s = random_stats(4, 3)
    kd = KnowledgeDistance(layer="layer2.0.conv1").fit_scale([s])
    broken = s.clone()
    broken[1, 4] = bad
    with pytest.raises(ValueError, match=f"layer 'layer2.0.conv1' contains 1 {kind}"):
        kd.pairwise(broken, s)
    with pytest.raises(ValueError, match=f"centroids for layer 'layer2.0.conv1'.*{kind}"):
        kd.pairwise(s, broken)
    with pytest.raises(ValueError, match="layer2.0.conv1"):
        KnowledgeDistance(layer="layer2.0.conv1").fit_scale([s, broken])
    with pytest.raises(ValueError, match=kind):
        KnowledgeDistance("kl").pairwise(broken, s)  # no layer given: still names the value
    with pytest.raises(ValueError, match=kind):
        combine_layers(t([[1.0, bad]]))


def test_w2_equals_weighted_kmeans_distance_over_c():
    """Clustering raw rows with feature_weights = 1/spread^2 uses exactly the W2 metric."""
    c = 6
    s = random_stats(300, c, seed=3)
    kd = KnowledgeDistance().fit_scale(torch.split(s, 64))
    km = StreamingKMeans(4, seed=0, feature_weights=kd.feature_weights())
    for b in torch.split(s, 64):
        km.partial_fit(b)
    km.finalize()
    w2 = kd.pairwise(s, km.cluster_centers_)
    torch.testing.assert_close(w2 * c, km.sq_distances(s), rtol=1e-13, atol=0)
    labels, dist = kd.nearest(s, km.cluster_centers_)
    km_labels, km_d2 = km.predict(s)
    assert torch.equal(labels, km_labels)
    torch.testing.assert_close(dist, km_d2 / c, rtol=1e-13, atol=0)


def test_w2_equals_euclidean_over_c_in_normalized_space():
    c = 5
    s = random_stats(200, c, seed=4)
    kd = KnowledgeDistance().fit_scale([s])
    z = kd.normalize(s)
    km = StreamingKMeans(3, seed=0)
    for b in torch.split(z, 50):
        km.partial_fit(b)
    km.finalize()
    cents = kd.denormalize(km.cluster_centers_)
    torch.testing.assert_close(kd.normalize(cents), km.cluster_centers_, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(kd.pairwise(s, cents), km.sq_distances(z) / c)
    # The normalised statistics have unit pool spread.
    torch.testing.assert_close(z.std(0), torch.ones(2 * c, dtype=D))


def test_constant_statistic_gets_zero_weight():
    # Channel 2 is dead on the pool (mu and sigma constant): it must not blow up distances.
    pool = t([[0, 5, 1, 0], [2, 5, 3, 0], [4, 5, 2, 0]])
    kd = KnowledgeDistance().fit_scale([pool])
    w = kd.feature_weights()
    assert w[1].item() == 0.0 and w[3].item() == 0.0
    assert w[0].item() == pytest.approx(1 / 4) and w[2].item() == pytest.approx(1.0)
    d = kd.pairwise(t([[2, 5 + 1e-9, 2, 1e-9]]), t([[0, 5, 1, 0]]))
    # Only channel 1 counts: ((2-0)^2/4 + (2-1)^2/1) / C = 2 / 2.
    assert d.item() == pytest.approx(1.0, rel=1e-12)
    # denormalize restores constant statistics from the pool mean.
    torch.testing.assert_close(kd.denormalize(kd.normalize(pool)), pool)


def test_activation_stats_layouts():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=gen)
    s = activation_stats(x)
    assert s.shape == (3, 8)
    flat = x.reshape(3, 4, -1)
    torch.testing.assert_close(s, torch.cat([flat.mean(2), flat.std(2, correction=0)], 1))
    tokens = x.reshape(3, 4, 30).transpose(1, 2)  # [B, T, C]
    torch.testing.assert_close(activation_stats(tokens, channel_dim=-1), s)
    lin = activation_stats(torch.randn(3, 4, generator=gen))
    assert torch.equal(split_stats(lin)[1], torch.zeros(3, 4))
    assert activation_stats(x.half()).dtype == torch.float32


def test_errors_name_the_fix():
    with pytest.raises(QCalibError, match="choose one of: cosine, kl, w2"):
        KnowledgeDistance("l1")
    with pytest.raises(RuntimeError, match="fit_scale"):
        KnowledgeDistance().pairwise(random_stats(2, 3), random_stats(2, 3))
    kd = KnowledgeDistance().fit_scale([random_stats(5, 3)])
    with pytest.raises(ValueError, match="2 channels, the scale has 3"):
        kd.pairwise(random_stats(2, 2), random_stats(2, 3))
    with pytest.raises(ValueError, match="negative standard deviations"):
        kd.pairwise(t([[0, 0, 0, -1, 1, 1]]), random_stats(2, 3))


finite = st.floats(-50, 50, allow_nan=False)
positive = st.floats(0, 20, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(
    mus=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=2, max_size=5),
    sigmas=st.lists(st.lists(positive, min_size=3, max_size=3), min_size=5, max_size=5),
)
def test_properties_nonnegative_and_w2_symmetric(mus, sigmas):
    n = len(mus)
    s = join_stats(t(mus), t(sigmas[:n]))
    scale = t([1.0, 2.0, 0.5]), t([1.0, 0.25, 3.0])
    w2 = KnowledgeDistance(exact=True).set_scale(*scale).pairwise(s, s)
    assert bool((w2 >= 0).all())
    torch.testing.assert_close(w2, w2.T, rtol=0, atol=0)
    fast = KnowledgeDistance().set_scale(*scale).pairwise(s, s)
    assert bool((fast >= 0).all())
    torch.testing.assert_close(fast, w2, rtol=1e-12, atol=1e-9)
    assert bool((KnowledgeDistance("kl").pairwise(s, s) >= 0).all())
    cos = KnowledgeDistance("cosine").set_scale(t([1.0] * 3), t([1.0] * 3)).pairwise(s, s)
    assert bool(((cos >= 0) & (cos <= 2)).all())


def test_reused_weights_and_centroids_follow_a_new_scale_and_in_place_changes():
    s = random_stats(6, 3)
    kd = KnowledgeDistance(layer="fc").fit_scale([s])
    w = kd.feature_weights()
    w.zero_()  # a caller's copy: the distances keep their weights
    cents = s[:2].clone()
    labels, d = kd.nearest(s, cents)
    assert labels[:2].tolist() == [0, 1] and float(d[2]) > 0
    kd.fit_scale([s * 2])  # a new scale: weights 1/4 as large, so W2 distances 1/4
    _, d_new = kd.nearest(s, cents)
    assert torch.allclose(d_new, d / 4)
    cents[1, 0] = float("nan")  # the same centroid tensor changed in place: checked again
    with pytest.raises(ValueError, match="centroids for layer 'fc'"):
        kd.nearest(s, cents)
