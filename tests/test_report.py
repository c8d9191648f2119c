"""Diagnostics (hand-computed SQNR, projection), `qcalib run` end to end (reproduction,
resume, refusal), and `qcalib report` (figures, notes, errors, headless Chromium render)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from qcalib import diagnostics
from qcalib.calibrate import CALIBRATORS
from qcalib.cli import main
from qcalib.config import CalibConfig, QuantConfig
from qcalib.data.pool import Pool
from qcalib.diagnostics import layer_sqnr, pool_projection
from qcalib.errors import QCalibError
from qcalib.pipeline import build_quant_model
from qcalib.report import build_report, load_runs, runs, write_report


def _db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    signal, noise = signal.detach(), noise.detach()
    return 10 * math.log10(float(signal.square().sum()) / float(noise.square().sum()))


def test_layer_sqnr_equals_hand_computation_with_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).eval()
    x = torch.randn(12, 5)
    qmodel = build_quant_model(model, QuantConfig(wbits=3, abits=3, first_last_bits=None), x)
    CALIBRATORS.get("minmax")(CalibConfig(num_calib=12)).calibrate(qmodel, x, seed=0)
    rows = layer_sqnr(qmodel, x, batch_size=5)
    (_, m0), (_, m1) = qmodel.quant_modules()
    with torch.no_grad():
        fp0 = F.linear(x, m0.weight, m0.bias)
        fp1 = F.linear(fp0.relu(), m1.weight, m1.bias)
        w0, w1 = m0.weight_quantizer(m0.weight), m1.weight_quantizer(m1.weight)
        q0 = F.linear(m0.act_quantizer(x), w0, m0.bias)
        q1 = F.linear(m1.act_quantizer(q0.relu()), w1, m1.bias)
    assert [r["layer"] for r in rows] == ["0", "2"]
    assert rows[0]["output_sqnr_db"] == pytest.approx(_db(fp0, q0 - fp0), rel=1e-5)
    assert rows[1]["output_sqnr_db"] == pytest.approx(_db(fp1, q1 - fp1), rel=1e-5)
    assert rows[0]["weight_sqnr_db"] == pytest.approx(_db(m0.weight, w0 - m0.weight), rel=1e-5)
    assert 0 < rows[1]["output_sqnr_db"] < 40
    # the quantizers are left on, as found
    assert all(m.use_weight_quant and m.use_act_quant for _, m in qmodel.quant_modules())


def test_pool_projection_marks_the_selected_and_is_reproducible():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    pool = Pool(TensorDataset(torch.randn(50, 1, 8, 8)), name="p")
    selected = [3, 17, 40]
    p = pool_projection(model, pool, selected, samples=20, seed=1, batch_size=8)
    assert len(p["xy"]) == len(p["indices"]) == len(p["selected"])
    assert set(selected) <= set(p["indices"]) and 20 <= len(p["indices"]) <= 23
    assert [i for i, s in zip(p["indices"], p["selected"], strict=True) if s] == selected
    ev = p["explained_variance"]
    assert ev[0] >= ev[1] > 0 and sum(ev) <= 1 + 1e-6
    # the points are centred PCA coordinates
    xy = torch.tensor(p["xy"])
    assert xy.mean(0).abs().max() < 1e-3
    assert p == pool_projection(model, pool, selected, samples=20, seed=1, batch_size=8)


def test_report_reads_the_files_the_diagnostics_write():
    assert runs.LAYER_STATS_FILE == diagnostics.LAYER_STATS_FILE
    assert runs.PROJECTION_FILE == diagnostics.PROJECTION_FILE


EXPERIMENT = {
    "model": "zoo:fmnist-resnet20",
    "data": "digits",
    "eval_batch_size": 200,
    "calib": {"num_calib": 8, "batch_size": 8},
    "seeds": [0, 1],
    "diagnostics": {"samples": 48, "sqnr_samples": 4},
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Two seeds of a tiny min-max run (the reference ResNet-20 on 8x8 digits)."""
    root = tmp_path_factory.mktemp("exp")
    (root / "exp.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    assert main(["run", str(root / "exp.yaml"), "--out", str(root / "out"), "--no-progress"]) == 0
    return root


def test_run_writes_one_directory_per_seed_with_config_and_log(experiment):
    out = experiment / "out"
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        for name in ("config.yaml", "result.json", "quant_state.safetensors",
                     "layer_stats.json", "pool_projection.json"):  # fmt: skip
            assert (run / name).is_file(), name
        result = json.loads((run / "result.json").read_text())
        assert result["config"]["seed"] == seed and len(result["calib_indices"]) == 8
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["seed"] == seed and "seeds" not in saved and "out" not in saved
        stats = json.loads((run / "layer_stats.json").read_text())["layers"]
        assert len(stats) == 22 and all(r["output_sqnr_db"] is not None for r in stats)
        # diagnostics.samples = 48 reached the projection: 48 pool samples plus the set
        proj = json.loads((run / "pool_projection.json").read_text())
        assert 48 <= len(proj["indices"]) <= 48 + 8 and sum(proj["selected"]) == 8
        assert set(result["calib_indices"]) <= set(proj["indices"])
        assert proj["pool_size"] > 1000  # the digits pool, far more than was projected
    indices = [json.loads((out / f"seed-{s}" / "calib_indices.json").read_text()) for s in (0, 1)]
    assert indices[0] != indices[1]
    log = (out / "qcalib.log").read_text()
    assert "seed 0:" in log and "seed 1:" in log


def test_saved_config_reproduces_the_run(experiment):
    first = experiment / "out" / "seed-1"
    again = experiment / "again"
    assert main(["run", str(first / "config.yaml"), "--out", str(again), "--no-progress"]) == 0
    a, b = (json.loads((d / "result.json").read_text()) for d in (first, again))
    assert a["calib_indices"] == b["calib_indices"]
    assert (a["fp_top1"], a["quant_top1"]) == (b["fp_top1"], b["quant_top1"])
    assert a["config"] == b["config"]
    # diagnostics agree to float tolerance (CPU conv kernels may sum in another order)
    sa, sb = (json.loads((d / "layer_stats.json").read_text())["layers"] for d in (first, again))
    assert [r["layer"] for r in sa] == [r["layer"] for r in sb]
    for ra, rb in zip(sa, sb, strict=True):
        assert ra.pop("layer") == rb.pop("layer") and ra == pytest.approx(rb, rel=1e-5)


def test_rerun_keeps_finished_runs_and_refuses_another_config(experiment, capsys):
    out = experiment / "out"
    stamp = (out / "seed-0" / "result.json").stat().st_mtime_ns
    assert main(["run", str(experiment / "exp.yaml"), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 2
    assert (out / "seed-0" / "result.json").stat().st_mtime_ns == stamp
    other = experiment / "other.yaml"
    other.write_text(yaml.safe_dump({**EXPERIMENT, "quant": {"wbits": 3}}))
    assert main(["run", str(other), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a finished run of a different config; choose another --out" in err
    assert "\n" not in err and (out / "seed-0" / "result.json").stat().st_mtime_ns == stamp


def test_run_cli_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quant: {wbit: 3}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert (
        "unknown config key 'quant.wbit'; valid keys under quant: wbits" in capsys.readouterr().err
    )
    cfg.write_text("model: zoo:fmnist-resnet20\n")
    assert main(["run", str(cfg)]) == 2
    assert "has no out: key; give the output directory with --out" in capsys.readouterr().err
    cfg.write_text("select: {selector: kcenter, params: {nope: 1}}\nout: o\n")
    assert main(["run", str(cfg)]) == 2
    assert "selector 'kcenter' has no parameter 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_page_has_every_figure(experiment, tmp_path):
    records = load_runs([experiment / "out"])
    assert [r.seed for r in records] == [0, 1]
    page = build_report(records)
    assert page.count('src="data:image/png;base64,') == 5 and "Not drawn" not in page
    assert "W4A4 minmax random n=8" in page


def _record(wbits, abits, selector, seed, top1, calibrator="minmax"):
    from pathlib import Path

    config = {"quant": {"wbits": wbits, "abits": abits}, "calib": {"calibrator": calibrator},
              "select": {"selector": selector}, "seed": seed}  # fmt: skip
    result = {"config": config, "calib_indices": list(range(32)), "quant_top1": top1,
              "fp_top1": 93.5}  # fmt: skip
    return runs.RunRecord(Path(f"r{seed}"), result, None, None)


def test_report_figures_plot_random_and_selectq_per_bit_width_as_computed_by_hand():
    from qcalib.report.figures import metric_lines, seed_spread, spread_groups

    recs = [_record(3, 3, "random", s, v) for s, v in enumerate([60.0, 70.0, 80.0])]
    recs += [_record(3, 3, "selectq", s, v) for s, v in enumerate([72.0, 74.0, 73.0])]
    recs += [_record(4, 4, "random", s, v) for s, v in enumerate([92.0, 93.0])]
    recs += [_record(4, None, "selectq", 0, 93.0)]  # weight-only sorts as A16, not a crash
    recs += [_record(4, 4, "selectq", 0, None)]  # not evaluated: left out
    lines = metric_lines(recs)
    assert list(lines) == ["minmax / random", "minmax / selectq"]
    assert lines["minmax / random"] == {(3, 3): (70.0, math.sqrt(200 / 3)), (4, 4): (92.5, 0.5)}
    assert lines["minmax / selectq"] == {(3, 3): (73.0, math.sqrt(2 / 3)), (4, 16): (93.0, 0.0)}
    groups = spread_groups(recs)
    assert groups == {
        "W3A3 minmax random n=32": [60.0, 70.0, 80.0],
        "W3A3 minmax selectq n=32": [72.0, 74.0, 73.0],
        "W4A4 minmax random n=32": [92.0, 93.0],
        "W4A16 minmax selectq n=32": [93.0],
    }
    assert seed_spread(recs)[:8] == b"\x89PNG\r\n\x1a\n"
    assert seed_spread([r for r in recs if r.seed == 0]) is None  # no setting has 2 seeds


def test_report_notes_missing_diagnostics_and_rejects_bad_input(experiment, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(experiment / "out" / "seed-0", bare)
    for name in ("layer_stats.json", "pool_projection.json"):
        (bare / name).unlink()
    page = build_report(load_runs([bare]))
    # one run: metric vs bits drawn; no seed spread, no per-layer figures, no projection
    assert page.count("data:image/png;base64,") == 1 and page.count("Not drawn: needs") == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(QCalibError, match="holds no result.json"):
        load_runs([tmp_path / "empty"])
    (bare / "result.json").write_text("{not json")
    with pytest.raises(QCalibError, match="result.json is not readable JSON"):
        load_runs([bare])
    with pytest.raises(QCalibError, match="not a run directory"):
        load_runs([tmp_path / "missing"])


def test_python_m_qcalib_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "qcalib", "report", "--help"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "RUN" in out.stdout


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(experiment, tmp_path):
    page = write_report([experiment / "out"], tmp_path / "report.html")
    # A script run at load marks whether every image decoded; --dump-dom prints the DOM
    # after the load event.
    check = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " const ok = imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"
        " document.body.setAttribute('data-images', (ok ? 'ok:' : 'broken:') + imgs.length);"
        " });</script>"
    )
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", check + "</body>"))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
           probe.as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-images="ok:5"' in dom
