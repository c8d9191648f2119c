"""Baseline selectors to compare SelectQ against (design.md §3, issue 3 item 5).

* ``"balanced"``: class-balanced random sampling (needs pool labels).
* ``"kcenter"``: greedy k-center coreset (Sener & Savarese 2018) on an activation embedding.
* ``"herding"``: kernel herding (Chen, Welling & Smola 2010), i.e. greedy MMD matching of
  the selected set to the pool in an RBF kernel on the same embedding.

(``"random"`` lives in :mod:`qcalib.select.base`.)

The embedding (:func:`pool_embedding`)
--------------------------------------
The same streamed statistics SelectQ clusters (:mod:`qcalib.select.stats`), so the
baselines differ from SelectQ in the *selection rule*, not in what they see:

* ``features="deepest"`` (default): the statistics rows of the deepest observed layer
  (a classifier's penultimate features: for a ``[B, C]`` linear input the sigmas are 0
  and drop out), the usual coreset embedding;
* ``features="all"``: every observed layer's rows concatenated, each layer scaled by
  ``1 / sqrt(C_l)``, so that the squared Euclidean distance is the *sum over layers* of
  the per-layer W2 Knowledge Distance (every layer counts equally, as in SelectQ's
  ``combine="mean"``).

Each statistic is centred and divided by its spread over the candidates (sample std);
statistics that are constant over the candidates are dropped. float64.

Memory: unlike SelectQ these methods need every candidate's embedding at once
(``M x D`` float64 values; herding also computes ``M^2`` kernel values in blocks), so
the candidates are a seeded uniform subsample of at most ``max_pool`` samples (default
5000; ``max_pool=0`` or ``None`` uses the whole pool). This is a property of the baselines,
stated so that comparisons on large pools are read correctly.

Character of each baseline: k-center greedy covers the embedding, so it deliberately
picks the farthest points, outliers included (it is the coverage extreme); herding
picks the points of highest kernel density first and then fills in where the selected
set's kernel mean falls short of the pool's (the distribution-matching extreme).
Herding is deterministic given its candidates: the seed only draws the ``max_pool``
subsample (and the median-heuristic subsample).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from qcalib.data.pool import Pool
from qcalib.errors import QCalibError
from qcalib.select.base import SELECTORS, Selector
from qcalib.select.budget import allocate_quotas
from qcalib.select.kmeans import pairwise_sq_dists
from qcalib.select.stats import (
    STATS_KINDS,
    ActivationStatsCollector,
    StatRowCache,
    parse_layer_list,
    stat_batches,
)

__all__ = ["BalancedSelector", "HerdingSelector", "KCenterSelector", "pool_embedding"]

log = logging.getLogger(__name__)

FEATURES = ("deepest", "all")
# Largest [rows, M] kernel block computed at once by herding.
_BLOCK_ELEMS = 1 << 22
# Rows used by the median heuristic (its pairwise distances are held at once).
_MEDIAN_ROWS = 1000


def _candidates(n_pool: int, max_pool: int | None, seed: int) -> Tensor | None:
    if not max_pool or n_pool <= max_pool:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_pool, generator=gen)[:max_pool].sort().values


def pool_embedding(
    model: nn.Module,
    pool: Pool,
    *,
    features: str = "deepest",
    layers: Any = None,
    stats: str = "mean_std",
    batch_size: int = 128,
    max_pool: int | None = 5000,
    seed: int = 0,
    device: str | None = None,
    row_cache: StatRowCache | None = None,
) -> tuple[Tensor, Tensor]:
    """``(indices [M], embedding [M, D] float64)`` of the candidates (see module notes);
    ``row_cache`` keeps the statistic rows for later selectors on the same model and pool."""
    if features not in FEATURES:
        raise QCalibError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    cand = _candidates(len(pool), max_pool, seed)
    spec = layers
    if features == "deepest":
        items = parse_layer_list(layers)
        spec = [-1] if items is None else None  # None: observe the given list, keep its last
    collector = ActivationStatsCollector(model, layers if spec is None else spec, stats, device)
    per_site: dict[str, list[Tensor]] = {}
    seen: list[Tensor] = []
    for idx, rows in stat_batches(pool, collector, batch_size, cand, row_cache):
        for s, r in rows.items():
            per_site.setdefault(s, []).append(r)
        seen.append(idx)
    sites = collector.sites or []
    if features == "deepest":
        sites = sites[-1:]
    blocks = []
    for s in sites:
        rows = torch.cat(per_site.pop(s)).to(torch.float64)
        c = rows.shape[1] // 2
        blocks.append(_standardize(rows) / c**0.5)
    per_site.clear()
    emb = torch.cat(blocks, 1)
    if emb.shape[1] == 0:
        raise QCalibError(
            "every activation statistic is constant over the candidates; the embedding is "
            "empty (identical inputs?) - try features='all' or other layers"
        )
    return torch.cat(seen), emb


def _standardize(rows: Tensor, eps: float = 1e-8) -> Tensor:
    if rows.shape[0] < 2:
        return rows[:, :0]
    std = rows.std(0)
    live = std > eps
    return (rows[:, live] - rows[:, live].mean(0)) / std[live]


def _check_common(features: str, stats: str, batch_size: Any, max_pool: Any, name: str) -> None:
    if features not in FEATURES:
        raise QCalibError(
            f"{name}: features must be one of {', '.join(FEATURES)}, got {features!r}"
        )
    if stats not in STATS_KINDS:
        raise QCalibError(f"{name}: stats must be one of {', '.join(STATS_KINDS)}, got {stats!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QCalibError(f"{name}: batch_size must be a positive integer, got {batch_size!r}")
    if max_pool is not None and (
        isinstance(max_pool, bool) or not isinstance(max_pool, int) or max_pool < 0
    ):
        raise QCalibError(f"{name}: max_pool must be a non-negative integer, got {max_pool!r}")


@SELECTORS.register("balanced")
class BalancedSelector(Selector):
    """Class-balanced random sampling (seeded).

    ``mode="proportional"`` (default): each class gets a quota proportional to its frequency
    in the pool (largest remainder, exact; ties to the larger class, then the lower label)
    and its samples are a seeded uniform draw inside the class; compared to plain random
    sampling this removes the class-mix noise of small sets. ``mode="equal"``: the same
    number per class (water-filling: a class smaller than its equal share gives its
    spare seats to the others; leftover seats to the larger classes, then lower labels).
    Needs the pool's labels.
    """

    def __init__(self, seed: int = 0, mode: str = "proportional") -> None:
        super().__init__(seed=seed)
        if mode not in ("proportional", "equal"):
            raise QCalibError(f"balanced: mode must be 'proportional' or 'equal', got {mode!r}")
        self.mode = mode
        self.labels_: Tensor | None = None

    def _fit(self, pool: Pool, model: nn.Module | None) -> None:
        labels = getattr(pool, "labels", None)
        if labels is None:
            raise QCalibError(
                f"the balanced selector needs class labels, and the pool "
                f"{getattr(pool, 'name', '')!r} has none; use a labeled dataset (e.g. "
                "imagefolder:PATH with one folder per class) or --selector random/selectq"
            )
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() != len(pool):
            raise QCalibError(
                f"the pool has {len(pool)} samples but {labels.numel()} labels; fix the dataset"
            )
        self.labels_ = labels

    def _quotas(self, counts: list[int], n: int) -> list[int]:
        if self.mode == "proportional":
            return allocate_quotas(counts, n)
        q = [0] * len(counts)
        left = n
        while left > 0:
            open_ = [i for i, c in enumerate(counts) if q[i] < c]
            share = left // len(open_)
            if share == 0:  # fewer seats than open classes: larger classes, then lower label
                for i in sorted(open_, key=lambda i: (-counts[i], i))[:left]:
                    q[i] += 1
                break
            for i in open_:
                add = min(share, counts[i] - q[i])
                q[i] += add
                left -= add
        return q

    def _select(self, n: int) -> Tensor:
        assert self.labels_ is not None
        classes, counts = torch.unique(self.labels_, sorted=True, return_counts=True)
        quotas = self._quotas(counts.tolist(), n)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for c, q in zip(classes.tolist(), quotas, strict=True):
            members = torch.nonzero(self.labels_ == c).flatten()
            perm = torch.randperm(members.numel(), generator=gen)
            if q:
                out.append(members[perm[:q]])
        return torch.cat(out)


class _EmbeddingSelector(Selector):
    needs_model = True

    def __init__(
        self,
        seed: int = 0,
        features: str = "deepest",
        layers: Any = None,
        stats: str = "mean_std",
        batch_size: int = 128,
        max_pool: int | None = 5000,
        device: str | None = None,
    ) -> None:
        super().__init__(seed=seed)
        _check_common(features, stats, batch_size, max_pool, type(self).__name__)
        parse_layer_list(layers)
        self.features = features
        self.layers = layers
        self.stats = stats
        self.batch_size = batch_size
        self.max_pool = max_pool
        self.device = device
        self.index_: Tensor | None = None
        self.embedding_: Tensor | None = None

    def _fit(self, pool: Pool, model: nn.Module | None) -> None:
        assert model is not None
        self.index_, self.embedding_ = pool_embedding(
            model, pool, features=self.features, layers=self.layers, stats=self.stats,
            batch_size=self.batch_size, max_pool=self.max_pool, seed=self.seed,
            device=self.device, row_cache=self.row_cache,
        )  # fmt: skip

    def _check_n(self, n: int) -> int:
        assert self.index_ is not None
        m = self.index_.numel()
        if n > m:
            raise QCalibError(
                f"{type(self).__name__}: --num-calib {n} exceeds the {m} candidates kept by "
                f"max_pool={self.max_pool}; raise it with --selector-param max_pool=N"
            )
        return m


@SELECTORS.register("kcenter")
class KCenterSelector(_EmbeddingSelector):
    """Greedy k-center coreset: start from a seeded random candidate, then repeatedly add
    the candidate farthest from the selected set (ties: lowest position). A 2-approximation
    of the minimax cover; it spreads the set over the embedding, outliers included.
    """

    def _select(self, n: int) -> Tensor:
        m = self._check_n(n)
        z = self.embedding_
        assert z is not None and self.index_ is not None
        gen = torch.Generator().manual_seed(self.seed)
        first = int(torch.randint(m, (1,), generator=gen))
        taken = torch.zeros(m, dtype=torch.bool)
        min_d = torch.full((m,), float("inf"), dtype=torch.float64)
        chosen = []
        i = first
        for _ in range(n):
            chosen.append(i)
            taken[i] = True
            torch.minimum(min_d, (z - z[i]).square_().sum(1), out=min_d)
            score = min_d.masked_fill(taken, -1.0)
            i = int(torch.argmax(score))  # first maximal: lowest position on ties
        return self.index_[torch.tensor(chosen)]


@SELECTORS.register("herding")
class HerdingSelector(_EmbeddingSelector):
    """Kernel herding: greedily add ``argmax_x  mu_p(x) - 1/(t+1) sum_{s<=t} k(x, x_s)``
    over unselected candidates, with ``mu_p(x) = mean_j k(x, x_j)`` the pool's kernel mean;
    each step greedily lowers the MMD between the selected set and the pool.

    Kernel ``k(x, y) = exp(-|x - y|^2 / (2 h^2))``; ``bandwidth`` ``h`` in the standardised
    embedding; default the median heuristic ``2 h^2 = median |x_i - x_j|^2`` over a seeded
    subsample of at most 1000 candidates. Cost ``O(M^2 D)`` once, then ``O(n M D)``.
    """

    def __init__(
        self,
        seed: int = 0,
        features: str = "deepest",
        layers: Any = None,
        stats: str = "mean_std",
        batch_size: int = 128,
        max_pool: int | None = 5000,
        bandwidth: float | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(seed, features, layers, stats, batch_size, max_pool, device)
        if bandwidth is not None and (
            isinstance(bandwidth, bool)
            or not isinstance(bandwidth, (int, float))
            or not bandwidth > 0
        ):
            raise QCalibError(f"herding: bandwidth must be positive, got {bandwidth!r}")
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.gamma_: float | None = None
        self.kernel_mean_: Tensor | None = None

    def _fit(self, pool: Pool, model: nn.Module | None) -> None:
        super()._fit(pool, model)
        z = self.embedding_
        assert z is not None
        m = z.shape[0]
        if self.bandwidth is not None:
            self.gamma_ = 1.0 / (2.0 * self.bandwidth**2)
        else:
            gen = torch.Generator().manual_seed(self.seed)
            sub = z[torch.randperm(m, generator=gen)[:_MEDIAN_ROWS]]
            d2 = pairwise_sq_dists(sub, sub, exact=True)
            off = d2[~torch.eye(sub.shape[0], dtype=torch.bool)]
            off = off[off > 0]
            med = float(off.median()) if off.numel() else 1.0
            self.gamma_ = 1.0 / med
        step = max(1, _BLOCK_ELEMS // max(1, m))
        mean_k = torch.empty(m, dtype=torch.float64)
        for r0 in range(0, m, step):
            k = pairwise_sq_dists(z[r0 : r0 + step], z).mul_(-self.gamma_).exp_()
            mean_k[r0 : r0 + step] = k.mean(1)
        self.kernel_mean_ = mean_k

    def _select(self, n: int) -> Tensor:
        m = self._check_n(n)
        z, mu = self.embedding_, self.kernel_mean_
        assert z is not None and mu is not None and self.index_ is not None
        g = self.gamma_
        assert g is not None
        acc = torch.zeros(m, dtype=torch.float64)  # sum_s k(x, x_s)
        taken = torch.zeros(m, dtype=torch.bool)
        chosen = []
        for t in range(n):
            score = (mu - acc / (t + 1)).masked_fill_(taken, float("-inf"))
            i = int(torch.argmax(score))
            chosen.append(i)
            taken[i] = True
            acc += (z - z[i]).square_().sum(1).mul_(-g).exp_()
        return self.index_[torch.tensor(chosen)]
