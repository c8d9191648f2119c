"""The block-reconstruction engine behind AdaRound, BRECQ and QDrop (and CL-Calib later).

:class:`BlockReconstructor` walks a list of blocks in execution order. For each block it

1. **caches** the calibration set's block inputs and FP block outputs once, with hooks:
   the *inputs* come from the quantized model in its deployment state (finished blocks
   hard-rounded with their learned activation steps, activation quantization on), the
   *targets* from an FP copy of the network taken before any block changed. This is the
   "asymmetric" reconstruction of AdaRound / BRECQ (``asym=True`` in the BRECQ code) and
   QDrop's "block inputs from the already-quantized model". BRECQ's code makes one sweep
   for the weights with activation quantization off everywhere and a second sweep for
   the activation steps; we make one sweep whose inputs are always the fully quantized
   upstream, so the cache is built once per block and every method sees the inputs the
   deployed network will see.
2. runs the method's **stages** (:class:`Stage`): Adam on the AdaRound variables
   (``w_lr``) and/or on the activation step sizes (``a_lr``, cosine-annealed to 0 as in
   the BRECQ / QDrop code), with the activations inside the block quantized per element
   with probability ``drop_prob`` (0: float, 1: all quantized, QDrop: 0.5). Each
   iteration draws ``batch_size`` cached samples without replacement.
3. minimizes a **sum of loss terms** (:class:`LossTerm`: any callable taking a
   :class:`LossContext` and returning a scalar). The defaults are
   :class:`ReconstructionLoss` (optionally Fisher-weighted) and
   :class:`RoundingRegularizer`; further terms (the contrastive CL-Calib term) are passed
   as ``extra_terms`` without touching the engine. A term may also define
   ``begin_block(info)`` / ``end_block(info)`` (:class:`BlockInfo`: the block, its cache
   and the FP model, e.g. to build a frozen head) and ``param_groups()`` (extra trainable
   parameters, optimized with Adam).
4. **hardens** the rounding into the weights, writes the learned steps into the
   quantizers, and **checkpoints** the whole model state to ``work_dir/recon_state.pt``
   (atomic write) with the number of finished blocks and a fingerprint of everything the
   result depends on (method, stages, config, seed, calibration data, initial model
   state, extra terms, device type).

Resuming: a rerun with the same ``work_dir`` and fingerprint loads the state and starts
at the first unfinished block; a block interrupted half-way restarts from its beginning.
Randomness is drawn from generators seeded from ``(seed, block index, stage index)``
only, and the optimizers are created fresh per stage, so no RNG or optimizer state has
to be carried over: a resumed run ends bit-identical to an uninterrupted one (same
device and torch build). A state with another fingerprint is ignored with a warning.

Fisher weighting (BRECQ's ``fisher_diag``): the squared output error is weighted by
``(|g| + 1)^2`` where ``g`` is the gradient of ``KL(softmax(FP logits) || softmax(Q
logits))`` (batch mean) w.r.t. the block output, taken with the network quantized up to
and including this block and float after it. Calibration data is unlabeled, so the FP
model's own predictions serve as (soft) labels, exactly as in the BRECQ code. The
gradients come from the same forward pass that captures the block inputs.

Loss normalization follows the BRECQ / QDrop ``lp_loss``: the error is summed over the
feature dimension and averaged over the batch and the remaining dimensions; this sets the
balance with the regularizer weight 0.01. The feature dimension is dimension 1 for
channel-first outputs (convolutions ``[B, C, H, W]``, classifiers ``[B, F]``), and the
*last* one for token outputs ``[B, L, H]`` (a 3-D output of a "transformer" block or of a
linear layer), where summing over dimension 1 would sum over tokens and make the loss
scale with the sequence length. For token outputs the mean runs over *valid* tokens
only: the padding mask is read from the calibration batch itself when it is a packed
token batch (:mod:`qcalib.data.tokens`, row 1 of ``[B, 2, L]``), not from the block's
attention-mask argument, whose layout differs between models (4-D additive or boolean,
causal or not, ``None`` without padding); the cache keeps it as
:attr:`BlockCache.token_mask`. Without padding this is the plain mean over tokens.

Fisher weighting of token outputs: the KL divergence is taken over the vocabulary (the
last dimension of ``[B, L, V]`` LM logits, not dimension 1, the sequence), per token,
summed over the valid tokens of a sequence and averaged over sequences (the
``batchmean`` of the image case, one sequence standing for one image).

Speed (issue 14): an iteration does the block's forward and backward plus the fused
quantizer ops of :mod:`qcalib.calibrate.lsq` / :mod:`qcalib.calibrate.rounding` and
nothing else. The stage's sample indices are drawn up front from the same CPU generator
(the same stream as one ``randperm`` per iteration) and moved to the device once; a stage
that does not learn the weights quantizes them once (:class:`FrozenWeightQuantizer`)
instead of every iteration; the loss values are read back to the host only at logging
iterations (first, last, every 50th with a progress bar), so on CUDA the loop queues
kernels without waiting for them. ``ReconConfig.amp`` runs the block's forward under
``torch.autocast`` in bfloat16 (the layers' FP work; fake quantization, the mixing of the
drop and the loss stay float32; bfloat16 has float32's range, so no gradient scaler is
needed); ``ReconConfig.compile`` runs it through ``torch.compile`` (built once per stage,
because the stage swaps the quantizers; dynamo's per-code recompile limit may send later
blocks of the same class back to eager mode, which changes speed, not results). Both are
off by default and, when on, part of the fingerprint.

Device: everything (caches, generators, optimizers) lives on the device of the model's
parameters and the calibration tensor; nothing is hard-coded. The cache holds one block's
inputs and outputs for the whole calibration set on that device (BRECQ / QDrop's
``keep_gpu``). Block inputs must be batch-first tensors (or values equal in every batch);
a block called several times in one forward pass is reconstructed for its first call; a
block the forward pass never reaches is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qcalib.calibrate.checkpoint import state_digest
from qcalib.calibrate.lp_loss import channel_sum_mean, lp_channel_sum_mean, lp_error
from qcalib.calibrate.lsq import ReconActQuantizer
from qcalib.calibrate.rounding import (
    AdaRoundQuantizer,
    BetaSchedule,
    harden,
    install_adaround,
    restore,
)
from qcalib.config import ReconConfig
from qcalib.data.tokens import is_token_batch
from qcalib.errors import QCalibError
from qcalib.model.partition import Block
from qcalib.model.qmodules import QuantConv1D, QuantLinear, QuantModule, first_tensor
from qcalib.model.stop import StopForward
from qcalib.model.wrap import QuantModel

__all__ = [
    "STATE_FILE",
    "BlockNotReached",
    "BlockCache",
    "BlockInfo",
    "BlockReconstructor",
    "FrozenWeightQuantizer",
    "LossContext",
    "LossTerm",
    "ReconstructionLoss",
    "RoundingRegularizer",
    "Stage",
    "block_layers",
    "derive_seed",
    "feature_last",
    "stage_quantizers",
    "token_mask",
]

log = logging.getLogger(__name__)

STATE_FILE = "recon_state.pt"
_STATE_VERSION = 2  # 2: the fingerprint is checkpoint.state_digest


@dataclass(frozen=True)
class Stage:
    """One optimization run over a block.

    ``drop_prob`` is the probability that an activation element *inside* the block is
    fake-quantized (QDrop); 0 keeps activations float, 1 quantizes all of them.
    ``rec_p`` is the norm of the reconstruction error (2: MSE).
    """

    name: str
    iters: int
    learn_weights: bool
    learn_act: bool
    drop_prob: float
    rec_p: float = 2.0


@dataclass
class BlockCache:
    """A block's cached inputs (batch-first tensors or constants) and FP outputs."""

    args: list[Any]
    kwargs: dict[str, Any]
    # True (batch-first tensor), False (constant) or, for a tuple / list value (e.g. a
    # transformer's rotary ``position_embeddings``), a tuple of such flags.
    batched_args: list[Any]
    batched_kwargs: dict[str, Any]
    fp_out: torch.Tensor
    fisher: torch.Tensor | None = None
    # Token outputs ``[N, L, H]`` (features last, module docs) and, when the calibration
    # data is a packed token batch, which of their tokens are real (``[N, L]`` bool).
    tokens: bool = False
    token_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.fp_out.shape[0]

    def inputs(self, idx: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = tuple(_take(a, b, idx) for a, b in zip(self.args, self.batched_args, strict=True))
        kwargs = {k: _take(v, self.batched_kwargs[k], idx) for k, v in self.kwargs.items()}
        return args, kwargs


def _rows(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return t.index_select(0, idx) if t is not None else None


def _take(value: Any, batched: Any, idx: torch.Tensor) -> Any:
    if batched is True:
        # index_select: the same rows as value[idx], a third of advanced indexing's cost on
        # the CPU for a batch of activations.
        return value.index_select(0, idx)
    if isinstance(batched, tuple):
        return type(value)(_take(v, b, idx) for v, b in zip(value, batched, strict=True))
    return value


@dataclass
class BlockInfo:
    """What a loss term's ``begin_block`` / ``end_block`` hook gets."""

    block: Block
    index: int
    num_blocks: int
    cache: BlockCache
    qmodel: QuantModel
    fp_model: QuantModel
    fp_block: nn.Module
    blocks: Sequence[Block] = ()
    calib_data: torch.Tensor | None = None
    batch_size: int = 0  # samples per iteration
    seed: int = 0

    def fp_module(self, block: Block) -> nn.Module:
        """The FP twin of ``block`` (of this run's frozen FP copy)."""
        return self.fp_model.model.get_submodule(block.name)


@dataclass
class LossContext:
    """Everything a loss term may read at one iteration."""

    q_out: torch.Tensor
    fp_out: torch.Tensor
    fisher: torch.Tensor | None
    inputs: tuple[tuple[Any, ...], dict[str, Any]]
    batch_indices: torch.Tensor
    block: Block
    block_index: int
    stage: Stage
    iteration: int  # 0-based within the stage
    rounding: list[AdaRoundQuantizer]
    act_quantizers: list[ReconActQuantizer]
    info: BlockInfo
    tokens: bool = False  # q_out / fp_out are token outputs [B, L, H]
    token_mask: torch.Tensor | None = None  # [B, L] bool, real tokens of this batch

    @property
    def step(self) -> int:
        """1-based iteration count (what the BRECQ / QDrop schedules count)."""
        return self.iteration + 1


@runtime_checkable
class LossTerm(Protocol):
    """A composable term of the reconstruction loss: ``term(ctx) -> scalar tensor``."""

    name: str

    def __call__(self, ctx: LossContext) -> torch.Tensor: ...


def _token_sum_mean(err: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, H]`` error: sum over features, mean over the real tokens (``mask``)."""
    per_token = err.sum(-1)
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def feature_last(block: Block, out: torch.Tensor) -> bool:
    """Whether ``out`` is a token output ``[B, L, H]`` (features last, module docs): a 3-D
    output of a transformer block or of a linear layer (a 3-D conv output is ``[B, C, L]``)."""
    if out.dim() != 3:
        return False
    return block.kind == "transformer" or isinstance(block.module, (QuantLinear, QuantConv1D))


def token_mask(calib_data: Any, out: torch.Tensor) -> torch.Tensor | None:
    """Real tokens ``[B, L]`` of token outputs ``out`` from a packed token batch; None when
    the data carries no mask of that length (then every token counts)."""
    if not is_token_batch(calib_data) or calib_data.shape[-1] != out.shape[1]:
        return None
    return calib_data[:, 1].to(out.device) != 0


@dataclass(frozen=True)
class ReconstructionLoss:
    """``|q_out - fp_out|^p`` (or ``(q_out - fp_out)^2 (|g| + 1)^2`` with ``fisher``)."""

    p: float = 2.0
    fisher: bool = False
    name: str = "rec"

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        diff = ctx.q_out - ctx.fp_out
        tokens = getattr(ctx, "tokens", False)
        if self.fisher:
            if ctx.fisher is None:
                raise QCalibError("Fisher-weighted loss without cached gradients")
            err = diff.square() * ctx.fisher.square()
        elif not tokens:
            return lp_channel_sum_mean(diff, self.p)
        else:
            err = lp_error(diff, self.p)
        if tokens:
            return _token_sum_mean(err, getattr(ctx, "token_mask", None))
        return channel_sum_mean(err)


@dataclass(frozen=True)
class RoundingRegularizer:
    """``weight * sum(1 - |2 h(V) - 1|^beta)`` over the block's AdaRound quantizers;
    0 during the warm-up (as in the BRECQ / QDrop code)."""

    weight: float
    schedule: BetaSchedule
    name: str = "round"

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        if not ctx.rounding or self.weight == 0 or not self.schedule.active(ctx.step):
            return ctx.q_out.new_zeros(())
        beta = self.schedule(ctx.step)
        return self.weight * sum(q.regularization(beta) for q in ctx.rounding)


# -- helpers ---------------------------------------------------------------------------


class BlockNotReached(QCalibError):
    """The forward pass on the calibration data never calls the block."""


def _output_tensor(out: Any, what: str = "block output") -> torch.Tensor:
    t = first_tensor(out)
    if t is None:
        raise QCalibError(f"{what} is a {type(out).__name__}, not a tensor; cannot reconstruct it")
    return t


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    return type(out)([new, *out[1:]])


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return _output_tensor(out, "model output")


def _clone(x: Any) -> Any:
    if isinstance(x, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in x):
        return type(x)(_clone(v) for v in x)
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _collate(items: list[Any], sizes: list[int], what: str) -> tuple[Any, Any]:
    """Concatenate batch-first tensors; keep a value that is the same in every batch.

    Tuples / lists of equal length (HF rotary ``position_embeddings = (cos, sin)``) are
    collated element by element; their flag is then a tuple of flags (see :func:`_take`).
    A transformer's ``[1, L]`` position ids or ``[1, L, D]`` rotary tables are the same
    in every batch and so kept once.
    """
    first = items[0]
    if (
        isinstance(first, (tuple, list))
        and any(isinstance(v, torch.Tensor) for v in first)
        and all(type(t) is type(first) and len(t) == len(first) for t in items)
    ):
        parts = [
            _collate([t[j] for t in items], sizes, f"element {j} of {what}")
            for j in range(len(first))
        ]
        flags = tuple(b for _, b in parts)
        if not any(flags):
            return first, False
        return type(first)(v for v, _ in parts), flags
    if all(
        isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n
        for t, n in zip(items, sizes, strict=True)
    ):
        return torch.cat(items), True
    if all(_same(items[0], t) for t in items[1:]):
        return items[0], False
    if any(t is None for t in items) and any(isinstance(t, torch.Tensor) for t in items):
        # transformers skips the attention mask of a batch without padding (sdpa).
        raise QCalibError(
            f"{what} is None in some calibration batches and a tensor in others (padding "
            "in some batches only); calibrate on sequences of one length without padding, "
            "or set the calibration batch size (--calib-batch-size) to the number of samples"
        )
    raise QCalibError(
        f"{what} is neither a batch-first tensor nor the same in every batch; block "
        "reconstruction needs batch-first block inputs"
    )


def _fisher_kl(q_logits: torch.Tensor, fp_logits: torch.Tensor, x: Any) -> torch.Tensor:
    """``KL(softmax(FP) || softmax(Q))`` of a batch (module docs): over classes (dim 1) of
    ``[B, C, ...]`` logits; over the vocabulary (last dim) of ``[B, L, V]`` LM logits, per
    token, padding excluded, summed per sequence and averaged over sequences."""
    if q_logits.dim() != 3:
        return F.kl_div(
            F.log_softmax(q_logits, dim=1), F.softmax(fp_logits, dim=1), reduction="batchmean"
        )
    per_token = F.kl_div(
        F.log_softmax(q_logits, dim=-1), F.softmax(fp_logits, dim=-1), reduction="none"
    ).sum(-1)
    mask = token_mask(x, q_logits)
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum() / q_logits.shape[0]


def block_layers(block: Block) -> list[QuantModule]:
    """The quantized layers of a block."""
    return [m for _, m in block.layers() if isinstance(m, QuantModule)]


def derive_seed(seed: int, *parts: int) -> int:
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def _term_id(term: Any) -> str:
    ident = getattr(term, "fingerprint", None)
    text = ident() if callable(ident) else (ident if ident is not None else repr(term))
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(text))


def _recon_identity(cfg: ReconConfig) -> dict[str, Any]:
    # Speed switches that are off leave the fingerprint of the runs made before they existed.
    return {k: v for k, v in asdict(cfg).items() if not (k in _SPEED_FLAGS and not v)}


_SPEED_FLAGS = ("amp", "compile")


class FrozenWeightQuantizer(nn.Module):
    """The weight quantizer of a stage that does not learn the weights: the quantized
    weight is computed once (by the plain quantizer, so the same values) and returned at
    every call; recomputed only if the weight tensor is written in place."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = [base]  # kept out of children / state_dict
        self.spec = getattr(base, "spec", None)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), w._version, w.shape, w.dtype, w.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.base[0](w).detach())
        return self._cache[1]


