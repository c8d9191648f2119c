"""Wrap a float network for fake quantization.

Design (see the method notes): activation quantizers sit on the *inputs* of quantized
Conv2d / Linear layers; residual additions, pooling and activations stay float. BN is
folded first. The first and last quantized layers (in execution order) get
``first_last_bits`` for weight and input activation.

What stays float: layers without a quantized twin (Conv1d/3d, ConvTranspose, Embedding,
subclasses that override ``forward``, ``nn.MultiheadAttention`` with its ``out_proj``, any
module holding its own parameters) stay float with one warning naming them;
normalization layers and parametric activations (PReLU) stay float silently, by design.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from qcalib.errors import QCalibError
from qcalib.model.fold import fold_bn, set_submodule
from qcalib.model.qmodules import (
    FLOAT_UNITS,
    QuantModule,
    is_quantizable,
    quant_twin,
    run_example,
)
from qcalib.quant.quantizer import ActQuantizer, DynamicActQuantizer, QuantSpec, WeightQuantizer

__all__ = [
    "ObserverFactory",
    "QuantModel",
    "execution_order",
    "quantizable_layers",
    "quantize_model",
]

# Called once per quantizer with the quantizer's final spec (bits / per_channel / ch_axis);
# must return a fresh observer (or None for a quantizer whose parameters are set by hand).
ObserverFactory = Callable[[QuantSpec], nn.Module | None]

_SILENT_FLOAT: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.PReLU,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@contextlib.contextmanager
def probe_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, observers paused; everything restored on exit.

    An example forward run only to learn the call order must neither update BN running
    statistics nor feed an observer.
    """
    modes = [(m, m.training) for m in model.modules()]
    paused = [m for m in model.modules() if getattr(m, "observer_enabled", False)]
    model.eval()
    for m in paused:
        m.observer_enabled = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for m in paused:
            m.observer_enabled = True


