"""Exact BatchNorm folding into the preceding Conv2d / Linear.

In eval mode ``bn(conv(x)) = conv'(x)`` with ``W' = W * s`` and ``b' = (b - mean) * s + beta``,
``s = gamma / sqrt(var + eps)`` per output channel, so the fold is exact up to float
rounding (computed in float64).

Finding the pairs: the network is traced with ``torch.fx``; a BN is folded when its input
is the output of a conv (BatchNorm2d) or linear (BatchNorm1d) call that nothing else
uses, and neither module is called twice, registered under two names, or shares its
parameters. A module that does not trace is handled by its children (each traced on its
own) plus two structural rules: consecutive siblings of an ``nn.Sequential``, and the
conv/bn attribute pairs of torchvision's ResNet / BasicBlock / Bottleneck (exact class
only, since a subclass may reorder them). The structural rules cannot see a conv output that the
untraceable forward also uses elsewhere.

Conv2d / Linear subclasses that override ``forward`` (EfficientNet's
``Conv2dStaticSamePadding``: pad, then ``F.conv2d``) are traced as opaque leaves, like the
torch layers, so ``conv -> bn`` pairs through them are seen. Folding into the *stored*
weight is exact only when their forward is affine in ``(weight, bias)`` the way the
parent's is (padding is; weight standardization is not), so for them each fold is
checked on a seeded probe input: ``bn(layer(x))`` against the folded layer's output, in
float64. A pair that fails the check (or whose layer does not run on the probe) keeps
its BatchNorm, with a warning naming it.

A module whose ``forward`` has optional arguments (EfficientNet's
``MBConvBlock.forward(x, drop_connect_rate=None)``) is traced with them fixed at their
defaults when plain tracing fails: the eval-mode graph the analysis needs.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from qcalib.model.qmodules import QuantModule, has_custom_forward

__all__ = ["find_conv_bn_pairs", "fold_bn", "try_trace"]

log = logging.getLogger(__name__)
#: Largest relative error of a checked fold into a custom-forward layer (float64 math).
_FOLD_CHECK_RTOL = 1e-6

# Exact torchvision classes whose conv -> bn attribute pairs are known.
_KNOWN_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "torchvision.models.resnet.ResNet": (("conv1", "bn1"),),
    "torchvision.models.resnet.BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "torchvision.models.resnet.Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}


class _Tracer(fx.Tracer):
    # Quantized layers hold data-dependent control flow (``initialized``), so they are
    # opaque leaves like the torch.nn layers they replace; conv/linear subclasses with
    # their own forward are leaves too, so the graph shows them as the layers they are.
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, QuantModule)
            or has_custom_forward(m)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _optional_defaults(module: nn.Module) -> dict[str, object]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def try_trace(module: nn.Module) -> fx.Graph | None:
    """The module's fx graph (QuantModules and custom-forward layers as leaves), or None
    if it does not trace, even with its optional forward arguments at their defaults."""
    try:
        return _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - any failure just means "not traceable"
        pass
    defaults = _optional_defaults(module)
    if not defaults:
        return None
    try:
        return _Tracer().trace(module, concrete_args=defaults)
    except Exception:  # noqa: BLE001
        return None


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if type(bn) is nn.BatchNorm2d and isinstance(layer, nn.Conv2d):
        n_out = layer.out_channels
    elif type(bn) is nn.BatchNorm1d and isinstance(layer, nn.Linear):
        n_out = layer.out_features
    else:
        return False
    # Without running statistics, eval-mode BN normalizes with batch statistics: not affine.
    return bn.num_features == n_out and bn.running_mean is not None and bn.running_var is not None


def _shared_ids(model: nn.Module) -> set[int]:
    """Modules registered under several names or sharing a parameter with another module."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = {i for i, n in names.items() if n > 1}
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    for mods in owners.values():
        if len(mods) > 1:
            shared |= mods
    return shared


def _fx_pairs(module: nn.Module, graph: fx.Graph, shared: set[int]) -> list[tuple[str, str]]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        bn, layer = module.get_submodule(node.target), module.get_submodule(src.target)
        if not _foldable(layer, bn) or id(layer) in shared or id(bn) in shared:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1 or len(src.users) != 1:
            continue
        if any(a.startswith(f"{src.target}.") for a in attrs):
            continue  # its weight is read directly somewhere else
        pairs.append((str(src.target), str(node.target)))
    return pairs


