"""Calibrator registry and the observer-based calibrators (min-max, percentile, MSE).

A calibrator takes a :class:`~qcalib.model.wrap.QuantModel` whose quantizers exist but
have no parameters yet, plus a calibration batch, and sets every scale / zero point.
Observer calibrators attach observers, run one forward pass, and detach them again so
the calibrated model carries no statistics.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qcalib.config import CalibConfig
from qcalib.distributed import rank, require_shards, shard
from qcalib.errors import QCalibError
from qcalib.model.wrap import QuantModel
from qcalib.quant.observers import make_observer
from qcalib.quant.quantizer import UniformQuantizer
from qcalib.registry import Registry

log = logging.getLogger(__name__)

# Seed offset of a sampling observer on rank r: distinct key streams per rank.
_RANK_SEED_STRIDE = 1_000_003


class Calibrator(ABC):
    """Sets the quantization parameters of a QuantModel from calibration data.

    ``accepts_loss_terms``: whether the calibrator minimizes a loss that add-ons such as
    CL-Calib (``ReconConfig.contrastive``) can extend; the others refuse such a config.
    """

    accepts_loss_terms = False

    def __init__(self, cfg: CalibConfig) -> None:
        if cfg.recon.contrastive is not None and not self.accepts_loss_terms:
            raise QCalibError(
                f"--contrastive is an add-on to the reconstruction calibrators (adaround, "
                f"brecq, qdrop), not to {cfg.calibrator!r}: pick one of them or drop it"
            )
        self.cfg = cfg

    @abstractmethod
    def calibrate(
        self,
        qmodel: QuantModel,
        calib_data: torch.Tensor,
        seed: int = 0,
        progress: bool = True,
        work_dir: Path | None = None,
    ) -> None:
        """Set every quantizer's parameters. ``work_dir``, when given, is where a long
        calibrator keeps resumable state (a rerun with the same config continues there)."""

    def report(self) -> dict:
        """What the last :meth:`calibrate` cost (iterations, time per iteration...);
        empty for one-pass calibrators. Goes into ``result.json`` as ``calib_stats``."""
        return {}


CALIBRATORS: Registry[type[Calibrator]] = Registry("calibrator")


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
    qmodel.set_quant_state(weight=True, act=False)
    qmodel.set_observing(True)
    try:
        chunks = torch.split(shard(calib_data), batch_size)
        for x in tqdm(chunks, desc="observe activations", leave=False, disable=not progress):
            try:
                qmodel(x)
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


class ObserverCalibrator(Calibrator):
    """Ranges from observers; subclasses name the weight and activation observers."""

    weight_observer = "minmax"
    act_observer = "minmax"

    def observer_params(self, name: str, seed: int) -> dict:
        # Only the sampling observers take a seed: it decides their subsample.
        c = self.cfg
        if name == "percentile":
            return {
                "percentile": c.percentile,
                "max_samples": c.percentile_max_samples,
                "seed": seed,
            }
        if name == "mse":
            return {
                "num_candidates": c.mse_candidates,
                "p": c.mse_norm,
                "max_samples": c.mse_max_samples,
                "seed": seed,
            }
        return {}

    def calibrate(
        self,
        qmodel: QuantModel,
        calib_data: torch.Tensor,
        seed: int = 0,
        progress: bool = True,
        work_dir: Path | None = None,
    ) -> None:
        w_obs, a_obs = self.weight_observer, self.act_observer
        calibrate_weights(qmodel, w_obs, **self.observer_params(w_obs, seed))
        calibrate_activations(
            qmodel, calib_data, a_obs, self.cfg.batch_size, progress,
            **self.observer_params(a_obs, seed),
        )  # fmt: skip


@CALIBRATORS.register("minmax")
class MinMaxCalibrator(ObserverCalibrator):
    """Full observed range for weights (per channel) and activations."""


@CALIBRATORS.register("percentile")
class PercentileCalibrator(ObserverCalibrator):
    """Activation ranges clipped at a percentile; weights keep their full range (a
    percentile of a few hundred weights per channel would clip real values)."""

    act_observer = "percentile"


@CALIBRATORS.register("mse")
class MSECalibrator(ObserverCalibrator):
    """Clipping searched to minimize the Lp quantization error, weights and activations."""

    weight_observer = "mse"
    act_observer = "mse"
