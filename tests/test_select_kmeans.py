"""StreamingKMeans: agreement with scikit-learn, determinism, bounded memory, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from qcalib.errors import QCalibError
from qcalib.select.kmeans import StreamingKMeans, pairwise_sq_dists, rowwise_sq_dists

BATCH = 64


def batches(x: torch.Tensor, size: int = BATCH) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def stream(km: StreamingKMeans, x: torch.Tensor, size: int = BATCH) -> StreamingKMeans:
    for b in batches(x, size):
        km.partial_fit(b)
    return km.finalize()


def matched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``b`` reordered to best match the rows of ``a`` (Hungarian on distances)."""
    cost = torch.cdist(a.double(), b.double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    return b[torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]]


@pytest.fixture(scope="module")
def blobs():
    """5 well-separated clusters in 8-D, 2000 points, in random order (make_blobs shuffles)."""
    x, _ = make_blobs(2000, 8, centers=5, cluster_std=1.0, random_state=0)
    x = torch.tensor(x, dtype=torch.float32)
    sk = KMeans(5, n_init=10, random_state=0).fit(x.numpy())
    return x, sk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_well_separated(blobs, seed):
    x, sk = blobs
    km = stream(StreamingKMeans(5, seed=seed), x)
    # Tolerance: inertia within 2% of scikit-learn's KMeans (10 inits, Lloyd to convergence).
    ratio = km.inertia(x) / sk.inertia_
    assert abs(ratio - 1.0) < 0.02, ratio
    # Hungarian matching of centroids: every matched pair within 0.05 (cluster std is 1).
    ours = km.cluster_centers_.numpy()
    cost = ((ours[:, None, :] - sk.cluster_centers_[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    assert np.sqrt(cost[rows, cols]).max() < 0.05
    # Masses from a second assignment pass under fixed centroids equal scikit-learn's sizes.
    labels, _ = km.predict(x)
    mass = torch.bincount(labels, minlength=5).numpy()
    sk_mass = np.bincount(sk.labels_, minlength=5)
    assert (mass[rows] == sk_mass[cols]).all()
    assert int(km.mass_.sum()) == x.shape[0] == km.n_seen_


def test_overlapping_clusters_close_to_sklearn():
    """Overlapping clusters (std 4): the n_init/init_iters seeding keeps us within 2%."""
    x, _ = make_blobs(2000, 8, centers=5, cluster_std=4.0, random_state=1)
    x = torch.tensor(x)
    sk = KMeans(5, n_init=10, random_state=0).fit(x.numpy())
    ratios = [stream(StreamingKMeans(5, seed=s), x).inertia(x) / sk.inertia_ for s in range(4)]
    assert max(ratios) < 1.02, ratios


def test_deterministic_for_a_seed(blobs):
    x, _ = blobs
    a = stream(StreamingKMeans(5, seed=7), x)
    b = stream(StreamingKMeans(5, seed=7), x)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert torch.equal(a.counts_, b.counts_)
    assert torch.equal(a.mass_, b.mass_)
    # reset() restores the initial generator state: a refit is identical too.
    a.reset()
    stream(a, x)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)


def _tensor_sizes(obj) -> dict[str, int]:
    sizes = {}
    for name, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            sizes[name] = v.numel()
        elif isinstance(v, (list, tuple, dict)):
            items = v.values() if isinstance(v, dict) else v
            sizes[name] = sum(t.numel() for t in items if isinstance(t, torch.Tensor))
    return sizes


def test_memory_independent_of_rows_seen():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(100 * 32, 6, generator=gen)
    w = torch.rand(6, generator=gen) + 0.5
    small = StreamingKMeans(4, feature_weights=w)
    big = StreamingKMeans(4, feature_weights=w)
    stream(small, data[: 10 * 32], size=32)
    stream(big, data, size=32)
    assert big.n_seen_ == 10 * small.n_seen_
    sizes_small, sizes_big = _tensor_sizes(small), _tensor_sizes(big)
    assert sizes_small == sizes_big
    assert sum(sizes_big.values()) <= 4 * 6 + 2 * 4 + 6  # centers, counts, mass, weights


def test_buffers_until_enough_rows_then_seeds():
    x = torch.arange(30, dtype=torch.float64).reshape(10, 3)
    km = StreamingKMeans(5, seed=0)
    km.partial_fit(x[:3])
    assert not km.is_seeded
    with pytest.raises(RuntimeError, match="finalize"):
        km.predict(x)
    km.partial_fit(x[3:6])
    assert km.is_seeded and km._buffer == []
    km.partial_fit(x[6:])
    km.finalize()
    assert int(km.mass_.sum()) == 10


def test_k_larger_than_pool_raises_at_finalize():
    km = StreamingKMeans(10, name="layer1.conv")
    km.partial_fit(torch.randn(4, 3))
    km.partial_fit(torch.randn(3, 3))
    with pytest.raises(QCalibError, match=r"K=10 exceeds the pool size 7.*num_clusters=N"):
        km.finalize()


def test_init_size_seeds_at_finalize_when_stream_is_short():
    km = StreamingKMeans(2, init_size=100)
    km.partial_fit(torch.randn(10, 3, generator=torch.Generator().manual_seed(0)))
    assert not km.is_seeded
    km.finalize()
    assert km.is_seeded and int(km.mass_.sum()) == 10


@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_input_raises(bad, kind):
    x = torch.randn(8, 3)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=kind):
        StreamingKMeans(2).partial_fit(x)
    with pytest.raises(ValueError, match=f"layer 'blocks.3' contains 1 {kind}"):
        StreamingKMeans(2, name="blocks.3").partial_fit(x)


def test_empty_clusters_reseeded_on_farthest_rows():
    """Duplicate rows make k-means++ pick duplicate seeds; they must move to real clusters."""
    zeros = torch.zeros(16, 2, dtype=torch.float64)
    far = torch.tensor([[10.0, 0.0], [20.0, 0.0]], dtype=torch.float64).repeat(8, 1)

    def run() -> StreamingKMeans:
        km = StreamingKMeans(3, seed=0)
        km.partial_fit(zeros)  # all three seeds coincide: two centroids are empty
        assert int((km.counts_ == 0).sum()) == 2
        for _ in range(3):
            km.partial_fit(torch.cat([zeros[:4], far]))
        return km.finalize()

    km = run()
    assert km.n_reseeded_ == 2
    # Re-seeded onto a 20-row, then (farthest-first) onto a 0-row. The first centroid
    # absorbed every row before that and, being a running mean, keeps some of it (it ends
    # at 400/52 = 7.69 instead of 10); the three groups are nevertheless separated.
    xs = sorted(km.cluster_centers_[:, 0].tolist())
    assert xs == pytest.approx([0.0, 400 / 52, 20.0], abs=1e-9)
    labels, _ = km.predict(torch.cat([zeros[:4], far]))
    assert len(set(labels[:4].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    assert torch.equal(run().cluster_centers_, km.cluster_centers_)


def test_single_cluster_is_the_exact_running_mean():
    x = torch.randn(1000, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    km = stream(StreamingKMeans(1), x + 100.0, size=37)
    torch.testing.assert_close(km.cluster_centers_[0], (x + 100.0).mean(0), rtol=0, atol=1e-10)


def test_decay_forgets_old_batches():
    a = torch.zeros(640, 2, dtype=torch.float64)
    b = torch.full((640, 2), 5.0, dtype=torch.float64)
    x = torch.cat([a, b])
    keep = stream(StreamingKMeans(1), x)
    forget = stream(StreamingKMeans(1, decay=0.5), x)
    assert keep.cluster_centers_[0, 0].item() == pytest.approx(2.5)
    # 10 batches after the shift, the old data weighs about 0.5**10 relative to the new.
    assert forget.cluster_centers_[0, 0].item() == pytest.approx(5.0, abs=0.01)


def test_feature_weights_equal_clustering_rescaled_features(blobs):
    x, _ = blobs
    x = x.double()
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.25, 4.0, 1.5], dtype=torch.float64)
    weighted = stream(StreamingKMeans(5, seed=1, feature_weights=scale**2), x)
    plain = stream(StreamingKMeans(5, seed=1), x * scale)
    # Same clusters (possibly in another order: equal-inertia seedings may tie differently).
    ours = weighted.cluster_centers_ * scale
    theirs = matched(ours, plain.cluster_centers_)
    torch.testing.assert_close(ours, theirs)
    assert weighted.inertia(x) == pytest.approx(plain.inertia(x * scale), rel=1e-12)


def test_fit_with_lloyd_passes(blobs):
    x, sk = blobs
    bs = batches(x)
    km = StreamingKMeans(5, seed=0).fit(bs, n_passes=3)
    assert km.inertia(x) <= sk.inertia_ * 1.001
    assert int(km.mass_.sum()) == x.shape[0]
    one = StreamingKMeans(5, seed=0).fit(bs)
    assert torch.equal(one.cluster_centers_, stream(StreamingKMeans(5, seed=0), x).cluster_centers_)
    with pytest.raises(ValueError, match="re-iterable"):
        StreamingKMeans(5).fit(iter(bs), n_passes=2)


def test_queries_shapes_and_dtypes(blobs):
    x, _ = blobs
    km = stream(StreamingKMeans(5, dtype=torch.float32), x)
    labels, d2 = km.predict(x[:10])
    assert labels.dtype == torch.int64 and labels.shape == (10,)
    assert d2.dtype == torch.float32
    torch.testing.assert_close(km.transform(x[:10]), km.sq_distances(x[:10]).sqrt())
    torch.testing.assert_close(d2, km.sq_distances(x[:10]).min(1).values, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="8 features"):
        km.predict(torch.randn(3, 4))


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(n_clusters=0), QCalibError),
        (dict(n_clusters=3, init="farthest"), QCalibError),
        (dict(n_clusters=3, decay=0.0), QCalibError),
        (dict(n_clusters=3, feature_weights=torch.tensor([1.0, -1.0])), ValueError),
        (dict(n_clusters=3, init=torch.zeros(2, 4)), ValueError),
    ],
)
def test_invalid_parameters(kwargs, err):
    with pytest.raises(err):
        StreamingKMeans(**kwargs)


