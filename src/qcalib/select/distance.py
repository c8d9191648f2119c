"""Knowledge Distance: how far a sample's activation statistics are from a centroid's.

Statistics layout
-----------------
For one layer with ``C`` channels, a sample's *statistics row* is the concatenation
``[mu_1, ..., mu_C, sigma_1, ..., sigma_C]`` (width ``2C``): per-channel mean and standard
deviation of the activation over spatial positions (or tokens). Blocks rather than
interleaving so that ``split_stats`` is two slices and a centroid of rows (a k-means mean)
has the same layout. :func:`activation_stats` computes the rows from an activation;
:func:`split_stats` / :func:`join_stats` convert between the row and ``(mu, sigma)``.

Metrics (design.md §3; ``metric=`` switches, new ones register in :data:`METRICS`)
-----------------------------------------------------------------------------------
Per channel the sample is treated as ``N(mu, sigma^2)`` and the centroid as
``N(mu_c, sigma_c^2)``.

* ``"w2"`` (default): squared 2-Wasserstein distance between the two Gaussians,
  ``(mu - mu_c)^2 + (sigma - sigma_c)^2``, with each term divided by the *pool spread*
  (std across samples) of that statistic, averaged over channels ``j``::

      d = 1/C * sum_j [ (mu_j - mu_c,j)^2 / s_mu,j^2 + (sigma_j - sigma_c,j)^2 / s_sigma,j^2 ]

  Why normalise: raw activations differ by orders of magnitude across channels and
  between means and stds; unnormalised, a handful of large channels would decide every
  distance. Dividing by the pool spread makes "one typical deviation" cost 1 in every
  statistic. Equivalently, with ``z = stats * sqrt(w)``, ``w = feature_weights()``
  (``1 / spread^2``), ``d = |z - z_c|^2 / C``: clustering the normalised rows with plain
  squared Euclidean k-means (or the raw rows with ``StreamingKMeans(feature_weights=w)``)
  minimises exactly this distance, so clustering and selection agree. The ``[B, K]``
  matrix uses the same fast matrix-product path as ``StreamingKMeans`` (``exact=True``
  forms every difference instead); :meth:`KnowledgeDistance.nearest` recomputes the
  distance to the chosen centroid exactly.
* ``"kl"``: ``KL(N(mu, sigma^2) || N(mu_c, sigma_c^2))`` per channel, averaged, sigmas
  floored at ``eps``. KL is invariant to a per-channel rescaling, so it needs no pool
  spread. Caveat: it explodes for (near-)deterministic channels, e.g. the input of a
  linear layer after global pooling, where ``sigma = 0``; W2 is well defined there.
* ``"cosine"``: ``1 - cos`` between the spread-normalised stacked statistics ``z`` and
  ``z_c`` (not centred; in ``[0, 2]``). It ignores the overall magnitude of a sample's
  statistics. Caveat: post-ReLU inputs have all means positive, so the vectors share an
  orthant and distances are compressed towards 0.

Constant statistics: a statistic whose pool spread is ``<= eps`` takes the same value on
the whole pool; it carries no information about where a sample lies, and dividing by a
zero spread would turn rounding noise into huge distances. Its weight is 0 (it is also
0 in the normalised space); the channel average still divides by ``C``.

Pool spread is accumulated in a streaming way (:class:`RunningMoments`, Chan et al.'s
parallel update in float64) so the pool's statistics are never held whole. It uses the
sample standard deviation (``correction=1``, as ``torch.std``).

A sample's total distance over layers is :meth:`KnowledgeDistance.combine` of its
per-layer distances to the nearest centroid: the mean (default), the max (a sample is as
atypical as its most atypical layer), or the mean over a chosen subset of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from qcalib.errors import QCalibError
from qcalib.registry import Registry
from qcalib.select.kmeans import check_finite, pairwise_sq_dists, rowwise_sq_dists

__all__ = [
    "METRICS",
    "KnowledgeDistance",
    "RunningMoments",
    "activation_stats",
    "combine_layers",
    "join_stats",
    "split_stats",
]

# Largest number of elements of one [B, k, C] block in the KL computation.
_MAX_BLOCK_ELEMS = 1 << 22


def split_stats(stats: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., 2C]`` statistics -> ``(mu [..., C], sigma [..., C])`` (views, no copy)."""
    width = stats.shape[-1]
    if width % 2:
        raise ValueError(
            f"a statistics row is [mu_1..mu_C, sigma_1..sigma_C] and has even width, got {width}"
        )
    c = width // 2
    return stats[..., :c], stats[..., c:]


