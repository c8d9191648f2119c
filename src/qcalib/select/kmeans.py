"""Streaming (mini-batch) k-means: the "dynamic clustering" of SelectQ, one instance per layer.

Why streaming (design.md §3): the candidate pool is passed through the network once, batch
by batch, and each layer's per-sample activation statistics are clustered as they arrive.
Holding all statistics of a large pool for every layer would cost O(N·C) per layer; this
estimator keeps O(K·D) state whatever the number of rows seen (``D`` = feature width, for
SelectQ ``2C``: per-channel means and standard deviations, see ``distance.py``).

Algorithm (choices are ours, each switchable):

* **Seeding.** Greedy k-means++ (as in scikit-learn: ``2 + ln K`` candidates per step, keep
  the one that lowers the potential most) on the *first* batch. If that batch has fewer
  rows than ``max(n_clusters, init_size)`` the rows are buffered until enough have
  arrived; the buffer is freed as soon as the centroids are seeded, so it is bounded by
  ``init_size`` plus one batch. ``init="random"`` (K distinct rows) or an explicit
  ``[K, D]`` tensor are the alternatives. Seeding on one batch is fragile when clusters
  overlap (a bad seed is never escaped by single-pass updates), so by default
  ``n_init=3`` seedings are each refined by ``init_iters=5`` Lloyd iterations on the seed
  rows and the one with the lowest inertia on those rows is kept (scikit-learn's
  ``MiniBatchKMeans`` also tries ``n_init=3`` seedings). On a 5-cluster 8-D mixture with
  overlapping clusters this took the worst of 20 seeds from 26% above scikit-learn's
  ``KMeans`` inertia to 0.3%; the cost is a few passes over one batch.
* **Updates.** scikit-learn ``MiniBatchKMeans`` rule: each centroid keeps a count; a batch
  assigns ``n_c`` rows with mean ``m_c`` to centroid ``c``, then
  ``count_c <- decay * count_c + n_c`` and ``c <- c + (n_c / count_c) (m_c - c)``. With
  ``decay = 1`` (default) a centroid is the exact running mean of every row it was ever
  assigned, so the learning rate decays as ``1/count`` and the result does not depend on
  the batch size once assignments settle. ``decay < 1`` forgets old batches geometrically
  (an effective memory of ``1 / (1 - decay)`` batches), for pools whose order drifts.
  The seeding batch is also used for the first update (as scikit-learn's ``partial_fit``
  does), so every seeded row counts.
* **Empty clusters.** A centroid whose count is still zero after an update (it has never
  won a row: typically a duplicate seed when the pool has repeated rows) is moved onto the
  farthest row of the current batch (largest distance to its nearest updated centroid;
  ties broken by row index, so deterministically). Several empty centroids are placed
  farthest-first (distances refreshed after each placement), so they do not all land on
  copies of one far row. Its count stays zero, so the next rows it wins replace it.
  Centroids that did receive rows are never re-seeded, however small: in SelectQ a small
  far cluster is exactly the outlier group selection must see.
* **Masses.** ``mass_`` counts the rows assigned to each centroid *while streaming*, i.e.
  under centroids that were still moving. For the selection budget the caller should
  recompute masses in a second assignment pass with :meth:`predict` (or use
  ``fit(..., n_passes=2)``, whose Lloyd pass does it).
* **Weighted distances.** ``feature_weights`` ``w`` gives ``d(x, c) = sum_d w_d (x_d - c_d)^2``.
  The weighted mean is still the minimiser, so updates are unchanged. With
  ``KnowledgeDistance.feature_weights()`` (``1 / spread^2`` per statistic) the squared
  distance divided by ``C`` is exactly the W2 Knowledge Distance, so clustering and
  selection use one metric.
* **Distances.** The ``[B, K]`` distance matrices go through one matrix product,
  ``|x|^2 - 2 x.c + |c|^2``, after centring rows and centroids on the centroids' mean
  (distances are translation-invariant; centring keeps the expansion's cancellation at
  the scale of the data's spread, not of its offset): on CPU this is tens of times
  faster than forming ``x - c`` for every pair, which matters with a few dozen layers
  and hundreds of batches. Results are clamped at 0 and carry an absolute error of
  about 1e-16 (float64) times the squared norm of the centred rows. Distances that are
  *returned* for a row's own centroid (:meth:`predict`, :meth:`inertia`) are recomputed
  exactly as ``sum_d w_d (x_d - c_d)^2``, so a row's distance to itself is exactly 0.
  ``exact=True`` computes every distance directly instead (blocked, bounded memory).
* **Determinism.** All randomness comes from one ``torch.Generator`` seeded with
  ``seed``; argmin/argmax ties go to the lowest index; centroids are updated from sums
  accumulated with ``index_add_``. An identical input stream gives bit-identical
  centroids. (The one caveat: with the default ``exact=False`` a row's label comes from a
  BLAS product, and MKL does not promise bitwise-identical products across runs; a label
  could flip only between two centroids whose distances agree to ~1e-15 relative, e.g.
  duplicate centroids. ``exact=True`` removes the caveat.)
* **Precision.** Rows are converted to ``dtype`` (float64 by default): running means over
  many thousands of rows and k-means++ potentials are sums where float32 loses digits,
  and the state is only ``K x D``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from qcalib.errors import QCalibError

__all__ = ["StreamingKMeans", "check_finite", "pairwise_sq_dists", "rowwise_sq_dists"]

_INITS = ("k-means++", "random")
# Largest number of elements of one broadcast difference block in pairwise_sq_dists.
_MAX_BLOCK_ELEMS = 1 << 22


def check_finite(x: Tensor, what: str, layer: str | None = None) -> None:
    """Raise ``ValueError`` naming NaN/Inf (and the layer, when given) if ``x`` is not finite.

    A NaN in a statistic silently poisons a running mean and every distance computed from
    it; failing loudly with the layer name points at the broken activation.
    """
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        kinds = " and ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "Inf")) if n > 0)
        where = f" for layer {layer!r}" if layer is not None else ""
        raise ValueError(
            f"{what}{where} contains {kinds} value(s); check the activations that feed it "
            "(overflow, division by zero, a corrupt input)"
        )


def pairwise_sq_dists(
    x: Tensor,
    y: Tensor,
    weights: Tensor | None = None,
    *,
    exact: bool = False,
    max_block: int = _MAX_BLOCK_ELEMS,
) -> Tensor:
    """Squared (optionally weighted) Euclidean distances ``[B, K]`` between rows of x and y.

    ``exact=False``: one matrix product on rows centred on ``y``'s mean and scaled by
    ``sqrt(w)``, clamped at 0 (fast; absolute error ~1e-16 x squared centred norms in
    float64). ``exact=True``: ``sum_d w_d (x_d - y_d)^2`` formed directly, in blocks of
    ``y`` rows bounding the temporary at ``max_block`` elements (plus one row block when
    ``B * D`` alone exceeds it): exact zeros, no BLAS.
    """
    if exact:
        b, d = x.shape
        k = y.shape[0]
        out = torch.empty(b, k, dtype=torch.result_type(x, y), device=x.device)
        step = max(1, max_block // max(1, b * d))
        for k0 in range(0, k, step):
            diff = x[:, None, :] - y[None, k0 : k0 + step, :]
            diff.square_()
            if weights is not None:
                diff.mul_(weights)
            out[:, k0 : k0 + step] = diff.sum(-1)
        return out
    center = y.mean(0)
    xs, ys = x - center, y - center
    if weights is not None:
        sw = weights.sqrt()
        xs.mul_(sw)
        ys.mul_(sw)
    out = xs.square().sum(1)[:, None] + ys.square().sum(1)[None, :]
    out.addmm_(xs, ys.T, alpha=-2.0)
    return out.clamp_min_(0.0)


def rowwise_sq_dists(x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
    """Exact ``sum_d w_d (x_id - y_id)^2`` for paired rows ``x[i]``, ``y[i]``: ``[B]``."""
    diff = (x - y).square_()
    if weights is not None:
        diff.mul_(weights)
    return diff.sum(1)


class StreamingKMeans:
    """Mini-batch k-means with O(K·D) memory, fed with :meth:`partial_fit`.

    Parameters
    ----------
    n_clusters:
        Number of centroids ``K``.
    seed:
        Seed of the private generator used by the seeding (and nothing else).
    init:
        ``"k-means++"`` (greedy, default), ``"random"`` or a ``[K, D]`` tensor.
    decay:
        Forgetting factor in ``(0, 1]`` applied to every centroid's count once per batch.
        ``1.0`` is scikit-learn's ``MiniBatchKMeans`` rule (running means).
    feature_weights:
        Optional non-negative ``[D]`` weights of the squared distance.
    init_size:
        Minimum number of rows to seed on (default ``n_clusters``): the first batch is
        used as soon as it has that many rows, smaller batches are buffered.
    n_local_trials:
        k-means++ candidates per step; default ``2 + int(ln K)``.
    n_init:
        Number of seedings tried on the seed rows (the lowest inertia wins; ignored for a
        tensor ``init``).
    init_iters:
        Lloyd iterations on the seed rows refining each seeding before comparing them
        (0 keeps the raw k-means++ / random centroids). A tensor ``init`` is used as given.
    dtype:
        Working precision of the state and distances (default float64).
    exact:
        Compute every distance directly instead of through a matrix product (slower;
        see the module notes).
    name:
        Optional layer name, used in error messages.

    Attributes (after seeding)
    --------------------------
    cluster_centers_: ``[K, D]`` centroids.
    counts_: ``[K]`` float64 learning-rate counts (decayed when ``decay < 1``).
    mass_: ``[K]`` int64 rows assigned while streaming (see module notes).
    n_seen_: rows passed to :meth:`partial_fit`.
    n_steps_: mini-batch updates done.
    n_reseeded_: empty-cluster re-seeds done.
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        seed: int = 0,
        init: str | Tensor = "k-means++",
        decay: float = 1.0,
        feature_weights: Tensor | None = None,
        init_size: int | None = None,
        n_local_trials: int | None = None,
        n_init: int = 3,
        init_iters: int = 5,
        dtype: torch.dtype = torch.float64,
        exact: bool = False,
        name: str | None = None,
    ) -> None:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
            raise QCalibError(
                f"the number of clusters must be a positive integer, got {n_clusters!r}; "
                "set num_clusters to 1 or more (CLI: --selector-param num_clusters=N)"
            )
        if not (isinstance(decay, (int, float)) and 0.0 < float(decay) <= 1.0):
            raise QCalibError(f"decay must be in (0, 1], got {decay!r}; use 1.0 for running means")
        if isinstance(init, Tensor):
            if init.dim() != 2 or init.shape[0] != n_clusters:
                raise ValueError(
                    f"init tensor must have shape [n_clusters={n_clusters}, D], "
                    f"got {tuple(init.shape)}"
                )
            check_finite(init, "init centroids", name)
        elif init not in _INITS:
            raise QCalibError(f"unknown k-means init {init!r}; choose one of: {', '.join(_INITS)}")
        if init_size is not None and (not isinstance(init_size, int) or init_size < 1):
            raise ValueError(f"init_size must be a positive integer or None, got {init_size!r}")
        if n_local_trials is not None and (
            not isinstance(n_local_trials, int) or n_local_trials < 1
        ):
            raise ValueError(f"n_local_trials must be a positive integer, got {n_local_trials!r}")
        for pname, v, lo in (("n_init", n_init, 1), ("init_iters", init_iters, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{pname} must be an integer >= {lo}, got {v!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        if feature_weights is not None:
            feature_weights = torch.as_tensor(feature_weights).detach().to("cpu", dtype)
            if feature_weights.dim() != 1:
                raise ValueError("feature_weights must be a 1-D tensor [D]")
            check_finite(feature_weights, "feature_weights", name)
            if bool((feature_weights < 0).any()) or not bool((feature_weights > 0).any()):
                raise ValueError("feature_weights must be non-negative and not all zero")

        self.n_clusters = n_clusters
        self.seed = seed
        self.init = init
        self.decay = float(decay)
        self.feature_weights = feature_weights
        self.init_size = init_size
        self.n_local_trials = n_local_trials
        self.n_init = n_init
        self.init_iters = init_iters
        self.dtype = dtype
        self.exact = bool(exact)
        self.name = name
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> StreamingKMeans:
        """Forget everything seen; the next :meth:`partial_fit` seeds again."""
        self.cluster_centers_: Tensor | None = None
        self.counts_: Tensor | None = None
        self.mass_: Tensor | None = None
        self.n_features_in_: int | None = None
        self.n_seen_ = 0
        self.n_steps_ = 0
        self.n_reseeded_ = 0
        self._buffer: list[Tensor] = []
        self._n_buffered = 0
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(self.seed)
        return self

    @property
    def is_seeded(self) -> bool:
        """Whether the centroids exist (enough rows have been seen to seed them)."""
        return self.cluster_centers_ is not None

    def __repr__(self) -> str:
        state = f"seen={self.n_seen_}" if self.is_seeded else f"buffered={self._n_buffered}"
        return (
            f"StreamingKMeans(n_clusters={self.n_clusters}, init={self._init_name()}, "
            f"decay={self.decay}, seed={self.seed}, {state})"
        )

    def _init_name(self) -> str:
        return "tensor" if isinstance(self.init, Tensor) else repr(self.init)

    def _rows_to_seed(self) -> int:
        if isinstance(self.init, Tensor):
            return 1
        return max(self.n_clusters, self.init_size or 0)

    # ------------------------------------------------------------------ input
    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor [B, D], got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"expected a 2-D tensor [B, D], got shape {tuple(x.shape)}")
        d = self.n_features_in_
        if d is None:
            d = self.feature_weights.numel() if self.feature_weights is not None else None
            if d is None and isinstance(self.init, Tensor):
                d = self.init.shape[1]
        if d is not None and x.shape[1] != d:
            raise ValueError(f"expected rows with {d} features, got {x.shape[1]}")
        check_finite(x, "k-means input", self.name)
        return x.detach().to("cpu", self.dtype)

    # ------------------------------------------------------------------ fitting
    def partial_fit(self, x: Tensor) -> StreamingKMeans:
        """Consume one batch ``[B, D]``: seed (possibly after buffering) or update."""
        x = self._check_input(x)
        if self.n_features_in_ is None:
            self.n_features_in_ = x.shape[1]
        if x.shape[0] == 0:
            return self
        self.n_seen_ += x.shape[0]
        if self.cluster_centers_ is None:
            self._buffer.append(x)
            self._n_buffered += x.shape[0]
            if self._n_buffered < self._rows_to_seed():
                return self
            x = self._take_buffer()
            self._seed_centers(x)
        self._update(x)
        return self

    def finalize(self) -> StreamingKMeans:
        """End of the stream: seed from the buffer if still needed, or fail if K > pool."""
        if self.cluster_centers_ is None:
            if self.n_seen_ < self.n_clusters:
                where = f" for layer {self.name!r}" if self.name is not None else ""
                raise QCalibError(
                    f"K={self.n_clusters} exceeds the pool size {self.n_seen_}{where}; "
                    "lower num_clusters (CLI: --selector-param num_clusters=N) or enlarge the pool"
                )
            x = self._take_buffer()
            self._seed_centers(x)
            self._update(x)
        return self

    def fit(self, batches: Iterable[Tensor], n_passes: int = 1) -> StreamingKMeans:
        """Start afresh, stream ``batches`` once, then run ``n_passes - 1`` Lloyd passes.

        A Lloyd pass assigns every row to the current centroids, then moves each centroid
        to the exact mean of its rows (O(K·D) memory: only sums are kept). It refines what
        one mini-batch pass found and sets ``mass_`` to the pass's assignment counts (under
        the centroids *before* that pass's move). ``batches`` must be re-iterable (a list,
        or an object whose ``__iter__`` restarts) when ``n_passes > 1``.
        """
        if not isinstance(n_passes, int) or n_passes < 1:
            raise ValueError(f"n_passes must be a positive integer, got {n_passes!r}")
        if n_passes > 1 and iter(batches) is batches:
            raise ValueError("n_passes > 1 needs a re-iterable of batches, not an iterator")
        self.reset()
        for x in batches:
            self.partial_fit(x)
        self.finalize()
        for _ in range(n_passes - 1):
            self._lloyd_pass(batches)
        return self

    def _take_buffer(self) -> Tensor:
        x = torch.cat(self._buffer, 0) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer = []
        self._n_buffered = 0
        return x

    def _sqd(self, x: Tensor, y: Tensor, exact: bool | None = None) -> Tensor:
        exact = self.exact if exact is None else exact
        return pairwise_sq_dists(x, y, self.feature_weights, exact=exact)

    def _seed_centers(self, x: Tensor) -> None:
        k = self.n_clusters
        if isinstance(self.init, Tensor):
            centers = self.init.detach().to("cpu", self.dtype).clone()
        else:
            centers, best = None, None
            for _ in range(self.n_init):
                if self.init == "random":
                    idx = torch.randperm(x.shape[0], generator=self._gen)[:k]
                    cand = x[idx].clone()
                else:
                    cand = self._kmeans_plus_plus(x)
                for _ in range(self.init_iters):
                    self._lloyd_step(x, cand)
                inertia = self._sqd(x, cand).min(1).values.sum()
                if best is None or inertia < best:  # strict: ties keep the earliest
                    centers, best = cand, inertia
        self.cluster_centers_ = centers
        self.counts_ = torch.zeros(k, dtype=torch.float64)
        self.mass_ = torch.zeros(k, dtype=torch.int64)

    def _lloyd_step(self, x: Tensor, centers: Tensor) -> None:
        """One in-memory Lloyd iteration on ``x`` (centroids with no rows stay put)."""
        labels = self._sqd(x, centers).argmin(1)
        n_c = torch.bincount(labels, minlength=self.n_clusters)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        hit = n_c > 0
        centers[hit] = sums[hit] / n_c[hit].to(centers.dtype)[:, None]

    def _kmeans_plus_plus(self, x: Tensor) -> Tensor:
        """Greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's variant)."""
        n, k = x.shape[0], self.n_clusters
        trials = self.n_local_trials or 2 + int(math.log(k))
        centers = x.new_empty(k, x.shape[1])
        first = int(torch.randint(n, (1,), generator=self._gen))
        centers[0] = x[first]
        closest = self._sqd(x, x[first : first + 1])[:, 0]
        for c in range(1, k):
            cum = torch.cumsum(closest, 0)
            pot = cum[-1]
            if pot > 0:
                r = torch.rand(trials, generator=self._gen, dtype=x.dtype) * pot
                cand = torch.searchsorted(cum, r).clamp_(max=n - 1)
            else:  # every row coincides with a chosen centre: any row will do
                cand = torch.randint(n, (trials,), generator=self._gen)
            cand_d = self._sqd(x[cand], x)  # [trials, n]
            torch.minimum(cand_d, closest[None, :], out=cand_d)
            best = int(torch.argmin(cand_d.sum(1)))
            centers[c] = x[cand[best]]
            closest = cand_d[best]
        return centers

    def _update(self, x: Tensor) -> None:
        centers, k = self.cluster_centers_, self.n_clusters
        d2 = self._sqd(x, centers)
        labels = d2.argmin(1)
        n_c = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        self.counts_.mul_(self.decay).add_(n_c.to(torch.float64))
        hit = n_c > 0
        eta = (n_c[hit].to(torch.float64) / self.counts_[hit]).to(centers.dtype)
        means = sums[hit] / n_c[hit].to(centers.dtype)[:, None]
        centers[hit] += eta[:, None] * (means - centers[hit])
        self.mass_ += n_c
        self.n_steps_ += 1
        empty = torch.nonzero(self.counts_ == 0).flatten()
        if empty.numel():
            self._reseed(x, empty)

    def _reseed(self, x: Tensor, empty: Tensor) -> None:
        """Move empty centroids onto the batch's farthest rows, farthest-first."""
        centers = self.cluster_centers_
        live = self.counts_ > 0
        if not bool(live.any()):
            return
        # Exact distances: rare, and "sits on a centroid" must mean exactly 0.
        min_d2 = self._sqd(x, centers[live], exact=True).min(1).values
        for c in empty.tolist():
            i = int(torch.argmax(min_d2))  # first maximal index: deterministic ties
            if not min_d2[i] > 0:  # every row sits on a centroid: nothing to gain
                break
            centers[c] = x[i]
            torch.minimum(min_d2, self._sqd(x, x[i : i + 1], exact=True)[:, 0], out=min_d2)
            self.n_reseeded_ += 1

    def _lloyd_pass(self, batches: Iterable[Tensor]) -> None:
        centers = self.cluster_centers_
        sums = torch.zeros_like(centers)
        n_c = torch.zeros(self.n_clusters, dtype=torch.int64)
        for x in batches:
            x = self._check_input(x)
            if x.shape[0] == 0:
                continue
            labels = self._sqd(x, centers).argmin(1)
            n_c += torch.bincount(labels, minlength=self.n_clusters)
            sums.index_add_(0, labels, x)
        hit = n_c > 0
        centers[hit] = sums[hit] / n_c[hit].to(centers.dtype)[:, None]
        self.mass_ = n_c
        self.counts_ = n_c.to(torch.float64)

    # ------------------------------------------------------------------ queries
    def _require_seeded(self) -> Tensor:
        if self.cluster_centers_ is None:
            raise RuntimeError(
                "StreamingKMeans has no centroids yet: feed batches with partial_fit() and "
                "call finalize() at the end of the stream"
            )
        return self.cluster_centers_

    def sq_distances(self, x: Tensor) -> Tensor:
        """Squared (weighted) distances ``[B, K]`` of rows to every centroid.

        Through the fast matrix-product path unless ``exact=True`` (see module notes).
        """
        centers = self._require_seeded()
        return self._sqd(self._check_input(x), centers)

    def transform(self, x: Tensor) -> Tensor:
        """Distances ``[B, K]`` to every centroid (not squared, as scikit-learn's)."""
        return self.sq_distances(x).sqrt_()

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest centroid of each row: ``(labels [B] int64, squared distances [B])``.

        Ties go to the lowest centroid index. Use this in a second pass over the pool to
        get final masses (``torch.bincount(labels, minlength=K)``) under fixed centroids.
        """
        centers = self._require_seeded()
        x = self._check_input(x)
        labels = self._sqd(x, centers).argmin(1)
        return labels, rowwise_sq_dists(x, centers[labels], self.feature_weights)

    def inertia(self, x: Tensor) -> float:
        """Sum of squared distances of the rows of ``x`` to their nearest centroid."""
        return float(self.predict(x)[1].sum())