def test_tensor_init_is_used():
    init = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    km = StreamingKMeans(2, init=init, init_iters=0)
    km.partial_fit(torch.tensor([[1.0, 1.0], [9.0, 9.0]]))
    km.finalize()
    torch.testing.assert_close(
        km.cluster_centers_, torch.tensor([[1.0, 1.0], [9.0, 9.0]], dtype=torch.float64)
    )


def test_pairwise_sq_dists_fast_exact_and_blocked():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, 7, generator=gen, dtype=torch.float64) + 1e3  # large offset
    y = torch.randn(9, 7, generator=gen, dtype=torch.float64) + 1e3
    w = torch.rand(7, generator=gen, dtype=torch.float64)
    exact = pairwise_sq_dists(x, y, w, exact=True)
    ref = ((x[:, None, :] - y[None, :, :]) ** 2 * w).sum(-1)
    assert torch.equal(exact, ref)
    assert torch.equal(pairwise_sq_dists(x, y, w, exact=True, max_block=10), exact)
    # Fast path: centring removes the offset, so the error stays at the spread's scale.
    torch.testing.assert_close(pairwise_sq_dists(x, y, w), exact, rtol=1e-12, atol=1e-12)
    assert torch.equal(pairwise_sq_dists(x, x, exact=True).diagonal(), torch.zeros(13).double())
    assert pairwise_sq_dists(x, x).diagonal().abs().max().item() < 1e-12
    torch.testing.assert_close(rowwise_sq_dists(x, y[:1].expand(13, 7), w), exact[:, 0])


