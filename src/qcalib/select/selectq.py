"""SelectQ: one-shot calibration-set selection by layer-wise clustering of activation statistics.

``SelectQSelector(**params).fit(pool, model=fp_model).select(n)`` (registered as
``"selectq"``). Forward passes only: no backward pass and no BatchNorm parameters are used
(the statistics are measured on the activations themselves). design.md §3 gives the
method; every choice below is ours and switchable by a constructor parameter.

Pass 1 — ``fit`` (clustering, memory O(K·C) per layer)
-----------------------------------------------------
1. The pool streams through the FP model (eval mode, ``torch.no_grad``) in batches of
   ``batch_size``; :class:`~qcalib.select.stats.ActivationStatsCollector` turns each
   quantized layer's input into per-sample rows ``[mu_1..mu_C, sigma_1..sigma_C]``.
2. **Order** (``shuffle=True``): the pool is streamed in a seeded random order. Real
   pools are often sorted (an ImageFolder is ordered by class), and both the spread
   estimate and the k-means seeding below read the *first* rows; in index order they
   would see one class only. The only O(N) cost is the transient permutation (8 bytes a
   sample: 10 MB for ImageNet's 1.28M images). ``shuffle=False`` streams in index order
   for pools known to be in random order.
3. **Spread, frozen** (``init_size`` rows, default 256): the first ``max(init_size, K)``
   rows are buffered; from them each layer's pool spread (std of every statistic) is
   estimated and then frozen, the layer's :class:`~qcalib.select.kmeans.StreamingKMeans`
   is seeded (k-means++, ``n_init`` seedings refined on the buffer) and updated with the
   buffer, and the buffer is freed. Why frozen: the clustering metric is the spread-
   normalised (W2) distance, and centroids are running means built from assignments under
   that metric; re-weighting the features mid-stream would make the early assignments and
   the centroid state inconsistent. A spread is a second-order statistic that a few
   hundred random rows pin down (relative standard error ~ 1/sqrt(2 m), 4.4% at m = 256).
   Memory of the buffer: ``init_size x sum_l 2 C_l`` float32 values (ResNet-18: ~10 MB).
4. A layer whose statistics are all constant on the buffer carries no information about
   where a sample lies; it is left out (``skipped_layers_``) with a log message.
5. **Clustering metric**: always the spread-normalised squared Euclidean distance, which
   is ``C x`` the W2 Knowledge Distance (``feature_weights = 1 / spread^2``); for
   ``metric="kl"``/``"cosine"`` only the Knowledge Distance of pass 2 changes (k-means
   needs a metric whose minimiser is the mean).

Pass 2 — ``select(n)`` (ranking, memory O(K·n))
----------------------------------------------
The budget is known only here, so the pool is streamed a second time (in index order;
the result does not depend on the order). Per sample and layer: the nearest centroid
and the distance to it under ``metric`` (the **Knowledge Distance**, KD); the layers' KDs
are combined into the sample's total KD (``combine``: ``"mean"``, ``"max"`` or a list of
layers averaged). The sample's cluster is its nearest centroid in ``partition_layer``.
Per cluster a bounded buffer keeps the ``n`` smallest ``(total KD, index)`` entries
(:class:`~qcalib.select.budget.ClusterTopK`) and the cluster masses are counted under the
final, fixed centroids. Then:

* **Quotas** proportional to the masses by largest remainder
  (:func:`~qcalib.select.budget.allocate_quotas`, exact integers, deterministic ties),
  where a cluster worth less than ``min_cluster_share`` seats (default 1) gets none
  and its share goes to the others. A set of ``n`` samples gives every member a weight
  of ``1/n``; a cluster lighter than ``1/n`` of the pool cannot be represented without
  over-weighting it (a share of 0.3 seat rounded up to 1 is 3.3x its mass), and such
  small, far clusters are exactly the outlier groups that k-means++ seeding likes to
  give a centroid of their own: their members then have a *small* Knowledge Distance,
  so only the mass rule keeps them out (a K = n medoid selection picks every one).
* **Inside a cluster**, by the ranking rule ``within`` (``"auto"`` by default, below).
  ``within="nearest"`` (the method as specified, the default before issue 12):
  smallest total KD first (ties: lower index). Outliers are far from the centroids of
  the layers where they are atypical, so they rank last in their cluster and are not
  taken unless the budget reaches them. Per-cluster buffers hold ``n`` entries.
* ``within="stratified"`` (option): the cluster's members are ranked by total KD, the
  ``trim`` fraction with the largest KD (default 5%) is dropped, and the quota is taken
  at evenly spaced ranks of the rest (rank ``floor((j + 1/2) L / q)``), so the set also
  reproduces the spread of each cluster rather than only its core. Bounded memory: the
  ranks come from a seeded uniform sample of each cluster (bottom-``R`` random keys,
  ``R = max(16 n, 4096)``; exact for clusters up to ``R`` members). Measured on the
  digits test model (n = 32, 5 seeds): ``within="nearest"`` sets are *narrower* than the
  pool (quantile gap 0.10 vs 0.06 for random sets in :mod:`qcalib.select.quality`);
  stratified sets match it better (0.05).
* ``within="matched"`` (option; ``auto``'s choice for MSE, reconstruction and GPTQ): the
  same bounded seeded uniform sample of each cluster as ``stratified``, the same
  trimming of the ``trim`` share with the largest total KD (the extreme tail: planted
  outliers inside a big cluster go here), then the quota is chosen by **greedy moment
  matching** (kernel herding with a linear kernel on ``[z, z^2 - 1]``): every held
  member carries a feature row ``z`` (per observed layer: its KD and ``match_dims``
  seeded random projections of its spread-normalised statistics, each column
  standardised over the kept members), and the set grows one member at a time, always
  the one that brings the running mean of ``[z, z^2 - 1]`` closest to 0, i.e. the set's
  per-layer mean *and spread* of the statistics closest to the cluster's (ties: lower
  index). Why: a set that reproduces the cluster's spread calibrates a clip or a fit as
  the pool would (the evidence: ``nearest`` sets are 1.6-1.8x as mismatched as random
  ones and lose 0.9-1.2 points under MSE at W3A3 and 5-6 under QDrop), and a
  deterministic match should vary less from seed to seed than ``stratified``'s evenly
  spaced ranks of one random KD ordering (only the cluster sample and the k-means
  seeding are random; the ``aware`` section of ``bench/selection.py`` measures it).
  Projections rather than the full statistics: a row of ``sum_l (1 + P)`` values keeps
  the per-cluster sample at ``R x D`` float64 values (ResNet-20's 22 layers, P = 4:
  D = 111, 29 MB for K = 8 at ``R = 4096``) instead of the full ``sum_l 2 C_l``. Cost:
  no extra forward (the rows come from the ranking pass) and ``O(q R D)`` per cluster.

Ranking rule per calibrator (``within="auto"``, the default)
------------------------------------------------------------
The pipeline passes what the run's calibrator reads from the set
(``Calibrator.reads``, a plain string: ``select/`` does not import ``calibrate/``) to
``fit(..., calibrator_reads=...)``; ``auto`` resolves it with :data:`AUTO_WITHIN`:

* ``"range"`` (min-max, percentile) -> ``nearest``: a range observer reads the set's
  extremes, and the narrow nearest-KD sets are what won the 3-bit range rows of the
  committed grid (ResNet-20 percentile W3A3 +4.4 to +7.3, MobileNetV2 min-max W3A3 +3.0
  to +3.2, the worst seed far above random's worst);
* ``"distribution"`` (MSE) and ``"fit"`` (AdaRound, BRECQ, QDrop, GPTQ) -> ``matched``:
  the clip search and the fitted rounding / Hessians should see the pool's spread;
* no need given (an API call without ``calibrator_reads``, ``qcalib inspect-calib``
  without ``--calibrator``) -> :data:`AUTO_FALLBACK` = ``matched``: a set that matches
  the pool cannot be far from what random sets give on average, while ``nearest`` lost
  up to 6 points under reconstruction; the safe side when the use is unknown.

On **token pools** (language models: samples of token ids and masks) ``auto`` reads
:data:`AUTO_WITHIN_TOKENS`, where ``"range"`` gets ``matched`` too. On SmolLM2-135M the
range rows' ``nearest`` sets lost to random on every seed (static min-max W8A8 held-out
perplexity 33.7-33.9 vs random's 32.0; W4A8 80.0-80.5 vs 74.8): an LLM's activation
ranges come from rare outlier tokens, which the core of each cluster leaves out, and
clipping them costs more than the finer grid gains. ``matched`` was chosen over
``nearest`` on validation windows of the calibration split (``bench/llm.py --section
validate-within``) and checked on MiniLM (``--section check-within-encoder``).

Selection depends on the calibrator's need only through this rule (pass 1 does not).
``selection_["within"]`` records the rule used.

Range matching (``ranges``)
---------------------------
With ``ranges`` on, both passes also read each sample's ``[min, max]`` at every observed
site (the collector's ``extremes`` rows: two reductions per site, no extra forward; off,
they are not read, since on thin CNN layers they cost up to half the statistics), so the
static per-tensor min-max range that any subset gives is known exactly. Pass 2 keeps, per
site, the pool's order statistics that fix the **median random draw's** range at the
budget ``n`` (:class:`~qcalib.select.ranges.ExtremesSketch`, ``O(N (1 - 2^(-1/n)))``
values a site), and ``selection_["range_mismatch"]`` reports the chosen set's mean
``|log|`` ratio of widths to it (0: every site's grid step is the typical random set's;
``range_mismatch_within``: the within rule's set before the swaps). With
``ranges="median"`` the set from the within rule is then repaired by greedy swaps inside
each cluster (quotas unchanged; the trimmed tail may be swapped in, so a set that the
trim left too narrow can take back one wide sample) while a swap lowers that mismatch
(:func:`~qcalib.select.ranges.match_ranges`); ``range_swaps`` counts them. With
``ranges="cap"`` only the sites *wider* than the median draw's count (a narrower range
is kept: on SmolLM2-135M's validation windows the within rule's narrower sets were the
better ones), so a set is only repaired where an outlier window widened a range. ``"off"``
keeps the within rule's set. ``"auto"`` (default, :func:`auto_ranges`) is ``cap`` on token
pools when the run's static activation ranges come from a range observer
(``fit(activation_reads="range")``: min-max, percentile, GPTQ W4A8, AdaRound with a
min-max activation observer;
:data:`AUTO_RANGES_TOKENS`) and off elsewhere (weight-only and per-token dynamic runs,
learned activation steps, MSE clipping). On SmolLM2-135M's validation windows
(``bench/llm.py --section validate-within``) ``matched + cap`` gave static min-max W8A8
perplexity 32.38 +- 0.08 and W4A8 73.88 +- 0.56 over 5 seeds, against random's 33.70 +-
0.65 and 77.12 +- 2.68 (``matched`` alone: 33.79 +- 1.51, 77.78 +- 4.77, one bad seed;
``median``: 33.40 +- 0.30, 76.63 +- 0.51), every seed below random's mean; SmoothQuant
W8A8 / W4A8 30.27 / 68.84 against 31.78 / 72.05, GPTQ W4A8 56.12 against 61.44 (3 seeds
each; ``matched``'s bad seed 62.25 repaired to 55.40). On MiniLM, never used to choose,
it is level with random (cosines within 1e-4). No run has shown it pay on
image pools, where reading the extremes is not free. Memory: the held members carry their
``2 x sites`` extremes (SmolLM2-135M, 210 sites, ``R = 4096``: ~110 MB).

Defaults and why
----------------
* ``num_clusters=8``: the budgets of interest are 32..1024; with K = 8 a cluster of
  average mass gets 4 seats at n = 32, so rounding moves each cluster's share by at most
  one seat while the pool is still stratified into several modes. K comparable to n
  makes most quotas 0 or 1 (rounding dominates, and the outlier-cluster guard removes
  real modes); K = 1 degenerates to "closest to the pool mean", which collapses the set
  onto one mode. Raise it for large budgets (e.g. 32 for n = 1024).
* ``partition_layer=-1`` (the deepest observed layer: a classifier's penultimate
  features): its clusters are the most semantic (close to classes), so proportional
  quotas keep the set's mix of kinds of inputs; the other layers enter through the
  total KD ranking.
* ``combine="mean"``: each layer's KD is already a channel average, so every layer counts
  equally; ``"max"`` is stricter (a sample is as atypical as its worst layer).

Determinism: all randomness comes from ``seed`` (shuffle order, per-layer k-means
seeding with seeds derived from it); distances are float64; every tie is broken by the
lower index. The same seed, pool and model give bit-identical indices within a process
configuration (same device and thread count; see the BLAS note in ``kmeans.py``).

Data-parallel (``torchrun --nproc-per-node N``)
-----------------------------------------------
Both passes keep the single-process stream: the same batches of ``batch_size`` samples in
the same (shuffled) order. Each batch is split into contiguous shards, one per rank
(:func:`~qcalib.distributed.shard_indices`); every rank forwards only its shard, and the
``[b, sum_l 2 C_l]`` statistic rows are all-gathered in rank order, which restores the
batch's rows in stream order. Everything after the rows (spread estimate, k-means++
seeding and its ``n_init`` refinements, the mini-batch centroid updates, empty-cluster
reseeding, cluster masses, the per-cluster top-k buffers, the stratified random keys)
then runs replicated on every rank on identical inputs, so every rank holds the same
state and selects the same indices as one process with the same seed. Why gather rows
rather than all-reduce per-centroid sums: streaming k-means is order dependent and its
seeding, reseeding and top-k read individual rows, not sums; the rows are the
sufficient statistic of all of them. Sums reduced across ranks would also add in a
different order than ``index_add_`` does in one process, so centroids would only agree
to rounding; gathered rows make them bit-identical. The cost is one all-gather of
``batch_size x sum_l 2 C_l`` float32 values per batch (under 1 MB at batch 128 for ResNet-20)
and the replicated O(B·K·D) distance work, both small next to the forward, which is what
is split. The indices are bit-identical to one process whenever a sample's rows do not
depend on which other samples share its forward (true of eval-mode CNNs / transformers up
to kernels that pick a different algorithm for a different batch size; then rows agree to
float32 rounding and so do the indices, except at exact distance ties). ``batch_size``
must be at least the number of ranks.

Errors (``QCalibError`` with the fix): ``n`` larger than the pool, ``num_clusters`` larger
than the pool, an empty pool, NaN/Inf activations (the layer is named), unknown
parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qcalib.data.pool import Pool
from qcalib.data.tokens import is_token_batch
from qcalib.distributed import (
    all_gather_rows,
    is_distributed,
    is_main,
    require_shards,
    shard_indices,
)
from qcalib.errors import QCalibError
from qcalib.select.base import SELECTORS, Selector
from qcalib.select.budget import ClusterTopK, allocate_quotas
from qcalib.select.distance import METRICS, KnowledgeDistance, combine_layers
from qcalib.select.kmeans import StreamingKMeans
from qcalib.select.ranges import (
    ExtremesSketch,
    match_ranges,
    median_draw_rank,
    range_mismatch,
    set_ranges,
)
from qcalib.select.stats import (
    STATS_KINDS,
    ActivationStatsCollector,
    extremes_key,
    parse_layer_list,
    resolve_layers,
    stat_batches,
)

__all__ = [
    "AUTO_FALLBACK",
    "AUTO_WITHIN",
    "AUTO_RANGES",
    "AUTO_RANGES_TOKENS",
    "AUTO_WITHIN_TOKENS",
    "RANGES_RULES",
    "WITHIN_RULES",
    "SelectQSelector",
    "auto_ranges",
    "auto_within",
]

WITHIN_RULES = ("auto", "nearest", "stratified", "matched")
#: ``ranges``: ``"off"`` keeps the within rule's set; ``"median"`` matches its static
#: min-max ranges to random's median draw (:mod:`qcalib.select.ranges`); ``"cap"`` only
#: brings the sites wider than that draw's back to it.
RANGES_RULES = ("auto", "off", "median", "cap")
#: ``ranges="auto"`` on image / feature pools: off (no validation run has shown matching
#: pay there, and the extremes cost up to half the statistics on thin CNN layers).
AUTO_RANGES = "off"
#: ``ranges="auto"`` on token pools, by what sets the static activation ranges reads
#: (``fit(activation_reads=...)``; others and None: off); see the module notes.
AUTO_RANGES_TOKENS = {"range": "cap"}
#: ``within="auto"``: the ranking rule for each calibrator need (see the module notes).
AUTO_WITHIN = {"range": "nearest", "distribution": "matched", "fit": "matched"}
#: ``within="auto"`` on token pools (language models; see the module notes).
AUTO_WITHIN_TOKENS = {"range": "matched", "distribution": "matched", "fit": "matched"}
#: ``within="auto"`` when the calibrator's need is not known.
AUTO_FALLBACK = "matched"

log = logging.getLogger(__name__)


def _int_param(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise QCalibError(f"selectq: {name} must be an integer >= {lo}, got {value!r}")
    return value


def _float_param(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QCalibError(f"selectq: {name} must be a number, got {value!r}")
    return float(value)


def derived_seed(seed: int, i: int) -> int:
    """A per-layer seed from the selector's seed (deterministic, distinct per layer)."""
    return (int(seed) * 1_000_003 + 7919 * (i + 1)) % (2**63)


