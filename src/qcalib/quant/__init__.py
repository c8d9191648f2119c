"""Quantizers, observers and rounding: pure tensor math, no knowledge of networks."""

from qcalib.quant.functional import fake_quantize, qparams_from_range, qrange, round_ste
from qcalib.quant.observers import (
    OBSERVERS,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from qcalib.quant.quantizer import ActQuantizer, QuantSpec, UniformQuantizer, WeightQuantizer

__all__ = [
    "OBSERVERS",
    "ActQuantizer",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QuantSpec",
    "UniformQuantizer",
    "WeightQuantizer",
    "fake_quantize",
    "make_observer",
    "qparams_from_range",
    "qrange",
    "round_ste",
]