def join_stats(mu: Tensor, sigma: Tensor) -> Tensor:
    """``(mu [..., C], sigma [..., C])`` -> ``[..., 2C]`` statistics rows."""
    if mu.shape != sigma.shape:
        raise ValueError(f"mu and sigma shapes differ: {tuple(mu.shape)} vs {tuple(sigma.shape)}")
    return torch.cat([mu, sigma], dim=-1)


def activation_stats(x: Tensor, channel_dim: int = 1) -> Tensor:
    """Per-sample per-channel mean and std of an activation, as ``[B, 2C]`` rows.

    ``x`` is ``[B, C, *spatial]`` (conv, ``channel_dim=1``) or ``[B, *tokens, C]``
    (transformer, ``channel_dim=-1``); every dimension but the batch and channel ones is
    reduced. The std is the population std (``correction=0``): it describes the
    activation of this one sample, and is 0 rather than NaN for a single position (a
    ``[B, C]`` linear-layer input). Computed in at least float32 with ``torch.var_mean``
    (two-pass, no ``E[x^2] - E[x]^2`` cancellation).
    """
    if x.dim() < 2:
        raise ValueError(f"expected an activation [B, C, ...], got shape {tuple(x.shape)}")
    channel_dim = channel_dim % x.dim()
    if channel_dim == 0:
        raise ValueError("channel_dim cannot be the batch dimension 0")
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x.movedim(channel_dim, 1)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    var, mu = torch.var_mean(x, dim=2, correction=0)
    return join_stats(mu, var.sqrt())


