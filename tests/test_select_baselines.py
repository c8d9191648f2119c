"""Baseline selectors: balanced, k-center greedy, kernel herding (and the shared embedding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qcalib.cli import build_parser
from qcalib.data.pool import Pool, TensorImageDataset
from qcalib.errors import QCalibError
from qcalib.select import SELECTORS, select_indices
from qcalib.select.baselines import HerdingSelector, KCenterSelector, pool_embedding
from qcalib.select.budget import allocate_quotas


class Flat(nn.Module):
    """One linear layer on flattened input: the deepest site's statistics are the raw inputs
    (sigma = 0, dropped), so the embedding is the standardised input itself."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 2)

    def forward(self, x):
        return self.fc(x)


def points_pool(x: torch.Tensor, labels: torch.Tensor | None = None) -> Pool:
    return Pool(TensorDataset(x), name="points", labels=labels)


def standardized(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean(0)) / x.std(0)


@pytest.fixture(scope="module")
def blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    x = torch.cat([c + torch.randn(60, 2, generator=g) for c in centers])
    x = torch.cat([x, torch.tensor([[30.0, 30.0], [-25.0, 20.0]])])  # two far outliers
    return x[torch.randperm(x.shape[0], generator=g)]


def test_registry_and_cli_choices():
    assert {"random", "selectq", "balanced", "kcenter", "herding"} <= set(SELECTORS.names())
    args = build_parser().parse_args(["quantize", "--selector", "herding"])
    assert args.selector == "herding"


def test_embedding_is_standardised_input(blobs):
    idx, emb = pool_embedding(Flat(2), points_pool(blobs), batch_size=50)
    assert torch.equal(idx, torch.arange(blobs.shape[0]))
    torch.testing.assert_close(emb, standardized(blobs) / 2**0.5)  # scaled by 1/sqrt(C)
    # max_pool: a seeded sorted subsample
    idx2, emb2 = pool_embedding(Flat(2), points_pool(blobs), max_pool=50, seed=1)
    assert idx2.numel() == 50 and torch.equal(idx2, idx2.sort().values)
    assert emb2.shape == (50, 2)


def test_embedding_all_layers():
    from conftest import TinyNet
    from qcalib.data.registry import load_pool

    torch.manual_seed(0)
    trained_tiny = TinyNet().eval()  # untrained is enough for the embedding's shape
    pool = load_pool("digits")
    idx, emb = pool_embedding(trained_tiny, pool, features="all", max_pool=300)
    _, deep = pool_embedding(trained_tiny, pool, max_pool=300)
    assert idx.numel() == 300
    assert emb.shape[1] > deep.shape[1]  # conv1 + conv2 + fc statistics
    idx_h = select_indices("herding", pool, 20, model=trained_tiny, features="all", max_pool=300)
    assert idx_h.numel() == 20


def reference_kcenter(z: torch.Tensor, first: int, n: int) -> list[int]:
    chosen = [first]
    for _ in range(n - 1):
        d = torch.stack([((z - z[c]) ** 2).sum(1) for c in chosen]).min(0).values
        d[chosen] = -1
        chosen.append(int(torch.argmax(d)))
    return chosen


def test_kcenter_matches_reference_and_takes_outliers(blobs):
    pool = points_pool(blobs)
    sel = KCenterSelector(seed=5).fit(pool, model=Flat(2))
    idx = sel.select(6)
    first = int(torch.randint(blobs.shape[0], (1,), generator=torch.Generator().manual_seed(5)))
    want = reference_kcenter(standardized(blobs), first, 6)
    assert idx.tolist() == sorted(want)
    far = torch.nonzero(blobs.abs().max(1).values > 15).flatten()
    assert torch.isin(far, idx).all()  # coverage: both outliers are centres
    assert torch.equal(idx, KCenterSelector(seed=5).fit(pool, model=Flat(2)).select(6))


def reference_herding(z: torch.Tensor, gamma: float, n: int) -> list[int]:
    k = torch.exp(-gamma * torch.cdist(z, z) ** 2)
    mu = k.mean(1)
    chosen: list[int] = []
    for t in range(n):
        score = mu - (k[:, chosen].sum(1) if chosen else 0) / (t + 1)
        score[chosen] = -float("inf")
        chosen.append(int(torch.argmax(score)))
    return chosen


def mmd2(k: torch.Tensor, idx: torch.Tensor) -> float:
    return float(k.mean() - 2 * k[:, idx].mean() + k[idx][:, idx].mean())


