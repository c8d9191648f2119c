"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights.

For a normalization layer whose output feeds only a group of linears, every input channel
``j`` gets

    s_j = max|X_j|^alpha / max_over_the_group max_i |W_ij|^(1 - alpha)

and the network is rewritten ``X diag(s)^-1`` (the norm's weight and bias divided by
``s``) times ``diag(s) W`` (the linears' input columns multiplied by ``s``): the same
function in exact arithmetic, with flatter activation channels that per-tensor activation
quantization handles better. ``max|X_j|`` is taken over the calibration set's valid tokens
(padding excluded when the batch is a packed text batch) in one FP forward pass.

Choices:

* **Pairs folded** (``pairs="norm"``, the default, as the paper's code does for Llama).
  Llama / Mistral / Qwen2-style decoder layers: ``input_layernorm`` ->
  ``self_attn.{q,k,v}_proj`` and ``post_attention_layernorm`` -> ``mlp.{gate,up}_proj``.
  GPT-2-style blocks: ``ln_1`` -> ``attn.c_attn`` and ``ln_2`` -> ``mlp.c_fc`` (HF's
  ``Conv1D`` keeps its weight as ``[in, out]``, so its *rows* are scaled). Post-LN
  encoders (BERT) are skipped: their norm output also feeds the residual stream, so
  dividing it by ``s`` would change the function. Any module with none of these patterns
  is left alone and named in the report's ``skipped`` with one logged warning.
* **Linear -> linear pairs** (``pairs="all"``, ``--smoothquant-pairs all``): also the
  inputs of ``o_proj`` and ``down_proj``, folded into the linear that produces them.
  ``down_proj`` reads ``act(gate_proj(x)) * up_proj(x)``, which scales channel by channel
  with ``up_proj``'s output, and ``o_proj`` reads ``softmax(QK^T) V`` per head, which
  mixes tokens, not channels, so dividing ``up_proj``'s / ``v_proj``'s output rows (and
  bias) by ``s`` and multiplying the consumer's input columns by ``s`` keeps the function.
  With grouped-query attention every query head of a group reads the same ``v_proj``
  channels, so ``s`` is one per ``v_proj`` output channel, from the maxima over its
  group's ``o_proj`` channels, repeated over the group.
* **Foldable norms.** ``nn.LayerNorm`` / ``nn.RMSNorm`` with an affine weight, and HF
  ``*RMSNorm`` classes that multiply by ``weight`` (Gemma's, which multiplies by
  ``1 + weight``, is not one of them and is skipped).
* **Clamps.** As the SmoothQuant code: activation and weight maxima clamped to at least
  ``1e-5``, ``s`` too. A channel never active on the calibration set keeps ``s = 1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qcalib.data.tokens import is_token_batch, unpack_tokens
from qcalib.errors import QCalibError
from qcalib.model.stop import forward_until_stopped, stop_before, unread_output_head

__all__ = [
    "PAIRS",
    "LinearPair",
    "SmoothGroup",
    "apply_smoothquant",
    "channel_abs_max",
    "find_linear_pairs",
    "find_smooth_groups",
]

log = logging.getLogger(__name__)

_EPS = 1e-5

# (norm attribute, linear attributes) per known decoder-layer layout.
_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
)
# (producer, consumer) linears whose channels match one to one or by GQA groups.
_LINEAR_PATTERNS: tuple[tuple[str, str], ...] = (
    ("self_attn.v_proj", "self_attn.o_proj"),
    ("mlp.up_proj", "mlp.down_proj"),
)
#: What ``apply_smoothquant`` folds: norm -> linear only, or the linear pairs too.
PAIRS = ("norm", "all")


@dataclass(frozen=True)
class SmoothGroup:
    """A norm and the linears that read its output (qualified names in the model)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LinearPair:
    """A linear whose output channels are (per ``group`` of heads) another's inputs."""

    producer: str
    consumer: str
    #: Consumer input channels per producer channel (query heads per key/value head).
    group: int = 1
    head_dim: int = 1

    def to_consumer(self, t: torch.Tensor) -> torch.Tensor:
        """A per-producer-channel tensor repeated onto the consumer's input channels."""
        if self.group == 1:
            return t
        return t.view(-1, 1, self.head_dim).expand(-1, self.group, -1).reshape(-1)

    def to_producer(self, t: torch.Tensor) -> torch.Tensor:
        """Per-consumer-channel maxima reduced to one per producer channel."""
        if self.group == 1:
            return t
        return t.view(-1, self.group, self.head_dim).amax(1).reshape(-1)


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x @ W + b with W [in, out].
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def _in_features(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.in_features
    if _is_conv1d(m):
        return m.weight.shape[0]
    return None


def _foldable_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    if isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
        return True
    name = type(m).__name__
    return name.endswith("RMSNorm") and not name.startswith("Gemma")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_smooth_groups(model: nn.Module) -> tuple[list[SmoothGroup], list[str]]:
    """Foldable ``norm -> linears`` groups, and what was found but could not be folded."""
    groups: list[SmoothGroup] = []
    skipped: list[str] = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for norm_attr, linear_attrs in _PATTERNS:
            norm = _get(m, norm_attr)
            if norm is None:
                continue
            linears = [_get(m, a) for a in linear_attrs]
            where = f"{prefix}{norm_attr}"
            if any(lin is None for lin in linears):
                skipped.append(f"{where} (its linears {', '.join(linear_attrs)} not all found)")
                continue
            if not _foldable_norm(norm):
                skipped.append(f"{where} ({type(norm).__name__} cannot absorb a scale)")
                continue
            width = norm.weight.shape[0]
            if any(_in_features(lin) != width for lin in linears):
                skipped.append(f"{where} (linears are not plain Linear/Conv1D of width {width})")
                continue
            groups.append(SmoothGroup(where, tuple(f"{prefix}{a}" for a in linear_attrs)))
    return groups, skipped


def find_linear_pairs(model: nn.Module) -> tuple[list[LinearPair], list[str]]:
    """Foldable ``producer -> consumer`` linear pairs (module notes), and what was found
    but could not be folded."""
    pairs: list[LinearPair] = []
    skipped: list[str] = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for prod_attr, cons_attr in _LINEAR_PATTERNS:
            prod, cons = _get(m, prod_attr), _get(m, cons_attr)
            if prod is None or cons is None:
                continue
            where = f"{prefix}{prod_attr} -> {cons_attr}"
            if not (isinstance(prod, nn.Linear) and isinstance(cons, nn.Linear)):
                skipped.append(f"{where} (not plain Linear layers)")
                continue
            width, reads = prod.out_features, cons.in_features
            group, head_dim = 1, 1
            if reads != width:
                head_dim = getattr(_get(m, "self_attn"), "head_dim", None) or 0
                if (
                    prod_attr != "self_attn.v_proj"
                    or not head_dim
                    or reads % width
                    or (width % head_dim)
                ):
                    skipped.append(f"{where} ({width} outputs feed {reads} inputs)")
                    continue
                group = reads // width
            pairs.append(LinearPair(f"{prefix}{prod_attr}", f"{prefix}{cons_attr}", group,
                                    head_dim))  # fmt: skip
    return pairs, skipped


@torch.no_grad()
def channel_abs_max(
    model: nn.Module,
    calib_data: torch.Tensor,
    modules: dict[str, nn.Module],
    batch_size: int = 16,
    inputs: dict[str, nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """``max |output_j|`` per last-dim channel of each of ``modules`` (and ``max |input_j|``
    of each of ``inputs``) over the calibration set (valid tokens only for packed text
    batches), float32, in one pass."""
    out: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None}
    handles = []

    def record(name: str, y: Any) -> None:
        y = y[0] if isinstance(y, (tuple, list)) else y
        mask = state["mask"]
        if mask is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(mask.shape):
            y = y[mask.to(torch.bool)]
        a = y.detach().reshape(-1, y.shape[-1]).abs().to(torch.float32)
        if a.shape[0] == 0:
            return
        cur = a.amax(0)
        out[name] = cur if name not in out else torch.maximum(out[name], cur)

    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(lambda _m, _a, y, n=name: record(n, y)))
    for name, mod in (inputs or {}).items():
        handles.append(mod.register_forward_pre_hook(lambda _m, a, n=name: record(n, a)))
    # Unless the head's own output is wanted, the logits are never read: stop at its input.
    head = unread_output_head(model, [*modules.values(), *(inputs or {}).values()])
    was_training = model.training
    model.eval()
    try:
        for chunk in torch.split(calib_data, batch_size):
            state["mask"] = unpack_tokens(chunk)[1] if is_token_batch(chunk) else None
            with stop_before(head):
                forward_until_stopped(model, chunk)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def _weight_abs_max(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach().to(torch.float32).abs()
    return w.amax(1) if _is_conv1d(m) else w.amax(0)  # per input channel


@torch.no_grad()
def _fold(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        if _is_conv1d(lin):
            lin.weight.mul_(s.to(lin.weight.dtype)[:, None])
        else:
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def _fold_pair(pair: LinearPair, producer: nn.Linear, consumer: nn.Linear, s: torch.Tensor) -> None:
    producer.weight.div_(s.to(producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    consumer.weight.mul_(pair.to_consumer(s).to(consumer.weight.dtype)[None, :])


def _spread(a: torch.Tensor) -> float:
    """max / median of per-channel maxima: how much the worst channel dominates."""
    return round(float(a.max() / a.median().clamp_min(_EPS)), 4)


def apply_smoothquant(
    model: nn.Module,
    calib_data: torch.Tensor,
    alpha: float = 0.5,
    batch_size: int = 16,
    pairs: str = "norm",
) -> dict[str, Any]:
    """Smooth ``model`` in place (see the module doc); returns a report for ``result.json``:
    ``alpha``, ``groups`` (norm, linears, max/median of the channel maxima before and
    after), ``linear_pairs`` (with ``pairs="all"``: producer, consumer, the same spreads)
    and ``skipped``."""
    if not 0.0 <= alpha <= 1.0:
        raise QCalibError(f"--smoothquant ALPHA must be in [0, 1], got {alpha}")
    if pairs not in PAIRS:
        raise QCalibError(f"--smoothquant-pairs must be one of {', '.join(PAIRS)}, got {pairs!r}")
    groups, skipped = find_smooth_groups(model)
    linear_pairs: list[LinearPair] = []
    if pairs == "all":
        linear_pairs, skipped_pairs = find_linear_pairs(model)
        skipped += skipped_pairs
    if not groups and not linear_pairs:
        log.warning(
            "smoothquant: no foldable norm -> linear pair in %s; the model is left unchanged%s",
            type(model).__name__,
            f" ({'; '.join(skipped[:3])})" if skipped else "",
        )
        return {"alpha": alpha, "groups": [], "linear_pairs": [],
                "skipped": skipped or [type(model).__name__]}  # fmt: skip
    if skipped:
        log.warning("smoothquant: skipped %d: %s", len(skipped), "; ".join(skipped[:5]))
    norms = {g.norm: model.get_submodule(g.norm) for g in groups}
    consumers = {p.consumer: model.get_submodule(p.consumer) for p in linear_pairs}
    # Every maximum is read from the unsmoothed model (each fold keeps the function, so
    # the order of the folds does not matter).
    act_max = channel_abs_max(model, calib_data, norms, batch_size, inputs=consumers)
    rows = []
    for g in groups:
        if g.norm not in act_max:
            skipped.append(f"{g.norm} (not reached by the calibration data)")
            continue
        a = act_max[g.norm]
        linears = [model.get_submodule(n) for n in g.linears]
        w = torch.stack([_weight_abs_max(lin).to(a.device) for lin in linears]).amax(0)
        s = (a.clamp_min(_EPS).pow(alpha) / w.clamp_min(_EPS).pow(1.0 - alpha)).clamp_min(_EPS)
        s = torch.where(a > 0, s, torch.ones_like(s))
        _fold(norms[g.norm], linears, s.to(norms[g.norm].weight.device))
        rows.append(
            {
                "norm": g.norm,
                "linears": list(g.linears),
                "act_spread_before": _spread(a),
                "act_spread_after": _spread(a / s),
            }
        )
    pair_rows = []
    for p in linear_pairs:
        if p.consumer not in act_max:
            skipped.append(f"{p.consumer} (not reached by the calibration data)")
            continue
        a = p.to_producer(act_max[p.consumer])
        consumer = consumers[p.consumer]
        w = p.to_producer(_weight_abs_max(consumer).to(a.device))
        s = (a.clamp_min(_EPS).pow(alpha) / w.clamp_min(_EPS).pow(1.0 - alpha)).clamp_min(_EPS)
        s = torch.where(a > 0, s, torch.ones_like(s)).to(consumer.weight.device)
        _fold_pair(p, model.get_submodule(p.producer), consumer, s)
        pair_rows.append({
            "producer": p.producer, "consumer": p.consumer,
            "act_spread_before": _spread(a), "act_spread_after": _spread(a / s.to(a.device)),
        })  # fmt: skip
    return {"alpha": alpha, "groups": rows, "linear_pairs": pair_rows, "skipped": skipped}
