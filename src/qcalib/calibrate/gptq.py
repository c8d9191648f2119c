"""GPTQ (Frantar et al. 2022): second-order weight rounding, layer by layer, block by block.

For every quantized layer with weight ``W [O, K]`` (a conv's weight flattened to
``[O, C*kh*kw]``, its inputs unfolded to match) and calibration inputs ``X [N, K]``:

1. ``H = 2/N * X^T X`` over the calibration tokens. When the calibration batch is a packed
   text batch (:mod:`qcalib.data.tokens`), rows of ``[B, L, K]`` inputs whose attention
   mask is 0 (padding) are left out.
2. Dead inputs (``H_jj = 0``: never active) get ``H_jj = 1`` and ``W[:, j] = 0``, as in the
   paper's code; zero lies on every grid here, so they quantize exactly.
3. ``act_order``: columns are visited by descending ``diag(H)`` and the permutation is
   undone at the end.
4. ``H += percdamp * mean(diag(H)) * I``; the upper Cholesky factor ``U`` of ``H^-1``
   drives the updates: column ``j`` is rounded, its error ``(w_j - q_j) / U_jj`` is
   spread onto the not-yet-quantized columns through row ``j`` of ``U``; lazily, inside
   batches of ``block_size`` columns, with one matrix product for the columns after the
   batch.

Choices (ours where the paper leaves them open):

* **The grid is fixed before GPTQ.** Scales / zero points come from a min-max observer on
  the FP weights, per output channel or per group (``QuantConfig.group_size``), exactly
  the round-to-nearest grid; GPTQ only changes which grid point each weight takes. With
  groups this is the ``static_groups`` variant of the public GPTQ code (the paper's code
  computes a group's scale when the sweep reaches it, on the error-updated weights): it
  keeps groups contiguous in the original column order, so ``act_order`` and groups
  combine without an index table, and the export is a plain ``[O, G]`` scale table.
* **Result storage.** The layer's FP weight parameter receives the GPTQ-rounded,
  dequantized weights ``(q - z) * s``, computed with the very arithmetic of
  :func:`~qcalib.quant.functional.fake_quantize`. The weight quantizer maps grid values
  onto themselves exactly, so the layer, ``state_dict``, the exported artifact and its
  reload all reproduce the GPTQ integers (the same scheme as AdaRound's ``harden``).
* **Walk.** Blocks of :func:`~qcalib.model.partition.partition_blocks` in execution
  order. For each block one pass over the calibration set, with every finished block
  quantized (its GPTQ weights) and the block itself float, collects ``H`` of all its
  layers; the pass stops at the block's output. All of the block's layers are then
  quantized from those ``H`` (the paper's code without its ``true-sequential`` option).
  With one layer per block this is fully sequential; with decoder layers as blocks it is
  the paper's setting. **Block inputs.** When a block follows the previous one in the
  same ``nn.ModuleList`` (a decoder / encoder stack), its inputs are the previous
  block's outputs, computed once with that block's GPTQ weights, with the other
  arguments (attention mask, rotary embeddings, ...) carried over from the stack's first
  block: one block forward per block to collect ``H`` and one to produce the next
  inputs, so the walk costs about two forwards of the network, as in the paper's code.
  Any other block (a lone layer, a CNN stage after pooling) is reached by a forward of
  the quantized network from its input, stopped at the block.
* **Activations.** Float while ``H`` is collected (GPTQ is a weight method). Activation
  quantizers (W4A8 ...) are calibrated afterwards by a min-max observer pass on the
  network with its GPTQ weights, as the observer calibrators do.
* **First-token weight** (``GPTQConfig.first_token_weight``, 1 = the paper). In a
  causal LM the first token of every sequence is an attention sink: every later token
  attends to its key and value, so an error on its q/k/v rows is read ``L`` times, while
  ``H``'s plain token mean gives it ``1/L`` of the weight. GPTQ then moves rounding error
  into the sink's directions: on SmolLM2-135M (W4A16 g128, 32 windows of 512) the
  layer-15 q/k/v output error of GPTQ was 0.2x round-to-nearest's on the other tokens and
  7.4x on the first token, and perplexity ended *above* round-to-nearest's. Counting each
  sequence's first token ``w`` times in ``H`` (its row scaled by ``sqrt(w)``) fixes this;
  ``w = 16`` (the default) was the best of 1 / 4 / 16 / 64 / 256 at W4A16 and W3A16 on
  validation windows of the calibration split (``bench/results/llm-validate.md``:
  W4A16 g128 21.86 -> 19.33, W3A16 g128 61.55 -> 41.95, 2 seeds); ``w = 1`` is the
  paper's GPTQ. Only token batches are weighted (CNN and plain-tensor inputs have no
  first token).
* **Data-parallel** (``torchrun``): each rank runs the Hessian passes on its contiguous
  shard of the calibration set; ``X^T X`` and the row counts are all-reduced (summed), so
  every rank holds the whole set's ``H`` (equal to one process's up to the order of the
  float32 sums) and runs the same solve.
* **Resuming** (``work_dir``, the run directory's ``calib_state/gptq``): after each block
  its layers' GPTQ weights go to a per-block checkpoint
  (:class:`~qcalib.calibrate.checkpoint.BlockCheckpoint`); a rerun from the same start
  (model state with its weight grid, calibration set, GPTQ options) loads the finished
  blocks and only replays their forwards to rebuild the next block's inputs, so the
  result equals an uninterrupted run's. Under ``torchrun`` rank 0 reads the checkpoint
  and broadcasts it, so every rank skips the same blocks (their Hessian all-reduces pair).
* Layers GPTQ cannot handle (grouped / depthwise convs, layers the calibration pass
  never reaches) keep their round-to-nearest weights, with a warning; :meth:`report`
  lists them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qcalib.calibrate.base import (
    CALIBRATORS,
    ObserverCalibrator,
    calibrate_activations,
    calibrate_weights,
)
from qcalib.calibrate.checkpoint import BlockCheckpoint, state_digest
from qcalib.config import CalibConfig, GPTQConfig
from qcalib.data.tokens import is_token_batch, unpack_tokens
from qcalib.distributed import (
    all_reduce_sum,
    broadcast_object,
    is_distributed,
    require_shards,
    shard,
    world_size,
)
from qcalib.errors import QCalibError
from qcalib.model.partition import Block, partition_blocks
from qcalib.model.qmodules import QuantConv2d, QuantLinear, QuantModule, first_tensor
from qcalib.model.stop import StopForward
from qcalib.model.wrap import QuantModel
from qcalib.quant.functional import fake_quantize

__all__ = [
    "GPTQCalibrator",
    "HessianAccumulator",
    "collect_hessians",
    "gptq_quantize",
    "layer_input_rows",
    "rtn_column_quantizer",
]

log = logging.getLogger(__name__)

ColumnQuantizer = Callable[[torch.Tensor, int], torch.Tensor]


def rtn_column_quantizer(
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int | None = None,
) -> ColumnQuantizer:
    """``f(column [O], original column index) -> grid value [O]`` for a fixed grid.

    ``scale`` is 0-dim (per tensor), ``[O]`` (per channel) or ``[O, G]`` (groups of
    ``group_size`` columns).
    """

    def quantize(w: torch.Tensor, j: int) -> torch.Tensor:
        s, z = scale, zero_point
        if group_size is not None:
            s, z = s[:, j // group_size], z[:, j // group_size]
        return fake_quantize(w, s.to(w.dtype), z.to(w.dtype), qmin, qmax, ch_axis=0)

    return quantize


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: ColumnQuantizer,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ-rounded ``weight [O, K]`` (dequantized) for the input Hessian ``H [K, K]``.

    Works in float32 (float64 when given float64). Raises :class:`QCalibError` when the
    dampened Hessian is not positive definite.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype).clone()
    k = w.shape[1]
    if h.shape != (k, k):
        raise ValueError(f"Hessian {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    cols = torch.arange(k, device=w.device)
    if act_order:
        cols = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, cols], h[cols][:, cols]
    torch.diagonal(h).add_(percdamp * torch.diagonal(h).mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise QCalibError(
            "GPTQ: the dampened Hessian is not positive definite; raise --percdamp "
            "(e.g. 0.1) or calibrate on more tokens"
        )
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    cols_list = cols.tolist()
    q = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qcol = quantize_column(col, cols_list[i1 + i])
            q[:, i1 + i] = qcol
            err = (col - qcol) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if act_order:
        q = q[:, torch.argsort(cols)]
    return q


class HessianAccumulator:
    """Running ``2/N * sum x x^T`` over input rows ``[N, K]`` (float32)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.sum = torch.zeros(k, k, device=device, dtype=torch.float32)
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        x = rows.detach().to(torch.float32)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.rows, 1))

    def reduce_across_ranks(self) -> None:
        """Sum ``X^T X`` and the row count over ranks (no-op in one process): every rank
        then holds the Hessian of the whole calibration set."""
        if not is_distributed():
            return
        self.sum = all_reduce_sum(self.sum)
        self.rows = int(all_reduce_sum(torch.tensor([self.rows], dtype=torch.int64)))