def _sample_indices(n: int, batch: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """``[iters, batch]`` draws without replacement, one ``randperm`` per iteration (the
    stream of drawing them inside the loop)."""
    if iters == 0:
        return torch.empty(0, batch, dtype=torch.long)
    return torch.stack([torch.randperm(n, generator=generator)[:batch] for _ in range(iters)])


# -- the engine ------------------------------------------------------------------------


class BlockReconstructor:
    """Reconstruct ``blocks`` of ``qmodel`` one after the other (see the module docs).

    ``stages(block)`` gives the optimization stages of a block. ``qmodel``'s quantizers
    must be initialized (weights and activations) before :meth:`run`.
    ``on_block_end(index, block)`` runs after each block's checkpoint and
    ``on_iteration(block_index, stage_index, iteration)`` after each optimizer step
    (progress reporting, tests that simulate an interruption).
    """

    def __init__(
        self,
        qmodel: QuantModel,
        blocks: Sequence[Block],
        stages: Callable[[Block], Sequence[Stage]],
        calib_data: torch.Tensor,
        cfg: ReconConfig,
        *,
        seed: int = 0,
        capture_batch_size: int = 64,
        extra_terms: Sequence[LossTerm] = (),
        progress: bool = True,
        work_dir: str | Path | None = None,
        method: str = "",
        fingerprint_extra: dict[str, Any] | None = None,
        on_block_end: Callable[[int, Block], None] | None = None,
        on_iteration: Callable[[int, int, int], None] | None = None,
    ) -> None:
        if len(calib_data) == 0:
            raise QCalibError("block reconstruction needs at least one calibration sample")
        self.qmodel = qmodel
        self.blocks = list(blocks)
        self.stages = stages
        self.calib_data = calib_data
        self.cfg = cfg
        self.seed = int(seed)
        self.capture_batch_size = int(capture_batch_size)
        self.extra_terms = list(extra_terms)
        self.progress = progress
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.method = method
        self.fingerprint_extra = fingerprint_extra or {}
        self.on_block_end = on_block_end
        self.on_iteration = on_iteration
        self.fp_model: QuantModel | None = None
        self.history: list[dict[str, Any]] = []
        self.resumed_from = 0

    # -- public -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        p = next(self.qmodel.parameters(), None)
        return p.device if p is not None else self.calib_data.device

    @property
    def state_path(self) -> Path | None:
        return self.work_dir / STATE_FILE if self.work_dir is not None else None

    def fingerprint(self) -> str:
        meta = {
            "engine": _STATE_VERSION,
            "method": self.method,
            "recon": _recon_identity(self.cfg),
            "seed": self.seed,
            "capture_batch_size": self.capture_batch_size,
            "blocks": [[b.name, b.kind, [asdict(s) for s in self.stages(b)]] for b in self.blocks],
            "extra_terms": [_term_id(t) for t in self.extra_terms],
            "device": self.device.type,
            "extra": self.fingerprint_extra,
        }
        state = sorted(self.qmodel.state_dict().items())
        return state_digest(meta, [("calib_data", self.calib_data), *state])

    def run(self) -> None:
        qmodel = self.qmodel
        modes = [(m, m.training) for m in qmodel.modules()]
        grads = [(p, p.requires_grad) for p in qmodel.parameters()]
        fingerprint = self.fingerprint()  # of the initial state, before anything loads
        self.fp_model = copy.deepcopy(qmodel).eval()
        self.fp_model.set_quant_state(False, False)
        for p in self.fp_model.parameters():
            p.requires_grad_(False)
        qmodel.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            done = self._load(fingerprint)
            self.resumed_from = done
            if done:
                log.info("resuming reconstruction at block %d/%d", done + 1, len(self.blocks))
            for index in range(done, len(self.blocks)):
                self._reconstruct_block(index)
                self._save(fingerprint, index + 1)
                if self.on_block_end is not None:
                    self.on_block_end(index, self.blocks[index])
        finally:
            for m, mode in modes:
                m.training = mode
            for p, flag in grads:
                p.requires_grad_(flag)
            self.fp_model = None

    # -- checkpoints --------------------------------------------------------------

    def _save(self, fingerprint: str, done: int) -> None:
        path = self.state_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "version": _STATE_VERSION,
            "fingerprint": fingerprint,
            "method": self.method,
            "done": done,
            "blocks": [b.name for b in self.blocks],
            "seed": self.seed,
            "model": {k: v.detach().cpu() for k, v in self.qmodel.state_dict().items()},
            # The finished blocks' timings and losses, so a resumed run reports them all.
            "history": [h for h in self.history if h["index"] < done],
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load(self, fingerprint: str) -> int:
        path = self.state_path
        if path is None or not path.exists():
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: start over rather than fail
            log.warning("ignoring unreadable reconstruction state %s (%s)", path, e)
            return 0
        if state.get("version") != _STATE_VERSION or state.get("fingerprint") != fingerprint:
            log.warning(
                "ignoring reconstruction state in %s: it was made with another model, data, "
                "seed or configuration; starting over",
                path,
            )
            return 0
        self.qmodel.load_state_dict(state["model"])
        self.history = [{**h, "restored": True} for h in state.get("history", [])]
        return min(int(state["done"]), len(self.blocks))

    # -- one block ----------------------------------------------------------------

    def _fp_block(self, block: Block) -> nn.Module:
        assert self.fp_model is not None
        return self.fp_model.model.get_submodule(block.name)

    def _reconstruct_block(self, index: int) -> None:
        block = self.blocks[index]
        label = block.name or "<model>"
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            cache = self.capture(index)
        except BlockNotReached:
            # Layers the forward pass never runs (e.g. auxiliary heads in eval mode) do
            # not affect the output; they keep rounding to nearest.
            log.warning("block %s is not reached by the forward pass; not reconstructed", label)
            return
        info = BlockInfo(
            block, index, len(self.blocks), cache, self.qmodel, self.fp_model,
            self._fp_block(block), self.blocks, self.calib_data,
            min(self.cfg.batch_size, len(cache)), self.seed,
        )  # fmt: skip
        terms_all = self.extra_terms
        for t in terms_all:
            if hasattr(t, "begin_block"):
                t.begin_block(info)
        try:
            for stage_index, stage in enumerate(self.stages(block)):
                self._run_stage(info, stage_index, stage)
        finally:
            for t in terms_all:
                if hasattr(t, "end_block"):
                    t.end_block(info)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        log.info(
            "reconstructed block %d/%d %s (%s) in %.1fs (%.1fs CPU)",
            index + 1, len(self.blocks), label, block.kind, seconds, cpu,
        )  # fmt: skip
        self.history.append(
            {"block": block.name, "index": index, "seconds": seconds, "cpu_seconds": cpu}
        )

    @torch.no_grad()
    def capture(self, index: int) -> BlockCache:
        """Inputs of block ``index`` in the quantized model, FP outputs (and Fisher weights)."""
        if self.fp_model is None:
            raise RuntimeError("capture() runs inside run()")
        block = self.blocks[index]
        q_mod, fp_mod = block.module, self._fp_block(block)
        fisher = self.cfg.fisher
        label = f"block {block.name or '<model>'}"
        args_b: list[tuple] = []
        kwargs_b: list[dict] = []
        outs, grads, sizes = [], [], []
        later = [m for b in self.blocks[index + 1 :] for m in block_layers(b)]
        for x in torch.split(self.calib_data, self.capture_batch_size):
            store = self._capture_batch(x, q_mod, fp_mod, later, fisher)
            if "fp" not in store or "args" not in store:
                raise BlockNotReached(f"{label} is not reached by the model's forward pass")
            args_b.append(store["args"])
            kwargs_b.append(store["kwargs"])
            outs.append(store["fp"])
            if fisher:
                grads.append(store["fisher"])
            sizes.append(x.shape[0])

        n_args = {len(a) for a in args_b}
        keys = {tuple(sorted(k)) for k in kwargs_b}
        if len(n_args) != 1 or len(keys) != 1:
            raise QCalibError(f"{label} is called with different arguments from batch to batch")
        args, batched_args = [], []
        for j in range(n_args.pop()):
            value, batched = _collate([a[j] for a in args_b], sizes, f"input {j} of {label}")
            args.append(value)
            batched_args.append(batched)
        kwargs, batched_kwargs = {}, {}
        for key in keys.pop():
            value, batched = _collate([k[key] for k in kwargs_b], sizes, f"{key!r} of {label}")
            kwargs[key], batched_kwargs[key] = value, batched
        fp_out = torch.cat(outs)
        tokens = feature_last(block, fp_out)
        return BlockCache(
            args, kwargs, batched_args, batched_kwargs, fp_out,
            torch.cat(grads) if fisher else None, tokens,
            token_mask(self.calib_data, fp_out) if tokens else None,
        )  # fmt: skip

    def _capture_batch(
        self,
        x: torch.Tensor,
        q_mod: nn.Module,
        fp_mod: nn.Module,
        later: list[QuantModule],
        fisher: bool,
    ) -> dict[str, Any]:
        """One calibration batch: FP block output, quantized block input, Fisher weights."""
        store: dict[str, Any] = {}

        def fp_hook(_m: nn.Module, _a: Any, out: Any) -> None:
            store.setdefault("fp", _output_tensor(out).detach().clone())
            if not fisher:
                raise StopForward

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if "args" not in store:
                store["args"] = tuple(_clone(a) for a in args)
                store["kwargs"] = {k: _clone(v) for k, v in kwargs.items()}
            if not fisher:
                raise StopForward

        def grad_hook(_m: nn.Module, _a: Any, out: Any) -> Any:
            if "leaf" in store:
                return None
            leaf = _output_tensor(out).detach().requires_grad_()
            store["leaf"] = leaf
            return _replace_first(out, leaf.clone())

        assert self.fp_model is not None
        handle = fp_mod.register_forward_hook(fp_hook)
        fp_logits = None
        try:
            fp_logits = _logits(self.fp_model(x))
        except StopForward:
            pass
        finally:
            handle.remove()
        handles = [q_mod.register_forward_pre_hook(pre_hook, with_kwargs=True)]
        flags = [(m, m.use_weight_quant, m.use_act_quant) for m in later]
        try:
            if not fisher:
                with contextlib.suppress(StopForward):
                    self.qmodel(x)
                return store
            # Fisher: quantized up to and including this block, float after it.
            handles.append(q_mod.register_forward_hook(grad_hook))
            for m in later:
                m.set_quant_state(False, False)
            with torch.enable_grad():
                q_logits = _logits(self.qmodel(x))
                loss = _fisher_kl(q_logits, fp_logits, x)
                leaf = store.get("leaf")
                if leaf is None:
                    return store
                g = None
                if loss.requires_grad:
                    (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
            g = torch.zeros_like(leaf) if g is None else g
            store["fisher"] = g.abs() + 1.0  # BRECQ: |g| + 1 (damping 1)
            return store
        finally:
            for h in handles:
                h.remove()
            for m, w, a in flags:
                m.set_quant_state(w, a)

    def _terms(self, stage: Stage) -> list[LossTerm]:
        cfg = self.cfg
        terms: list[LossTerm] = [ReconstructionLoss(stage.rec_p, cfg.fisher)]
        if stage.learn_weights:
            schedule = BetaSchedule(stage.iters, cfg.warmup, cfg.b_start, cfg.b_end)
            terms.append(RoundingRegularizer(cfg.reg_weight, schedule))
        return terms + self.extra_terms

    def _run_stage(self, info: BlockInfo, stage_index: int, stage: Stage) -> None:
        cfg, block, cache, index = self.cfg, info.block, info.cache, info.index
        device = cache.fp_out.device
        seed = derive_seed(self.seed, index, stage_index)
        idx_gen = torch.Generator().manual_seed(seed)
        drop_gen = torch.Generator(device=device).manual_seed(seed)
        with stage_quantizers(block, stage, drop_gen) as (rounding, acts):
            terms = self._terms(stage)
            optimizers: list[torch.optim.Optimizer] = []
            scheduler = None
            if rounding:
                optimizers.append(torch.optim.Adam([q.v for q in rounding], lr=cfg.w_lr))
            scales = [a.scale for a in acts if a.learn_scale]
            if scales:
                opt_a = torch.optim.Adam(scales, lr=cfg.a_lr)
                optimizers.append(opt_a)
                scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                    opt_a, T_max=max(stage.iters, 1), eta_min=0.0
                )
            groups = [g for t in terms for g in (getattr(t, "param_groups", lambda: [])())]
            if groups:
                optimizers.append(torch.optim.Adam(groups))
            iters = stage.iters if optimizers else 0
            n = len(cache)
            batch = min(cfg.batch_size, n)
            desc = f"[{index + 1}/{info.num_blocks}] {block.name or '<model>'} {stage.name}"
            bar = tqdm(range(iters), desc=desc, leave=False, disable=not self.progress)
            first = last = None
            t_stage = time.perf_counter()
            all_idx = _sample_indices(n, batch, iters, idx_gen).to(device)
            forward = torch.compile(block.module) if cfg.compile and iters else block.module
            autocast = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if cfg.amp
                else contextlib.nullcontext()
            )
            for it in bar:
                idx = all_idx[it]
                inputs = cache.inputs(idx)
                with torch.enable_grad():
                    with autocast:
                        q_out = _output_tensor(forward(*inputs[0], **inputs[1]))
                    fp_out, fisher = _rows(cache.fp_out, idx), _rows(cache.fisher, idx)
                    mask = _rows(cache.token_mask, idx)
                    ctx = LossContext(
                        q_out, fp_out, fisher, inputs, idx, block, index, stage, it,
                        rounding, acts, info, cache.tokens, mask,
                    )  # fmt: skip
                    values = [(t.name, t(ctx)) for t in terms]
                    total = sum(v for _, v in values)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                if total.requires_grad:
                    total.backward()
                for opt in optimizers:
                    opt.step()
                if scheduler is not None:
                    scheduler.step()
                for a in acts:
                    a.project()
                if self.on_iteration is not None:
                    self.on_iteration(index, stage_index, it)
                if it == 0 or it == iters - 1 or (self.progress and it % 50 == 0):
                    last = {name: float(v.detach()) for name, v in values}
                    first = first or last
                    if self.progress:
                        postfix = {k: f"{v:.3g}" for k, v in last.items()}
                        bar.set_postfix(loss=f"{float(total.detach()):.4g}", **postfix)
            bar.close()
            self.history.append(
                {"block": block.name, "index": index, "stage": stage.name, "iters": iters,
                 "seconds": round(time.perf_counter() - t_stage, 4), "first": first,
                 "last": last}
            )  # fmt: skip


