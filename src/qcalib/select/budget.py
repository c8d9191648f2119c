"""Splitting a selection budget over groups, and bounded per-group rankings.

:func:`allocate_quotas` apportions ``n`` seats to groups (clusters, classes) in proportion
to their masses; :class:`ClusterTopK` keeps, per group, the ``k`` entries with the smallest
keys of a stream, with memory ``O(groups * k)`` whatever the stream's length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qcalib.errors import QCalibError

__all__ = ["ClusterTopK", "allocate_quotas"]


def allocate_quotas(masses: Sequence[int] | Tensor, n: int, min_share: float = 0.0) -> list[int]:
    """Largest-remainder (Hamilton) apportionment of ``n`` seats by ``masses``.

    Each group gets ``floor(n * m / M)`` seats, and the seats left over go to the largest
    remainders ``n * m mod M`` (ties: larger mass first, then lower group index). The
    arithmetic is exact (Python integers), so the result is deterministic. Every quota is
    at most its group's mass as long as ``n <= M`` (a quota is at most
    ``ceil(n * m / M) <= m``), so nothing needs redistributing.

    ``min_share``: groups whose exact share ``n * m / M`` is below it get no seat and
    their share goes to the others (the apportionment is redone over the eligible
    groups). SelectQ uses 1: a seat for a group worth less than one seat over-represents
    it (by ``1 / share``), and such light groups are the outlier clusters that selection
    must leave out. When the eligible groups hold fewer than ``n`` members
    (or none is eligible), every non-empty group is eligible again.
    """
    m = [int(v) for v in (masses.tolist() if isinstance(masses, Tensor) else masses)]
    if any(v < 0 for v in m):
        raise ValueError(f"masses must be non-negative, got {m}")
    total = sum(m)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if n > total:
        raise QCalibError(f"cannot pick {n} samples from groups holding {total}")
    if not float(min_share) >= 0.0:
        raise ValueError(f"min_share must be non-negative, got {min_share!r}")
    eligible = [v > 0 and n * v >= min_share * total for v in m]
    if sum(v for v, e in zip(m, eligible, strict=True) if e) < n:
        eligible = [v > 0 for v in m]
    mass = [v if e else 0 for v, e in zip(m, eligible, strict=True)]
    big_m = sum(mass)
    if n == 0 or big_m == 0:
        return [0] * len(m)
    quotas = [n * v // big_m for v in mass]
    left = n - sum(quotas)
    order = sorted(
        (i for i in range(len(m)) if mass[i] > 0),
        key=lambda i: (-(n * mass[i] % big_m), -mass[i], i),
    )
    for i in order[:left]:
        quotas[i] += 1
    return quotas


class ClusterTopK:
    """Per group, the ``k`` entries with the smallest ``(key, index)`` seen in a stream.

    Entries are ``(group, key, index)`` plus an optional float64 ``value`` carried along
    (e.g. the Knowledge Distance of a sample ranked by a random key), a scalar or a row
    ``[D]`` per entry (every push the same ``D``). Ordering is
    lexicographic on ``(key, index)`` with float64 keys, so ties are broken by the smaller
    index and the result does not depend on the order in which the stream arrives. Held
    as one sorted buffer per group, merged batch by batch (a batch only brings the
    entries that beat the current k-th key), so memory is at most ``groups * k`` entries
    plus one batch: the bounded "heaps" of the selection's second pass.
    """

    def __init__(self, num_groups: int, k: int) -> None:
        if num_groups < 1 or k < 1:
            raise ValueError(f"need num_groups >= 1 and k >= 1, got {num_groups}, {k}")
        self.num_groups = num_groups
        self.k = k
        self.keys = [torch.empty(0, dtype=torch.float64) for _ in range(num_groups)]
        self.index = [torch.empty(0, dtype=torch.int64) for _ in range(num_groups)]
        self.values = [torch.empty(0, dtype=torch.float64) for _ in range(num_groups)]
        self.counts = torch.zeros(num_groups, dtype=torch.int64)
        self.peak_held = 0

    def push(
        self, groups: Tensor, keys: Tensor, index: Tensor, values: Tensor | None = None
    ) -> None:
        groups = groups.to(torch.int64).cpu()
        keys = keys.to(torch.float64).cpu()
        index = index.to(torch.int64).cpu()
        values = torch.zeros_like(keys) if values is None else values.to(torch.float64).cpu()
        self.counts += torch.bincount(groups, minlength=self.num_groups)
        for g in torch.unique(groups).tolist():
            sel = groups == g
            nk, ni, nv = keys[sel], index[sel], values[sel]
            old_k, old_i = self.keys[g], self.index[g]
            if old_k.numel() >= self.k:
                kth = old_k[-1]
                keep = (nk < kth) | ((nk == kth) & (ni < old_i[-1]))
                nk, ni, nv = nk[keep], ni[keep], nv[keep]
                if nk.numel() == 0:
                    continue
            all_k = torch.cat([old_k, nk])
            all_i = torch.cat([old_i, ni])
            old_v = self.values[g]
            if old_v.numel() == 0:  # the first push fixes the value shape (scalar or [D])
                old_v = old_v.reshape(0, *nv.shape[1:])
            all_v = torch.cat([old_v, nv])
            o = torch.argsort(all_i, stable=True)  # secondary key first, then stable primary
            all_k, all_i, all_v = all_k[o], all_i[o], all_v[o]
            o = torch.argsort(all_k, stable=True)[: self.k]
            self.keys[g], self.index[g], self.values[g] = all_k[o], all_i[o], all_v[o]
        self.peak_held = max(self.peak_held, self.held)

    @property
    def held(self) -> int:
        """Entries held now (at most ``num_groups * k``)."""
        return sum(t.numel() for t in self.index)

    def smallest(self, g: int, count: int) -> tuple[Tensor, Tensor]:
        """The ``count`` smallest ``(keys, indices)`` of group ``g``."""
        if count > self.index[g].numel():
            raise ValueError(f"group {g} holds {self.index[g].numel()} entries, asked {count}")
        return self.keys[g][:count], self.index[g][:count]

    def held_entries(self, g: int) -> tuple[Tensor, Tensor, Tensor]:
        """Everything group ``g`` holds: ``(keys, indices, values)``, ascending keys."""
        return self.keys[g], self.index[g], self.values[g]
