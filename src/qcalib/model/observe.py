"""Observer passes over a quantized model, and building one from a :class:`QuantConfig`.

The building blocks of the observer calibrators (:mod:`qcalib.calibrate.base`) and of
the calibration-set quality score (:func:`qcalib.select.quality.calibration_score`),
which sit on the same floor and must not import each other: hence here, below both.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from qcalib.config import CalibConfig
from qcalib.distributed import rank, require_shards, shard
from qcalib.errors import QCalibError
from qcalib.model.build import build_quant_model
from qcalib.model.stop import forward_until_stopped, stop_before, unread_output_head
from qcalib.model.wrap import QuantModel
from qcalib.quant.observers import make_observer
from qcalib.quant.quantizer import UniformQuantizer

# Sampling observers on rank r draw with seed + r * this (rank 0 keeps the run's seed).
_RANK_SEED_STRIDE = 1_000_003

__all__ = ["build_quant_model", "calibrate_activations", "calibrate_weights", "observer_params"]


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


def _is_nonfinite(error: ValueError) -> bool:
    return "non-finite" in str(error)  # the observers' own message (quant/observers.py)


class _Found(Exception):
    pass


def _nonfinite_activation_error(qmodel: QuantModel, x: torch.Tensor) -> QCalibError:
    """Name the first layer (in execution order) whose input holds NaN/Inf for batch ``x``.

    Run only after an observer refused a batch, so the normal path pays nothing."""
    found: list[str] = []

    def check(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple) -> None:
            t = args[0] if args else None
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.isfinite().all():
                found.append(name)
                raise _Found

        return hook

    handles = [m.register_forward_pre_hook(check(n)) for n, m in qmodel.quant_modules()]
    qmodel.set_observing(False)  # the caller's cleanup ends observing anyway
    try:
        qmodel(x)
    except _Found:
        pass
    finally:
        for h in handles:
            h.remove()
    where = found[0] if found else "a quantized layer"
    first = found and found[0] == next(iter(qmodel.quant_modules()))[0]
    cause = "the calibration data itself" if first else f"the layers upstream of {where}"
    return QCalibError(
        f"the input activations of layer {where} contain NaN or Inf (from {cause}); check the "
        "calibration data (--data) and the model's weights for NaN/Inf"
    )


@torch.no_grad()
def calibrate_weights(qmodel: QuantModel, observer: str, **params) -> None:
    """Weight ranges depend only on the weights: one observer call per layer."""
    for name, m in qmodel.quant_modules():
        q = m.weight_quantizer
        q.observer = make_observer(
            observer, per_channel=q.spec.per_channel, ch_axis=q.spec.ch_axis, **params
        )
        try:
            q.observer(q.observer_view(m.weight.detach()))
            q.compute_qparams()
        except ValueError as e:
            if not _is_nonfinite(e):
                raise
            raise QCalibError(
                f"the weights of layer {name} contain NaN or Inf; the model or its --weights "
                "file is damaged: retrain or restore it"
            ) from None
        finally:
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

    Under ``torchrun`` every rank observes its contiguous shard of ``calib_data`` and the
    observers are merged across ranks before the ranges are computed
    (:meth:`~qcalib.quant.observers.Observer.reduce_across_ranks`): min-max ranges are the
    single-process ones; sampling observers draw their keys with a seed offset per rank
    (rank 0 keeps the run's seed, so one process is unchanged).
    """
    _, acts = _quantizers(qmodel)
    # Weight-only models have no activation quantizer, dynamic ones nothing to calibrate.
    acts = [q for q in acts if not getattr(q, "dynamic", False)]
    if not acts:
        qmodel.set_quant_state(weight=True, act=True)
        return
    require_shards(len(calib_data), "activation calibration", "--num-calib")
    if "seed" in params:
        params = {**params, "seed": int(params["seed"]) + _RANK_SEED_STRIDE * rank()}
    for q in acts:
        q.observer = make_observer(observer, per_channel=False, ch_axis=q.spec.ch_axis, **params)
    # No observer reads the logits of a float (or weight-only) output head: the forwards
    # end at its input (qcalib.model.stop).
    observed = {id(q) for q in acts}
    head = unread_output_head(
        qmodel.model, (m for _, m in qmodel.quant_modules() if id(m.act_quantizer) in observed)
    )
    qmodel.set_quant_state(weight=True, act=False)
    qmodel.set_observing(True)
    try:
        chunks = torch.split(shard(calib_data), batch_size)
        for x in tqdm(chunks, desc="observe activations", leave=False, disable=not progress):
            try:
                with stop_before(head):
                    forward_until_stopped(qmodel, x)
            except ValueError as e:
                if not _is_nonfinite(e):
                    raise
                raise _nonfinite_activation_error(qmodel, x) from None
        for q in acts:
            q.observer.reduce_across_ranks()
            q.compute_qparams()
    finally:
        qmodel.set_observing(False)
        for q in acts:
            q.observer = None
    qmodel.set_quant_state(weight=True, act=True)
