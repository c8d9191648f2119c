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

from qcalib.config import FLOAT_ABITS, CalibConfig, QuantConfig
from qcalib.errors import QCalibError
from qcalib.model.observe import calibrate_activations, calibrate_weights, observer_params
from qcalib.model.wrap import QuantModel
from qcalib.registry import Registry

log = logging.getLogger(__name__)


class Calibrator(ABC):
    """Sets the quantization parameters of a QuantModel from calibration data.

    ``accepts_loss_terms``: whether the calibrator minimizes a loss that add-ons such as
    CL-Calib (``ReconConfig.contrastive``) can extend; the others refuse such a config.

    ``reads``: what the calibrator reads from its set (one of
    :data:`~qcalib.config.CALIBRATOR_READS`); the pipeline hands it to the selector so a
    calibrator-aware selection (SelectQ ``within="auto"``) picks the set that calibrator
    needs. The base default is ``"fit"``: a calibrator that does not say is assumed to fit
    the set, which asks for the pool-matching set (the safe side).
    """

    accepts_loss_terms = False
    reads = "fit"
    #: What sets the static activation ranges reads from the set (same vocabulary as
    #: ``reads``) when no activation observer sets them; see :meth:`activation_reads`.
    act_reads = "fit"

    @classmethod
    def activation_observer(cls, calib: CalibConfig) -> str | None:
        """The observer that sets the final activation ranges (None: none does)."""
        return None

    @classmethod
    def activation_reads(cls, quant: QuantConfig, calib: CalibConfig | None = None) -> str | None:
        """What the run's static activation ranges read from the calibration set: ``None``
        when activations stay float or are quantized per token at run time (no range is
        calibrated), else its activation observer's need (:data:`OBSERVER_READS`), else
        :attr:`act_reads`. The pipeline hands it to the selector, whose range matching
        (SelectQ ``ranges="auto"``) targets those ranges."""
        if quant.abits == FLOAT_ABITS or quant.a_dynamic:
            return None
        observer = cls.activation_observer(calib or CalibConfig())
        return OBSERVER_READS.get(observer or "", cls.act_reads)

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

#: What each activation observer reads from its set (the vocabulary of ``reads``).
OBSERVER_READS = {"minmax": "range", "percentile": "range", "mse": "distribution"}

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "ObserverCalibrator",
    "calibrate_activations",  # re-exported from qcalib.model.observe (moved there)
    "calibrate_weights",
]


class ObserverCalibrator(Calibrator):
    """Ranges from observers; subclasses name the weight and activation observers."""

    weight_observer = "minmax"
    act_observer = "minmax"

    @classmethod
    def activation_observer(cls, calib: CalibConfig) -> str | None:
        return cls.act_observer

    def observer_params(self, name: str, seed: int) -> dict:
        return observer_params(name, self.cfg, seed)

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

    reads = "range"


@CALIBRATORS.register("percentile")
class PercentileCalibrator(ObserverCalibrator):
    """Activation ranges clipped at a percentile; weights keep their full range (a
    percentile of a few hundred weights per channel would clip real values).

    ``reads = "range"``: a 99.99th percentile is still the extreme tail of the set, and
    the committed grid agrees (ResNet-20 percentile W3A3: SelectQ's narrow nearest-KD sets
    +4.4 to +7.3 points over random), so it gets the range calibrators' selection."""

    act_observer = "percentile"
    reads = "range"


@CALIBRATORS.register("mse")
class MSECalibrator(ObserverCalibrator):
    """Clipping searched to minimize the Lp quantization error, weights and activations.

    ``reads = "distribution"``: the clipping minimizes the error over the whole set, so a
    set narrower than the pool gives a clip too tight for the pool (nearest-KD sets lost
    0.9 to 1.2 points at W3A3 in the committed grid)."""

    reads = "distribution"

    weight_observer = "mse"
    act_observer = "mse"
