"""Quantized twins of ``nn.Conv2d`` / ``nn.Linear`` and of layers that compute the same.

A :class:`QuantModule` keeps an FP copy of the layer's weight and bias, a weight quantizer
(per output channel, ``ch_axis=0``) and an optional activation quantizer on the layer's
*input* (per tensor). The bias stays in float, as in the usual fake-quant PTQ protocol
(it would be int32 on integer hardware, which is lossless at this precision).

Twins:

* :class:`QuantConv2d`, :class:`QuantLinear`: the plain torch layers.
* :class:`QuantConv1D`: GPT-2's ``transformers.pytorch_utils.Conv1D`` (``x @ W + b`` with
  ``W`` stored ``[in, out]``). The twin stores the weight transposed, ``[out, in]``, and
  runs ``F.linear``: the output channels are then axis 0 as in every other twin, so the
  per-channel grid, AdaRound, observers and the export need no special axis. Matched by
  class name, so this module never imports transformers.
* :class:`QuantCustomForward`: a subclass of ``nn.Conv2d`` / ``nn.Linear`` that overrides
  ``forward`` (e.g. EfficientNet's ``Conv2dStaticSamePadding``, which pads, then calls
  ``F.conv2d``). Its own forward is kept: the twin holds the original layer without its
  ``weight`` / ``bias`` parameters and, for each call, sets them as plain attributes to
  the fake-quantized weight and the float bias, then calls the layer's forward on the
  fake-quantized input. What gets quantized is the *stored* weight; a forward that
  transforms its weight (weight standardization) sees the quantized weight and
  transforms that. Any other parameters of the layer stay float inside it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = [
    "FLOAT_UNITS",
    "QuantConv1D",
    "QuantConv2d",
    "QuantCustomForward",
    "QuantLinear",
    "QuantModule",
    "has_custom_forward",
    "is_conv",
    "is_depthwise",
    "is_quantizable",
    "is_transposed_linear",
]

# Modules that read their children's parameters directly instead of calling them
# (``MultiheadAttention`` uses ``out_proj.weight`` in a fused kernel), so swapping a child
# for a quantized twin would silently not quantize it. They stay float as a unit.
FLOAT_UNITS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _plain(m: nn.Module, base: type[nn.Module], *methods: str) -> bool:
    # A subclass that overrides forward computes something else than F.conv2d / F.linear
    # (padding first, standardizing its weight): it gets QuantCustomForward, which keeps it.
    return isinstance(m, base) and all(
        getattr(type(m), name) is getattr(base, name) for name in ("forward", *methods)
    )


#: Classes (``module.qualname``) that compute ``x @ weight + bias`` with ``weight [in, out]``.
_TRANSPOSED_LINEAR = frozenset({"transformers.pytorch_utils.Conv1D"})


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_transposed_linear(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (a linear layer with its weight stored ``[in, out]``)."""
    return any(_qualname(c) in _TRANSPOSED_LINEAR for c in type(m).__mro__)


def has_custom_forward(m: nn.Module) -> bool:
    """A Conv2d / Linear subclass whose ``forward`` (or ``_conv_forward``) is its own."""
    return not isinstance(m, QuantModule) and (
        (isinstance(m, nn.Conv2d) and not _plain(m, nn.Conv2d, "_conv_forward"))
        or (isinstance(m, nn.Linear) and not _plain(m, nn.Linear))
    )


def is_quantizable(m: nn.Module) -> bool:
    """Whether ``m`` is (or already is the twin of) a layer this package quantizes."""
    return isinstance(m, (QuantModule, nn.Conv2d, nn.Linear)) or is_transposed_linear(m)


def is_conv(m: nn.Module) -> bool:
    """A 2-D convolution, float or quantized (its activations are ``[B, C, H, W]``)."""
    if isinstance(m, QuantCustomForward):
        m = m.inner
    return isinstance(m, (nn.Conv2d, QuantConv2d))


def is_depthwise(m: nn.Module) -> bool:
    """A conv with one input channel per group (MobileNet-style depthwise)."""
    if isinstance(m, QuantCustomForward):
        m = m.inner
    if isinstance(m, (nn.Conv2d, QuantConv2d)):
        return m.groups > 1 and m.groups == m.in_channels
    return False