def test_exact_mode_matches_fast_mode(blobs):
    x, _ = blobs
    fast = stream(StreamingKMeans(5, seed=0), x)
    slow = stream(StreamingKMeans(5, seed=0, exact=True), x)
    # Same clusters, possibly permuted: the n_init seedings all reach the same optimum
    # and which one wins a rounding-level tie of inertias depends on the path.
    torch.testing.assert_close(
        fast.cluster_centers_, matched(fast.cluster_centers_, slow.cluster_centers_)
    )
    assert fast.inertia(x) == pytest.approx(slow.inertia(x), rel=1e-12)
    # predict's distances are exact in both modes: a centroid-row is at distance 0.
    _, d2 = fast.predict(fast.cluster_centers_)
    assert torch.equal(d2, torch.zeros(5, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=3, max_size=3),
        min_size=4,
        max_size=40,
    ),
    k=st.integers(1, 4),
    batch=st.integers(1, 9),
    decay=st.sampled_from([1.0, 0.7]),
)
def test_centroids_stay_in_data_hull(data, k, batch, decay):
    """Invariants: each centroid is a convex combination of rows (inside their bounding box),
    and streamed masses add up to the rows seen."""
    x = torch.tensor(data, dtype=torch.float64)
    km = stream(StreamingKMeans(k, seed=0, decay=decay), x, size=batch)
    lo, hi = x.min(0).values, x.max(0).values
    tol = 1e-9 * (1 + x.abs().max())
    assert bool(((km.cluster_centers_ >= lo - tol) & (km.cluster_centers_ <= hi + tol)).all())
    assert int(km.mass_.sum()) == x.shape[0]
    assert bool((km.predict(x)[1] >= 0).all())