def cluster_sample_size(n: int) -> int:
    """``R``: members kept per cluster by the sampled rules (stratified, matched)."""
    return max(16 * n, 4096)


def herd(features: Tensor, q: int) -> Tensor:
    """Positions of ``q`` rows of ``features`` ``[L, D]`` whose mean and spread match all rows'.

    Each column is standardised to ``z`` (mean 0, std 1 over the rows; a constant column
    becomes 0), and the rows are taken greedily so that the running mean of
    ``phi = [z, z^2 - 1]`` stays closest to 0, its value over all rows: at each step the
    row minimizing ``|S + phi_i|^2`` (``S`` the sum over the rows taken), i.e. kernel
    herding with a linear kernel on ``phi``. Ties go to the lowest position.
    """
    f = features.to(torch.float64)
    if q > f.shape[0]:
        raise ValueError(f"cannot take {q} of {f.shape[0]} rows")
    sd = f.std(0, correction=0)
    z = torch.where(sd > 0, (f - f.mean(0)) / sd.clamp_min(1e-300), torch.zeros_like(f))
    phi = torch.cat([z, z.square() - 1.0], 1)
    norms = phi.square().sum(1)
    total = torch.zeros(phi.shape[1], dtype=torch.float64)
    taken = torch.zeros(phi.shape[0], dtype=torch.bool)
    out = []
    for _ in range(q):
        cost = (2.0 * phi @ total + norms).masked_fill(taken, float("inf"))
        j = int(torch.argmin(cost))
        out.append(j)
        taken[j] = True
        total += phi[j]
    return torch.tensor(out, dtype=torch.int64)


