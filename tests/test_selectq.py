"""SelectQ selector: API/CLI use, determinism, outliers, bounded memory, errors; budget helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from qcalib.cli import main
from qcalib.config import CalibConfig, QuantConfig, RunConfig, SelectConfig
from qcalib.data.pool import Pool
from qcalib.data.registry import load_pool
from qcalib.errors import QCalibError
from qcalib.select import SELECTORS, SelectQSelector, select_indices
from qcalib.select.budget import ClusterTopK, allocate_quotas


@pytest.fixture(scope="module")
def digits_pool():
    return load_pool("digits")


def small_net(in_ch: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_ch, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


class LazyImages(Dataset):
    """``n`` pseudo-random 3x8x8 images generated on access (never all in memory)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 + i)
        return torch.randn(3, 8, 8, generator=g) + (i % 4) * 0.8


# ---------------------------------------------------------------------- budget helpers
def test_allocate_quotas_hand_cases():
    # exact shares 2.5, 1.5, 1.0 -> floors 2, 1, 1; the seat left ties on remainder 5/10
    # between groups 0 and 1 and goes to the larger mass.
    assert allocate_quotas([5, 3, 2], 5) == [3, 1, 1]
    assert allocate_quotas([1, 1, 1, 1], 2) == [1, 1, 0, 0]  # equal: lower index
    assert allocate_quotas([0, 7, 0], 3) == [0, 3, 0]
    # min_share: the 3-member group is worth 0.15 seat -> excluded, its share re-split.
    assert allocate_quotas([100, 100, 3], 10, min_share=1.0) == [5, 5, 0]
    assert allocate_quotas([100, 100, 3], 10) == [5, 5, 0]  # also by plain rounding
    # shares 10, 9.4, 0.6: the last seat goes to the largest remainder, 0.6 ...
    assert allocate_quotas([100, 94, 6], 20, min_share=0.0) == [10, 9, 1]
    # ... unless a group worth less than one seat is excluded: 20 over 194 -> 10.31, 9.69.
    assert allocate_quotas([100, 94, 6], 20, min_share=1.0) == [10, 10, 0]
    # eligible groups hold fewer than n: everyone is eligible again (and quotas <= masses).
    assert allocate_quotas([3, 3, 1], 7, min_share=5.0) == [3, 3, 1]
    with pytest.raises(QCalibError):
        allocate_quotas([2, 2], 5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=8).filter(lambda m: sum(m) > 0),
    st.data(),
)
def test_allocate_quotas_properties(masses, data):
    n = data.draw(st.integers(0, sum(masses)))
    share = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    q = allocate_quotas(masses, n, min_share=share)
    assert sum(q) == n
    assert all(0 <= qi <= mi for qi, mi in zip(q, masses, strict=True))
    if share == 0.0:  # Hamilton: every quota is the floor or the ceiling of the exact share
        total = sum(masses)
        assert all(
            n * m // total <= qi <= -(-n * m // total) for qi, m in zip(q, masses, strict=True)
        )


def test_cluster_topk_matches_sort_and_is_order_invariant():
    g = torch.Generator().manual_seed(0)
    n = 200
    groups = torch.randint(0, 3, (n,), generator=g)
    keys = torch.randint(0, 20, (n,), generator=g).double()  # many ties
    index = torch.randperm(1000, generator=g)[:n]
    results = []
    for perm in (torch.arange(n), torch.randperm(n, generator=g)):
        top = ClusterTopK(3, 7)
        for i in range(0, n, 16):
            sl = perm[i : i + 16]
            top.push(groups[sl], keys[sl], index[sl])
        assert top.peak_held <= 3 * 7
        results.append([top.smallest(c, 7)[1].tolist() for c in range(3)])
        assert top.counts.tolist() == torch.bincount(groups, minlength=3).tolist()
    assert results[0] == results[1]
    for c in range(3):
        members = sorted((float(keys[i]), int(index[i])) for i in range(n) if int(groups[i]) == c)
        assert results[0][c] == [i for _, i in members[:7]]