class RunningMoments:
    """Streaming per-column count, mean and variance in float64 (Chan et al. 1979).

    Each batch's mean and centred sum of squares are computed exactly and merged with
    ``M2 = M2_a + M2_b + delta^2 * n_a n_b / n``; unlike running ``sum(x^2)`` this does
    not cancel when the mean is large relative to the spread. Memory is O(D).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self._m2: Tensor | None = None

    def update(self, x: Tensor) -> RunningMoments:
        """Merge a batch ``[B, D]`` of rows."""
        if x.dim() != 2:
            raise ValueError(f"expected rows [B, D], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.detach().to("cpu", torch.float64)
        if self.mean is not None and x.shape[1] != self.mean.numel():
            raise ValueError(f"expected rows of width {self.mean.numel()}, got {x.shape[1]}")
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square_().sum(0)
        if self.mean is None:
            self.count, self.mean, self._m2 = n_b, mean_b, m2_b
            return self
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n
        return self

    def var(self, correction: int = 1) -> Tensor:
        """Per-column variance with ``correction`` (1 = sample variance, as ``torch.var``)."""
        if self._m2 is None or self.count - correction <= 0:
            raise ValueError(f"need more than {correction} row(s), got {self.count}")
        return self._m2 / (self.count - correction)

    def std(self, correction: int = 1) -> Tensor:
        """Per-column standard deviation (``correction=1`` matches ``torch.std``)."""
        return self.var(correction).sqrt()


# A metric maps (kd, stats [B, 2C] float64, centroids [K, 2C] float64) -> [B, K].
METRICS: Registry[Callable[[KnowledgeDistance, Tensor, Tensor], Tensor]] = Registry(
    "knowledge-distance metric"
)


@METRICS.register("w2")
def _w2(kd: KnowledgeDistance, stats: Tensor, centroids: Tensor) -> Tensor:
    w = kd._weights()
    return pairwise_sq_dists(stats, centroids, w, exact=kd.exact) / kd.n_channels


@METRICS.register("kl")
def _kl(kd: KnowledgeDistance, stats: Tensor, centroids: Tensor) -> Tensor:
    mu, sig = split_stats(stats)
    mu_c, sig_c = split_stats(centroids)
    sig = sig.clamp_min(kd.eps)
    var_c = sig_c.clamp_min(kd.eps).square()
    log_sig = sig.log()
    log_var_c = var_c.log()
    b, c = mu.shape
    k = mu_c.shape[0]
    out = torch.empty(b, k, dtype=stats.dtype)
    step = max(1, _MAX_BLOCK_ELEMS // max(1, b * c))
    for k0 in range(0, k, step):
        sl = slice(k0, k0 + step)
        # log(sig_c / sig) + (sig^2 + (mu - mu_c)^2) / (2 sig_c^2) - 1/2
        num = (mu[:, None, :] - mu_c[None, sl, :]).square_()
        num += sig.square()[:, None, :]
        num /= 2 * var_c[None, sl, :]
        num += 0.5 * log_var_c[None, sl, :]
        num -= log_sig[:, None, :]
        num -= 0.5
        out[:, sl] = num.mean(-1)
    return out.clamp_min_(0.0)


@METRICS.register("cosine")
def _cosine(kd: KnowledgeDistance, stats: Tensor, centroids: Tensor) -> Tensor:
    z = kd.normalize(stats)
    zc = kd.normalize(centroids)
    # Row-normalise first, then one matmul: |z_i| |zc_j| is never formed as a product.
    z = z / z.norm(dim=1, keepdim=True).clamp_min(kd.eps)
    zc = zc / zc.norm(dim=1, keepdim=True).clamp_min(kd.eps)
    return (1.0 - z @ zc.T).clamp_(0.0, 2.0)


class KnowledgeDistance:
    """Knowledge Distance between statistics rows and centroids of one layer.

    Parameters
    ----------
    metric:
        ``"w2"`` (default), ``"kl"`` or ``"cosine"`` (any name in :data:`METRICS`).
    eps:
        Floor of sigma in KL and of vector norms in cosine; statistics whose pool spread
        is ``<= eps`` are treated as constant over the pool (weight 0).
    exact:
        ``w2`` only: form every difference instead of one matrix product (slower; the
        default's error is ~1e-16 relative to the squared norms of the centred rows).
    layer:
        Optional layer name, used in error messages.

    ``w2`` and ``cosine`` need the pool spread: :meth:`fit_scale` (streamed) or
    :meth:`set_scale` (given). Distances are computed and returned in float64.
    """

    def __init__(
        self, metric: str = "w2", eps: float = 1e-8, layer: str | None = None, exact: bool = False
    ) -> None:
        self._metric_fn = METRICS.get(metric)  # QCalibError listing the choices
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.metric = metric
        self.eps = float(eps)
        self.layer = layer
        self.exact = bool(exact)
        self.mu_spread_: Tensor | None = None
        self.sigma_spread_: Tensor | None = None
        self.pool_mean_: Tensor | None = None  # [2C], known only after fit_scale
        self._moments: RunningMoments | None = None
        # SelectQ's ranking pass asks for the weights and the same checked centroids once
        # per layer and batch: kept with the tensors they were computed from.
        self._weights_of: tuple[Tensor, Tensor, Tensor] | None = None
        self._centroids_of: tuple[Tensor, int, Tensor] | None = None

    def __repr__(self) -> str:
        return f"KnowledgeDistance(metric={self.metric!r}, eps={self.eps}, layer={self.layer!r})"

    # ------------------------------------------------------------------ scale
    @property
    def n_channels(self) -> int | None:
        """``C`` of the fitted scale (None before fitting)."""
        return None if self.mu_spread_ is None else self.mu_spread_.numel()

    def partial_fit_scale(self, stats: Tensor) -> KnowledgeDistance:
        """Merge one batch of statistics rows ``[B, 2C]`` into the running pool spread."""
        self._check_stats(stats, "statistics", check_width=False)
        if self._moments is None:
            self._moments = RunningMoments()
        self._moments.update(stats)
        if self._moments.count >= 2:
            spread = self._moments.std(correction=1)
            self.mu_spread_, self.sigma_spread_ = split_stats(spread)
            self.pool_mean_ = self._moments.mean
        return self

    def fit_scale(self, stats_stream: Iterable[Tensor]) -> KnowledgeDistance:
        """Set the pool spread from a stream of ``[B, 2C]`` batches (starts afresh)."""
        self._moments = None
        self.mu_spread_ = self.sigma_spread_ = self.pool_mean_ = None
        for stats in stats_stream:
            self.partial_fit_scale(stats)
        if self.mu_spread_ is None:
            where = f" of layer {self.layer!r}" if self.layer is not None else ""
            n = 0 if self._moments is None else self._moments.count
            raise QCalibError(
                f"the pool spread{where} needs at least 2 samples, got {n}; "
                "enlarge the candidate pool"
            )
        return self

    def set_scale(self, mu_spread: Tensor, sigma_spread: Tensor) -> KnowledgeDistance:
        """Set the pool spread directly: ``[C]`` stds of the means and of the stds."""
        mu_spread = torch.as_tensor(mu_spread).detach().to("cpu", torch.float64).flatten()
        sigma_spread = torch.as_tensor(sigma_spread).detach().to("cpu", torch.float64).flatten()
        if mu_spread.shape != sigma_spread.shape:
            raise ValueError(
                f"mu_spread and sigma_spread differ in size: {mu_spread.numel()} vs "
                f"{sigma_spread.numel()}"
            )
        for name, s in (("mu_spread", mu_spread), ("sigma_spread", sigma_spread)):
            check_finite(s, name, self.layer)
            if bool((s < 0).any()):
                raise ValueError(f"{name} must be non-negative")
        self.mu_spread_, self.sigma_spread_ = mu_spread, sigma_spread
        self.pool_mean_ = None
        self._moments = None
        return self

    def _require_scale(self) -> tuple[Tensor, Tensor]:
        if self.mu_spread_ is None:
            raise RuntimeError(
                f"metric {self.metric!r} needs the pool spread: call fit_scale() or set_scale()"
            )
        return self.mu_spread_, self.sigma_spread_

    def feature_weights(self) -> Tensor:
        """``[2C]`` float64 weights ``1 / spread^2`` (0 for constant statistics).

        Pass to ``StreamingKMeans(feature_weights=...)`` to cluster raw statistics rows in
        the metric of ``w2``: its squared distance / C is exactly the W2 distance.
        """
        return self._weights().clone()

    def _weights(self) -> Tensor:
        """:meth:`feature_weights` itself, computed once per scale (callers only read it)."""
        mu_spread, sigma_spread = self._require_scale()
        cached = self._weights_of
        if cached is not None and cached[0] is mu_spread and cached[1] is sigma_spread:
            return cached[2]
        spread = join_stats(mu_spread, sigma_spread)
        live = spread > self.eps
        w = torch.zeros_like(spread)
        w[live] = spread[live].square().reciprocal()
        self._weights_of = (mu_spread, sigma_spread, w)
        return w

    def normalize(self, stats: Tensor) -> Tensor:
        """Rows in the normalised space ``z = stats / spread`` (constant statistics -> 0)."""
        stats = self._check_stats(stats, "statistics")
        return stats * self._weights().sqrt()

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`normalize` on live statistics.

        Constant statistics cannot be recovered from ``z``; they are set to the pool mean
        when the scale came from :meth:`fit_scale`, else to 0. For ``w2``/``cosine`` their
        value does not matter (weight 0); for ``kl`` prefer clustering raw rows with
        ``feature_weights`` instead.
        """
        z = self._check_stats(z, "normalised statistics")
        spread = join_stats(*self._require_scale())
        live = spread > self.eps
        out = torch.where(live, z * spread, torch.zeros((), dtype=torch.float64))
        if self.pool_mean_ is not None:
            out = torch.where(live, out, self.pool_mean_)
        return out

    # ------------------------------------------------------------------ distances
    def _check_stats(self, stats: Tensor, what: str, check_width: bool = True) -> Tensor:
        if not isinstance(stats, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(stats).__name__}")
        if stats.dim() != 2 or stats.shape[1] % 2:
            raise ValueError(
                f"{what} must be rows [N, 2C] laid out [mu_1..mu_C, sigma_1..sigma_C], "
                f"got shape {tuple(stats.shape)}"
            )
        c = self.n_channels
        if check_width and c is not None and stats.shape[1] != 2 * c:
            raise ValueError(f"{what} have {stats.shape[1] // 2} channels, the scale has {c}")
        check_finite(stats, f"Knowledge Distance {what}", self.layer)
        stats = stats.detach().to("cpu", torch.float64)
        if bool((split_stats(stats)[1] < 0).any()):
            where = f" for layer {self.layer!r}" if self.layer is not None else ""
            raise ValueError(f"{what}{where} have negative standard deviations")
        return stats

    def _checked_centroids(self, centroids: Tensor) -> Tensor:
        # The same centroids, unchanged since (autograd's version counter), were checked.
        cached = self._centroids_of
        if (
            cached is not None
            and cached[0] is centroids
            and cached[1] == centroids._version
            and cached[2].shape[1] == 2 * (self.n_channels or 0)
        ):
            return cached[2]
        checked = self._check_stats(centroids, "centroids")
        self._centroids_of = (centroids, centroids._version, checked)
        return checked

    def _checked_pair(self, stats: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
        stats = self._check_stats(stats, "statistics")
        centroids = self._checked_centroids(centroids)
        if stats.shape[1] != centroids.shape[1]:
            raise ValueError(
                f"statistics have {stats.shape[1] // 2} channels, centroids "
                f"{centroids.shape[1] // 2}"
            )
        return stats, centroids

    def pairwise(self, stats: Tensor, centroids: Tensor) -> Tensor:
        """Distances ``[B, K]`` from statistics rows ``[B, 2C]`` to centroids ``[K, 2C]``."""
        return self._metric_fn(self, *self._checked_pair(stats, centroids))

    def nearest(self, stats: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest centroid per row: ``(labels [B] int64, distances [B])``; ties -> lowest.

        For ``w2`` the returned distance is recomputed exactly for the chosen centroid.
        """
        # Checked once: this runs per layer and batch of SelectQ's ranking pass.
        stats, centroids = self._checked_pair(stats, centroids)
        d, labels = self._metric_fn(self, stats, centroids).min(1)
        if self.metric == "w2":
            w = self._weights()
            d = rowwise_sq_dists(stats, centroids[labels], w) / self.n_channels
        return labels, d

    @staticmethod
    def combine(per_layer: Tensor, how: str | Sequence[int] = "mean") -> Tensor:
        """Total distance ``[B]`` of each sample from its per-layer distances ``[B, L]``.

        ``"mean"`` (default): every layer counts equally (each is already averaged over
        its channels, so wide layers do not dominate). ``"max"``: a sample is as atypical
        as its worst layer. A list of layer indices: mean over those layers only.
        """
        return combine_layers(per_layer, how)


def combine_layers(per_layer: Tensor, how: str | Sequence[int] = "mean") -> Tensor:
    """See :meth:`KnowledgeDistance.combine`."""
    if per_layer.dim() != 2:
        raise ValueError(f"expected per-layer distances [B, L], got shape {tuple(per_layer.shape)}")
    check_finite(per_layer, "per-layer distances")
    n_layers = per_layer.shape[1]
    if n_layers == 0:
        raise ValueError("per-layer distances have no layers")
    if isinstance(how, str):
        if how == "mean":
            return per_layer.mean(1)
        if how == "max":
            return per_layer.amax(1)
        raise QCalibError(
            f"unknown layer combination {how!r}; choose 'mean', 'max' or a list of layer indices"
        )
    idx = list(how)
    if not idx:
        raise QCalibError("the list of layers to combine is empty; give at least one index")
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise QCalibError(
                f"layer index {i!r} is out of range for {n_layers} layers; "
                f"use indices 0..{n_layers - 1}"
            )
    return per_layer[:, torch.tensor(idx, dtype=torch.long)].mean(1)
