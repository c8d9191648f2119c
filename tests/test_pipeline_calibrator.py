"""``quantize(calibrator=...)``: a caller-built calibrator is used, and checked against the
config, so a benchmark can read the reconstruction engine's per-block history."""

from __future__ import annotations

import pytest

from qcalib.calibrate import CALIBRATORS
from qcalib.config import CalibConfig, QuantConfig, ReconConfig, RunConfig
from qcalib.errors import QCalibError
from qcalib.pipeline import Workbench, quantize


@pytest.fixture(scope="module")
def bench(trained_tiny):
    return Workbench(trained_tiny, "digits")


def _cfg(calibrator: str = "qdrop") -> RunConfig:
    recon = ReconConfig(iters=8, act_iters=4)
    calib = CalibConfig(calibrator=calibrator, num_calib=32, recon=recon)
    return RunConfig(model="api", data="digits", quant=QuantConfig(4, 4), calib=calib, seed=3)


def test_passed_calibrator_is_used_and_matches_the_default_run(bench):
    cfg = _cfg()
    cal = CALIBRATORS.get("qdrop")(cfg.calib)
    calls = []
    cal.on_iteration = lambda block, stage, it: calls.append((block, stage, it))
    _, r1 = quantize(cfg, bench, progress=False, calibrator=cal)
    assert cal.engine is not None
    blocks = [h for h in cal.engine.history if "stage" not in h]
    assert len(blocks) == len(cal.engine.blocks) and all(h["seconds"] > 0 for h in blocks)
    assert len(calls) == 8 * len(blocks)
    _, r2 = quantize(cfg, bench, progress=False)
    assert r1.quant_top1 == r2.quant_top1 and r1.calib_indices == r2.calib_indices


def test_passed_calibrator_must_fit_the_config(bench):
    cfg = _cfg()
    with pytest.raises(QCalibError, match="QDropCalibrator"):
        quantize(cfg, bench, progress=False, calibrator=CALIBRATORS.get("brecq")(cfg.calib))
    other = CalibConfig(calibrator="qdrop", num_calib=16, recon=cfg.calib.recon)
    with pytest.raises(QCalibError, match="CalibConfig"):
        quantize(cfg, bench, progress=False, calibrator=CALIBRATORS.get("qdrop")(other))
