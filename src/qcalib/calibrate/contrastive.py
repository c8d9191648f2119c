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

**Transformer blocks** (token outputs ``[B, L, H]``, see
:func:`~qcalib.calibrate.reconstruct.feature_last`): a sample is a *sequence*. Decoder /
encoder layers are called with more than the hidden states (attention mask, rotary
``position_embeddings``, position ids), so the trace also admits a call whose first
argument is the previous output and whose other arguments are the very objects the
reconstructed block was called with (a decoder stack passes one mask and one rotary table
to every layer); the critic replays them from the engine's block cache, indexed like the
batch. For token outputs the chain also stops at the first call that changes the shape,
so the features stay in the hidden space: ``truncated`` is the next ``tail_blocks``
layers, ``full`` every following layer and the final norm (Llama's ``model.norm``; the
LM head, which changes the width, and BERT's pooler, reached through slicing, end it).
The pooled feature is the mean over the *real* tokens (the cache's padding mask, as in
the reconstruction loss). We chose pooled hidden states over the tail's next-token
distributions: the full vocabulary per token would cost an LM-head forward and backward
per iteration (49k-wide for SmolLM2) and soft next-token distributions of different
sequences are close to each other (frequent tokens), the same shared-direction problem
that centering removes for pooled image features.

**λ schedule** (``schedule``): ``constant`` uses ``weight`` at every iteration;
``fade`` uses ``weight · ½(1 + cos(π t / T))`` at iteration ``t = 0 … T−1`` of a stage
of ``T`` iterations (the cosine the engine anneals the activation step sizes with), so
the term steers the early iterations and the end of every stage, where AdaRound's
rounding hardens, is decided by the reconstruction loss alone. A block with two stages
(BRECQ's rounding then activation stage) fades the term in each.

**Defaults** (λ = 0.1, τ = 0.1, NCE, truncated one-block tail, centered, constant) were
chosen on a validation split carved from the training data (ResNet-20, QDrop W2A4,
3 seeds; ``bench/results/contrastive-ablation.md``): the paper's λ = 1 cost 0.65 point
there, and no variant beat the base by more than its noise. λ = 0.1 (paired +0.11, std
0.20) and the full tail with a fading λ = 2 (+0.15, std 0.25) were the two best, tied within
their standard errors; the truncated tail is the cheaper critic (the full tail of an early
decoder layer is every later layer, forward and backward, per iteration), so it won the
tie. A weak term by default is the point: a user who turns it on should not lose
accuracy for it; the stronger settings stay one flag away.

Cost: the critic adds one forward and one input-gradient backward of the tail per
iteration; ``truncated`` with one block keeps this near a block's own cost. The term
counts the seconds of its own forward passes (:attr:`ContrastiveLoss.history`); the
benchmark compares whole iterations with and without it.
"""

from __future__ import annotations

import math
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

__all__ = [
    "ContrastiveLoss",
    "FrozenTailCritic",
    "contrastive_loss",
    "pool_features",
    "scheduled_weight",
]


def scheduled_weight(weight: float, schedule: str, iteration: int, iters: int) -> float:
    """λ at 0-based ``iteration`` of a stage of ``iters`` iterations (module docs)."""
    if schedule == "constant":
        return weight
    if schedule != "fade":
        raise QCalibError(f"unknown contrastive schedule {schedule!r}; choose constant or fade")
    return weight * 0.5 * (1.0 + math.cos(math.pi * iteration / max(iters, 1)))


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


def pool_features(t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``B x D`` features: average over space (4-D) or tokens (3-D; over the real tokens,
    ``mask [B, L]``, when given), else flatten."""
    if t.dim() == 4:
        return t.mean((2, 3))
    if t.dim() == 3:
        if mask is None:
            return t.mean(1)
        w = mask.to(t.dtype).unsqueeze(-1)
        return (t * w).sum(1) / w.sum(1).clamp_min(1.0)
    return t.flatten(1)


class FrozenTailCritic(nn.Module):
    """``pool(tail(x))`` with ``tail`` the FP modules that follow a block (module docs).

    ``modules`` is the traced chain; ``names`` says what it is, for logs and reports.
    ``with_context[i]``: module ``i`` is called like the block, with the block's other
    arguments (``forward``'s ``args`` and ``kwargs``: the block's cached inputs after the
    hidden states) — a decoder / encoder layer of the same stack.
    """

    def __init__(
        self, modules: list[nn.Module], names: list[str], with_context: list[bool] | None = None
    ) -> None:
        super().__init__()
        self.tail = nn.ModuleList(modules)
        self.names = names
        self.with_context = list(with_context) if with_context is not None else []
        self.with_context += [False] * (len(modules) - len(self.with_context))

    def forward(
        self,
        x: torch.Tensor,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # A clone, because a tail may start with an in-place op (ReLU(inplace=True)) and
        # the block output is also read by the reconstruction loss.
        x = x.clone()
        for m, context in zip(self.tail, self.with_context, strict=True):
            x = first_tensor(m(x, *args, **(kwargs or {}))) if context else m(x)
        return pool_features(x, mask)

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
        context: list[bool] = []
        if start is None:
            return cls(modules, names)
        cur = first_tensor(calls[start]["out"])
        tokens = bool(getattr(info.cache, "tokens", False))
        block_args, block_kwargs = calls[start]["args"][1:], calls[start]["kwargs"]
        n_blocks = 0
        for c in calls[start + 1 :]:
            if cur is None or (max_blocks is not None and n_blocks >= max_blocks):
                break
            args = c["args"]
            if not args or args[0] is not cur:
                continue
            plain = len(args) == 1 and not c["kwargs"]
            if not plain and not (tokens and _same_objects(args[1:], c["kwargs"], block_args,
                                                           block_kwargs)):  # fmt: skip
                continue
            out = c["out"] if plain else first_tensor(c["out"])
            if not isinstance(out, torch.Tensor) or (tokens and out.shape != cur.shape):
                break
            modules.append(c["module"])
            names.append(candidates[id(c["module"])][0])
            context.append(not plain)
            n_blocks += id(c["module"]) in blocks
            cur = out
        return cls(modules, names, context)


def _same_objects(args: tuple, kwargs: dict, ref_args: tuple, ref_kwargs: dict) -> bool:
    """Whether a call got exactly the objects (identity, not equality) the block got."""
    return (
        len(args) == len(ref_args)
        and all(a is b for a, b in zip(args, ref_args, strict=True))
        and kwargs.keys() == ref_kwargs.keys()
        and all(kwargs[k] is ref_kwargs[k] for k in kwargs)
    )


def _rows(cache: Any, idx: torch.Tensor) -> torch.Tensor | None:
    mask = getattr(cache, "token_mask", None)
    return mask[idx] if mask is not None else None


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
        fields = asdict(self.cfg)
        if fields["schedule"] == "constant":  # runs from before the option keep resuming
            del fields["schedule"]
        return f"ContrastiveLoss({sorted(fields.items())})"

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
            cache = info.cache
            replay = any(self._critic.with_context)  # else the block inputs are not read
            with torch.no_grad():
                z = torch.cat(
                    [
                        self._map(
                            cache.fp_out[idx],
                            cache.inputs(idx) if replay else None,
                            _rows(cache, idx),
                        )
                        for idx in torch.arange(len(cache), device=cache.fp_out.device).split(256)
                    ]
                )
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

    def _map(
        self,
        out: torch.Tensor,
        inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Critic features of block outputs ``out``; ``inputs``: the block's cached inputs
        of the same samples (the tail's layers replay all but the hidden states)."""
        if self._critic is None:
            raise RuntimeError("ContrastiveLoss is used outside a block (begin_block not called)")
        args, kwargs = inputs if inputs else ((), {})
        return self._critic(out, tuple(args[1:]), kwargs, mask)

    def features(
        self,
        out: torch.Tensor,
        inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        z = self._map(out, inputs, mask)
        if self._head is not None:
            z = self._head(z)
        return self._normalize(z)

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        if self._center is not None:
            z = z - self._center
        return F.normalize(z, dim=1)

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        t0 = time.perf_counter()
        mask = getattr(ctx, "token_mask", None)
        inputs = getattr(ctx, "inputs", None)
        z_q = self.features(ctx.q_out, inputs, mask)
        # Frozen critics: the FP side was mapped once per block; a trained head cannot be.
        cached = self._z_fp
        if cached is not None:
            z_f = cached[ctx.batch_indices]
        else:
            z_f = self.features(ctx.fp_out, inputs, mask)
        stage = getattr(ctx, "stage", None)
        weight = (
            scheduled_weight(self.cfg.weight, self.cfg.schedule, ctx.iteration, stage.iters)
            if stage is not None
            else self.cfg.weight
        )
        loss = weight * contrastive_loss(z_q, z_f, self.cfg.temperature, self.cfg.loss)
        self._calls += 1
        self._seconds += time.perf_counter() - t0
        return loss