def supports_gptq(m: QuantModule) -> bool:
    return isinstance(m, QuantLinear) or (isinstance(m, QuantConv2d) and m.groups == 1)


def layer_input_rows(
    m: QuantModule,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    first_token_weight: float = 1.0,
) -> torch.Tensor:
    """The layer's input as ``[N, K]`` rows matching ``weight.flatten(1)``'s columns.

    Linear: one row per token; ``[B, L, K]`` inputs drop the rows where ``mask [B, L]``
    is 0, and with ``first_token_weight`` ``w != 1`` each sequence's first kept token is
    scaled by ``sqrt(w)`` (its row then counts ``w`` times in ``X^T X``); only token
    batches (a ``mask``) are weighted. Conv: one row per output position (``F.unfold``
    with the layer's geometry).
    """
    if isinstance(m, QuantConv2d):
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = 0
        else:
            padding = m.padding
        if isinstance(padding, str):
            raise QCalibError(f"GPTQ: {m.layer_name} uses padding={padding!r}; give it as ints")
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    k = x.shape[-1]
    masked = mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape)
    if first_token_weight != 1.0 and masked:
        shape = x.shape[:2]
        first = mask.to(torch.int8).argmax(dim=1).to(x.device)  # 0 when none is kept
        x = x.clone()
        x[torch.arange(shape[0], device=x.device), first] *= first_token_weight**0.5
    if masked:
        return x[mask.to(torch.bool)]
    return x.reshape(-1, k)


