"""Observer passes over a quantized model, and building one from a :class:`QuantConfig`.

The building blocks of the observer calibrators (:mod:`qcalib.calibrate.base`) and of
the calibration-set quality score (:func:`qcalib.select.quality.calibration_score`),
which sit on the same floor and must not import each other: hence here, below both.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from qcalib.config import CalibConfig, QuantConfig
from qcalib.model.wrap import QuantModel, quantize_model
from qcalib.quant.observers import make_observer
from qcalib.quant.quantizer import QuantSpec, UniformQuantizer

__all__ = ["build_quant_model", "calibrate_activations", "calibrate_weights", "observer_params"]


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


def observer_params(name: str, cfg: CalibConfig, seed: int) -> dict:
    """The observer ``name``'s parameters from the calibration config."""
    # Only the sampling observers take a seed: it decides their subsample.
    if name == "percentile":
        return {"percentile": cfg.percentile, "max_samples": cfg.percentile_max_samples,
                "seed": seed}  # fmt: skip
    if name == "mse":
        return {"num_candidates": cfg.mse_candidates, "p": cfg.mse_norm,
                "max_samples": cfg.mse_max_samples, "seed": seed}  # fmt: skip
    return {}


def _quantizers(qmodel: QuantModel) -> tuple[list[UniformQuantizer], list[UniformQuantizer]]:
    weights, acts = [], []
    for _, m in qmodel.quant_modules():
        weights.append(m.weight_quantizer)
        if m.act_quantizer is not None:
            acts.append(m.act_quantizer)
    return weights, acts


@torch.no_grad()
def calibrate_weights(qmodel: QuantModel, observer: str, **params) -> None:
    """Weight ranges depend only on the weights: one observer call per layer."""
    for _, m in qmodel.quant_modules():
        q = m.weight_quantizer
        q.observer = make_observer(
            observer, per_channel=q.spec.per_channel, ch_axis=q.spec.ch_axis, **params
        )
        q.observer(q.observer_view(m.weight.detach()))
        q.compute_qparams()
        q.observer = None


@torch.no_grad()
def calibrate_activations(
    qmodel: QuantModel,
    calib_data: torch.Tensor,
    observer: str,
    batch_size: int,
    progress: bool = True,
    **params,
) -> None:
    """One pass over the calibration set with float activations and quantized weights.

    Weights are already quantized during the pass, so the observed activation ranges are
    those the quantized network really produces upstream of each layer.
    """
    _, acts = _quantizers(qmodel)
    # Weight-only models have no activation quantizer, dynamic ones nothing to calibrate.
    acts = [q for q in acts if not getattr(q, "dynamic", False)]
    if not acts:
        qmodel.set_quant_state(weight=True, act=True)
        return
    for q in acts:
        q.observer = make_observer(observer, per_channel=False, ch_axis=q.spec.ch_axis, **params)
    qmodel.set_quant_state(weight=True, act=False)
    qmodel.set_observing(True)
    try:
        chunks = torch.split(calib_data, batch_size)
        for x in tqdm(chunks, desc="observe activations", leave=False, disable=not progress):
            qmodel(x)
        for q in acts:
            q.compute_qparams()
    finally:
        qmodel.set_observing(False)
        for q in acts:
            q.observer = None
    qmodel.set_quant_state(weight=True, act=True)
