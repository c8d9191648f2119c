"""End-to-end runs: load model and data, select, calibrate, evaluate, save.

:class:`Workbench` holds what stays fixed across runs (FP model, pool, test set, FP
accuracy) so a benchmark grid reuses it; :func:`quantize` is one run.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from qcalib.calibrate import CALIBRATORS
from qcalib.calibrate.base import Calibrator
from qcalib.config import QuantConfig, RunConfig
from qcalib.data.registry import load_dataset, load_pool
from qcalib.errors import QCalibError
from qcalib.evaluate import accuracy
from qcalib.measure import Measure
from qcalib.model.wrap import QuantModel, quantize_model
from qcalib.quant.quantizer import QuantSpec
from qcalib.select import SELECTORS
from qcalib.zoo.external import load_model

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


NO_EVAL = "none"


def load_eval_set(data: str, data_root: str | None, eval_data: str | None) -> Dataset | None:
    """The labeled evaluation set of a run (see ``RunConfig.eval_data``); None for "none"."""
    if eval_data == NO_EVAL:
        return None
    return load_dataset(eval_data or data, "test", data_root)


class Workbench:
    """The fixed parts of a run: FP model, calibration pool, labeled test set (None when
    the run is not evaluated)."""

    def __init__(
        self,
        model: str | nn.Module,
        data: str,
        data_root: str | None = None,
        weights: str | None = None,
        device: str = "cpu",
        eval_batch_size: int = 500,
        eval_data: str | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model_name = model if isinstance(model, str) else type(model).__name__
        if isinstance(model, str):
            model = load_model(model, weights)
        self.model = model.eval().to(self.device)
        self.pool = load_pool(data, data_root, split="train")
        self.test_set = load_eval_set(data, data_root, eval_data)
        self.eval_batch_size = eval_batch_size
        self._fp_top1: float | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Workbench:
        return cls(cfg.model, cfg.data, cfg.data_root, cfg.weights, cfg.device,
                   cfg.eval_batch_size, cfg.eval_data)  # fmt: skip

    @property
    def evaluates(self) -> bool:
        return self.test_set is not None

    def accuracy(self, model: nn.Module, progress: bool = False) -> float:
        if self.test_set is None:
            raise QCalibError(
                "this run has no evaluation data (--eval-data none); give a labeled "
                "dataset with --eval-data to measure accuracy"
            )
        return accuracy(model, self.test_set, self.eval_batch_size, progress, self.device)

    @property
    def fp_top1(self) -> float:
        if self._fp_top1 is None:
            self._fp_top1 = self.accuracy(self.model)
        return self._fp_top1

    def example_input(self) -> torch.Tensor:
        return self.pool.example().to(self.device)


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
        example_input=example_input,
        fold=q.fold_bn,
    )


@dataclass
class RunResult:
    config: dict[str, Any]
    model: str
    fp_top1: float | None  # None: not evaluated (eval_data "none")
    quant_top1: float | None
    calib_indices: list[int]
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    calib_stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        q = self.config["quant"]
        return (
            f"{self.model} W{q['wbits']}A{q['abits']} {self.config['calib']['calibrator']} "
            f"({self.config['select']['selector']}, n={len(self.calib_indices)}): "
            + (
                f"FP {self.fp_top1:.2f}% -> quantized {self.quant_top1:.2f}%"
                if self.fp_top1 is not None and self.quant_top1 is not None
                else "not evaluated"
            )
        )


def select_indices(cfg: RunConfig, bench: Workbench, progress: bool = True) -> torch.Tensor:
    selector = SELECTORS.get(cfg.select.selector)(seed=cfg.seed, **cfg.select.kwargs())
    selector.progress = progress
    if getattr(selector, "needs_model", False):
        selector.fit(bench.pool, model=bench.model)
    else:
        selector.fit(bench.pool)
    return selector.select(cfg.calib.num_calib)


def check_indices(
    indices: Sequence[int] | torch.Tensor, pool_size: int, num_calib: int
) -> torch.Tensor:
    """A given calibration set as sorted unique indices, or a :class:`QCalibError`."""
    idx = torch.as_tensor(indices).long().flatten()
    if idx.numel() != num_calib:
        raise QCalibError(
            f"{idx.numel()} calibration indices given but --num-calib is {num_calib}; "
            "give as many indices as the run's num_calib"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= pool_size):
        raise QCalibError(
            f"calibration index out of range for a pool of {pool_size} samples "
            f"(got {int(idx.min())}..{int(idx.max())}); indices are 0-based pool positions"
        )
    if idx.unique().numel() != idx.numel():
        raise QCalibError("the calibration indices contain duplicates; list each sample once")
    return idx.sort().values


def quantize(
    cfg: RunConfig,
    bench: Workbench | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    calibrator: Calibrator | None = None,
    indices: Sequence[int] | torch.Tensor | None = None,
) -> tuple[QuantModel, RunResult]:
    """One PTQ run. With ``out``, each finished stage is written at once.

    ``calibrator``: an instance to use instead of a new one from the registry (e.g. to
    read a reconstruction calibrator's ``engine`` afterwards, or to set its hooks); it
    must be of ``cfg.calib.calibrator``'s class (or a subclass) and built on ``cfg.calib``.

    ``indices``: a precomputed calibration set (``cfg.calib.num_calib`` distinct pool
    indices, e.g. cached from an earlier selection, since selection does not depend on
    the calibrator or the bits); selection is skipped and ``cfg.select`` only labels the
    run. The indices are sorted like a selector's.
    """
    from qcalib.artifact import save_indices, save_run

    bench = bench or Workbench.from_config(cfg)
    torch.manual_seed(cfg.seed)
    seconds, rss = {}, {}
    cls = CALIBRATORS.get(cfg.calib.calibrator)
    if calibrator is None:
        calibrator = cls(cfg.calib)
    elif not isinstance(calibrator, cls) or calibrator.cfg != cfg.calib:
        raise QCalibError(
            f"quantize(calibrator=...) must be a {cls.__name__} ({cfg.calib.calibrator!r}) "
            f"built on the run's CalibConfig; got a {type(calibrator).__name__}"
        )

    with Measure() as m:
        if indices is None:
            indices = select_indices(cfg, bench, progress)
        else:
            indices = check_indices(indices, len(bench.pool), cfg.calib.num_calib)
    seconds["select"], rss["select"] = m.seconds, m.peak_rss_mb
    if out is not None:
        save_indices(Path(out), indices)

    with Measure() as m:
        calib = bench.pool.get(indices).to(bench.device)
        fp_model, smooth_report = bench.model, None
        # --- SmoothQuant (issue 11): a pre-transform of a copy of the FP model ---
        if cfg.quant.smoothquant_alpha is not None:
            from qcalib.model.smooth import apply_smoothquant

            fp_model = copy.deepcopy(bench.model)
            smooth_report = apply_smoothquant(fp_model, calib, cfg.quant.smoothquant_alpha)
        # --- end SmoothQuant ---
        qmodel = build_quant_model(fp_model, cfg.quant, bench.example_input())
        work_dir = Path(out) / "calib_state" if out is not None else None
        calibrator.calibrate(qmodel, calib, seed=cfg.seed, progress=progress, work_dir=work_dir)
    seconds["calibrate"], rss["calibrate"] = m.seconds, m.peak_rss_mb

    fp = q_top1 = None
    if bench.evaluates:
        t0 = time.perf_counter()
        fp = bench.fp_top1
        with Measure() as m:
            q_top1 = bench.accuracy(qmodel, progress)
        seconds["eval"], rss["eval"] = m.seconds, m.peak_rss_mb
        log.debug("FP accuracy took %.1fs", time.perf_counter() - t0 - m.seconds)

    result = RunResult(
        config=cfg.to_dict(),
        model=bench.model_name,
        fp_top1=fp,
        quant_top1=q_top1,
        calib_indices=indices.tolist(),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        peak_rss_mb={k: round(v, 1) for k, v in rss.items()},
        calib_stats=calibrator.report(),
    )
    if smooth_report is not None:  # SmoothQuant (issue 11)
        result.calib_stats["smoothquant"] = smooth_report
    if out is not None:
        save_run(Path(out), result, qmodel)
    return qmodel, result
