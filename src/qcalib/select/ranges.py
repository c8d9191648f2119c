"""The static min-max ranges a calibration set gives, known without a forward.

A static per-tensor min-max observer sets a site's range to the smallest minimum and the
largest maximum over the calibration set, so the range of *any* subset follows from one
``[min, max]`` pair per sample and site (the ``extremes`` rows of
:class:`~qcalib.select.stats.ActivationStatsCollector`). This module turns those pairs into:

* **The random-draw reference.** For a budget ``n`` out of a pool of ``N``, the median over
  random draws (without replacement) of the set's maximum at a site is the pool's ``j``-th
  largest per-sample maximum, ``j`` the smallest rank with
  ``P(a draw holds one of the top j) = 1 - C(N - j, n) / C(N, n) >= 1/2``
  (:func:`median_draw_rank`); likewise for the minimum. Only the top ``j`` values per site
  are needed, so a stream keeps a bounded buffer (:class:`ExtremesSketch`).
* **A mismatch** of a set's ranges to that reference (:func:`range_mismatch`): the mean over
  sites of ``|log(width / reference width)|``, where a width is ``max(hi, 0) - min(lo, 0)``
  (the observers' range always contains 0). 0 means every site's grid step is the one a
  typical random set gives; ``log 2`` on average means steps twice or half as fine.
* **Range matching** (:func:`match_ranges`): starting from a chosen set, swap members for
  other candidates of the same group (SelectQ's clusters, so the cluster quotas stay) as
  long as a swap lowers the mismatch. A set of language-model windows takes its ranges
  from a few outlier tokens; which ones a set happens to hold decides its perplexity under
  static min-max (bench/results/llm.md), and a set whose ranges sit at random's median has
  neither the wide ranges of an unlucky draw nor the clipped ones of a set of typical
  windows only.

Why the median draw and not the pool's own range: the pool's range is that of its single
most extreme sample, which a set of ``n`` << ``N`` would have to contain; the median draw is
what the random baseline gives in its typical run, the reference issue 12 measures against.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ExtremesSketch",
    "match_ranges",
    "median_draw_rank",
    "range_mismatch",
    "set_ranges",
]


def median_draw_rank(pool_size: int, n: int) -> int:
    """``j`` (1-based): the median of the maximum of ``n`` draws without replacement from
    ``pool_size`` values is the ``j``-th largest value."""
    if not 1 <= n <= pool_size:
        raise ValueError(f"need 1 <= n <= pool size, got n={n}, pool {pool_size}")
    # P(the draw holds none of the top j) = C(N - j, n) / C(N, n), by its recurrence in j;
    # the tolerance absorbs float rounding where it is exactly 1/2 (N = 4, n = 2).
    none = 1.0
    for j in range(1, pool_size - n + 2):
        none *= (pool_size - n - j + 1) / (pool_size - j + 1)
        if none <= 0.5 + 1e-9:
            return j
    return pool_size - n + 1


class ExtremesSketch:
    """Streams per-sample extremes ``[B, S, 2]`` (``[..., 0]`` minima, ``[..., 1]`` maxima
    of ``S`` sites) and keeps, per site, the ``k`` smallest minima and ``k`` largest maxima:
    enough for :meth:`reference` at any budget whose :func:`median_draw_rank` is <= ``k``."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.low: Tensor | None = None  # [<=k, S] ascending
        self.high: Tensor | None = None  # [<=k, S] descending
        self.count = 0

    def push(self, extremes: Tensor) -> None:
        ext = extremes.to(torch.float64)
        lo, hi = ext[..., 0], ext[..., 1]
        if self.low is not None and self.high is not None:
            lo, hi = torch.cat([self.low, lo]), torch.cat([self.high, hi])
        k = min(self.k, lo.shape[0])
        self.low = torch.topk(lo, k, dim=0, largest=False).values
        self.high = torch.topk(hi, k, dim=0, largest=True).values
        self.count += extremes.shape[0]

    def reference(self, n: int) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` per site: the median over random draws of ``n`` samples of the set's
        minimum and maximum."""
        if self.low is None or self.high is None:
            raise ValueError("no extremes were pushed")
        j = median_draw_rank(self.count, n)
        if j > self.low.shape[0]:
            raise ValueError(f"the sketch keeps {self.low.shape[0]} values per site, need {j}")
        return self.low[j - 1], self.high[j - 1]


def set_ranges(extremes: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` per site of a set whose members' extremes are ``[M, S, 2]``."""
    return extremes[..., 0].amin(0), extremes[..., 1].amax(0)


def _width(lo: Tensor, hi: Tensor) -> Tensor:
    return hi.clamp_min(0) - lo.clamp_max(0)