def _structural_pairs(module: nn.Module, shared: set[int]) -> list[tuple[str, str]]:
    candidates: list[tuple[str, str]] = []
    if isinstance(module, nn.Sequential):
        names = [n for n, _ in module.named_children()]
        candidates += list(zip(names, names[1:], strict=False))
    candidates += list(_KNOWN_PAIRS.get(_qualname(module), ()))
    pairs = []
    for layer_name, bn_name in candidates:
        layer, bn = getattr(module, layer_name, None), getattr(module, bn_name, None)
        if layer is None or bn is None or id(layer) in shared or id(bn) in shared:
            continue
        if _foldable(layer, bn):
            pairs.append((layer_name, bn_name))
    return pairs


def _find(module: nn.Module, prefix: str, shared: set[int], use_fx: bool) -> list[tuple[str, str]]:
    graph = try_trace(module) if use_fx else None
    if graph is not None:
        local = _fx_pairs(module, graph, shared)
    else:
        local = _structural_pairs(module, shared)
        for name, child in module.named_children():
            local += [(f"{name}.{a}", f"{name}.{b}") for a, b in _find(child, "", shared, use_fx)]
    return [(prefix + a, prefix + b) for a, b in local]


def find_conv_bn_pairs(model: nn.Module, *, use_fx: bool = True) -> list[tuple[str, str]]:
    """Qualified ``(layer, batchnorm)`` names that :func:`fold_bn` folds.

    ``use_fx=False`` forces the structural fallback everywhere (for testing it).
    """
    pairs = _find(model, "", _shared_ids(model), use_fx)
    return list(dict.fromkeys(pairs))


def _fold_into(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    w = layer.weight.detach().double()
    n_out = w.shape[0]
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(n_out)
    gamma = bn.weight.detach().double() if bn.weight is not None else w.new_ones(n_out)
    beta = bn.bias.detach().double() if bn.bias is not None else w.new_zeros(n_out)
    assert bn.running_mean is not None and bn.running_var is not None
    s = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter((w * s.reshape(-1, *([1] * (w.dim() - 1)))).to(dtype))
    layer.bias = nn.Parameter(((b - bn.running_mean.double()) * s + beta).to(dtype))


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name), leaf, new)


def _probe_input(layer: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Conv2d):
        # Large enough for any kernel / dilation / stride to produce a few outputs.
        size = max(
            (k - 1) * d + s + 3
            for k, d, s in zip(layer.kernel_size, layer.dilation, layer.stride, strict=True)
        )
        shape: tuple[int, ...] = (2, layer.in_channels, size, size)
    else:
        shape = (2, layer.in_features)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _fold_is_exact(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether folding ``bn`` into the custom-forward ``layer`` keeps ``bn(layer(x))``."""
    ref_layer, ref_bn = copy.deepcopy(layer).double(), copy.deepcopy(bn).double()
    folded = copy.deepcopy(layer).double()
    _fold_into(folded, copy.deepcopy(bn).double())
    x = _probe_input(layer)
    try:
        with torch.no_grad():
            want, got = ref_bn(ref_layer(x)), folded(x)
    except Exception:  # noqa: BLE001 - a layer that cannot run on the probe is not folded
        return False
    if want.shape != got.shape:
        return False
    err = (want - got).abs().max() / want.abs().max().clamp_min(1e-12)
    return bool(err <= _FOLD_CHECK_RTOL)


def fold_bn(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every foldable BatchNorm folded and set to Identity.

    The user's model is not modified. BNs that cannot be folded (no preceding conv/linear,
    shared input, no running statistics, a custom-forward layer whose fold does not check
    out) are kept as they are.
    """
    folded = copy.deepcopy(model).eval()
    for layer_name, bn_name in find_conv_bn_pairs(folded):
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        if has_custom_forward(layer) and not _fold_is_exact(layer, bn):
            log.warning(
                "BatchNorm %s is not folded into %s (%s): its forward is not affine in the "
                "stored weight, so the fold would change the output",
                bn_name, layer_name, type(layer).__name__,
            )  # fmt: skip
            continue
        _fold_into(layer, bn)
        set_submodule(folded, bn_name, nn.Identity())
    return folded
