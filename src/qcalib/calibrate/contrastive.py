"""CL-Calib: a contrastive mutual-information term for block reconstruction.

Inside the reconstruction of a block, the quantized output ``q_i`` and the FP output
``f_i`` of calibration sample ``i`` form a positive pair; ``(q_i, f_j)`` with ``j != i``
are negatives. Both sides go through a *critic* ``g``, are L2-normalized, and compared
with ``s_ij = <g(q_i), g(f_j)> / tau``. Two losses on the ``B x B`` matrix ``s``:

* ``nce`` (default), binary noise-contrastive estimation with positives and negatives
  weighted equally::

      L = -mean_i log sigmoid(s_ii) - mean_{i != j} log sigmoid(-s_ij)

* ``infonce``, softmax over the batch (each row picks its own partner)::

      L = -mean_i log( exp(s_ii) / sum_j exp(s_ij) )

Minimizing either raises a lower bound of the mutual information between FP and
quantized activations (design.md §4). The term added to the reconstruction loss is
``weight * L``.

**The critic trains nothing.** A critic learned on a few hundred calibration samples
collapses (it maps everything to one point and the term stops carrying information), so
``g`` is cut from the frozen FP network itself: the modules that follow the block in
the FP copy, applied to the block output, then global average pooling (4-D: over H, W;
3-D: over tokens). The tail is found by tracing one FP forward pass: it is the chain of
calls, in execution order, whose only input is the previous call's output (a block of
the partition or a leaf module outside every block, e.g. a ReLU or the pooling layer),
and it stops at the first gap (functional code between blocks such as ``x.flatten(1)``)
or after ``tail_blocks`` blocks. The features are centered on the mean FP feature of
the calibration set (``center=True``, a constant per block) before normalization:
pooled post-ReLU features of different images point almost the same way (cosine about
0.95 on the reference models), so uncentered, every negative pair looks like a positive
one and the NCE term is about ``log(1 + e^(0.95/tau))`` whatever the quantizer does.
``critic="full"`` follows the chain as far as it goes;
``critic="projection"`` is the ablation that *does* train something (a linear head on
the pooled output). The FP side of every sample is mapped once per block and cached.

The tail's parameters belong to the engine's frozen FP copy (``requires_grad=False``):
gradients flow through it to the quantized block output only.

Cost: the critic adds one forward and one input-gradient backward of the tail per
iteration; ``truncated`` with one block keeps this near a block's own cost. The term
counts the seconds of its own forward passes (:attr:`ContrastiveLoss.history`); the
benchmark compares whole iterations with and without it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qcalib.calibrate.reconstruct import BlockInfo, LossContext, derive_seed
from qcalib.config import ContrastiveConfig
from qcalib.errors import QCalibError
from qcalib.model.qmodules import first_tensor

__all__ = ["ContrastiveLoss", "FrozenTailCritic", "contrastive_loss", "pool_features"]


def contrastive_loss(z_q: torch.Tensor, z_f: torch.Tensor, temperature: float, kind: str = "nce"):
    """The CL-Calib loss of L2-normalized features ``z_q``, ``z_f`` (``B x D``, ``B >= 2``);
    row ``i`` of both is the same sample."""
    if z_q.shape[0] < 2:
        raise QCalibError(
            "the contrastive loss needs at least 2 samples per batch (the negatives are the "
            "other samples); raise --recon-batch-size and --num-calib to 2 or more"
        )
    s = z_q @ z_f.T / temperature
    b = s.shape[0]
    if kind == "infonce":
        return F.cross_entropy(s, torch.arange(b, device=s.device))
    if kind != "nce":
        raise QCalibError(f"unknown contrastive loss {kind!r}; choose nce or infonce")
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    return -F.logsigmoid(s.diagonal()).mean() - F.logsigmoid(-s[off]).mean()


def pool_features(t: torch.Tensor) -> torch.Tensor:
    """``B x D`` features: average over space (4-D) or tokens (3-D), else flatten."""
    if t.dim() == 4:
        return t.mean((2, 3))
    if t.dim() == 3:
        return t.mean(1)
    return t.flatten(1)


class FrozenTailCritic(nn.Module):
    """``pool(tail(x))`` with ``tail`` the FP modules that follow a block (module docs).

    ``modules`` is the traced chain; ``names`` says what it is, for logs and reports.
    """

    def __init__(self, modules: list[nn.Module], names: list[str]) -> None:
        super().__init__()
        self.tail = nn.ModuleList(modules)
        self.names = names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A clone, because a tail may start with an in-place op (ReLU(inplace=True)) and
        # the block output is also read by the reconstruction loss.
        x = x.clone()
        for m in self.tail:
            x = m(x)
        return pool_features(x)

    @classmethod
    def trace(cls, info: BlockInfo, max_blocks: int | None) -> FrozenTailCritic:
        """Trace the FP copy on two calibration samples; keep the chain after ``info.block``
        (at most ``max_blocks`` blocks; None: as far as it goes)."""
        if info.calib_data is None:
            raise QCalibError("tracing the critic needs the calibration data in BlockInfo")
        blocks = {id(info.fp_module(b)): b.name or "<model>" for b in info.blocks}
        inside = {id(m) for b in info.blocks for m in info.fp_module(b).modules()}
        candidates: dict[int, tuple[str, nn.Module]] = {}
        for name, m in info.fp_model.model.named_modules():
            if id(m) in blocks:
                candidates[id(m)] = (blocks[id(m)], m)
            elif id(m) not in inside and next(m.children(), None) is None:
                candidates[id(m)] = (name, m)
        calls: list[dict[str, Any]] = []

        def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append({"module": m, "args": args, "kwargs": kwargs, "out": None})

        def post(m: nn.Module, _a: Any, out: Any) -> None:
            # Non-nested candidates: the open call is the last one of this module.
            for c in reversed(calls):
                if c["module"] is m and c["out"] is None:
                    c["out"] = out
                    break

        handles = []
        for _, m in candidates.values():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))
        try:
            with torch.no_grad():
                info.fp_model(info.calib_data[:2])
        finally:
            for h in handles:
                h.remove()

        target = info.fp_module(info.block)
        start = next((i for i, c in enumerate(calls) if c["module"] is target), None)
        modules: list[nn.Module] = []
        names: list[str] = []
        if start is None:
            return cls(modules, names)
        cur = first_tensor(calls[start]["out"])
        n_blocks = 0
        for c in calls[start + 1 :]:
            if cur is None or (max_blocks is not None and n_blocks >= max_blocks):
                break
            args = c["args"]
            if c["kwargs"] or len(args) != 1 or args[0] is not cur:
                continue
            out = c["out"]
            if not isinstance(out, torch.Tensor):
                break
            modules.append(c["module"])
            names.append(candidates[id(c["module"])][0])
            n_blocks += id(c["module"]) in blocks
            cur = out
        return cls(modules, names)


class ContrastiveLoss:
    """The CL-Calib loss term for :class:`~qcalib.calibrate.reconstruct.BlockReconstructor`.

    Pass it in ``extra_terms`` (the reconstruction calibrators do when
    ``ReconConfig.contrastive`` is set). ``history`` gets one entry per block: critic,
    tail, feature width, iterations and seconds spent in the term's forward passes.
    """

    name = "cl"

    def __init__(self, cfg: ContrastiveConfig | None = None) -> None:
        self.cfg = cfg or ContrastiveConfig()
        self.history: list[dict[str, Any]] = []
        self._critic: nn.Module | None = None
        self._z_fp: torch.Tensor | None = None
        self._head: nn.Linear | None = None
        self._center: torch.Tensor | None = None
        self._calls = 0
        self._seconds = 0.0

    def fingerprint(self) -> str:
        return f"ContrastiveLoss({sorted(asdict(self.cfg).items())})"

    # -- engine hooks --------------------------------------------------------------

    def begin_block(self, info: BlockInfo) -> None:
        if info.batch_size < 2:
            raise QCalibError(
                f"CL-Calib needs at least 2 samples per reconstruction batch (negatives are "
                f"the other samples of the batch), got {info.batch_size}: raise "
                "--recon-batch-size and --num-calib, or drop --contrastive"
            )
        c = self.cfg
        t0 = time.perf_counter()
        if c.critic == "projection":
            self._critic = FrozenTailCritic([], [])
            self._center = None
            width = pool_features(info.cache.fp_out[:1]).shape[1]
            gen = torch.Generator().manual_seed(derive_seed(info.seed, info.index))
            head = nn.Linear(width, c.proj_dim)
            with torch.no_grad():
                bound = 1.0 / width**0.5
                head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
                head.bias.zero_()
            self._head = head.to(info.cache.fp_out.device)
            self._z_fp = None
        else:
            limit = None if c.critic == "full" else c.tail_blocks
            self._critic = FrozenTailCritic.trace(info, limit)
            self._head = None
            with torch.no_grad():
                z = torch.cat([self._critic(f) for f in torch.split(info.cache.fp_out, 256)])
            self._center = z.mean(0) if c.center else None
            self._z_fp = self._normalize(z)
        self._calls, self._seconds = 0, time.perf_counter() - t0

    def end_block(self, info: BlockInfo) -> None:
        critic = self._critic
        self.history.append(
            {
                "block": info.block.name,
                "critic": self.cfg.critic,
                "tail": list(getattr(critic, "names", [])),
                "iterations": self._calls,
                "seconds": round(self._seconds, 4),
            }
        )
        self._critic = self._z_fp = self._head = self._center = None

    def param_groups(self) -> list[dict[str, Any]]:
        if self._head is None:
            return []
        return [{"params": list(self._head.parameters()), "lr": self.cfg.proj_lr}]

    # -- the term -----------------------------------------------------------------

    def features(self, out: torch.Tensor) -> torch.Tensor:
        if self._critic is None:
            raise RuntimeError("ContrastiveLoss is used outside a block (begin_block not called)")
        z = self._critic(out)
        if self._head is not None:
            z = self._head(z)
        return self._normalize(z)

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        if self._center is not None:
            z = z - self._center
        return F.normalize(z, dim=1)

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        t0 = time.perf_counter()
        z_q = self.features(ctx.q_out)
        # Frozen critics: the FP side was mapped once per block; a trained head cannot be.
        cached = self._z_fp
        z_f = cached[ctx.batch_indices] if cached is not None else self.features(ctx.fp_out)
        loss = self.cfg.weight * contrastive_loss(z_q, z_f, self.cfg.temperature, self.cfg.loss)
        self._calls += 1
        self._seconds += time.perf_counter() - t0
        return loss
