"""Wrap a float network for fake quantization.

Design (see the method notes): activation quantizers sit on the *inputs* of quantized
Conv2d / Linear layers (and their look-alikes, see :mod:`qcalib.model.qmodules`); residual
additions, pooling and activations stay float. BN is folded first. The first and last
quantized layers (in execution order) get ``first_last_bits`` for weight and input
activation.

Text models (:class:`qcalib.zoo.hf.HFTextModel`, recognised by their ``task``) follow the
LLM protocol instead (GPTQ, SmoothQuant and their successors): every attention / MLP
linear is quantized alike, the first one (``q_proj`` of layer 0) included, so
``first_last_bits`` does not apply; token embeddings and the output head (``lm_head``,
found with ``get_output_embeddings()``) stay float. ``lm_head_bits`` quantizes the head
(weight and input) at that width; ``embedding_bits`` rounds every embedding table to that
width, per row (a token's vector) on its own min-max range, asymmetric: weight only, since
an embedding's output is its rows, and data-free (round to nearest, nothing to calibrate).
A table tied to the head gets its own copy, so a float head keeps the float weights. The
rounded table is part of the wrapped model, not a quantizer: ``set_quant_state`` does
not switch it off (the FP reference of a run is the unwrapped model).

What stays float: layers without a quantized twin (Conv1d/3d, ConvTranspose, Embedding,
``nn.MultiheadAttention`` with its ``out_proj``, any module holding its own parameters)
are named in one warning; normalization layers and parametric activations (PReLU) stay
float silently, by design. :func:`quant_coverage` measures what share of the weights and
activation sites is quantized; :func:`quantize_model` refuses a model whose
conv/linear-like weights stay float beyond ``MAX_FLOAT_WEIGHT_SHARE`` unless
``allow_float=True`` (embeddings and a head kept float by option do not count).
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
from qcalib.quant.functional import check_bits, fake_quantize, qparams_from_range, qrange
from qcalib.quant.quantizer import ActQuantizer, DynamicActQuantizer, QuantSpec, WeightQuantizer

__all__ = [
    "MAX_FLOAT_WEIGHT_SHARE",
    "ObserverFactory",
    "QuantModel",
    "execution_order",
    "is_text_model",
    "output_head_name",
    "quant_coverage",
    "quantizable_layers",
    "quantize_embeddings",
    "quantize_model",
]

#: Largest share of conv/linear-like weights that may stay float without allow_float.
MAX_FLOAT_WEIGHT_SHARE = 0.05
_TEXT_TASKS = ("causal-lm", "embedding")

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


def _is_norm(m: nn.Module) -> bool:
    # Models define their own norms (LlamaRMSNorm, T5LayerNorm): float by protocol too.
    return isinstance(m, _SILENT_FLOAT) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def _unquantized_with_params(model: nn.Module, text: bool = False) -> list[str]:
    """Modules that keep float parameters, except norms / PReLU (float by design) and,
    in text models, token / position embeddings (float by the LLM protocol)."""
    names: list[str] = []
    silent = (nn.Embedding,) if text else ()

    def visit(m: nn.Module, name: str) -> None:
        if isinstance(m, (QuantModule, *silent)) or _is_norm(m):
            return
        if isinstance(m, FLOAT_UNITS) or any(True for _ in m.parameters(recurse=False)):
            names.append(f"{name or '<root>'} ({type(m).__name__})")
            if isinstance(m, FLOAT_UNITS):
                return
        for child_name, child in m.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return names


def quantize_embeddings(net: nn.Module, bits: int) -> tuple[str, ...]:
    """Round every ``nn.Embedding`` table of ``net`` in place to ``bits`` per row (module
    notes); returns their names. Each table gets a new frozen parameter, which unties it
    from an output head that shared it."""
    check_bits(bits)
    qmin, qmax = qrange(bits, symmetric=False)
    names = []
    for name, m in net.named_modules():
        if isinstance(m, nn.Embedding):
            w = m.weight.detach()
            scale, zero_point = qparams_from_range(w.amin(1), w.amax(1), qmin, qmax, False)
            with torch.no_grad():
                rounded = fake_quantize(w.clone(), scale, zero_point, qmin, qmax, ch_axis=0)
            m.weight = nn.Parameter(rounded, requires_grad=False)
            names.append(name)
    return tuple(names)


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
        # Layers left float on purpose (an LM head without lm_head_bits): not counted as
        # missed by quant_coverage.
        self.float_by_option: tuple[str, ...] = ()
        #: Embedding tables rounded by ``embedding_bits``: name -> bits.
        self.quantized_embeddings: dict[str, int] = {}

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


def is_text_model(model: nn.Module) -> bool:
    """A Hugging Face text adapter (:class:`qcalib.zoo.hf.HFTextModel`), by its ``task``."""
    return getattr(model, "task", None) in _TEXT_TASKS and isinstance(
        getattr(model, "model", None), nn.Module
    )


def output_head_name(model: nn.Module) -> str | None:
    """Qualified name of a text model's output head (``model.lm_head``), else None."""
    if not is_text_model(model):
        return None
    getter = getattr(model.model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _own_weights(m: nn.Module, seen: set[int]) -> int:
    """Elements of ``m``'s own matrix-or-larger parameters not counted before."""
    total = 0
    for p in m.parameters(recurse=False):
        if p.dim() >= 2 and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def quant_coverage(qmodel: QuantModel) -> dict[str, Any]:
    """What share of the network is actually quantized.

    Weights: elements of the parameters of rank >= 2 (conv / linear-like weights; biases
    and norms are float by protocol) held by quantized layers whose weight quantization
    is on, against those held by every other module, except embeddings (``nn.Embedding``,
    float by design) and the layers in ``qmodel.float_by_option`` (reported apart).
    Activation sites: the inputs of those layers, quantized when the layer has an input
    quantizer that is on. A shared layer or parameter counts once.
    Returns ``weights_quantized``, ``weights_float``, ``weight_share``,
    ``act_sites_quantized``, ``act_sites_float``, ``act_share``, ``float_layers``
    (``"name (Type)"``) and ``float_by_option`` (names).
    """
    w_q = w_f = a_q = a_f = 0
    float_layers: list[str] = []
    by_option = set(qmodel.float_by_option)
    seen_params: set[int] = set()
    seen_modules: set[int] = set()

    def visit(m: nn.Module, name: str) -> None:
        nonlocal w_q, w_f, a_q, a_f
        if id(m) in seen_modules:
            return
        seen_modules.add(id(m))
        if isinstance(m, QuantModule):
            n = m.weight.numel() if id(m.weight) not in seen_params else 0
            seen_params.add(id(m.weight))
            if m.use_weight_quant:
                w_q += n
            else:
                w_f += n
            if m.act_quantizer is not None and m.use_act_quant:
                a_q += 1
            else:
                a_f += 1
            return  # its internals (a custom layer's other parameters) belong to it
        if name in by_option or isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            seen_params.update(id(p) for p in m.parameters())
            return
        n = _own_weights(m, seen_params)
        if n:
            w_f += n
            a_f += 1
            float_layers.append(f"{name or '<root>'} ({type(m).__name__})")
        for child_name, child in m.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(qmodel.model, "")
    return {
        "weights_quantized": w_q,
        "weights_float": w_f,
        "weight_share": w_q / (w_q + w_f) if w_q + w_f else 1.0,
        "act_sites_quantized": a_q,
        "act_sites_float": a_f,
        "act_share": a_q / (a_q + a_f) if a_q + a_f else 1.0,
        "float_layers": float_layers,
        "float_by_option": sorted(by_option),
        "quantized_embeddings": dict(getattr(qmodel, "quantized_embeddings", {})),
    }


def _check_coverage(qmodel: QuantModel) -> None:
    cov = quant_coverage(qmodel)
    share = 1.0 - cov["weight_share"]
    if share <= MAX_FLOAT_WEIGHT_SHARE:
        return
    names = cov["float_layers"]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise QCalibError(
        f"{share:.1%} of the conv/linear-like weights would stay float ({shown}); qcalib has "
        "no quantized twin for them: pass allow_float=True (QuantConfig.allow_float_layers, "
        "--allow-float-layers) to quantize the rest anyway"
    )


def quantize_model(
    model: nn.Module,
    w_spec: QuantSpec,
    a_spec: QuantSpec | None,
    *,
    first_last_bits: int | None = 8,
    lm_head_bits: int | None = None,
    embedding_bits: int | None = None,
    allow_float: bool = False,
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
    registration order; ``first_last_bits=None`` quantizes them like the rest. Text
    models ignore ``first_last_bits``: their head stays float unless ``lm_head_bits``
    is given, their embeddings unless ``embedding_bits`` is (see the module docs).
    Raises :class:`QCalibError` when more than ``MAX_FLOAT_WEIGHT_SHARE`` of the
    conv/linear-like weights stays float, unless ``allow_float``.
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
    if lm_head_bits is not None:
        check_bits(lm_head_bits)
    if embedding_bits is not None:
        check_bits(embedding_bits)
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
    text = is_text_model(net)
    if embedding_bits is not None and not text:
        raise QCalibError(
            "--embedding-bits applies to text models (hf: causal LMs and encoders); drop it "
            "for this model"
        )
    head = output_head_name(net)
    kept_float: tuple[str, ...] = ()
    if head is not None and lm_head_bits is None and head in layers:
        kept_float = (head,)
        del layers[head]
    if not layers:
        raise QCalibError(
            f"{type(model).__name__} has no quantizable layer (Conv2d/Linear); "
            "qcalib quantizes only those"
        )
    order = list(layers)
    edges: tuple[str, ...]
    if example_input is not None:
        ran = first_call_order(net, example_input, layers)
        order = ran + [n for n in order if n not in ran]
        edges = (ran[0], ran[-1]) if ran else (order[0], order[-1])
    else:
        edges = (order[0], order[-1])
    if text:
        edges = ()

    head_specs = (w_spec, a_spec)
    if lm_head_bits is not None:
        head_specs = (
            dataclasses.replace(w_spec, bits=lm_head_bits),
            None if a_spec is None else dataclasses.replace(a_spec, bits=lm_head_bits),
        )
    names_of: dict[int, list[str]] = {}
    for name, m in net.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(name)
    for name, layer in layers.items():
        if name == head:
            sw, sa = head_specs
        else:
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

    embeddings = () if embedding_bits is None else quantize_embeddings(net, embedding_bits)
    _disable_fastpaths(net)
    qmodel = QuantModel(net, order)
    qmodel.quantized_embeddings = dict.fromkeys(embeddings, embedding_bits)
    qmodel.first_layer, qmodel.last_layer = edges if edges else (None, None)
    qmodel.float_by_option = kept_float
    if not allow_float:
        _check_coverage(qmodel)
    floats = [n for n in _unquantized_with_params(net, text) if n.split(" ")[0] not in kept_float]
    if floats:
        warnings.warn(
            "qcalib: these modules have parameters that are not quantized and stay float: "
            + ", ".join(floats),
            UserWarning,
            stacklevel=2,
        )
    return qmodel
