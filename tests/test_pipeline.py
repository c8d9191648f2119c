"""End-to-end runs through the API and the CLI on scikit-learn digits (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qcalib.artifact import load_run
from qcalib.calibrate import CALIBRATORS
from qcalib.cli import main
from qcalib.config import CalibConfig, QuantConfig, RunConfig, SelectConfig
from qcalib.errors import QCalibError
from qcalib.pipeline import Workbench, build_quant_model, quantize
from qcalib.select import SELECTORS


@pytest.fixture(scope="module")
def bench(trained_tiny):
    return Workbench(trained_tiny, "digits")


def _cfg(**kw) -> RunConfig:
    calib = kw.pop("calib", CalibConfig(num_calib=32))
    quant = kw.pop("quant", QuantConfig(wbits=4, abits=4))
    return RunConfig(model="api", data="digits", calib=calib, quant=quant, **kw)


def test_fp_model_is_accurate_enough_to_measure_quantization(bench):
    assert bench.fp_top1 > 85.0


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "mse"])
def test_w8a8_is_close_to_fp_and_w2a2_is_worse(bench, calibrator):
    cal = CalibConfig(calibrator=calibrator, num_calib=64)
    _, r8 = quantize(_cfg(quant=QuantConfig(8, 8), calib=cal), bench, progress=False)
    _, r2 = quantize(
        _cfg(quant=QuantConfig(2, 2, first_last_bits=None), calib=cal), bench, progress=False
    )
    assert abs(r8.quant_top1 - bench.fp_top1) <= 1.5
    assert r2.quant_top1 < r8.quant_top1


def test_run_is_reproducible_and_artifact_round_trips(bench, tmp_path, trained_tiny):
    cfg = _cfg(seed=3)
    q1, r1 = quantize(cfg, bench, out=tmp_path / "run", progress=False)
    _, r2 = quantize(cfg, bench, progress=False)
    assert r1.calib_indices == r2.calib_indices
    assert r1.quant_top1 == r2.quant_top1

    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["quant_top1"] == r1.quant_top1
    assert json.loads((tmp_path / "run" / "calib_indices.json").read_text()) == r1.calib_indices
    layers = json.loads((tmp_path / "run" / "quant_layers.json").read_text())
    assert [row["wbits"] for row in layers] == [8, 4, 8]  # first/last at 8 bits

    cfg2, q2, _ = load_run(tmp_path / "run", model=trained_tiny)
    assert cfg2 == cfg
    x = bench.pool.get(list(range(16)))
    assert torch.equal(q1(x), q2(x))
    assert bench.accuracy(q2) == r1.quant_top1


def test_random_selector_is_seeded_sorted_unique(bench):
    a = SELECTORS.get("random")(seed=1).fit(bench.pool).select(50)
    b = SELECTORS.get("random")(seed=1).fit(bench.pool).select(50)
    c = SELECTORS.get("random")(seed=2).fit(bench.pool).select(50)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, a.sort().values) and a.unique().numel() == 50


def test_num_calib_larger_than_pool_is_a_clear_error(bench):
    with pytest.raises(QCalibError, match="larger than the pool"):
        quantize(_cfg(calib=CalibConfig(num_calib=10**6)), bench, progress=False)


def test_unknown_selector_lists_choices(bench):
    with pytest.raises(QCalibError, match="random"):
        quantize(_cfg(select=SelectConfig("nope")), bench, progress=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--wbits", "9"], "argument --wbits: must be from 2 to 8, got 9"),
        (["--abits", "1"], "argument --abits: expected bits from 2 to 8, or 16 / none"),
        (["--model", "zoo:nope"], "unknown"),
        (["--data", "nope", "--model", "torchvision:resnet18"], "unknown"),
        (
            ["--data", "digits", "--num-calib", "100000", "--model", "torchvision:resnet18"],
            "larger than the pool",
        ),  # fmt: skip
        (["--data", "fashion-mnist", "--data-root", "/nonexistent"], "dataset-fashion-mnist"),
    ],
)
def test_cli_bad_input_is_one_line_error(capsys, argv, message):
    assert main(["quantize", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    # Parse-time errors name the subcommand (argparse), load-time ones only the program.
    assert err.startswith(("qcalib: error:", "qcalib quantize: error:")) and message in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_model_without_quantizable_layer(tmp_path, capsys, monkeypatch):
    import qcalib.pipeline as pipeline

    monkeypatch.setattr(
        pipeline, "load_model", lambda *a, **k: torch.nn.Sequential(torch.nn.ReLU())
    )
    assert main(["quantize", "--no-progress", "--data", "digits", "--model", "x:y"]) == 2
    assert "no quantizable layer" in capsys.readouterr().err


def test_precomputed_indices_skip_selection_and_match_the_selected_run(bench):
    cfg = _cfg(seed=5)
    _, ref = quantize(cfg, bench, progress=False)
    shuffled = list(reversed(ref.calib_indices))
    _, given = quantize(cfg, bench, progress=False, indices=shuffled)
    assert given.calib_indices == ref.calib_indices  # sorted like a selector's
    assert given.quant_top1 == ref.quant_top1
    # The set is used as given, whatever cfg.select says (it only labels the run).
    other = _cfg(seed=5, select=SelectConfig("nope"))
    _, labeled = quantize(other, bench, progress=False, indices=torch.tensor(shuffled))
    assert labeled.quant_top1 == ref.quant_top1


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([0, 1], "2 calibration indices given but --num-calib is 32"),
        (list(range(31)) + [10**6], "out of range"),
        (list(range(31)) + [0], "duplicates"),
    ],
)
def test_precomputed_indices_errors(bench, indices, message):
    with pytest.raises(QCalibError, match=message):
        quantize(_cfg(), bench, progress=False, indices=indices)


# -- an unlabeled file pool with separate labeled evaluation data ----------------------------


def _png(path, seed: int) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """``files:`` list of 6 unlabeled images; an image folder whose val/ has 2 classes."""
    root = tmp_path_factory.mktemp("images")
    for i in range(6):
        _png(root / "pool" / f"{i}.png", i)
    (root / "pool.txt").write_text("\n".join(f"pool/{i}.png" for i in range(6)) + "\n")
    for c, name in enumerate(("ant", "bee")):
        for i in range(3):
            _png(root / "labeled" / "val" / name / f"{i}.png", 100 + 10 * c + i)
    return root


def _image_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 7, stride=8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
    )  # fmt: skip


def test_file_pool_is_evaluated_on_eval_data(image_data, tmp_path):
    from qcalib.data.registry import load_dataset

    model = _image_model()
    spec, eval_spec = f"files:{image_data / 'pool.txt'}", f"imagefolder:{image_data / 'labeled'}"
    bench = Workbench(model, spec, eval_data=eval_spec)
    cfg = RunConfig(model="api", data=spec, eval_data=eval_spec, calib=CalibConfig(num_calib=4))
    qmodel, res = quantize(cfg, bench, out=tmp_path / "run", progress=False)
    # FP and quantized top-1 by hand: each model's argmax against the val/ folder's labels.
    val = load_dataset(eval_spec, "val")
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        pred, qpred = model(images).argmax(1), qmodel(images).argmax(1)
    labels = torch.as_tensor([val[i][1] for i in range(len(val))])
    assert len(val) == 6 and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert res.fp_top1 == pytest.approx(100.0 * float((pred == labels).float().mean()))
    assert res.quant_top1 == pytest.approx(100.0 * float((qpred == labels).float().mean()))
    assert len(res.calib_indices) == 4
    assert json.loads((tmp_path / "run" / "result.json").read_text())["config"]["eval_data"] == (
        eval_spec
    )


def test_file_pool_without_eval_data_names_the_flag(image_data):
    with pytest.raises(QCalibError, match="--eval-data"):
        Workbench(_image_model(), f"files:{image_data / 'pool.txt'}")


def test_eval_data_none_skips_evaluation(image_data, tmp_path):
    spec = f"files:{image_data / 'pool.txt'}"
    bench = Workbench(_image_model(), spec, eval_data="none")
    cfg = RunConfig(model="api", data=spec, eval_data="none", calib=CalibConfig(num_calib=4))
    _, res = quantize(cfg, bench, out=tmp_path / "run", progress=False)
    assert res.fp_top1 is None and res.quant_top1 is None and "eval" not in res.seconds
    assert res.summary().endswith("not evaluated")
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["quant_top1"] is None and len(saved["calib_indices"]) == 4
    with pytest.raises(QCalibError, match="no evaluation data"):
        bench.accuracy(bench.model)


def test_cli_file_pool_without_eval_data_is_one_line_error(image_data, capsys):
    argv = ["quantize", "--no-progress", "--model", "torchvision:resnet18",
            "--data", f"files:{image_data / 'pool.txt'}", "--num-calib", "4"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qcalib: error:") and "--eval-data none" in err and "\n" not in err


def test_grid_options_reach_the_quantizers_and_the_model(trained_tiny):
    # Each QuantConfig / CalibConfig option changes what is built, not only the config:
    # symmetric grids, per-tensor weights, BN left unfolded, the percentile.
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    default = build_quant_model(trained_tiny, QuantConfig(4, 4, first_last_bits=None), x[:1])
    changed = build_quant_model(
        trained_tiny,
        QuantConfig(
            4,
            4,
            w_symmetric=True,
            a_symmetric=True,
            w_per_channel=False,
            fold_bn=False,
            first_last_bits=None,
        ),  # fmt: skip
        x[:1],
    )
    for q, on in ((default, False), (changed, True)):
        mods = dict(q.quant_modules())
        assert len(mods) == 3
        for m in mods.values():
            assert m.weight_quantizer.spec.symmetric is on and m.act_quantizer.spec.symmetric is on
            assert m.weight_quantizer.spec.per_channel is not on
        assert any(isinstance(m, nn.BatchNorm2d) for m in q.model.modules()) is on
    scales = {}
    for pct in (90.0, 100.0):
        q = build_quant_model(trained_tiny, QuantConfig(8, 8, first_last_bits=None), x[:1])
        cfg = CalibConfig(calibrator="percentile", percentile=pct)
        CALIBRATORS.get("percentile")(cfg).calibrate(q, x, progress=False)
        scales[pct] = [float(m.act_quantizer.scale) for _, m in q.quant_modules()]
    # A lower percentile clips more: no range wider, and the wide-tailed inputs narrower.
    assert all(a <= b for a, b in zip(scales[90.0], scales[100.0], strict=True))
    assert any(a < 0.9 * b for a, b in zip(scales[90.0], scales[100.0], strict=True))
