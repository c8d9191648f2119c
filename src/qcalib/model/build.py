"""A QuantModel built as a :class:`~qcalib.config.QuantConfig` says.

Shared by the pipeline (a new run) and the artifact loader (rebuilding a saved run), so
both wrap a network the same way; it lives here, below both, so neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn

from qcalib.config import QuantConfig
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
        allow_float=q.allow_float_layers,
        example_input=example_input,
        fold=q.fold_bn,
    )
