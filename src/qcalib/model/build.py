"""A QuantModel built as a :class:`~qcalib.config.QuantConfig` says.

Shared by the pipeline (a new run) and the artifact loader (rebuilding a saved run), so
both wrap a network the same way; it lives here, below both, so neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn

from qcalib.config import QuantConfig
from qcalib.errors import QCalibError
from qcalib.model.wrap import QuantModel, quantize_model
from qcalib.quant.quantizer import QuantSpec


def build_quant_model(model: nn.Module, q: QuantConfig, example_input: torch.Tensor) -> QuantModel:
    """Wrap ``model`` with quantizers (no parameters yet) as the config says."""
    a_spec = (
        QuantSpec(q.abits, q.a_symmetric, per_channel=False, dynamic=q.a_dynamic)
        if q.quantize_activations
        else None
    )
    return quantize_model(
        model,
        QuantSpec(q.wbits, q.w_symmetric, q.w_per_channel, ch_axis=0, group_size=q.group_size),
        a_spec,
        first_last_bits=q.first_last_bits,
        lm_head_bits=q.lm_head_bits,
        embedding_bits=q.embedding_bits,
        allow_float=q.allow_float_layers,
        example_input=example_input,
        fold=q.fold_bn,
    )


def check_input_fits(model: nn.Module, example_input: torch.Tensor, data: str = "--data") -> None:
    """Run ``model`` on one pool sample; a shape error becomes a :class:`QCalibError` naming
    the sample's shape and what the model's first layer expects.

    Checked before selection and calibration, which would otherwise fail deep inside a
    hook with torch's message about some intermediate tensor."""
    try:
        with torch.no_grad():
            model(example_input)
    except RuntimeError as e:
        first = next(
            ((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))),
            None,
        )
        if first is None:
            wants = "another shape"
        elif isinstance(first[1], nn.Conv2d):
            wants = f"{first[1].in_channels} channel(s) at its first layer {first[0]} (Conv2d)"
        else:
            wants = f"{first[1].in_features} features at its first layer {first[0]} (Linear)"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QCalibError(
            f"the model does not take the pool's samples: a sample has shape "
            f"{tuple(example_input.shape[1:])}, the model expects {wants} ({detail}); give "
            f"{data} of the shape the model was trained on (e.g. RGB vs grayscale images)"
        ) from None