# ---------------------------------------------------------------------- selection
def test_selects_sorted_unique_and_is_deterministic(trained_tiny, digits_pool):
    runs = [
        SelectQSelector(seed=3, num_clusters=6).fit(digits_pool, model=trained_tiny).select(40)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])  # bit-identical for the same seed
    idx = runs[0]
    assert idx.numel() == 40 and idx.unique().numel() == 40
    assert torch.equal(idx, idx.sort().values)
    other = SelectQSelector(seed=4, num_clusters=6).fit(digits_pool, model=trained_tiny).select(40)
    assert not torch.equal(idx, other)
    # select() twice on one fit gives the same answer; a different n re-ranks.
    sel = SelectQSelector(seed=3, num_clusters=6).fit(digits_pool, model=trained_tiny)
    assert torch.equal(sel.select(40), idx)
    info = sel.selection_
    assert sum(info["quotas"]) == 40 and sum(info["masses"]) == len(digits_pool)
    assert all(q <= m for q, m in zip(info["quotas"], info["masses"], strict=True))


def test_quotas_follow_cluster_masses(trained_tiny, digits_pool):
    sel = SelectQSelector(num_clusters=5, within="nearest").fit(digits_pool, model=trained_tiny)
    idx = sel.select(64)
    _, _, clusters = sel.knowledge_distances(idx)
    got = torch.bincount(clusters, minlength=5).tolist()
    assert got == sel.selection_["quotas"]
    masses = sel.selection_["masses"]
    for q, m in zip(got, masses, strict=True):
        if 64 * m / sum(masses) >= 1:
            assert abs(q - 64 * m / sum(masses)) < 1 + 1e-9
    # Inside each cluster, the selected samples are the ones with the smallest total KD.
    all_i, all_d, all_c = sel.knowledge_distances()
    for c in range(5):
        members = all_i[all_c == c][torch.argsort(all_d[all_c == c], stable=True)]
        assert set(members[: got[c]].tolist()) == set(idx[clusters == c].tolist())


def test_stratified_takes_evenly_spaced_kd_ranks(trained_tiny, digits_pool):
    sel = SelectQSelector(num_clusters=4, within="stratified", trim=0.1)
    idx = sel.fit(digits_pool, model=trained_tiny).select(30)
    assert torch.equal(idx, sel.select(30))  # deterministic
    all_i, all_d, all_c = sel.knowledge_distances()
    quotas = sel.selection_["quotas"]
    want = []
    for c, q in enumerate(quotas):
        # clusters are smaller than the 4096-entry sample: the ranks are exact
        members = all_i[all_c == c][torch.argsort(all_d[all_c == c], stable=True)]
        keep = max(q, members.numel() - round(members.numel() * 0.1))
        want += [int(members[int((j + 0.5) * keep / q)]) for j in range(q)]
    assert idx.tolist() == sorted(want)
    nearest = SelectQSelector(num_clusters=4, within="nearest")
    nearest = nearest.fit(digits_pool, model=trained_tiny).select(30)
    assert not torch.equal(idx, nearest)


@pytest.mark.parametrize(
    "params",
    [
        {"metric": "kl"},
        {"metric": "cosine", "combine": "max"},
        {"combine": "0,-1", "partition_layer": "conv2"},
        {"stats": "mean", "layers": "conv2,fc", "shuffle": False},
        {"min_cluster_share": 0.0, "decay": 0.9, "n_init": 1},
        {"within": "stratified", "trim": 0.2},
    ],
)
def test_variants_run(trained_tiny, digits_pool, params):
    idx = select_indices("selectq", digits_pool, 24, model=trained_tiny, num_clusters=4, **params)
    assert idx.numel() == 24 and idx.unique().numel() == 24


