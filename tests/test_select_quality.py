"""Calibration-set quality report: formulas, limits, outliers, API and `qcalib inspect-calib`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qcalib.cli import main
from qcalib.data.pool import Pool, TensorImageDataset
from qcalib.data.registry import load_dataset, load_pool
from qcalib.errors import QCalibError
from qcalib.select import SELECTORS, calibration_mismatch, format_report
from qcalib.select.stats import NonFiniteActivationError


class Flat(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.fixture(scope="module")
def planted():
    """The digits train images plus 8 planted outliers (saturated noise), as a pool."""
    ds = load_dataset("digits", "train")
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(8, *ds.images.shape[1:], generator=g) > 0.3).to(torch.uint8) * 255
    images = torch.cat([ds.images, noise])
    mean, std = ds.mean.flatten().tolist(), ds.std.flatten().tolist()
    pool = Pool(TensorImageDataset(images, None, mean, std), "planted")
    outliers = torch.arange(len(ds), len(ds) + 8)
    return pool, outliers


def test_hand_computed_linear_input():
    # One site: the input [4, 2] of a linear layer, so positions are the samples.
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])
    pool = Pool(TensorDataset(x), name="hand")
    r = calibration_mismatch(Flat(2), pool, [0, 1], quantiles=(0.0, 0.5, 1.0))
    (row,) = r.layers
    assert row.layer == "fc" and (row.pool_min, row.pool_max) == (0.0, 7.0)
    assert (row.set_min, row.set_max) == (0.0, 3.0)
    assert row.range_gap == pytest.approx(4 / 7)  # (|0-0| + |3-7|) / 7
    # quantiles (0, .5, 1): set 0, 1.5, 3 vs pool 0, 3.5, 7 -> mean gap 2; pool std sqrt(5.25)
    assert row.quantile_gap == pytest.approx(2 / math.sqrt(5.25))
    # per channel: set N(1, 1), N(2, 1) vs pool N(3, 5), N(4, 5) -> W2^2 = 4 + (1 - sqrt 5)^2
    assert row.moment_distance == pytest.approx(math.sqrt((10 - 2 * math.sqrt(5)) / 5))
    want = (4 / 7 + 2 / math.sqrt(5.25) + math.sqrt((10 - 2 * math.sqrt(5)) / 5)) / 3
    assert row.mismatch == pytest.approx(want)
    assert r.average["mismatch"] == pytest.approx(want) == r.mismatch
    assert r.n_set == 2 and r.n_pool == 4


def test_whole_pool_gives_zero_and_outliers_score_high(trained_tiny, planted):
    pool, outliers = planted
    full = calibration_mismatch(trained_tiny, pool, torch.arange(len(pool)), batch_size=256)
    assert [r.layer for r in full.layers] == ["conv1", "conv2", "fc"]
    assert max(abs(v) for v in full.average.values()) < 1e-9
    bad = calibration_mismatch(trained_tiny, pool, outliers, batch_size=256)
    rand = [
        calibration_mismatch(
            trained_tiny, pool, SELECTORS.get("random")(seed=s).fit(pool).select(8), batch_size=256
        ).mismatch
        for s in range(3)
    ]
    assert bad.mismatch > 3 * max(rand), (bad.mismatch, rand)


def test_separate_calibration_set_and_max_pool(trained_tiny):
    pool = load_pool("digits")
    same = calibration_mismatch(trained_tiny, pool, calib=load_pool("digits"), batch_size=512)
    assert max(abs(v) for v in same.average.values()) < 1e-9
    sub = calibration_mismatch(trained_tiny, pool, [1, 5, 9], max_pool=200, layers="fc")
    assert sub.n_pool == 200 and sub.n_set == 3 and [r.layer for r in sub.layers] == ["fc"]


def test_format_report_one_line_per_layer(trained_tiny):
    pool = load_pool("digits")
    text = format_report(calibration_mismatch(trained_tiny, pool, list(range(32))))
    lines = text.splitlines()
    assert lines[0].startswith("calibration set: 32 samples vs pool 'digits'")
    assert lines[1].split() == ["layer", "range_gap", "quantile_gap", "moment_distance", "mismatch"]
    assert [ln.split()[0] for ln in lines[2:]] == ["conv1", "conv2", "fc", "average"]


def test_errors(trained_tiny):
    pool = Pool(TensorDataset(torch.randn(10, 1, 8, 8)), name="ten")
    with pytest.raises(QCalibError, match="duplicates"):
        calibration_mismatch(trained_tiny, pool, [1, 1])
    with pytest.raises(QCalibError, match="out of range"):
        calibration_mismatch(trained_tiny, pool, [10])
    with pytest.raises(QCalibError, match="empty"):
        calibration_mismatch(trained_tiny, pool, [])
    with pytest.raises(QCalibError, match="not both"):
        calibration_mismatch(trained_tiny, pool)
    with pytest.raises(QCalibError, match="quantiles"):
        calibration_mismatch(trained_tiny, pool, [0], quantiles=(1.5,))

    class Overflow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) * float("inf"))

    p = Pool(TensorDataset(torch.randn(6, 4)), name="inf")
    with pytest.raises(NonFiniteActivationError, match="layer 'b'"):
        calibration_mismatch(Overflow(), p, [0, 1])


@pytest.fixture()
def patched_model(trained_tiny, monkeypatch):
    import qcalib.zoo.external as external

    monkeypatch.setattr(external, "load_model", lambda *a, **k: trained_tiny)
    return trained_tiny


def _run_cli(capsys, argv):
    code = main(["inspect-calib", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_indices_selector_and_run(patched_model, tmp_path, capsys):
    ind = tmp_path / "ind.txt"
    ind.write_text("3 5, 8\n13\n")
    code, out, _ = _run_cli(
        capsys,
        ["--model", "x:y", "--data", "digits", "--indices", str(ind), "--json",
         str(tmp_path / "r.json")],
    )  # fmt: skip
    assert code == 0
    names = [ln.split()[0] for ln in out.splitlines()[2:]
             if ln and not ln.startswith(("saved", "quality score"))]  # fmt: skip
    assert names == ["conv1", "conv2", "fc", "average"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["n_set"] == 4 and len(saved["layers"]) == 3 and "mismatch" in saved["average"]

    code, out, _ = _run_cli(
        capsys,
        ["--model", "x:y", "--data", "digits", "--selector", "selectq", "--num-calib", "16",
         "--selector-param", "num_clusters=3"],
    )  # fmt: skip
    assert code == 0 and "16 samples" in out

    run = tmp_path / "run"
    run.mkdir()
    (run / "calib_indices.json").write_text(json.dumps([0, 1, 2, 3, 4]))
    (run / "result.json").write_text(json.dumps({"config": {"model": "x:y", "data": "digits"}}))
    code, out, _ = _run_cli(capsys, ["--run", str(run)])
    assert code == 0 and "5 samples vs pool 'digits'" in out


def test_cli_errors_are_one_line(patched_model, tmp_path, capsys):
    ind = tmp_path / "ind.json"
    ind.write_text("[0, 99999]")
    code, _, err = _run_cli(capsys, ["--data", "digits", "--indices", str(ind)])
    assert code == 2 and "out of range" in err and "\n" not in err.strip()
    ind.write_text("a.png\nb.png\n")
    code, _, err = _run_cli(capsys, ["--data", "digits", "--indices", str(ind)])
    assert code == 2 and "--calib-files" in err
    code, _, err = _run_cli(
        capsys, ["--data", "digits", "--selector", "selectq", "--selector-param", "k=2"]
    )
    assert code == 2 and "num_clusters" in err
    code, _, err = _run_cli(capsys, ["--run", str(tmp_path / "nowhere")])
    assert code == 2 and "calib_indices.json" in err


def test_cli_calib_files_in_and_outside_the_pool(monkeypatch, tmp_path, capsys):
    from PIL import Image

    import qcalib.zoo.external as external

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=8), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(2)
    ).eval()
    net(torch.zeros(1, 3, 224, 224))  # materialise the lazy layer
    monkeypatch.setattr(external, "load_model", lambda *a, **k: net)
    pool_dir, other = tmp_path / "pool", tmp_path / "other"
    pool_dir.mkdir()
    other.mkdir()
    g = torch.Generator().manual_seed(0)
    for d, k in ((pool_dir, 5), (other, 2)):
        for i in range(k):
            arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"img{i}.png")
    inside = tmp_path / "inside.txt"
    inside.write_text("pool/img1.png\npool/img3.png\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("other/img0.png\nother/img1.png\n")
    outs = {}
    for lst in (inside, outside):
        code, out, err = _run_cli(
            capsys,
            ["--data", f"imagefolder:{pool_dir}", "--calib-files", str(lst), "--json",
             str(tmp_path / f"{lst.stem}.json"), "--score-samples", "4"],
        )  # fmt: skip
        assert code == 0, err
        assert "2 samples vs pool" in out
        outs[lst.stem] = out
    r_in = json.loads((tmp_path / "inside.json").read_text())
    r_out = json.loads((tmp_path / "outside.json").read_text())
    assert r_in["layers"][0]["set_max"] <= r_in["layers"][0]["pool_max"]
    assert r_in["n_set"] == 2 and r_out["n_set"] == 2 and r_out["n_pool"] == 5
    # Files of the pool are mapped to its indices, so the set can be scored (calibrate on
    # it, compare outputs on the pool); a separate set is only compared, never scored.
    assert "quality score" in outs["inside"] and "score" in r_in["info"]
    assert "quality score" not in outs["outside"] and "score" not in r_out["info"]


def test_pool_reference_reused_for_many_sets(trained_tiny, planted):
    from qcalib.select.quality import pool_reference

    pool, outliers = planted
    ref = pool_reference(trained_tiny, pool, batch_size=256, max_pool=600, seed=1)
    assert ref.n_pool == 600 and ref.sites == ["conv1", "conv2", "fc"]
    for idx in (torch.arange(0, 400, 7), outliers):
        direct = calibration_mismatch(trained_tiny, pool, idx, max_pool=600, seed=1)
        reused = calibration_mismatch(trained_tiny, pool, idx, reference=ref)
        assert reused.n_pool == direct.n_pool == 600 and reused.n_set == direct.n_set
        for a, b in zip(direct.layers, reused.layers, strict=True):
            assert a.layer == b.layer
            assert (a.pool_min, a.pool_max) == (b.pool_min, b.pool_max)  # same pool side
            assert (a.set_min, a.set_max) == pytest.approx((b.set_min, b.set_max))
            assert b.moment_distance == pytest.approx(a.moment_distance, rel=1e-4)
        assert reused.mismatch == pytest.approx(direct.mismatch, rel=1e-4)
    whole = pool_reference(trained_tiny, pool, batch_size=256)
    same = calibration_mismatch(
        trained_tiny, pool, torch.arange(len(pool)), batch_size=256, reference=whole
    )
    assert max(abs(v) for v in same.average.values()) < 1e-9
    other = Pool(TensorDataset(torch.randn(10, 1, 8, 8)), name="ten")
    with pytest.raises(QCalibError, match="measured on a pool of"):
        calibration_mismatch(trained_tiny, other, [0, 1], reference=ref)