def range_mismatch(
    lo: Tensor, hi: Tensor, ref_lo: Tensor, ref_hi: Tensor, excess_only: bool = False
) -> float:
    """Mean over sites of ``|log(width / reference width)|`` (sites whose reference width
    is 0 are left out: a constant-zero input has no grid to match). ``excess_only``: only
    widths above the reference count, ``max(0, log(width / reference))``."""
    w, ref = _width(lo, hi), _width(ref_lo, ref_hi)
    ok = ref > 0
    if not bool(ok.any()):
        return 0.0
    r = (w[ok].clamp_min(1e-30) / ref[ok]).log()
    return float((r.clamp_min(0) if excess_only else r.abs()).mean())


def _site_costs(w: Tensor, ref: Tensor, ok: Tensor, excess_only: bool = False) -> Tensor:
    """Per-candidate :func:`range_mismatch` over the valid sites; ``w`` ``[..., S]``."""
    r = (w.clamp_min(1e-30) / ref).log()
    r = r.clamp_min(0) if excess_only else r.abs()
    return (r * ok).sum(-1) / ok.sum().clamp_min(1)


def match_ranges(
    chosen: list[Tensor],
    extremes: list[Tensor],
    ref_lo: Tensor,
    ref_hi: Tensor,
    max_swaps: int | None = None,
    excess_only: bool = False,
) -> tuple[list[Tensor], int]:
    """Swap set members for same-group candidates while each swap lowers the mismatch
    (``excess_only``: the excess of :func:`range_mismatch`, so only sites wider than the
    reference are brought in, and among the swaps that lower it most the one with the
    smallest two-sided mismatch is taken; it stops once no site is wider).

    ``extremes[g]`` ``[L_g, S, 2]`` are the extremes of the ``L_g`` candidates group ``g``
    may use, ``chosen[g]`` the positions (among them) of its current members. Each step
    takes the single swap, over all groups, with the largest decrease of
    :func:`range_mismatch` (ties: the first group, then the lowest positions), so group
    sizes never change; at most ``max_swaps`` steps (default: the set size).
    Returns the new positions per group and the number of swaps made.
    """
    chosen = [c.clone() for c in chosen]
    ref = _width(ref_lo, ref_hi).to(torch.float64)
    ok = (ref > 0).to(torch.float64)
    ref = ref.clamp_min(1e-30)
    total = sum(c.numel() for c in chosen)
    limit = total if max_swaps is None else max_swaps
    swaps = 0
    while swaps < limit:
        members = torch.cat([e[c] for e, c in zip(extremes, chosen, strict=True)])
        lo_all, hi_all = members[..., 0], members[..., 1]
        now = _width(lo_all.amin(0), hi_all.amax(0))
        current = float(_site_costs(now, ref, ok, excess_only))
        if excess_only and current <= 1e-12:
            break
        best: tuple[float, int, int, int] | None = None
        offset = 0
        for g, (e, c) in enumerate(zip(extremes, chosen, strict=True)):
            q = c.numel()
            if q == 0 or e.shape[0] <= q:
                offset += q
                continue
            # The set's range without each member (the other members' extremes), [q, S].
            keep = torch.ones(total, q, dtype=torch.bool)
            keep[torch.arange(offset, offset + q), torch.arange(q)] = False
            inf = torch.tensor(float("inf"), dtype=lo_all.dtype)
            lo_wo = torch.where(keep.T[:, :, None], lo_all[None], inf).amin(1)
            hi_wo = torch.where(keep.T[:, :, None], hi_all[None], -inf).amax(1)
            free = torch.ones(e.shape[0], dtype=torch.bool)
            free[c] = False
            cand = torch.nonzero(free).flatten()
            lo_new = torch.minimum(lo_wo[:, None], e[cand, :, 0][None])  # [q, F, S]
            hi_new = torch.maximum(hi_wo[:, None], e[cand, :, 1][None])
            width = _width(lo_new, hi_new)
            cost = _site_costs(width, ref, ok, excess_only)  # [q, F]
            if excess_only:  # ties in the excess go to the smallest two-sided mismatch
                lowest = cost.min()
                two_sided = _site_costs(width, ref, ok)
                cost_pick = torch.where(cost <= lowest + 1e-12, two_sided, torch.inf)
                flat = int(torch.argmin(cost_pick))
            else:
                flat = int(torch.argmin(cost))
            value = float(cost.flatten()[flat])
            if best is None or value < best[0]:
                best = (value, g, flat // cand.numel(), int(cand[flat % cand.numel()]))
            offset += q
        if best is None or best[0] >= current - 1e-12:
            break
        _, g, out_pos, new = best
        chosen[g][out_pos] = new
        swaps += 1
    return chosen, swaps