def test_herding_matches_reference_avoids_outliers_and_lowers_mmd(blobs):
    pool = points_pool(blobs)
    sel = HerdingSelector(bandwidth=1.0).fit(pool, model=Flat(2))
    idx = sel.select(12)
    z = standardized(blobs) / 2**0.5
    assert sel.gamma_ == pytest.approx(0.5)
    assert idx.tolist() == sorted(reference_herding(z, 0.5, 12))
    far = torch.nonzero(blobs.abs().max(1).values > 15).flatten()
    assert not torch.isin(far, idx).any()
    k = torch.exp(-0.5 * torch.cdist(z, z) ** 2)
    rand = [mmd2(k, SELECTORS.get("random")(seed=s).fit(pool).select(12)) for s in range(10)]
    assert mmd2(k, idx) < min(rand)
    # Median heuristic by default; deterministic.
    a = HerdingSelector().fit(pool, model=Flat(2))
    b = HerdingSelector().fit(pool, model=Flat(2))
    assert a.gamma_ > 0 and torch.equal(a.select(12), b.select(12))


def test_balanced_proportional_and_equal():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    labels = labels[perm]
    images = torch.zeros(100, 1, 2, 2, dtype=torch.uint8)
    pool = Pool(TensorImageDataset(images, labels, [0.0], [1.0]), name="imb")
    idx = SELECTORS.get("balanced")(seed=1).fit(pool).select(21)
    counts = torch.bincount(labels[idx], minlength=4).tolist()
    assert counts == allocate_quotas([50, 30, 15, 5], 21) == [11, 6, 3, 1]
    assert torch.equal(idx, SELECTORS.get("balanced")(seed=1).fit(pool).select(21))
    assert not torch.equal(idx, SELECTORS.get("balanced")(seed=2).fit(pool).select(21))
    eq = SELECTORS.get("balanced")(seed=0, mode="equal").fit(pool).select(30)
    # equal shares 7.5 each; class 3 only has 5, its spare seats go to the others.
    assert torch.bincount(labels[eq], minlength=4).tolist() == [9, 8, 8, 5]
    assert idx.unique().numel() == 21 and eq.unique().numel() == 30


def test_balanced_on_digits_labels():
    from qcalib.data.registry import load_pool

    pool = load_pool("digits")
    idx = SELECTORS.get("balanced")(seed=0).fit(pool).select(100)
    counts = torch.bincount(pool.labels[idx], minlength=10)
    want = allocate_quotas(torch.bincount(pool.labels, minlength=10), 100)
    assert counts.tolist() == want


def test_errors(blobs):
    pool = points_pool(blobs)
    with pytest.raises(QCalibError, match="needs class labels.*--selector random"):
        SELECTORS.get("balanced")().fit(pool)
    with pytest.raises(QCalibError, match="needs the model"):
        SELECTORS.get("kcenter")().fit(pool)
    with pytest.raises(QCalibError, match="exceeds the 40 candidates.*max_pool"):
        KCenterSelector(max_pool=40).fit(pool, model=Flat(2)).select(41)
    with pytest.raises(QCalibError, match="features must be one of"):
        HerdingSelector(features="middle")
    with pytest.raises(QCalibError, match="bandwidth must be positive"):
        HerdingSelector(bandwidth=0)
    with pytest.raises(QCalibError, match=r"no parameter 'gamma'.*bandwidth"):
        SELECTORS.get("herding")(seed=0, gamma=1.0)
    with pytest.raises(QCalibError, match="mode must be"):
        SELECTORS.get("balanced")(mode="stratified")
    with pytest.raises(QCalibError, match="larger than the pool"):
        KCenterSelector().fit(pool, model=Flat(2)).select(10_000)


def test_model_free_selectors_ignore_a_model(blobs):
    # Callers pass the FP model to every selector's fit; those that read no activations
    # must select exactly what they select without it.
    pool = points_pool(blobs, labels=torch.arange(blobs.shape[0]) % 3)
    for name in ("random", "balanced"):
        alone = select_indices(name, pool, 12, seed=3)
        with_model = select_indices(name, pool, 12, seed=3, model=Flat(2))
        assert torch.equal(alone, with_model), name
    with pytest.raises(QCalibError, match="'kcenter' reads activations: pass the FP model"):
        select_indices("kcenter", pool, 12)
