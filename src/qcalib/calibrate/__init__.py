"""Calibration: observer passes and reconstruction methods, by registered name."""

from qcalib.calibrate import gptq as _gptq  # noqa: F401  (registers gptq)
from qcalib.calibrate import methods as _methods  # noqa: F401  (registers adaround/brecq/qdrop)
from qcalib.calibrate.base import CALIBRATORS, Calibrator

__all__ = ["CALIBRATORS", "Calibrator"]
