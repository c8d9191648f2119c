"""End-to-end runs: load model and data, select, calibrate, evaluate, save.

:class:`Workbench` holds what stays fixed across runs (FP model, pool, test set, FP
accuracy) so a benchmark grid reuses it; :func:`quantize` is one run.

The metric follows the model: top-1 accuracy for classifiers; for a Hugging Face text
model (:class:`~qcalib.zoo.hf.HFTextModel`) on ``text:`` data, perplexity on the held-out
documents in ``chunk`` windows (causal LMs) or the mean cosine similarity of the
quantized to the FP embeddings on the held-out documents in the run's text mode
(encoders; the FP model's own figure is 1 by definition and is not computed).

Under ``torchrun`` (:mod:`qcalib.distributed`) every rank runs the same :func:`quantize`:
SelectQ's passes, the observer passes and GPTQ's Hessians are split over the ranks and
reduced, so all ranks hold the same selection and calibrated model; rank 0 alone writes
the run directory and evaluates (the other ranks return a result without a metric).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from qcalib.artifact import prepare_run_dir, save_indices, save_run
from qcalib.calibrate import CALIBRATORS
from qcalib.calibrate.base import Calibrator
from qcalib.config import CalibConfig, RunConfig, TextConfig
from qcalib.data.imagefolder import EvalTransform
from qcalib.data.pool import Pool
from qcalib.data.preprocess import AUTO, image_transform
from qcalib.data.registry import is_text_spec, load_dataset, load_pool
from qcalib.data.text import TokenSamples, check_enough_tokens, limit_tokens
from qcalib.distributed import barrier, broadcast_object, is_main
from qcalib.errors import QCalibError
from qcalib.evaluate import accuracy, embedding_cosine, perplexity
from qcalib.measure import Measure
from qcalib.model.build import build_quant_model, check_input_fits
from qcalib.model.wrap import QuantModel
from qcalib.result import RunResult
from qcalib.select import SELECTORS
from qcalib.select.base import check_budget
from qcalib.select.stats import StatRowCache
from qcalib.zoo.external import load_model

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


NO_EVAL = "none"
METRICS = ("top1", "perplexity", "embedding_cosine")
# What each HFTextModel task is evaluated with.
TEXT_METRICS = {"causal-lm": "perplexity", "embedding": "embedding_cosine"}


def load_eval_set(
    data: str,
    data_root: str | None,
    eval_data: str | None,
    transform: EvalTransform | None = None,
    unreadable: str = "error",
) -> Dataset | None:
    """The labeled evaluation set of a run (see ``RunConfig.eval_data``); None for "none".
    ``transform``: the preprocessing of image files (None: ImageNet's); ``unreadable``:
    what to do with image files that do not decode (``RunConfig.unreadable_images``)."""
    if eval_data == NO_EVAL:
        return None
    return load_dataset(
        eval_data or data, "test", data_root, transform=transform, unreadable=unreadable
    )


def text_metric(model: nn.Module) -> str:
    """The metric of a text model (see :data:`TEXT_METRICS`), or a :class:`QCalibError`."""
    task = getattr(model, "task", None)
    if task not in TEXT_METRICS:
        raise QCalibError(
            f"text data needs a Hugging Face text model (causal LM or encoder), got "
            f"{type(model).__name__}; load one with --model hf:PATH or wrap it in "
            "qcalib.zoo.hf.HFCausalLM / HFEncoder"
        )
    return TEXT_METRICS[task]


def load_text_eval_set(
    model: nn.Module, data: str, data_root: str | None, eval_data: str | None, text: TextConfig
) -> TokenSamples | None:
    """The held-out text of a run: perplexity reads ``chunk`` windows, embedding cosine
    the run's own text mode; capped at ``text.eval_max_tokens``. None for "none"."""
    if eval_data == NO_EVAL:
        return None
    spec = eval_data or data
    if not is_text_spec(spec):
        raise QCalibError(
            f"--eval-data {spec} is not text; a text model is evaluated on text:PATH "
            "(default: the held-out documents of --data) or --eval-data none"
        )
    if text_metric(model) == "perplexity":
        text = replace(text, mode="chunk")
    samples = load_dataset(spec, "test", data_root, tokenizer=model.tokenizer, text=text)
    assert isinstance(samples, TokenSamples)
    return limit_tokens(samples, text.eval_max_tokens)


class Workbench:
    """The fixed parts of a run: FP model, calibration pool, test set (None when the run is
    not evaluated): labeled images for classifiers, held-out text for text models.

    Image files are preprocessed by ``preprocess`` (:mod:`qcalib.data.preprocess`;
    ``"auto"``: the model's own, e.g. ``(x - 127) / 128`` for EfficientNet-Lite), pool and
    test set alike; :attr:`transform` is the one used."""

    def __init__(
        self,
        model: str | nn.Module,
        data: str | Pool,
        data_root: str | None = None,
        weights: str | None = None,
        device: str = "cpu",
        eval_batch_size: int = 500,
        eval_data: str | None = None,
        text: TextConfig | None = None,
        preprocess: str = AUTO,
        unreadable_images: str = "error",
    ) -> None:
        self.device = resolve_device(device)
        self.model_name = model if isinstance(model, str) else type(model).__name__
        if isinstance(model, str):
            model = load_model(model, weights)
        self.model = model.eval().to(self.device)
        self.transform = image_transform(preprocess, model)
        self.eval_batch_size = eval_batch_size
        self.text = text or TextConfig()
        self.test_set: Dataset | None
        if isinstance(data, Pool):
            # A pool built by the caller (a subset, an in-memory token set): evaluated only
            # on the labeled / held-out data that eval_data names.
            text_model = getattr(model, "task", None) in TEXT_METRICS
            self.metric = text_metric(model) if text_model else "top1"
            self.pool = data
            if eval_data is None or eval_data == NO_EVAL:
                self.test_set = None
            elif text_model:
                self.test_set = load_text_eval_set(model, eval_data, data_root, None, self.text)
            else:
                self.test_set = load_eval_set(
                    eval_data, data_root, None, self.transform, unreadable_images
                )
        elif is_text_spec(data):
            self.metric = text_metric(model)
            tokenizer = getattr(model, "tokenizer", None)
            self.pool = load_pool(data, data_root, tokenizer=tokenizer, text=self.text)
            self.test_set = load_text_eval_set(model, data, data_root, eval_data, self.text)
        else:
            self.metric = "top1"
            self.pool = load_pool(data, data_root, split="train", transform=self.transform,
                                  unreadable=unreadable_images)  # fmt: skip
            self.test_set = load_eval_set(data, data_root, eval_data, self.transform,
                                          unreadable_images)  # fmt: skip
        self._fp_metric: float | None = None
        # Opt-in (memory): a StatRowCache here lets every selection on this workbench
        # forward each pool sample once (qcalib.select.stats, "Reuse across selectors").
        self.stat_rows: StatRowCache | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Workbench:
        return cls(cfg.model, cfg.data, cfg.data_root, cfg.weights, cfg.device,
                   cfg.eval_batch_size, cfg.eval_data, cfg.text, cfg.preprocess,
                   cfg.unreadable_images)  # fmt: skip

    @property
    def evaluates(self) -> bool:
        return self.test_set is not None

    @property
    def eval_tokens(self) -> int | None:
        """Tokens in the text evaluation set (scored by perplexity: one fewer per window)."""
        return self.test_set.num_tokens if isinstance(self.test_set, TokenSamples) else None

    def evaluate(self, model: nn.Module, progress: bool = False) -> float:
        """``model``'s figure under :attr:`metric` (quantized models: against the FP one)."""
        if self.metric == "top1":
            return self.accuracy(model, progress)
        test_set = self._require_test_set()
        if self.metric == "perplexity":
            return self.perplexity(model, progress)[0]
        if model is self.model:
            return 1.0
        return embedding_cosine(self.model, model, test_set, self.eval_batch_size, progress,
                                self.device)  # fmt: skip

    def perplexity(self, model: nn.Module, progress: bool = False) -> tuple[float, int]:
        """``(perplexity, tokens scored)`` of a causal LM on the held-out windows."""
        return perplexity(model, self._require_test_set(), self.eval_batch_size, progress,
                          self.device)  # fmt: skip

    @property
    def fp_metric(self) -> float:
        if self._fp_metric is None:
            self._fp_metric = self.evaluate(self.model)
        return self._fp_metric

    def _require_test_set(self) -> Dataset:
        if self.test_set is None:
            raise QCalibError(
                "this run has no evaluation data (--eval-data none); drop --eval-data none "
                "to evaluate on the held-out split"
            )
        return self.test_set

    def accuracy(self, model: nn.Module, progress: bool = False) -> float:
        if self.metric != "top1":
            raise QCalibError(
                f"a text model has no top-1 accuracy; it is evaluated by {self.metric} "
                "(Workbench.evaluate)"
            )
        if self.test_set is None:
            raise QCalibError(
                "this run has no evaluation data (--eval-data none); give a labeled "
                "dataset with --eval-data to measure accuracy"
            )
        return accuracy(model, self.test_set, self.eval_batch_size, progress, self.device)

    @property
    def fp_top1(self) -> float:
        if self.metric != "top1":
            self.accuracy(self.model)  # raises: names the text metric
        return self.fp_metric

    def example_input(self) -> torch.Tensor:
        return self.pool.example().to(self.device)


def select_indices(
    cfg: RunConfig, bench: Workbench, progress: bool = True, report: dict | None = None
) -> torch.Tensor:
    """The run's calibration set. The selector is told what the run's calibrator reads
    from it (``Calibrator.reads``) and what sets its static activation ranges reads
    (``Calibrator.activation_reads``), so calibrator-aware strategies pick accordingly.
    ``report`` (optional) receives the selector's own account of the set
    (``selection_``, e.g. SelectQ's quotas and range mismatch)."""
    selector = SELECTORS.get(cfg.select.selector)(seed=cfg.seed, **cfg.select.kwargs())
    selector.progress = progress
    selector.row_cache = bench.stat_rows
    calibrator = CALIBRATORS.get(cfg.calib.calibrator)
    reads = {"calibrator_reads": calibrator.reads,
             "activation_reads": calibrator.activation_reads(cfg.quant, cfg.calib)}  # fmt: skip
    # Every selector's fit takes the model; those that read no activations ignore it.
    selector.fit(bench.pool, model=bench.model, **reads)
    indices = selector.select(cfg.calib.num_calib)
    if report is not None:
        report.update(getattr(selector, "selection_", None) or {})
    return indices


def score_calibration(
    calib: CalibConfig, seed: int = 0
) -> Callable[[nn.Module, torch.Tensor], None]:
    """The run's own calibrator as :func:`~qcalib.select.quality.calibration_score`'s
    ``calibrate``: the set is then scored by the quantized model the run would build from
    it (GPTQ's Hessian-driven rounding included), not by the calibrator's observers."""
    calibrator = CALIBRATORS.get(calib.calibrator)(calib)

    def run(qmodel: nn.Module, data: torch.Tensor) -> None:
        calibrator.calibrate(qmodel, data, seed=seed, progress=False)

    return run


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


def _prepare_run_dir_on_main(out: str | Path, cfg: RunConfig, overwrite: bool) -> list[int] | None:
    """:func:`prepare_run_dir` on rank 0 alone, its outcome (saved indices or the error)
    shared with every rank: two ranks writing ``run_config.json`` at once raced on its
    temporary file, and a rank that failed alone would leave the others waiting."""
    outcome: tuple[list[int] | None, str | None] = (None, None)
    if is_main():
        try:
            outcome = (prepare_run_dir(out, cfg, overwrite), None)
        except QCalibError as e:
            outcome = (None, str(e))
    indices, error = broadcast_object(outcome)
    if error is not None:
        raise QCalibError(error)
    return indices


def quantize(
    cfg: RunConfig,
    bench: Workbench | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    calibrator: Calibrator | None = None,
    indices: Sequence[int] | torch.Tensor | None = None,
    overwrite: bool = False,
) -> tuple[QuantModel, RunResult]:
    """One PTQ run. With ``out``, each finished stage is written at once.

    ``out`` holding a finished run is refused unless ``overwrite``; an unfinished run
    there resumes when its config equals ``cfg`` (its calibration indices are reused and a
    reconstruction restarts at its first unfinished block), else it is refused naming
    what differs (:func:`qcalib.artifact.prepare_run_dir`).

    ``calibrator``: an instance to use instead of a new one from the registry (e.g. to
    read a reconstruction calibrator's ``engine`` afterwards, or to set its hooks); it
    must be of ``cfg.calib.calibrator``'s class (or a subclass) and built on ``cfg.calib``.

    ``indices``: a precomputed calibration set (``cfg.calib.num_calib`` distinct pool
    indices, e.g. cached from an earlier selection, since selection does not depend on
    the calibrator or the bits); selection is skipped and ``cfg.select`` only labels the
    run. The indices are sorted like a selector's.
    """
    saved_indices = _prepare_run_dir_on_main(out, cfg, overwrite) if out is not None else None
    if indices is None:
        indices = saved_indices
    bench = bench or Workbench.from_config(cfg)
    check_enough_tokens(bench.pool, bench.text.seq_len, cfg.calib.num_calib)
    if indices is None:
        check_budget(cfg.calib.num_calib, len(bench.pool))
    check_input_fits(bench.model, bench.example_input())
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

    selection: dict = {}
    with Measure() as m:
        if indices is None:
            indices = select_indices(cfg, bench, progress, report=selection)
        else:
            indices = check_indices(indices, len(bench.pool), cfg.calib.num_calib)
    seconds["select"], rss["select"] = m.seconds, m.peak_rss_mb
    # Stage lines in the log (and OUT/qcalib.log): what a run without progress bars shows.
    log.info("calibration set: %d of %d pool samples (%s) in %.1fs", len(indices),
             len(bench.pool), cfg.select.selector, m.seconds)  # fmt: skip
    # Data-parallel runs: every rank selects and calibrates the same model; only rank 0
    # writes, evaluates and reports (the others' results carry no metric).
    writes = out is not None and is_main()
    if writes:
        save_indices(Path(out), indices)

    with Measure() as m:
        calib = bench.pool.get(indices).to(bench.device)
        fp_model, smooth_report = bench.model, None
        # --- SmoothQuant (issue 11): a pre-transform of a copy of the FP model ---
        if cfg.quant.smoothquant_alpha is not None:
            from qcalib.model.smooth import apply_smoothquant

            fp_model = copy.deepcopy(bench.model)
            smooth_report = apply_smoothquant(
                fp_model, calib, cfg.quant.smoothquant_alpha, pairs=cfg.quant.smoothquant_pairs
            )
        # --- end SmoothQuant ---
        qmodel = build_quant_model(fp_model, cfg.quant, bench.example_input())
        work_dir = Path(out) / "calib_state" if writes else None
        calibrator.calibrate(qmodel, calib, seed=cfg.seed, progress=progress, work_dir=work_dir)
    seconds["calibrate"], rss["calibrate"] = m.seconds, m.peak_rss_mb
    log.info("calibrated with %s in %.1fs", cfg.calib.calibrator, m.seconds)

    fp = q_metric = eval_tokens = None
    if bench.evaluates and is_main():
        t0 = time.perf_counter()
        fp = bench.fp_metric
        with Measure() as m:
            if bench.metric == "perplexity":
                q_metric, eval_tokens = bench.perplexity(qmodel, progress)
            else:
                q_metric, eval_tokens = bench.evaluate(qmodel, progress), bench.eval_tokens
        seconds["eval"], rss["eval"] = m.seconds, m.peak_rss_mb
        log.info("evaluated: %s FP %.4g, quantized %.4g (%.1fs; FP %.1fs)", bench.metric, fp,
                 q_metric, m.seconds, time.perf_counter() - t0 - m.seconds)  # fmt: skip
    top1 = bench.metric == "top1"

    result = RunResult(
        config=cfg.to_dict(),
        model=bench.model_name,
        fp_top1=fp if top1 else None,
        quant_top1=q_metric if top1 else None,
        calib_indices=indices.tolist(),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        peak_rss_mb={k: round(v, 1) for k, v in rss.items()},
        calib_stats=calibrator.report(),
        metric=bench.metric,
        fp_metric=fp,
        quant_metric=q_metric,
        eval_tokens=eval_tokens,
        selection=selection,
    )
    if smooth_report is not None:  # SmoothQuant (issue 11)
        result.calib_stats["smoothquant"] = smooth_report
    if writes:
        save_run(Path(out), result, qmodel)
    barrier()  # no rank returns before the run directory is complete
    return qmodel, result