class QuantModule(nn.Module):
    """Common base: FP weight / bias, a weight quantizer and an input quantizer.

    ``use_weight_quant`` / ``use_act_quant`` decide whether the tensors are quantized;
    both start ``True`` because a quantizer without parameters passes tensors through, so
    a fresh model computes the FP function until it is calibrated. A quantizer whose
    observer is enabled still observes its tensor when its ``use_*`` flag is off.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_quantizer: nn.Module,
        act_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> None:
        super().__init__()
        spec = getattr(weight_quantizer, "spec", None)
        if spec is not None and spec.per_channel and spec.ch_axis != 0:
            raise ValueError("a weight quantizer must use ch_axis=0 (output channels)")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.use_weight_quant = True
        self.use_act_quant = True
        self.layer_name = layer_name

    def set_quant_state(self, weight: bool, act: bool) -> None:
        self.use_weight_quant = weight
        self.use_act_quant = act

    def quantizers(self) -> dict[str, nn.Module]:
        """The quantizer submodules by attribute name (``act_quantizer`` only if present)."""
        out = {"weight_quantizer": self.weight_quantizer}
        if self.act_quantizer is not None:
            out["act_quantizer"] = self.act_quantizer
        return out

    def layer_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _apply(self.act_quantizer, x, self.use_act_quant)
        # Call the quantizer module with the weight alone so that a rounding-learning
        # quantizer (AdaRound) with the same signature can be swapped in.
        w = _apply(self.weight_quantizer, self.weight, self.use_weight_quant)
        return self.layer_forward(x, w)


def _apply(q: nn.Module | None, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    if q is None:
        return x
    if enabled:
        return q(x)
    observer = getattr(q, "observer", None)
    if getattr(q, "observer_enabled", False) and observer is not None:
        observer(x.detach())
    return x


class QuantConv2d(QuantModule):
    """Fake-quantized ``nn.Conv2d`` (any stride / padding / dilation / groups / padding mode)."""

    def __init__(
        self,
        conv: nn.Conv2d,
        weight_quantizer: nn.Module,
        act_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> None:
        super().__init__(conv.weight, conv.bias, weight_quantizer, act_quantizer, layer_name)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        w_quantizer: nn.Module,
        a_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> QuantConv2d:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        return cls(conv, w_quantizer, a_quantizer, layer_name)

    def layer_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            # Mirrors nn.Conv2d._conv_forward: non-zero padding is applied explicitly.
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, _pair(0), self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, name={self.layer_name!r}"
        )


class QuantLinear(QuantModule):
    """Fake-quantized ``nn.Linear``."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: nn.Module,
        act_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> None:
        super().__init__(linear.weight, linear.bias, weight_quantizer, act_quantizer, layer_name)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        w_quantizer: nn.Module,
        a_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> QuantLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        return cls(linear, w_quantizer, a_quantizer, layer_name)

    def layer_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, name={self.layer_name!r}"
        )


class QuantConv1D(QuantModule):
    """Fake-quantized GPT-2 ``Conv1D``; the weight is held transposed, ``[out, in]``."""

    def __init__(
        self,
        conv1d: nn.Module,
        weight_quantizer: nn.Module,
        act_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> None:
        weight = conv1d.weight.t().contiguous()
        super().__init__(weight, conv1d.bias, weight_quantizer, act_quantizer, layer_name)
        self.in_features, self.out_features = conv1d.weight.shape

    @classmethod
    def from_float(
        cls,
        conv1d: nn.Module,
        w_quantizer: nn.Module,
        a_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> QuantConv1D:
        if not is_transposed_linear(conv1d):
            raise TypeError(f"expected transformers' Conv1D, got {type(conv1d).__name__}")
        return cls(conv1d, w_quantizer, a_quantizer, layer_name)

    def layer_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Conv1D's own kernel on an [in, out] contiguous copy, so that an unquantized twin
        # is bit-identical to the layer (F.linear, or addmm on the transposed view, differ
        # in the last bits).
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), weight.t().contiguous())
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, transposed, name={self.layer_name!r}"
        )


class QuantCustomForward(QuantModule):
    """A Conv2d / Linear subclass with its own ``forward``, run with a quantized weight.

    ``inner`` is a copy of the layer with its ``weight`` / ``bias`` parameters removed;
    :meth:`layer_forward` lends it the (fake-quantized) weight and the bias for one call.
    """

    def __init__(
        self,
        layer: nn.Module,
        weight_quantizer: nn.Module,
        act_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> None:
        super().__init__(layer.weight, layer.bias, weight_quantizer, act_quantizer, layer_name)
        inner = copy.deepcopy(layer)
        for name in ("weight", "bias"):
            inner._parameters.pop(name, None)
            inner.__dict__[name] = None
        self.inner = inner

    @classmethod
    def from_float(
        cls,
        layer: nn.Module,
        w_quantizer: nn.Module,
        a_quantizer: nn.Module | None = None,
        layer_name: str = "",
    ) -> QuantCustomForward:
        if not has_custom_forward(layer):
            raise TypeError(f"{type(layer).__name__} is not a Conv2d/Linear with its own forward")
        return cls(layer, w_quantizer, a_quantizer, layer_name)

    def layer_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        inner.__dict__["weight"], inner.__dict__["bias"] = weight, self.bias
        try:
            return inner(x)
        finally:
            # Not kept between calls: a deepcopy or state_dict must not see a stale tensor.
            inner.__dict__["weight"] = inner.__dict__["bias"] = None

    def extra_repr(self) -> str:
        return f"{type(self.inner).__name__}, name={self.layer_name!r}"


def quant_twin(layer: nn.Module) -> type[QuantModule]:
    """The QuantModule class for a quantizable float layer."""
    if has_custom_forward(layer):
        return QuantCustomForward
    if is_transposed_linear(layer):
        return QuantConv1D
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d
    if isinstance(layer, nn.Linear):
        return QuantLinear
    raise TypeError(f"no quantized twin for {type(layer).__name__}")


def first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a module call returned: ``out`` itself, or the first element of a
    tuple/list output (a block that also returns e.g. attention weights); else None."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def run_example(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` on an example: a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)
