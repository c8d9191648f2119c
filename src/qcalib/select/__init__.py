"""Calibration data selection: activation statistics, clustering, distances, strategies.

Selectors (registry :data:`SELECTORS`): ``random``, ``selectq`` (SelectQ), ``balanced``,
``kcenter``, ``herding``; each is ``Selector(seed=..., **params).fit(pool[, model]).select(n)``.
:func:`calibration_mismatch` measures how well a calibration set matches the pool;
:func:`calibration_score` how well it calibrates (label-free, lower is better).
"""

from qcalib.select.base import SELECTORS, RandomSelector, Selector, select_indices, selector_params
from qcalib.select.baselines import BalancedSelector, HerdingSelector, KCenterSelector
from qcalib.select.quality import (
    MismatchReport,
    calibration_mismatch,
    calibration_score,
    format_report,
)
from qcalib.select.selectq import SelectQSelector
from qcalib.select.stats import ActivationStatsCollector, NonFiniteActivationError

__all__ = [
    "SELECTORS",
    "ActivationStatsCollector",
    "BalancedSelector",
    "HerdingSelector",
    "KCenterSelector",
    "MismatchReport",
    "NonFiniteActivationError",
    "RandomSelector",
    "SelectQSelector",
    "Selector",
    "calibration_mismatch",
    "calibration_score",
    "format_report",
    "select_indices",
    "selector_params",
]
