"""Partition a network into reconstruction blocks (BRECQ-style).

A block is either a residual-like module reconstructed as a whole, or a quantizable
layer that lies in no such module. A module is a block when:

1. its class is known: torchvision BasicBlock / Bottleneck ("residual"), InvertedResidual /
   MBConv and the efficientnet(-lite)-pytorch packages' MBConvBlock ("inverted_residual",
   with or without skip connection: the block boundary is the same, only the add is
   missing), ``nn.TransformerEncoderLayer`` / ``DecoderLayer``
   and torchvision's ViT / Swin blocks ("transformer"); subclasses included;
2. or it is detected structurally (see :func:`is_residual_graph`): it traces with fx and
   its output is the module input carried through residual additions, each adding a
   branch with at least one conv/linear; of nested such modules only the innermost
   count, so a stage of residual units gives the units, not the stage;
3. or another instance of its class was detected by rule 2 (a MobileNetV2-style class
   whose stride-2 instances have no skip connection is still one block kind).

Hugging Face transformers (a ``PreTrainedModel`` anywhere in the network): each decoder /
encoder layer is one "transformer" block, by class name (``LlamaDecoderLayer``,
``MistralDecoderLayer``, ``Qwen2DecoderLayer``, ``GPT2Block``, ``BertLayer``) or, for
other architectures, as an element of the layer list at a known path (``model.layers``,
``transformer.h``, ``encoder.layer``, ``gpt_neox.layers``, ...). A transformers model
whose layer list is found by neither rule raises :class:`QCalibError` naming its class:
reconstructing it layer by layer would silently drop the block-level objective.

Containers (Sequential / ModuleList / ModuleDict) are never blocks themselves. The kind
of a structurally detected block is "transformer" when it contains attention
(``nn.MultiheadAttention`` or a softmax), "inverted_residual" when it contains a
depthwise conv, else "residual". Modules are traced, not run, to detect structure: a
forward with Python side effects would run them once.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qcalib.errors import QCalibError
from qcalib.model.fold import try_trace
from qcalib.model.qmodules import FLOAT_UNITS, QuantModule, is_depthwise, is_quantizable
from qcalib.model.wrap import QuantModel, first_call_order

__all__ = ["Block", "BlockKind", "hf_layer_lists", "is_residual_graph", "partition_blocks"]

BlockKind = Literal["residual", "inverted_residual", "transformer", "layer"]

_KNOWN: dict[str, BlockKind] = {
    "torchvision.models.resnet.BasicBlock": "residual",
    "torchvision.models.resnet.Bottleneck": "residual",
    "torchvision.models.mobilenetv2.InvertedResidual": "inverted_residual",
    "torchvision.models.mobilenetv3.InvertedResidual": "inverted_residual",
    "torchvision.models.efficientnet.MBConv": "inverted_residual",
    "torchvision.models.efficientnet.FusedMBConv": "inverted_residual",
    # EfficientNet(-Lite) of the efficientnet-pytorch / efficientnet-lite-pytorch packages.
    "efficientnet_lite_pytorch.model.MBConvBlock": "inverted_residual",
    "efficientnet_pytorch.model.MBConvBlock": "inverted_residual",
    "torchvision.models.vision_transformer.EncoderBlock": "transformer",
    "torchvision.models.swin_transformer.SwinTransformerBlock": "transformer",
    "torchvision.models.swin_transformer.SwinTransformerBlockV2": "transformer",
    "torch.nn.modules.transformer.TransformerEncoderLayer": "transformer",
    "torch.nn.modules.transformer.TransformerDecoderLayer": "transformer",
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer": "transformer",
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer": "transformer",
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer": "transformer",
    "transformers.models.gpt2.modeling_gpt2.GPT2Block": "transformer",
    "transformers.models.bert.modeling_bert.BertLayer": "transformer",
}
# Where transformers models keep their layer list, relative to a PreTrainedModel.
_HF_LAYER_PATHS = (
    "model.layers",
    "layers",
    "transformer.h",
    "h",
    "encoder.layer",
    "layer",
    "model.decoder.layers",
    "decoder.layers",
    "gpt_neox.layers",
    "transformer.layers",
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax}


@dataclass(frozen=True)
class Block:
    """A unit of block reconstruction: qualified name (relative to the partitioned net)."""

    name: str
    module: nn.Module
    kind: BlockKind

    def layers(self) -> list[tuple[str, nn.Module]]:
        """The quantizable layers inside, with qualified names."""
        if self.kind == "layer":
            return [(self.name, self.module)]
        out = []
        for name, m in self.module.named_modules():
            if is_quantizable(m) and not _inside_float_unit(self.module, name):
                out.append((f"{self.name}.{name}" if self.name else name, m))
        return out


def _inside_float_unit(root: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(
        isinstance(root.get_submodule(".".join(parts[:i])), FLOAT_UNITS)
        for i in range(1, len(parts))
    )


def _known_kind(m: nn.Module) -> BlockKind | None:
    for cls in type(m).__mro__:
        kind = _KNOWN.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    return None


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADD_FUNCTIONS) or (
        n.op == "call_method" and n.target in _ADD_METHODS
    )


def _is_softmax(n: fx.Node, root: nn.Module) -> bool:
    return (
        (n.op == "call_function" and n.target in _SOFTMAX_FUNCTIONS)
        or (n.op == "call_method" and n.target == "softmax")
        or (n.op == "call_module" and isinstance(root.get_submodule(n.target), nn.Softmax))
    )


def is_residual_graph(root: nn.Module, graph: fx.Graph) -> bool:
    """Whether the graph's output is its input carried through residual additions.

    *Stream* nodes are the inputs and whatever is computed from stream nodes alone without
    a conv/linear (activations, norms, pooling, reshapes, adding constants). An add of a
    stream node's descendants is *residual* when, counted from the latest stream node
    both operands share, its branches contain at least one conv/linear and share none
    (identity and projection shortcuts both qualify; ``y + y`` and a stem conv feeding
    both sides do not). The graph is residual when its single output is a stream node
    downstream of a residual add.
    """
    anc: dict[fx.Node, int] = {}  # bitmask of ancestors, the node included
    index: dict[fx.Node, int] = {}
    input_mask = layer_mask = 0
    stream: dict[fx.Node, bool] = {}  # stream node -> has a residual add upstream
    for i, n in enumerate(graph.nodes):
        index[n] = i
        mask = 1 << i
        for p in n.all_input_nodes:
            mask |= anc[p]
        anc[n] = mask
        if n.op == "placeholder":
            input_mask |= 1 << i
            stream[n] = False
            continue
        if n.op == "output":
            out = n.args[0]
            return isinstance(out, fx.Node) and stream.get(out, False)
        if n.op == "call_module" and is_quantizable(root.get_submodule(n.target)):
            layer_mask |= 1 << i
            continue
        deps = [p for p in n.all_input_nodes if anc[p] & input_mask]
        if not deps:
            continue
        if all(p in stream for p in deps):
            stream[n] = any(stream[p] for p in deps)
        elif _is_add(n) and len(deps) == 2:
            a, b = anc[deps[0]], anc[deps[1]]
            shared = a & b
            split = [s for s in stream if (shared >> index[s]) & 1]
            if not split:
                continue
            since = ~anc[max(split, key=index.__getitem__)]
            if (a | b) & since & layer_mask and not shared & since & layer_mask:
                stream[n] = True
    return False


def _structural_kind(m: nn.Module, graph: fx.Graph | None) -> BlockKind:
    has_softmax = graph is not None and any(_is_softmax(n, m) for n in graph.nodes)
    if has_softmax or any(isinstance(c, nn.MultiheadAttention) for c in m.modules()):
        return "transformer"
    if any(is_depthwise(c) for c in m.modules()):
        return "inverted_residual"
    return "residual"


class _Analysis:
    """Which modules of a network are blocks, by the rules of the module docstring."""

    def __init__(self, extra: dict[int, str] | None = None) -> None:
        self._extra = extra or {}
        self._has_layer: dict[int, bool] = {}
        self._structural: dict[int, BlockKind | None] = {}
        self._final: dict[int, BlockKind | None] = {}
        self._below: dict[tuple[str, int], bool] = {}
        self._classes: set[type] = set()

    def has_layer(self, m: nn.Module) -> bool:
        key = id(m)
        if key not in self._has_layer:
            self._has_layer[key] = not isinstance(m, FLOAT_UNITS) and (
                is_quantizable(m) or any(self.has_layer(c) for c in m.children())
            )
        return self._has_layer[key]

    def _candidate(self, m: nn.Module) -> bool:
        return self.has_layer(m) and not is_quantizable(m) and not isinstance(m, _CONTAINERS)

    def _block_below(self, m: nn.Module, rule: str) -> bool:
        key = (rule, id(m))
        if key not in self._below:
            kind_of = self.structural if rule == "structural" else self.final
            self._below[key] = any(
                kind_of(c) is not None or self._block_below(c, rule) for c in m.children()
            )
        return self._below[key]

    def _known(self, m: nn.Module) -> BlockKind | None:
        return self._extra.get(id(m)) or _known_kind(m)  # type: ignore[return-value]

    def structural(self, m: nn.Module) -> BlockKind | None:
        """Rules 1 and 2: a known class, or an innermost structurally residual module."""
        key = id(m)
        if key not in self._structural:
            kind = self._known(m) if self._candidate(m) else None
            if kind is None and self._candidate(m) and not self._block_below(m, "structural"):
                graph = try_trace(m)
                if graph is not None and is_residual_graph(m, graph):
                    kind = _structural_kind(m, graph)
                    self._classes.add(type(m))
            self._structural[key] = kind
        return self._structural[key]

    def final(self, m: nn.Module) -> BlockKind | None:
        """Rule 3 on top of 1 and 2; valid once ``structural`` has seen every module."""
        key = id(m)
        if key not in self._final:
            kind = self._known(m) if self._candidate(m) else None
            if kind is None and self._candidate(m) and not self._block_below(m, "final"):
                kind = self.structural(m)
                if kind is None and type(m) in self._classes:
                    kind = _structural_kind(m, try_trace(m))
            self._final[key] = kind
        return self._final[key]


def _is_hf_pretrained(m: nn.Module) -> bool:
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(m).__mro__
    )


def hf_layer_lists(net: nn.Module) -> dict[int, str]:
    """Block kind lookups for transformers models: ``{id(layer): "transformer"}``.

    Raises :class:`QCalibError` for a transformers model (the outermost one) in which
    neither a known layer class nor a layer list at a known path holds its layers.
    """
    found: dict[int, str] = {}
    outer = [
        m for n, m in net.named_modules()
        if _is_hf_pretrained(m) and not any(_is_hf_pretrained(p) for p in _parents(net, n))
    ]  # fmt: skip
    for hf in outer:
        if any(_known_kind(m) is not None for m in hf.modules()):
            continue
        for path in _HF_LAYER_PATHS:
            try:
                layers = hf.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList) and len(layers):
                found.update((id(m), "transformer") for m in layers)
                break
        else:
            raise QCalibError(
                f"cannot find the decoder/encoder layers of {type(hf).__name__} (none of "
                f"{', '.join(_HF_LAYER_PATHS)}); block reconstruction needs them: use "
                "--calibrator adaround (layer-wise) or report the architecture"
            )
    return found


def _parents(root: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    return [root.get_submodule(".".join(parts[:i])) for i in range(len(parts))]


def partition_blocks(model: nn.Module, example_input: Any = None) -> list[Block]:
    """Blocks covering every quantizable layer exactly once, in execution order.

    Works on a float network and on a :class:`QuantModel` (then names are relative to
    ``model.model``, like ``quant_modules()``). Execution order comes from running
    ``example_input`` (tensor, tuple of args, or dict of kwargs) when given; blocks the
    example does not reach, or all blocks without an example, follow in registration order.
    """
    net = model.model if isinstance(model, QuantModel) else model
    analysis = _Analysis(hf_layer_lists(net))
    for m in net.modules():
        analysis.structural(m)

    blocks: list[Block] = []
    seen: set[int] = set()

    def walk(m: nn.Module, name: str) -> None:
        if id(m) in seen or not analysis.has_layer(m):
            return
        if is_quantizable(m):
            seen.add(id(m))
            blocks.append(Block(name, m, "layer"))
            return
        kind = analysis.final(m)
        if kind is not None:
            seen.update(id(c) for c in m.modules())
            blocks.append(Block(name, m, kind))
            return
        seen.add(id(m))
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(net, "")
    if isinstance(model, QuantModel):
        # A layer left float on purpose (an LM head without lm_head_bits) has nothing to learn.
        blocks = [b for b in blocks if b.kind != "layer" or isinstance(b.module, QuantModule)]
    if example_input is None:
        return blocks
    by_name = {b.name: b for b in blocks}
    ran = first_call_order(net, example_input, {b.name: b.module for b in blocks})
    done = set(ran)
    return [by_name[n] for n in ran] + [b for b in blocks if b.name not in done]
