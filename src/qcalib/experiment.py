"""Running an experiment file (:mod:`qcalib.config_file`): one run per seed.

Choices:

* One :class:`~qcalib.pipeline.Workbench` (model, pool, test set, FP figure) serves every
  seed: seeds change the selection and the calibration's randomness, nothing else.
* Each run directory gets ``config.yaml`` (the effective config) *before* the run starts,
  then the pipeline's files, then the diagnostics (:mod:`qcalib.diagnostics`).
* Nothing finished is lost: a run directory whose ``result.json`` was made by the same
  config (and holds its diagnostics when they are on) is kept and skipped, so rerunning an
  interrupted experiment resumes with the next seed; one made by a *different* config is an
  error (choose another ``--out``). A directory with no ``result.json`` (an interrupted
  run) is run again; reconstruction calibrators resume from their ``calib_state/``.
* The experiment's log goes to ``OUT/qcalib.log`` besides the console (appended, so an
  interrupted and resumed experiment keeps both parts).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from qcalib.artifact import RESULT_FILE
from qcalib.config import RunConfig
from qcalib.config_file import CONFIG_FILE, Experiment, dump_run_config
from qcalib.diagnostics import LAYER_STATS_FILE, PROJECTION_FILE, write_diagnostics
from qcalib.errors import QCalibError
from qcalib.files import writable_dir
from qcalib.pipeline import RunResult, Workbench, quantize

__all__ = ["LOG_FILE", "log_to_file", "run_experiment"]

log = logging.getLogger(__name__)

LOG_FILE = "qcalib.log"


@contextlib.contextmanager
def log_to_file(path: str | Path) -> Iterator[None]:
    """Copy the ``qcalib`` loggers' records (INFO and up) into ``path`` while in the block."""
    path = Path(path)
    writable_dir(path.parent)  # an unwritable --out is a one-line error, not an OSError
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("qcalib")
    old_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _finished(run_dir: Path, cfg: RunConfig, needs: tuple[str, ...]) -> bool:
    """True when ``run_dir`` holds this config's finished run; an error for another's."""
    result_path = run_dir / RESULT_FILE
    if not result_path.exists():
        return False
    try:
        saved = RunConfig.from_dict(json.loads(result_path.read_text())["config"])
    except (ValueError, KeyError, TypeError, QCalibError):
        raise QCalibError(
            f"{result_path} is not a readable result; move it away or choose another --out"
        ) from None
    if saved != cfg:
        raise QCalibError(
            f"{run_dir} holds a finished run of a different config; choose another --out "
            "(or delete that directory to replace it)"
        )
    return all((run_dir / name).exists() for name in needs)


def run_experiment(
    exp: Experiment, out: str | Path, progress: bool = True, bench: Workbench | None = None
) -> list[RunResult | None]:
    """Run every seed of ``exp`` into ``out`` (see the module doc); one result per seed,
    None for a seed whose finished run was kept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[RunResult | None] = []
    with log_to_file(out / LOG_FILE):
        log.info("experiment: %d run(s) of %s into %s", len(exp.seeds), exp.run.model, out)
        needs = (LAYER_STATS_FILE, PROJECTION_FILE) if exp.diagnostics.enabled else ()
        bar = tqdm(exp.seeds, desc="seeds", unit="run", disable=not progress or len(exp.seeds) < 2)
        for seed in bar:
            cfg = replace(exp.run, seed=seed)
            run_dir = exp.run_dir(out, seed)
            if _finished(run_dir, cfg, needs):
                log.info("seed %d: finished run in %s kept", seed, run_dir)
                results.append(None)
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG_FILE).write_text(dump_run_config(cfg, exp.diagnostics))
            if bench is None:
                bench = Workbench.from_config(cfg)
            qmodel, result = quantize(cfg, bench=bench, out=run_dir, progress=progress)
            log.info("seed %d: %s", seed, result.summary())
            if exp.diagnostics.enabled:
                write_diagnostics(run_dir, bench.model, qmodel, bench.pool, result.calib_indices,
                                  exp.diagnostics, seed=seed, device=bench.device)  # fmt: skip
            results.append(result)
    return results