# One calibration batch at a block's input: positional args, keyword args, token mask.
BlockInputs = list[tuple[tuple, dict[str, Any], "torch.Tensor | None"]]


@torch.no_grad()
def capture_block_inputs(
    qmodel: QuantModel, block: Block, calib_data: torch.Tensor, batch_size: int
) -> BlockInputs:
    """The block's call arguments per calibration batch, from forwards of the quantized
    network (in its current state) stopped at the block's input."""
    captured: list[tuple[tuple, dict[str, Any]]] = []

    def pre_hook(_m: Any, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise StopForward

    handle = block.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    was_training = qmodel.training
    qmodel.eval()
    out: BlockInputs = []
    try:
        for chunk in torch.split(calib_data, batch_size):
            n = len(captured)
            with contextlib.suppress(StopForward):
                qmodel(chunk)
            if len(captured) == n:
                raise QCalibError(f"GPTQ: block {block.name!r} is not reached by the forward pass")
            args, kwargs = captured[-1]
            mask = unpack_tokens(chunk)[1] if is_token_batch(chunk) else None
            out.append((args, kwargs, mask))
    finally:
        handle.remove()
        qmodel.train(was_training)
    return out


@torch.no_grad()
def next_block_inputs(block: Block, inputs: BlockInputs) -> BlockInputs:
    """The inputs of the block after ``block`` in a layer stack: ``block``'s output (first
    tensor) in place of its first argument, every other argument unchanged."""
    out: BlockInputs = []
    for args, kwargs, mask in inputs:
        y = first_tensor(block.module(*args, **kwargs))
        if y is None or not args:
            raise QCalibError(
                f"GPTQ: block {block.name!r} does not pass a tensor on as its first argument"
            )
        out.append(((y, *args[1:]), kwargs, mask))
    return out


def stacked_after(blocks: list[Block], root: torch.nn.Module) -> list[bool]:
    """Per block: whether it directly follows the previous block in one ``nn.ModuleList``."""
    where: dict[int, tuple[int, int]] = {}
    for parent in root.modules():
        if isinstance(parent, torch.nn.ModuleList):
            for i, child in enumerate(parent):
                where.setdefault(id(child), (id(parent), i))
    flags = [False]
    for prev, block in zip(blocks, blocks[1:], strict=False):
        a, b = where.get(id(prev.module)), where.get(id(block.module))
        flags.append(a is not None and b is not None and a[0] == b[0] and b[1] == a[1] + 1)
    return flags


@torch.no_grad()
def collect_hessians(
    qmodel: QuantModel,
    block: Block,
    layers: dict[str, QuantModule],
    calib_data: torch.Tensor,
    batch_size: int,
    inputs: BlockInputs | None = None,
    first_token_weight: float = 1.0,
) -> dict[str, HessianAccumulator]:
    """Hessians of ``layers`` (all inside ``block``) from one pass over ``calib_data``.

    With ``inputs`` (the block's cached call arguments) only the block runs; else the
    model runs in its current quantization state up to the block's output. Under
    ``torchrun`` ``calib_data`` / ``inputs`` are this rank's shard and the accumulators are
    summed over ranks before they are returned.
    """
    acc = {n: HessianAccumulator(m.weight[0].numel(), m.weight.device) for n, m in layers.items()}
    state: dict[str, Any] = {"mask": None}
    handles = []
    for name, m in layers.items():

        def pre_hook(mod: QuantModule, args: tuple, name: str = name) -> None:
            acc[name].add(layer_input_rows(mod, args[0], state["mask"], first_token_weight))

        handles.append(m.register_forward_pre_hook(pre_hook))

    def stop(_m: Any, _a: Any, _o: Any) -> None:
        raise StopForward

    handles.append(block.module.register_forward_hook(stop))
    was_training = qmodel.training
    qmodel.eval()
    try:
        if inputs is not None:
            for args, kwargs, mask in inputs:
                state["mask"] = mask
                with contextlib.suppress(StopForward):
                    block.module(*args, **kwargs)
        else:
            for chunk in torch.split(calib_data, batch_size):
                state["mask"] = unpack_tokens(chunk)[1] if is_token_batch(chunk) else None
                with contextlib.suppress(StopForward):
                    qmodel(chunk)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    for a in acc.values():
        a.reduce_across_ranks()
    return acc


@CALIBRATORS.register("gptq")
class GPTQCalibrator(ObserverCalibrator):
    """GPTQ weights on a min-max grid; activations (if quantized) by min-max after."""

    weight_observer = "minmax"
    act_observer = "minmax"
    # The weights solve a least-squares fit to the set's Hessians, which must stand for
    # the pool's; the activations (W4A8 ...) then take the set's min-max ranges.
    reads = "fit"

    def __init__(self, cfg: CalibConfig) -> None:
        super().__init__(cfg)
        self._report: dict = {}

    def report(self) -> dict:
        return dict(self._report)

    def calibrate(
        self,
        qmodel: QuantModel,
        calib_data: torch.Tensor,
        seed: int = 0,
        progress: bool = True,
        work_dir: Path | None = None,
    ) -> None:
        g = self.cfg.gptq
        t0 = time.perf_counter()
        calibrate_weights(qmodel, self.weight_observer)
        blocks = partition_blocks(qmodel, example_input=calib_data[:1])
        # Data-parallel: Hessian passes on this rank's shard, H summed over ranks in
        # collect_hessians; every rank then solves the same H into the same weights.
        require_shards(len(calib_data), "GPTQ calibration", "--num-calib")
        full_calib, calib_data = calib_data, shard(calib_data)
        prefix = {id(m): n for n, m in qmodel.quant_modules()}
        checkpoint = self._checkpoint(qmodel, blocks, full_calib, work_dir)
        resumed, info, saved = checkpoint.load() if checkpoint is not None else (0, {}, {})
        if is_distributed():  # every rank skips the blocks rank 0 found finished
            resumed, info, saved = broadcast_object((resumed, info, saved))
        if resumed == len(blocks):
            log.info("gptq: all %d blocks were finished before: their weights are restored",
                     len(blocks))  # fmt: skip
        elif resumed:
            log.info("gptq: resuming at block %d/%d", resumed + 1, len(blocks))
        qmodel.set_quant_state(weight=True, act=False)
        fallback: list[str] = list(info.get("rtn_layers", []))
        stacked = stacked_after(blocks, qmodel)
        inputs: BlockInputs | None = None
        hessian_s: dict[str, float] = dict(info.get("hessian_seconds", {}))
        layer_s: dict[str, float] = dict(info.get("layer_seconds", {}))  # finished layers
        try:
            for i, block in enumerate(
                tqdm(blocks, desc="gptq blocks", leave=False, disable=not progress)
            ):
                if i + 1 < len(blocks) and stacked[i + 1] and not stacked[i]:
                    # The first block of a stack: its inputs are captured once, then each
                    # block's quantized output feeds the next.
                    inputs = capture_block_inputs(qmodel, block, calib_data, self.cfg.batch_size)
                elif not stacked[i]:
                    inputs = None
                if i < resumed:  # finished before: its weights back, only its forward again
                    with torch.no_grad():
                        for name, w in saved[i].items():
                            qmodel.model.get_submodule(name).weight.copy_(w)
                else:
                    t0 = time.perf_counter()
                    layers = self._solve_block(
                        qmodel, block, prefix, calib_data, inputs, fallback, hessian_s, layer_s
                    )
                    log.info("gptq: block %d/%d (%d layers) in %.1fs", i + 1, len(blocks),
                             len(layers), time.perf_counter() - t0)  # fmt: skip
                    if checkpoint is not None:
                        checkpoint.save(
                            i,
                            {name: m.weight for name, m in layers.items()},
                            {"rtn_layers": fallback, "hessian_seconds": hessian_s,
                             "layer_seconds": layer_s},
                        )  # fmt: skip
                if inputs is not None and i + 1 < len(blocks) and stacked[i + 1]:
                    inputs = next_block_inputs(block, inputs)
        finally:
            qmodel.set_quant_state(weight=True, act=True)
        if fallback:
            log.warning(
                "gptq: %d layer(s) kept round-to-nearest weights (grouped conv or not "
                "reached by the calibration data): %s",
                len(fallback),
                ", ".join(fallback[:10]),
            )
        calibrate_activations(
            qmodel, full_calib, self.act_observer, self.cfg.batch_size, progress
        )  # shards it itself
        self._report = {
            "blocks": len(blocks),
            "gptq_layers": len(layer_s),  # one solve timing per GPTQ-rounded layer
            "rtn_layers": fallback,
            "act_order": g.act_order,
            "percdamp": g.percdamp,
            "block_size": g.block_size,
            "first_token_weight": g.first_token_weight,
            "seconds": round(time.perf_counter() - t0, 3),
            "resumed_blocks": resumed,
            # Hessian passes per block and the GPTQ solve per layer (the cost split of
            # the benchmark's per-layer timing).
            "hessian_seconds": hessian_s,
            "layer_seconds": layer_s,
        }

    def _solve_block(
        self,
        qmodel: QuantModel,
        block: Block,
        prefix: dict[int, str],
        calib_data: torch.Tensor,
        inputs: BlockInputs | None,
        fallback: list[str],
        hessian_s: dict[str, float],
        layer_s: dict[str, float],
    ) -> dict[str, QuantModule]:
        """GPTQ on one block: its layers' Hessians from one pass (the block float), then
        each layer's solve. Returns the block's GPTQ-capable layers; those it could not
        solve (and the layers GPTQ cannot handle) are appended to ``fallback``; the
        timings go into ``hessian_s`` / ``layer_s``."""
        g = self.cfg.gptq
        layers = {}
        for _, m in block.layers():
            name = prefix.get(id(m))
            if name is None:
                continue
            if supports_gptq(m):
                layers[name] = m
            else:
                fallback.append(name)
        if not layers:
            return layers
        for m in layers.values():  # the block runs float while H is collected
            m.use_weight_quant = False
        t = time.perf_counter()
        try:
            acc = collect_hessians(
                qmodel,
                block,
                layers,
                calib_data,
                self.cfg.batch_size,
                inputs,
                first_token_weight=g.first_token_weight,
            )
        finally:
            for m in layers.values():
                m.use_weight_quant = True
        hessian_s[block.name] = round(time.perf_counter() - t, 4)
        for name, m in layers.items():
            if acc[name].rows == 0:
                fallback.append(name)
                continue
            t = time.perf_counter()
            self._quantize_layer(m, acc[name].hessian(), g)
            layer_s[name] = round(time.perf_counter() - t, 4)
        return layers

    def _checkpoint(
        self, qmodel: QuantModel, blocks: list[Block], calib: torch.Tensor, work_dir: Path | None
    ) -> BlockCheckpoint | None:
        """The walk's checkpoint, keyed on everything the result depends on: the GPTQ
        options, the blocks, the calibration set and the model state (its weight grid
        included) before the first block."""
        if work_dir is None:
            return None
        meta = {"walk": "gptq-v1", "gptq": asdict(self.cfg.gptq), "batch": self.cfg.batch_size,
                "blocks": [b.name for b in blocks], "ranks": world_size()}  # fmt: skip
        tensors = [("calib", calib), *sorted(qmodel.state_dict().items())]
        return BlockCheckpoint(Path(work_dir) / "gptq", state_digest(meta, tensors), "gptq")

    @staticmethod
    @torch.no_grad()
    def _quantize_layer(m: QuantModule, hessian: torch.Tensor, g: GPTQConfig) -> None:
        wq = m.weight_quantizer
        spec = wq.spec
        column = rtn_column_quantizer(
            wq.scale, wq.zero_point, spec.qmin, spec.qmax, spec.group_size
        )
        q = gptq_quantize(
            m.weight.flatten(1),
            hessian,
            column,
            block_size=g.block_size,
            percdamp=g.percdamp,
            act_order=g.act_order,
        )
        m.weight.copy_(q.reshape(m.weight.shape).to(m.weight.dtype))