@contextlib.contextmanager
def stage_quantizers(
    block: Block, stage: Stage, generator: torch.Generator | None = None, commit: bool = True
) -> Iterator[tuple[list[AdaRoundQuantizer], list[ReconActQuantizer]]]:
    """Swap the block's quantizers for the stage's trainable ones; yield them.

    Weights get :class:`AdaRoundQuantizer` s when the stage learns them; every activation
    quantizer becomes a :class:`ReconActQuantizer` (learned step when the stage learns
    activations, drop probability ``stage.drop_prob``), and a stage that does not learn
    the weights quantizes them once (:class:`FrozenWeightQuantizer`); all layers quantize
    weights and activations. On a normal exit with ``commit`` the rounding is hardened into the
    weights and the learned steps written back; otherwise (an exception, ``commit=False``)
    the original quantizers return unchanged. The layers' quant-state flags are restored.
    """
    layers = block_layers(block)
    flags = [(m, m.use_weight_quant, m.use_act_quant) for m in layers]
    rounding: list[AdaRoundQuantizer] = []
    acts: list[ReconActQuantizer] = []
    finished = False
    try:
        for m in layers:
            if stage.learn_weights:
                rounding.append(install_adaround(m))
            else:
                m.weight_quantizer = FrozenWeightQuantizer(m.weight_quantizer)
            if m.act_quantizer is not None:
                base = m.act_quantizer
                act = ReconActQuantizer(base, stage.learn_act, stage.drop_prob, generator)
                m.act_quantizer = act.to(m.weight.device)
                acts.append(act)
            m.set_quant_state(True, True)
        yield rounding, acts
        finished = commit
    finally:
        for m in layers:
            if isinstance(m.weight_quantizer, AdaRoundQuantizer):
                (harden if finished else restore)(m)
            if isinstance(m.weight_quantizer, FrozenWeightQuantizer):
                m.weight_quantizer = m.weight_quantizer.base[0]
            if isinstance(m.act_quantizer, ReconActQuantizer):
                q = m.act_quantizer
                m.act_quantizer = q.commit() if finished else q.base[0]
        for m, w, a in flags:
            m.set_quant_state(w, a)