def first_call_order(
    model: nn.Module, example_input: Any, targets: dict[str, nn.Module]
) -> list[str]:
    """Names from ``targets`` in the order their modules are first called; unused ones omitted."""
    order: dict[str, None] = {}
    handles = []
    for name, m in targets.items():

        def hook(_m: nn.Module, _args: Any, name: str = name) -> None:
            order.setdefault(name, None)

        handles.append(m.register_forward_pre_hook(hook))
    try:
        with probe_mode(model):
            run_example(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return list(order)


def execution_order(
    model: nn.Module,
    example_input: Any,
    predicate: Callable[[nn.Module], bool] = is_quantizable,
) -> list[str]:
    """Qualified names of the modules matching ``predicate`` in first-call order.

    ``example_input`` is a tensor, a tuple of positional args, or a dict of kwargs. Modules
    that the example does not reach are left out. The model is not changed (see
    :func:`probe_mode`).
    """
    targets = {n: m for n, m in model.named_modules() if predicate(m)}
    return first_call_order(model, example_input, targets)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable layers by first registered name, skipping the insides of float units."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def visit(m: nn.Module, prefix: str) -> None:
        if id(m) in seen or isinstance(m, FLOAT_UNITS):
            return
        seen.add(id(m))
        if is_quantizable(m):
            out[prefix] = m
            return
        for name, child in m.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return out


def _unquantized_with_params(model: nn.Module) -> list[str]:
    """Modules that keep float parameters, except norms / PReLU (float by design)."""
    names: list[str] = []

    def visit(m: nn.Module, name: str) -> None:
        if isinstance(m, (QuantModule, *_SILENT_FLOAT)):
            return
        if isinstance(m, FLOAT_UNITS) or any(True for _ in m.parameters(recurse=False)):
            names.append(f"{name or '<root>'} ({type(m).__name__})")
            if isinstance(m, FLOAT_UNITS):
                return
        for child_name, child in m.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return names


def _no_fastpath(_module: nn.Module, _args: Any) -> None:
    """Forward pre-hook whose presence disables a fused fast path (see below)."""


def _disable_fastpaths(model: nn.Module) -> None:
    # In eval + no_grad, TransformerEncoderLayer runs one fused kernel that reads
    # linear1.weight etc. directly and so would bypass the quantized twins; torch skips the
    # fast path whenever a forward hook is attached, and TransformerEncoder's nested-tensor
    # path (which feeds that kernel) is off with use_nested_tensor=False.
    for m in model.modules():
        if not isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(isinstance(c, QuantModule) for c in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoderLayer):
            m.register_forward_pre_hook(_no_fastpath)
        else:
            m.use_nested_tensor = False


class QuantModel(nn.Module):
    """A network whose Conv2d / Linear layers were swapped for :class:`QuantModule` twins.

    ``order`` lists the quantized layers' qualified names (relative to ``.model``) in
    execution order; by default, registration order.
    """

    def __init__(self, model: nn.Module, order: list[str] | None = None) -> None:
        super().__init__()
        self.model = model
        found = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
        if order is None:
            order = list(found)
        unknown = [n for n in order if n not in found]
        if unknown or len(set(order)) != len(found):
            raise ValueError(f"order must name each QuantModule once; bad names: {unknown}")
        self._order = list(order)
        # Names of the layers that got ``first_last_bits`` (set by quantize_model).
        self.first_layer: str | None = order[0] if order else None
        self.last_layer: str | None = order[-1] if order else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def quant_modules(self) -> list[tuple[str, QuantModule]]:
        """``(qualified name, module)`` of every quantized layer in execution order."""
        return [(n, self.model.get_submodule(n)) for n in self._order]

    def quantizers(self) -> list[tuple[str, nn.Module]]:
        """``(qualified name, quantizer)`` pairs, e.g. ``("conv1.weight_quantizer", ...)``."""
        return [
            (f"{name}.{attr}" if name else attr, q)
            for name, m in self.quant_modules()
            for attr, q in m.quantizers().items()
        ]

    def set_quant_state(self, weight: bool, act: bool) -> None:
        for _, m in self.quant_modules():
            m.set_quant_state(weight, act)

    def set_observing(self, enabled: bool) -> None:
        """Observing: quantizers with an observer record statistics and do not fake-quantize.

        Quantizers without an observer keep quantizing, so activation statistics can be
        taken on a network whose weights were quantized beforehand. ``False`` puts every
        quantizer back to quantizing and not observing.
        """
        for _, q in self.quantizers():
            observing = enabled and getattr(q, "observer", None) is not None
            q.observer_enabled = observing
            q.fake_quant_enabled = not observing

    def compute_qparams(self) -> None:
        """Every quantizer that has an observer takes its parameters from it."""
        for name, q in self.quantizers():
            if getattr(q, "observer", None) is None:
                continue
            try:
                q.compute_qparams()
            except Exception as e:
                raise RuntimeError(f"computing quantization parameters of {name}: {e}") from e

    def quant_state_dict(self) -> dict[str, torch.Tensor]:
        """Quantization parameters only (no weights, no observer statistics), by name."""
        out: dict[str, torch.Tensor] = {}
        for name, q in self.quantizers():
            for key, value in q.state_dict().items():
                if not key.startswith("observer."):
                    out[f"{name}.{key}"] = value.detach().clone()
        return out

    def load_quant_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load what :meth:`quant_state_dict` produced (e.g. into a freshly wrapped model)."""
        expected = set(self.quant_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if strict and (missing or unexpected):
            raise QCalibError(
                "quantization state does not match this model: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} "
                "(was it saved from a model wrapped with the same architecture?)"
            )
        for name, q in self.quantizers():
            device = self.model.get_submodule(name.rpartition(".")[0]).weight.device
            # The quantizer's loader adopts the stored tensors' device for resized buffers.
            sub = {
                k[len(name) + 1 :]: v.to(device)
                for k, v in state.items()
                if k.startswith(f"{name}.")
            }
            q.load_state_dict(sub, strict=False)


def _quantizers(
    spec_w: QuantSpec,
    spec_a: QuantSpec | None,
    w_factory: ObserverFactory | None,
    a_factory: ObserverFactory | None,
) -> tuple[WeightQuantizer, ActQuantizer | None]:
    w_obs = w_factory(spec_w) if w_factory is not None else None
    if spec_a is None:  # weight-only: the layer's input stays float
        return WeightQuantizer(spec_w, w_obs), None
    if spec_a.dynamic:
        return WeightQuantizer(spec_w, w_obs), DynamicActQuantizer(spec_a)
    a_obs = a_factory(spec_a) if a_factory is not None else None
    return WeightQuantizer(spec_w, w_obs), ActQuantizer(spec_a, a_obs)


def quantize_model(
    model: nn.Module,
    w_spec: QuantSpec,
    a_spec: QuantSpec | None,
    *,
    first_last_bits: int | None = 8,
    w_observer_factory: ObserverFactory | None = None,
    a_observer_factory: ObserverFactory | None = None,
    example_input: Any = None,
    fold: bool = True,
) -> QuantModel:
    """Copy ``model``, fold BN, and swap every Conv2d / Linear for its quantized twin.

    The weight grid is ``w_spec`` with ``ch_axis=0`` (output channels; ``per_channel`` as
    given, or per group with ``w_spec.group_size``); activations are per tensor, per token
    at run time with ``a_spec.dynamic``, or float everywhere (weight-only, first and last
    layer included) with ``a_spec=None``. First / last layer are found by running
    ``example_input`` (tensor, tuple of args or dict of kwargs) when given, else by
    registration order; ``first_last_bits=None`` quantizes them like the rest.
    """
    if not isinstance(model, nn.Module):
        raise QCalibError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(w_spec, QuantSpec) or not isinstance(a_spec, (QuantSpec, type(None))):
        raise QCalibError("w_spec and a_spec must be qcalib.quant.QuantSpec instances")
    if a_spec is not None and a_spec.per_channel:
        raise QCalibError("activations are quantized per tensor; use a_spec.per_channel=False")
    if a_spec is not None and a_spec.group_size is not None:
        raise QCalibError("--group-size applies to weights; activations have no groups")
    if w_spec.dynamic:
        raise QCalibError("weights are quantized statically; dynamic applies to activations")
    w_spec = dataclasses.replace(w_spec, ch_axis=0)
    fl_specs = (w_spec, a_spec)
    if first_last_bits is not None:
        fl_specs = (
            dataclasses.replace(w_spec, bits=first_last_bits),
            None if a_spec is None else dataclasses.replace(a_spec, bits=first_last_bits),
        )

    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise QCalibError("the model is already quantized (it contains QuantModules)")
    net = fold_bn(model) if fold else copy.deepcopy(model).eval()
    layers = quantizable_layers(net)
    if not layers:
        raise QCalibError(
            f"{type(model).__name__} has no quantizable layer (Conv2d/Linear); "
            "qcalib quantizes only those"
        )
    order = list(layers)
    if example_input is not None:
        ran = first_call_order(net, example_input, layers)
        order = ran + [n for n in order if n not in ran]
        edges = (ran[0], ran[-1]) if ran else (order[0], order[-1])
    else:
        edges = (order[0], order[-1])

    names_of: dict[int, list[str]] = {}
    for name, m in net.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(name)
    for name, layer in layers.items():
        sw, sa = fl_specs if name in edges else (w_spec, a_spec)
        wq, aq = _quantizers(sw, sa, w_observer_factory, a_observer_factory)
        device = layer.weight.device
        aq = aq.to(device) if aq is not None else None
        twin = quant_twin(layer).from_float(layer, wq.to(device), aq, name)
        # A layer registered under several names stays one (shared) module.
        for alias in names_of[id(layer)]:
            if alias:
                set_submodule(net, alias, twin)
            else:
                net = twin  # the model is a single layer

    floats = _unquantized_with_params(net)
    if floats:
        warnings.warn(
            "qcalib: these modules have parameters that are not quantized and stay float: "
            + ", ".join(floats),
            UserWarning,
            stacklevel=2,
        )
    _disable_fastpaths(net)
    qmodel = QuantModel(net, order)
    qmodel.first_layer, qmodel.last_layer = edges
    return qmodel