def test_variant_options_take_effect(trained_tiny, digits_pool, monkeypatch):
    # Each option of test_variants_run reaches the part of the method it names (a selector
    # that accepted and ignored one would still return 24 distinct indices).
    import qcalib.select.selectq as selectq

    orders, shares = [], []
    real_batches, real_quotas = selectq.stat_batches, selectq.allocate_quotas

    def batches_spy(pool, collector, batch_size, order=None, cache=None):
        orders.append(order)
        return real_batches(pool, collector, batch_size, order, cache)

    def quotas_spy(masses, n, share):
        shares.append(share)
        return real_quotas(masses, n, share)

    monkeypatch.setattr(selectq, "stat_batches", batches_spy)
    monkeypatch.setattr(selectq, "allocate_quotas", quotas_spy)

    def fitted(**params):
        orders.clear()
        shares.clear()
        sel = SelectQSelector(num_clusters=4, **params).fit(digits_pool, model=trained_tiny)
        return sel, sel.select(24)

    default, default_idx = fitted()
    assert default.active_sites_ == ["conv1", "conv2", "fc"]
    assert default.partition_site_ == "fc" and default._combine_idx == "mean"
    assert torch.equal(orders[0].sort().values, torch.arange(len(digits_pool)))  # shuffled
    assert not torch.equal(orders[0], torch.arange(len(digits_pool)))
    assert orders[1] is None and shares == [default.min_cluster_share]
    assert {kd.metric for kd in default.kd_.values()} == {"w2"}

    sel, idx = fitted(metric="kl")
    assert {kd.metric for kd in sel.kd_.values()} == {"kl"}
    assert not torch.equal(idx, default_idx)

    sel, _ = fitted(combine="0,-1", partition_layer="conv2")
    assert sel.partition_site_ == "conv2" and sel._combine_idx == [0, 2]

    sel, _ = fitted(stats="mean", layers="conv2,fc", shuffle=False)
    assert sel.active_sites_ == ["conv2", "fc"] and sel._collector.stats == "mean"
    assert orders == [None, None]  # pass 1 in pool order
    # mean-only rows: the sigma half of every row is zero
    assert all(float(km.cluster_centers_[:, km.cluster_centers_.shape[1] // 2 :].abs().max()) == 0
               for km in sel.kmeans_.values())  # fmt: skip

    sel, _ = fitted(min_cluster_share=0.0, decay=0.9, n_init=1)
    assert shares == [0.0]
    assert {(km.decay, km.n_init) for km in sel.kmeans_.values()} == {(0.9, 1)}
    assert {(km.decay, km.n_init) for km in default.kmeans_.values()} != {(0.9, 1)}

    sel, idx = fitted(within="stratified", trim=0.2)
    assert sel.selection_["within"] == "stratified" and sel.trim == 0.2
    assert not torch.equal(idx, default_idx)


def test_planted_outliers_are_never_selected():
    g = torch.Generator().manual_seed(0)
    n_pool, n = 400, 40
    x = torch.randn(n_pool, 3, 8, 8, generator=g)
    x += torch.randint(0, 4, (n_pool, 1, 1, 1), generator=g).float() * 0.8  # 4 modes
    outliers = torch.randperm(n_pool, generator=g)[:6]
    x[outliers] = x[outliers] * 6 + 4
    pool = Pool(TensorDataset(x), name="planted")
    model = small_net()
    for k, within in ((4, "nearest"), (8, "nearest"), (16, "nearest"), (8, "stratified")):
        for seed in (0, 1):
            sel = SelectQSelector(
                seed=seed, num_clusters=k, batch_size=50, init_size=100, within=within
            )
            idx = sel.fit(pool, model=model).select(n)
            assert not torch.isin(idx, outliers).any(), (k, within, seed)
    random_hits = [
        int(torch.isin(SELECTORS.get("random")(seed=s).fit(pool).select(n), outliers).sum())
        for s in range(10)
    ]
    assert sum(random_hits) > 0


def _retained(obj, seen=None) -> int:
    """Tensor elements reachable from a selector's own state (not the pool or model)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_retained(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_retained(v, seen) for v in obj)
    if type(obj).__module__.startswith("qcalib.select") and hasattr(obj, "__dict__"):
        return sum(
            _retained(v, seen)
            for k, v in vars(obj).items()
            if k not in ("_pool", "_collector", "model")
        )
    return 0


def test_memory_bounded_for_a_pool_larger_than_the_budget():
    model = small_net()
    sizes = {}
    for n_pool in (300, 3000):
        pool = Pool(LazyImages(n_pool), name=f"lazy{n_pool}")
        sel = SelectQSelector(num_clusters=4, batch_size=100, init_size=64, within="nearest")
        sel.fit(pool, model=model)
        sizes[n_pool] = _retained(sel)
        assert sel.init_rows_ <= 64 + 100  # the spread/seed buffer: init_size + one batch
        idx = sel.select(20)
        assert idx.numel() == 20
        assert sel.selection_["peak_heap_entries"] <= 4 * 20  # heaps bounded by K * n
    assert sizes[300] == sizes[3000]
    width = 2 * (3 + 8 + 16)  # statistics per sample over the three layers
    # Everything kept is far less than the statistics of the pool would be.
    assert sizes[3000] < 3000 * width / 10


def test_errors_name_the_fix(trained_tiny, digits_pool):
    fitted = SelectQSelector(num_clusters=4).fit(digits_pool, model=trained_tiny)
    with pytest.raises(QCalibError, match="larger than the pool"):
        fitted.select(len(digits_pool) + 1)
    tiny_pool = Pool(TensorDataset(torch.randn(5, 1, 8, 8)), name="five")
    with pytest.raises(QCalibError, match=r"num_clusters=8 exceeds the pool size 5.*num_clusters="):
        SelectQSelector().fit(tiny_pool, model=trained_tiny)
    with pytest.raises(QCalibError, match="empty"):
        Pool(TensorDataset(torch.empty(0, 1, 8, 8)))

    class EmptyPool:  # a duck-typed pool that slipped past Pool's own check
        name = "void"
        labels = None

        def __len__(self) -> int:
            return 0

    with pytest.raises(QCalibError, match="'void' is empty"):
        SelectQSelector().fit(EmptyPool(), model=trained_tiny)
    with pytest.raises(QCalibError, match="needs the model"):
        SelectQSelector().fit(digits_pool)
    with pytest.raises(QCalibError, match=r"no parameter 'num_cluster'.*num_clusters"):
        SELECTORS.get("selectq")(seed=0, num_cluster=4)
    with pytest.raises(QCalibError, match="no parameter 'k'"):
        SELECTORS.get("random")(seed=0, k=4)
    with pytest.raises(QCalibError, match="num_clusters must be an integer"):
        SelectQSelector(num_clusters="many")
    with pytest.raises(QCalibError, match="trim must be a number"):
        SelectQSelector(trim="lots")
    with pytest.raises(QCalibError, match="within must be"):
        SelectQSelector(within="farthest")
    with pytest.raises(QCalibError, match="unknown knowledge-distance metric"):
        SelectQSelector(metric="l1")
    with pytest.raises(QCalibError, match="needs the sigmas"):
        SelectQSelector(metric="kl", stats="mean")
    with pytest.raises(QCalibError, match="partition_layer"):
        SelectQSelector(num_clusters=2, partition_layer="nope").fit(digits_pool, model=trained_tiny)


def test_nan_activation_is_reported_with_the_layer():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            return self.fc((h - h) / (h - h))  # 0/0

    pool = Pool(TensorDataset(torch.randn(20, 3, 6, 6)), name="nan")
    with pytest.raises(QCalibError, match=r"layer 'fc'.*NaN") as info:
        SelectQSelector(num_clusters=2, batch_size=8).fit(pool, model=Broken().eval())
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "arch", ["torchvision:resnet18", "torchvision:mobilenet_v2", "zoo:resnet20", "zoo:mnv2"]
)
def test_architectures(arch):
    import torchvision

    from qcalib.zoo.mobilenet import MobileNetV2Small
    from qcalib.zoo.resnet import ResNet20

    torch.manual_seed(0)
    build, shape = {
        "torchvision:resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
        "torchvision:mobilenet_v2": (
            lambda: torchvision.models.mobilenet_v2(num_classes=10),
            (3, 32, 32),
        ),
        "zoo:resnet20": (ResNet20, (1, 28, 28)),
        "zoo:mnv2": (MobileNetV2Small, (1, 28, 28)),
    }[arch]
    model = build().eval()
    x = torch.randn(24, *shape, generator=torch.Generator().manual_seed(1))
    pool = Pool(TensorDataset(x), name="rand24")
    sel = SelectQSelector(num_clusters=3, batch_size=12, init_size=12).fit(pool, model=model)
    idx = sel.select(8)
    assert idx.numel() == 8 and idx.unique().numel() == 8
    assert len(sel.sites_) > 10 and sel.partition_site_ == sel.active_sites_[-1]
    if arch == "torchvision:resnet18":
        assert sel.sites_[0] == "conv1" and sel.sites_[-1] == "fc" and len(sel.sites_) == 21


def test_pipeline_and_cli(trained_tiny, monkeypatch, capsys, tmp_path):
    import json

    import qcalib.pipeline as pipeline

    bench = pipeline.Workbench(trained_tiny, "digits")
    cfg = RunConfig(
        model="api",
        data="digits",
        quant=QuantConfig(8, 8),
        calib=CalibConfig(num_calib=32),
        select=SelectConfig("selectq", (("num_clusters", 4),)),
    )
    _, result = pipeline.quantize(cfg, bench, progress=False)
    assert len(result.calib_indices) == 32
    assert result.calib_indices == sorted(set(result.calib_indices))

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: trained_tiny)
    out = tmp_path / "run"
    argv = ["quantize", "--no-progress", "--data", "digits", "--model", "x:y", "--num-calib",
            "16", "--selector", "selectq", "--selector-param", "num_clusters=3",
            "--selector-param", "combine=max", "--wbits", "8", "--abits", "8",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert len(json.loads((out / "calib_indices.json").read_text())) == 16
    # The selector's account of its set travels into result.json.
    selection = json.loads((out / "result.json").read_text())["selection"]
    assert sum(selection["quotas"]) == 16 and len(selection["masses"]) == 3
    assert selection["ranges"] == "off" and selection["range_mismatch"] is None
    assert result.selection["within"] == "nearest"  # auto, range calibrator, images
    capsys.readouterr()
    bad = [*argv[:-2], "--selector-param", "clusters=3"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "no parameter 'clusters'" in err and "num_clusters" in err and "\n" not in err.strip()


def test_allocate_quotas_group_exactly_at_min_share_keeps_its_seat():
    # Shares n * m / M = 2, 2 and exactly 1.0 for the 5-member group: "below min_share"
    # excludes it only when strictly below, so it keeps its seat. (With a strict ">" it
    # would be dropped and its seat re-split: [3, 2, 0].)
    assert allocate_quotas([10, 10, 5], 5, min_share=1.0) == [2, 2, 1]
    # Just below the boundary (share 4/4.1 < 1) it is excluded.
    assert allocate_quotas([10, 10, 4], 5, min_share=1.0) == [3, 2, 0]
    # A fractional min_share at its exact boundary: shares 3.25, 1.25 and 0.5 == 0.5; the
    # boundary group's remainder (0.5) is the largest, so it takes the last seat.
    assert allocate_quotas([13, 5, 2], 5, min_share=0.5) == [3, 1, 1]
    assert allocate_quotas([13, 5, 2], 5, min_share=0.51) == [4, 1, 0]


# ------------------------------------------------------ options take effect, as documented
def _image_layer_pool(kind: str, n_pool: int = 300, n_out: int = 8, seed: int = 0):
    """A pool whose planted samples differ from the rest only in the way ``kind`` names,
    seen on the first conv's input (the image itself): ``spread`` = same per-channel
    spatial means, 5x the spatial spread; ``scale`` = the whole image x4 (means and
    spreads scaled together, so the statistics vector keeps its direction). Also returns
    the pool before planting."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pool, 3, 8, 8, generator=g) * 0.5 + 2.0
    clean = x.clone()
    out = torch.randperm(n_pool, generator=g)[:n_out]
    if kind == "spread":
        mu = x[out].mean((2, 3), keepdim=True)
        x[out] = mu + (x[out] - mu) * 5
    else:
        x[out] = x[out] * 4
    planted = Pool(TensorDataset(x), name=f"planted-{kind}")
    return planted, out, Pool(TensorDataset(clean), name="clean")


def _select(pool, seed=0, **params):
    params.setdefault("within", "nearest")  # these tests read the KD ranking directly
    sel = SelectQSelector(seed=seed, num_clusters=4, batch_size=100, init_size=100,
                          layers="0", **params)  # fmt: skip
    return sel.fit(pool, model=small_net()).select(30)


def _hits(pool, outliers, seeds=range(5), **params):
    return sum(int(torch.isin(_select(pool, s, **params), outliers).sum()) for s in seeds)


def test_stats_mean_is_blind_to_spread_only_outliers():
    # Documented: stats="mean" keeps per-channel means only. Planting 5x the spatial
    # spread into 8 samples (their means unchanged) leaves a mean-only selection exactly
    # as it was on the clean pool; mean_std sees them as outliers and never picks one.
    planted, out, clean = _image_layer_pool("spread")
    for seed in (0, 1):
        assert torch.equal(_select(planted, seed, stats="mean"), _select(clean, seed, stats="mean"))
    assert _hits(planted, out, stats="mean_std") == 0
    assert not torch.equal(_select(planted, stats="mean_std"), _select(clean, stats="mean_std"))


def test_cosine_ignores_the_overall_magnitude_w2_does_not():
    # Documented: cosine compares the direction of the normalised statistics and ignores
    # their magnitude; w2 charges every deviation. 4x brighter copies of 8 samples are far
    # for w2 and never picked (5 seeds); for cosine they rank like ordinary samples.
    planted, out, _ = _image_layer_pool("scale")
    assert _hits(planted, out, metric="w2") == 0
    assert _hits(planted, out, metric="cosine") >= 3


@pytest.mark.parametrize("metric", ["w2", "kl", "cosine"])
@pytest.mark.parametrize("combine", ["mean", "max"])
def test_metric_and_combine_reach_the_ranking(metric, combine, monkeypatch):
    # Every per-layer KD is the named metric's, and the total is their mean or max.
    import qcalib.select.selectq as selectq

    seen = []

    def spy(per_layer, how):
        total = selectq_combine(per_layer, how)
        seen.append((per_layer, how, total))
        return total

    selectq_combine = selectq.combine_layers
    monkeypatch.setattr(selectq, "combine_layers", spy)
    pool, _, _ = _image_layer_pool("scale")
    sel = SelectQSelector(num_clusters=4, batch_size=100, init_size=100, metric=metric,
                          combine=combine)  # fmt: skip
    sel.fit(pool, model=small_net()).select(20)
    assert {kd.metric for kd in sel.kd_.values()} == {metric}
    assert seen and all(how == combine for _, how, _ in seen)
    for per_layer, _, total in seen:
        assert per_layer.shape[1] == len(sel.active_sites_) > 1
        expected = per_layer.max(1).values if combine == "max" else per_layer.mean(1)
        torch.testing.assert_close(total, expected)