def auto_within(calibrator_reads: str | None, token_pool: bool) -> str:
    """``within="auto"``'s rule for a calibrator need (None: unknown) on an image / feature
    pool (:data:`AUTO_WITHIN`) or a token pool (:data:`AUTO_WITHIN_TOKENS`)."""
    table = AUTO_WITHIN_TOKENS if token_pool else AUTO_WITHIN
    return table.get(calibrator_reads or "", AUTO_FALLBACK)


def auto_ranges(activation_reads: str | None, token_pool: bool) -> str:
    """``ranges="auto"``'s rule for what sets the run's static activation ranges reads
    (None: no range calibrated, or unknown): :data:`AUTO_RANGES` on an image / feature
    pool, :data:`AUTO_RANGES_TOKENS` (else off) on a token pool."""
    if not token_pool:
        return AUTO_RANGES
    return AUTO_RANGES_TOKENS.get(activation_reads or "", "off")


@SELECTORS.register("selectq")
class SelectQSelector(Selector):
    """SelectQ calibration-set selection (see the module notes for the method).

    Parameters
    ----------
    seed:
        Seed of the stream order and of the k-means seeding.
    num_clusters:
        ``K``, clusters per layer (default 8, see the notes).
    metric:
        Knowledge Distance: ``"w2"`` (default), ``"kl"`` or ``"cosine"``.
    combine:
        Total KD over layers: ``"mean"`` (default), ``"max"``, or layers (names / indices
        among the observed layers, list or comma-separated string) to average.
    layers:
        Layers observed (default all quantized layers): names, indices in execution
        order, or a comma-separated string of either.
    batch_size:
        Pool batch size of both passes.
    stats:
        ``"mean_std"`` (default) or ``"mean"`` (per-channel means only).
    partition_layer:
        The layer whose clusters split the budget: an index among the observed layers
        (default -1, the deepest) or a name.
    init_size:
        Rows buffered to estimate the frozen pool spread and seed k-means (default 256).
    min_cluster_share:
        Clusters whose proportional share is below this many seats get none (default 1;
        0 gives plain largest-remainder quotas).
    shuffle:
        Stream pass 1 in a seeded random order (default True).
    decay:
        Forgetting factor of the streaming k-means counts (default 1: running means).
    n_init:
        k-means++ seedings tried on the init buffer (default 3).
    within:
        Ranking inside a cluster: ``"auto"`` (default: by the calibrator's need, see the
        notes), ``"nearest"`` (smallest KD first), ``"stratified"`` (evenly spaced KD
        ranks after trimming) or ``"matched"`` (greedy moment matching after trimming).
    trim:
        ``within="stratified"`` / ``"matched"``: fraction of each cluster's highest-KD
        members left out (default 0.05).
    match_dims:
        ``within="matched"``: random projections of each layer's statistics matched
        besides its KD (default 4; 0 matches the per-layer KDs only).
    ranges:
        ``"off"``, ``"median"`` (swap members inside their clusters until the set's static
        min-max ranges are closest to random's median draw), ``"cap"`` (swap only until
        no site is wider than that draw's) or ``"auto"`` (default: :func:`auto_ranges`,
        ``cap`` for range calibrators on token pools, else off); see the module notes,
        "Range matching".
    device:
        Where the forwards run (default: the model's device).
    """

    needs_model = True

    def __init__(
        self,
        seed: int = 0,
        num_clusters: int = 8,
        metric: str = "w2",
        combine: Any = "mean",
        layers: Any = None,
        batch_size: int = 128,
        stats: str = "mean_std",
        partition_layer: int | str = -1,
        init_size: int = 256,
        min_cluster_share: float = 1.0,
        shuffle: bool = True,
        decay: float = 1.0,
        n_init: int = 3,
        within: str = "auto",
        trim: float = 0.05,
        match_dims: int = 4,
        ranges: str = "auto",
        device: str | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self.num_clusters = _int_param("num_clusters", num_clusters, 1)
        self.batch_size = _int_param("batch_size", batch_size, 1)
        self.init_size = _int_param("init_size", init_size, 2)
        self.n_init = _int_param("n_init", n_init, 1)
        METRICS.get(metric)  # QCalibError listing the metrics
        if stats not in STATS_KINDS:
            raise QCalibError(
                f"selectq: stats must be one of {', '.join(STATS_KINDS)}, got {stats!r}"
            )
        if metric == "kl" and stats == "mean":
            raise QCalibError(
                "selectq: metric='kl' compares Gaussians and needs the sigmas; use "
                "stats='mean_std' or metric='w2'"
            )
        if isinstance(combine, str) and combine in ("mean", "max"):
            self.combine: Any = combine
        else:
            self.combine = parse_layer_list(combine)
            if self.combine is None:
                self.combine = "mean"
        self.metric = metric
        self.layers = layers
        parse_layer_list(layers)  # early syntax check
        self.stats = stats
        if isinstance(partition_layer, bool) or not isinstance(partition_layer, (int, str)):
            raise QCalibError(
                f"selectq: partition_layer must be a layer index or name, got {partition_layer!r}"
            )
        self.partition_layer = partition_layer
        if not _float_param("min_cluster_share", min_cluster_share) >= 0:
            raise QCalibError(f"selectq: min_cluster_share must be >= 0, got {min_cluster_share!r}")
        self.min_cluster_share = float(min_cluster_share)
        if not isinstance(shuffle, bool):
            raise QCalibError(f"selectq: shuffle must be true or false, got {shuffle!r}")
        self.shuffle = shuffle
        if not 0.0 < _float_param("decay", decay) <= 1.0:
            raise QCalibError(f"selectq: decay must be in (0, 1], got {decay!r}")
        self.decay = float(decay)
        if within not in WITHIN_RULES:
            raise QCalibError(
                f"selectq: within must be one of {', '.join(WITHIN_RULES)}, got {within!r}"
            )
        self.within = within
        if ranges not in RANGES_RULES:
            raise QCalibError(
                f"selectq: ranges must be one of {', '.join(RANGES_RULES)}, got {ranges!r}"
            )
        self.ranges = ranges
        self.match_dims = _int_param("match_dims", match_dims, 0)
        if not 0.0 <= _float_param("trim", trim) < 1.0:
            raise QCalibError(f"selectq: trim must be in [0, 1), got {trim!r}")
        self.trim = float(trim)
        self.device = device
        # Fitted state (O(K·C) per layer); set by fit().
        self.sites_: list[str] | None = None
        self.active_sites_: list[str] | None = None
        self.skipped_layers_: list[str] = []
        self.partition_site_: str | None = None
        self.kmeans_: dict[str, StreamingKMeans] = {}
        self.kd_: dict[str, KnowledgeDistance] = {}
        self.init_rows_ = 0
        self._combine_idx: str | list[int] = "mean"
        self.selection_: dict[str, Any] | None = None
        self._pool: Pool | None = None
        self._collector: ActivationStatsCollector | None = None
        self._projections: dict[str, Tensor] = {}
        self.token_pool_ = False

    def resolved_within(self) -> str:
        """The ranking rule ``select`` uses: ``within``, or ``auto``'s choice for the
        calibrator need given to ``fit`` and the pool's kind (:func:`auto_within`)."""
        if self.within != "auto":
            return self.within
        return auto_within(self.calibrator_reads_, self.token_pool_)

    def resolved_ranges(self) -> str:
        """The range rule ``select`` applies: ``ranges``, or ``auto``'s choice for the
        calibrator need given to ``fit`` and the pool's kind (:func:`auto_ranges`)."""
        if self.ranges != "auto":
            return self.ranges
        return auto_ranges(self.activation_reads_, self.token_pool_)

    # ------------------------------------------------------------------ streams
    def _stat_batches(
        self,
        pool: Pool,
        collector: ActivationStatsCollector,
        order: Tensor | None = None,
        desc: str = "pool",
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """``(indices, {site: rows})`` per batch of ``batch_size`` samples, in ``order``.

        Under ``torchrun`` each batch is split over the ranks (contiguous shards), every
        rank forwards its shard and the rows are all-gathered in rank order, so every rank
        yields the very batches, rows and order of the single-process stream (see the
        module notes, "Data-parallel").
        """
        if not is_distributed():
            batches = stat_batches(pool, collector, self.batch_size, order, self.row_cache)
            total = len(pool) if order is None else len(order)
            yield from tqdm(batches, total=-(-total // self.batch_size), leave=False,
                            desc=f"{type(self).__name__}: {desc}",
                            disable=not self.progress)  # fmt: skip
            return
        require_shards(
            min(self.batch_size, len(pool)), "selectq batch", "--selector-param batch_size=N"
        )
        stream = torch.arange(len(pool)) if order is None else order
        widths: list[tuple[str, int]] | None = None
        chunks = torch.split(stream, self.batch_size)
        for idx in tqdm(chunks, desc=f"{type(self).__name__}: {desc}", leave=False,
                        disable=not (self.progress and is_main())):  # fmt: skip
            mine = shard_indices(idx.numel())
            if len(mine):
                rows = collector(pool.get(idx[mine.start : mine.stop]))
                if widths is None:
                    widths = [(site, r.shape[1]) for site, r in rows.items()]
                flat = torch.cat(list(rows.values()), 1)
            else:  # a last batch shorter than the world leaves this rank nothing
                assert widths is not None
                flat = torch.empty(0, sum(w for _, w in widths))
            full = all_gather_rows(flat)
            parts = torch.split(full, [w for _, w in widths], 1)
            yield idx, {site: p.contiguous() for (site, _), p in zip(widths, parts, strict=True)}

    # ------------------------------------------------------------------ pass 1
    def _fit(self, pool: Pool, model: nn.Module | None) -> None:
        assert model is not None
        n_pool = len(pool)
        self.token_pool_ = is_token_batch(pool.example())  # fit() refused an empty pool
        k = self.num_clusters
        if k > n_pool:
            raise QCalibError(
                f"num_clusters={k} exceeds the pool size {n_pool}; lower it with "
                f"--selector-param num_clusters=N (N <= {n_pool}) or use a larger --data pool"
            )
        if n_pool < 2:
            raise QCalibError(
                f"selectq needs at least 2 samples in the pool to measure its spread, got "
                f"{n_pool}; use a larger --data pool"
            )
        self.kmeans_, self.kd_, self.skipped_layers_ = {}, {}, []
        self.selection_, self._projections = None, {}
        # The extremes cost up to half the statistics on thin CNN layers (the selection
        # pass has a cost bound): read only when range matching will use them.
        collector = ActivationStatsCollector(
            model, self.layers, self.stats, self.device, extremes=self.resolved_ranges() != "off"
        )
        order = None
        if self.shuffle:
            order = torch.randperm(n_pool, generator=torch.Generator().manual_seed(self.seed))
        init_rows = max(self.init_size, k)
        buffer: dict[str, list[Tensor]] | None = {}
        n_buf = 0
        seeded = False
        for _, rows in self._stat_batches(pool, collector, order, desc="cluster pass"):
            if not seeded:
                assert buffer is not None
                for s, r in rows.items():
                    buffer.setdefault(s, []).append(r)
                n_buf += next(iter(rows.values())).shape[0]
                if n_buf >= init_rows:
                    self._init_layers(collector.sites or [], buffer, n_buf)
                    buffer, seeded = None, True
                continue
            for s in self.active_sites_ or ():
                self.kmeans_[s].partial_fit(rows[s])
        if not seeded:
            assert buffer is not None
            self._init_layers(collector.sites or [], buffer, n_buf)
            buffer = None
        for km in self.kmeans_.values():
            km.finalize()
        collector.tap.sites = list(self.active_sites_ or ())  # pass 2 skips constant layers
        self._collector = collector
        self._pool = pool
        self.partition_site_ = self._resolve_partition()
        self._combine_idx = self._resolve_combine()
        log.info(
            "selectq: clustered %d samples over %d layers (K=%d, spread from %d rows)",
            n_pool, len(self.active_sites_ or ()), k, self.init_rows_,
        )  # fmt: skip

    def _init_layers(self, sites: list[str], buffer: dict[str, list[Tensor]], n_buf: int) -> None:
        self.sites_ = list(sites)
        self.init_rows_ = n_buf
        active = []
        for i, s in enumerate(sites):
            x = torch.cat(buffer.pop(s), 0)
            kd = KnowledgeDistance(self.metric, layer=s).fit_scale([x])
            w = kd.feature_weights()
            if not bool((w > 0).any()):
                self.skipped_layers_.append(s)
                log.info("selectq: layer %s has constant statistics; left out", s)
                continue
            km = StreamingKMeans(
                self.num_clusters,
                seed=derived_seed(self.seed, i),
                decay=self.decay,
                feature_weights=w,
                n_init=self.n_init,
                name=s,
            )
            km.partial_fit(x)  # seeds on the whole buffer, then its first update
            self.kmeans_[s], self.kd_[s] = km, kd
            active.append(s)
        if not active:
            raise QCalibError(
                f"every observed layer has constant activation statistics over the first "
                f"{n_buf} samples; the pool looks degenerate (identical inputs?) or the "
                "layers chosen with layers=... carry no information"
            )
        self.active_sites_ = active

    def _resolve_partition(self) -> str:
        assert self.sites_ is not None and self.active_sites_ is not None
        default = self.partition_layer == -1
        hits = resolve_layers(self.sites_, [self.partition_layer], "partition_layer")
        if len(hits) != 1:
            raise QCalibError(
                f"partition_layer {self.partition_layer!r} names {len(hits)} call sites "
                f"({', '.join(hits)}); name one of them"
            )
        site = hits[0]
        if site in self.active_sites_:
            return site
        if default:
            return self.active_sites_[-1]
        raise QCalibError(
            f"partition_layer {site!r} has constant statistics over the pool and cannot "
            f"split it; choose another, e.g. {self.active_sites_[-1]!r}"
        )

    def _resolve_combine(self) -> str | list[int]:
        if isinstance(self.combine, str):
            return self.combine
        active = self.active_sites_ or []
        chosen = resolve_layers(active, self.combine, "combine")
        return [active.index(s) for s in chosen]

    # ------------------------------------------------------------------ pass 2
    def _select(self, n: int) -> Tensor:
        assert self._pool is not None and self._collector is not None
        active = self.active_sites_ or []
        part = self.partition_site_
        within = self.resolved_within()
        ranges = self.resolved_ranges()
        sampled = within in ("stratified", "matched")
        top = ClusterTopK(self.num_clusters, cluster_sample_size(n) if sampled else n)
        gen = torch.Generator().manual_seed(derived_seed(self.seed, -1))
        with_ext = self._collector.extremes  # fit read them iff range matching is on
        if ranges != "off" and not with_ext:
            raise QCalibError(
                f"selectq: ranges={ranges!r} needs the extremes that fit did not read (the "
                "rule changed after fit); call fit again"
            )
        sketch = ExtremesSketch(median_draw_rank(len(self._pool), n)) if with_ext else None
        for idx, rows in self._stat_batches(self._pool, self._collector, desc="ranking pass"):
            per_layer, labels = [], None
            for s in active:
                lab, d = self.kd_[s].nearest(rows[s], self.kmeans_[s].cluster_centers_)
                per_layer.append(d)
                if s == part:
                    labels = lab
            total = combine_layers(torch.stack(per_layer, 1), self._combine_idx)
            assert labels is not None
            values = total[:, None].to(torch.float64)
            if within == "matched":
                values = torch.cat([values, self._match_features(rows, per_layer)], 1)
            if sketch is not None:
                # The extremes ride along as the last 2S columns: range matching and the
                # set's range mismatch read them for the held members only.
                ext = torch.stack([rows[extremes_key(s)] for s in active], 1)  # [B, S, 2]
                sketch.push(ext)
                values = torch.cat([values, ext.flatten(1).to(torch.float64)], 1)
            if sampled:  # a uniform sample of each cluster, carrying the KD along
                keys = torch.rand(idx.numel(), generator=gen, dtype=torch.float64)
                top.push(labels, keys, idx, values=values)
            else:
                top.push(labels, total, idx, values=values)
        n_ext = 2 * len(active) if sketch is not None else 0
        masses = top.counts.clone()
        quotas = allocate_quotas(masses, n, self.min_cluster_share)
        cands: list[tuple[Tensor, Tensor]] = []  # per cluster: (pool indices, values)
        picks: list[Tensor] = []  # per cluster: positions of the members in cands
        for c, q in enumerate(quotas):
            if not q:
                continue
            ii, vals, keep = self._candidates(top, c, q, within)
            if within == "stratified":
                pos = self._stratified(q, keep)
            elif within == "matched":
                pos = herd(vals[:keep, 1 : vals.shape[1] - n_ext], q)
            else:
                pos = torch.arange(q)
            cands.append((ii, vals))
            picks.append(pos)
        before = after = None
        swaps = 0
        if sketch is not None:
            extremes = [v[:, -n_ext:].reshape(-1, len(active), 2) for _, v in cands]
            ref_lo, ref_hi = sketch.reference(n)

            def mismatch() -> float:
                members = torch.cat([e[p] for e, p in zip(extremes, picks, strict=True)])
                return round(range_mismatch(*set_ranges(members), ref_lo, ref_hi), 6)

            before = mismatch()
            if ranges in ("median", "cap"):
                picks, swaps = match_ranges(
                    picks, extremes, ref_lo, ref_hi, excess_only=ranges == "cap"
                )
            after = mismatch()
        idx = torch.cat([ii[p] for (ii, _), p in zip(cands, picks, strict=True)])
        kd = torch.cat([v[p, 0] for (_, v), p in zip(cands, picks, strict=True)])
        self.selection_ = {
            "masses": masses.tolist(),
            "quotas": quotas,
            "heap_capacity": top.num_groups * top.k,
            "peak_heap_entries": top.peak_held,
            "within": within,
            "ranges": ranges,
            "calibrator_reads": self.calibrator_reads_,
            "activation_reads": self.activation_reads_,
            "token_pool": self.token_pool_,
            "max_selected_kd": float(kd.max()),
            # Mean |log| ratio of the set's static min-max widths to random's median draw
            # (qcalib.select.ranges), before and after range matching, and its swaps;
            # None when the extremes were not read (ranges off).
            "range_mismatch_within": before,
            "range_mismatch": after,
            "range_swaps": swaps,
        }
        return idx

    def _candidates(
        self, top: ClusterTopK, c: int, q: int, within: str
    ) -> tuple[Tensor, Tensor, int]:
        """Cluster ``c``'s members, ``(pool indices, values, keep)``: the rule picks among
        the first ``keep``; range matching may also swap in the rest. ``nearest``: the
        ``q`` smallest KDs; ``stratified``: the held sample by (KD, index), the ``trim``
        tail last; ``matched``: the kept members in index order (the herding's argmin
        ties then go to the lower index), then the tail."""
        _, ii, vals = top.held_entries(c)
        if within == "nearest":
            return ii[:q], vals[:q], q
        o = torch.argsort(ii, stable=True)
        ii, vals = ii[o], vals[o]
        o = torch.argsort(vals[:, 0], stable=True)  # by (KD, index): the tail goes last
        n_held = ii.numel()
        keep = max(q, n_held - int(round(n_held * self.trim)))
        if within == "matched":
            o = torch.cat([o[:keep].sort().values, o[keep:]])
        return ii[o], vals[o], keep

    @staticmethod
    def _stratified(q: int, keep: int) -> Tensor:
        """``q`` evenly spaced ranks of ``keep`` members ordered by KD."""
        return ((torch.arange(q, dtype=torch.float64) + 0.5) * (keep / q)).floor().long()

    def _match_features(self, rows: dict[str, Tensor], per_layer: list[Tensor]) -> Tensor:
        """``within="matched"``'s feature row per sample: per layer its KD, then
        ``match_dims`` fixed seeded projections of its spread-normalised statistics."""
        cols = []
        for i, (s, d) in enumerate(zip(self.active_sites_ or [], per_layer, strict=True)):
            cols.append(d.to(torch.float64)[:, None])
            if not self.match_dims:
                continue
            r = rows[s].to("cpu", torch.float64)
            if s not in self._projections:
                g = torch.Generator().manual_seed(derived_seed(self.seed, 10_000 + i))
                p = torch.randn(r.shape[1], self.match_dims, generator=g, dtype=torch.float64)
                w = self.kd_[s].feature_weights().to(torch.float64).cpu().sqrt()
                self._projections[s] = w[:, None] * p / r.shape[1] ** 0.5
            cols.append(r @ self._projections[s])
        return torch.cat(cols, 1)

    def knowledge_distances(self, indices: Any = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(indices, total KD [M], partition cluster [M])`` of pool samples (all by default).

        For inspection and tests (holds O(M) values); selection never calls it.
        """
        if self._pool is None or self._collector is None:
            raise RuntimeError("call fit(pool, model=...) first")
        active = self.active_sites_ or []
        out_i, out_d, out_c = [], [], []
        for idx, x in self._pass(self._pool, self.batch_size, indices, desc="distances"):
            rows = self._collector(x)
            per_layer = []
            for s in active:
                lab, d = self.kd_[s].nearest(rows[s], self.kmeans_[s].cluster_centers_)
                per_layer.append(d)
                if s == self.partition_site_:
                    out_c.append(lab)
            out_d.append(combine_layers(torch.stack(per_layer, 1), self._combine_idx))
            out_i.append(idx)
        return torch.cat(out_i), torch.cat(out_d), torch.cat(out_c)
