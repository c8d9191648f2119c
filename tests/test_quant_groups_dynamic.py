"""Group-wise weight grids, per-token dynamic activations and weight-only (A16) models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qcalib.artifact import layer_table
from qcalib.calibrate import CALIBRATORS
from qcalib.config import CalibConfig, QuantConfig, ReconConfig
from qcalib.errors import QCalibError
from qcalib.pipeline import build_quant_model
from qcalib.quant.observers import make_observer
from qcalib.quant.quantizer import DynamicActQuantizer, QuantSpec, WeightQuantizer, group_rows


def _np_fake_quant(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Asymmetric min-max grid written out by hand (range widened to contain 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    s = max((hi - lo) / qmax, 1e-8)
    z = np.clip(-np.round(lo / s), 0, qmax)
    q = np.clip(np.round(x / s) + z, 0, qmax)
    return (q - z) * s


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 4))


def test_group_rows_pads_a_short_last_group_with_its_own_values():
    w = torch.arange(10.0).reshape(2, 5)
    rows = group_rows(w, 2)
    assert rows.tolist() == [[0, 1], [2, 3], [4, 4], [5, 6], [7, 8], [9, 9]]


def test_grouped_minmax_weight_matches_per_group_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 7)
    q = WeightQuantizer(QuantSpec(4, per_channel=True, group_size=3))
    q.observer = make_observer("minmax", per_channel=True, ch_axis=0)
    q.observer(q.observer_view(w))
    q.compute_qparams()
    assert q.scale.shape == (3, 3)  # ceil(7 / 3) groups per row
    out = q(w).numpy()
    ref = np.zeros_like(out)
    wn = w.numpy()
    for o in range(3):
        for g0 in range(0, 7, 3):
            seg = wn[o, g0 : g0 + 3]
            ref[o, g0 : g0 + 3] = _np_fake_quant(seg, seg.min(), seg.max(), 4)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    # Grid values map onto themselves (what export and GPTQ rely on).
    assert torch.equal(q(q(w)), q(w))


def test_smaller_groups_lower_rtn_error():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    errs = []
    for gs in (None, 32, 8):
        q = WeightQuantizer(QuantSpec(3, per_channel=True, group_size=gs))
        q.observer = make_observer("minmax", per_channel=True, ch_axis=0)
        q.observer(q.observer_view(w))
        q.compute_qparams()
        errs.append(float((q(w) - w).square().sum()))
    assert errs[0] > errs[1] > errs[2]


def test_group_spec_errors_name_the_flag():
    with pytest.raises(QCalibError, match="--group-size"):
        QuantSpec(4, per_channel=False, group_size=128)
    with pytest.raises(QCalibError, match="--group-size"):
        QuantConfig(group_size=0)
    with pytest.raises(QCalibError, match="--per-tensor-weights"):
        QuantConfig(group_size=8, w_per_channel=False)


@pytest.mark.parametrize("calibrator", ["minmax", "mse"])
def test_grouped_model_calibrates_and_reloads_exactly(calibrator):
    model = _mlp()
    x = torch.randn(16, 10)
    cfg = QuantConfig(wbits=4, abits=8, group_size=4, first_last_bits=None)
    qm = build_quant_model(model, cfg, x[:1])
    CALIBRATORS.get(calibrator)(CalibConfig(calibrator=calibrator)).calibrate(qm, x, progress=False)
    layer = qm.model[0]
    assert layer.weight_quantizer.scale.shape == (6, 3)
    fresh = build_quant_model(model, cfg, x[:1])
    fresh.load_state_dict(qm.state_dict())
    assert torch.equal(fresh(x), qm(x))
    assert [r["w_group_size"] for r in layer_table(qm)] == [4, 4]


def test_reconstruction_calibrators_refuse_groups():
    model = _mlp()
    x = torch.randn(8, 10)
    qm = build_quant_model(model, QuantConfig(group_size=4), x[:1])
    with pytest.raises(QCalibError, match="--group-size"):
        CALIBRATORS.get("adaround")(CalibConfig(calibrator="adaround")).calibrate(
            qm, x, progress=False
        )


def test_dynamic_per_token_matches_hand_computation():
    x = torch.tensor(
        [[[1.0, -2.0, 3.0, 0.4], [0.5, 0.25, 0.0, 0.1]], [[-1.0, -3.0, -0.5, -2.0], [7, 1, 2, 3]]]
    )
    q = DynamicActQuantizer(QuantSpec(4))
    out = q(x).numpy()
    xn = x.numpy()
    ref = np.stack(
        [np.stack([_np_fake_quant(row, row.min(), row.max(), 4) for row in tok]) for tok in xn]
    )
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    # Each token has its own grid: the first row's step is 5/15, the second row's 0.5/15.
    assert out[0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    assert abs(out[0, 1, 1] - 0.25) <= 0.5 / 15 / 2 + 1e-7
    with pytest.raises(QCalibError, match="static range"):
        q.set_qparams(torch.ones(()), torch.zeros(()))


def test_dynamic_model_needs_no_activation_calibration_and_is_recorded():
    model = _mlp()
    x = torch.randn(16, 10)
    cfg = QuantConfig(wbits=8, abits=8, a_dynamic=True, first_last_bits=None)
    qm = build_quant_model(model, cfg, x[:1])
    assert all(isinstance(m.act_quantizer, DynamicActQuantizer) for _, m in qm.quant_modules())
    CALIBRATORS.get("minmax")(CalibConfig()).calibrate(qm, x, progress=False)
    # W8 with per-token A8: close to FP, and different from the float-activation model.
    fp = model(x)
    assert (qm(x) - fp).abs().max() < 0.05
    qm.set_quant_state(weight=True, act=False)
    no_act = qm(x)
    qm.set_quant_state(weight=True, act=True)
    assert not torch.equal(no_act, qm(x))
    # "recorded": the artifact's layer table says the activations are per-token dynamic.
    rows = layer_table(qm)
    assert len(rows) == 2 and all(r["a_dynamic"] is True and r["abits"] == 8 for r in rows)
    with pytest.raises(QCalibError, match="--a-dynamic"):
        QuantConfig(abits=16, a_dynamic=True)


@pytest.mark.parametrize("abits", [16, None])
def test_weight_only_model_has_no_activation_quantizers(abits):
    cfg = QuantConfig(wbits=4, abits=abits)
    assert cfg.abits == 16 and not cfg.quantize_activations
    model = _mlp()
    x = torch.randn(16, 10)
    qm = build_quant_model(model, cfg, x[:1])
    assert all(m.act_quantizer is None for _, m in qm.quant_modules())
    recon = ReconConfig(iters=5, act_iters=5, batch_size=4)
    for name in ("minmax", "percentile", "mse", "gptq", "adaround", "brecq", "qdrop"):
        qm = build_quant_model(model, cfg, x[:1])
        calib = CALIBRATORS.get(name)(CalibConfig(calibrator=name, recon=recon))
        calib.calibrate(qm, x, progress=False)
        # Activations float: the output is the FP network with the quantized weights.
        l0, l2 = qm.model[0], qm.model[2]
        hidden = torch.relu(x @ l0.weight_quantizer(l0.weight).T + l0.bias)
        w_only = hidden @ l2.weight_quantizer(l2.weight).T + l2.bias
        with torch.no_grad():
            torch.testing.assert_close(qm(x), w_only.detach())
            assert not torch.equal(qm(x), model(x)), name  # the weights were quantized


def test_abits_error_names_float_option():
    with pytest.raises(QCalibError, match="16 / none"):
        QuantConfig(abits=12)


def _cli_config(*flags: str):
    from qcalib.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["quantize", *flags]))


def test_cli_flags_reach_the_config_and_round_trip():
    from qcalib.config import GPTQConfig, RunConfig

    cfg = _cli_config(
        "--abits", "none", "--group-size", "128", "--calibrator", "gptq", "--act-order",
        "--percdamp", "0.05", "--smoothquant", "0.8",
    )  # fmt: skip
    q, c = cfg.quant, cfg.calib
    assert (q.abits, q.group_size, q.smoothquant_alpha, q.a_dynamic) == (16, 128, 0.8, False)
    assert c.gptq == GPTQConfig(act_order=True, percdamp=0.05)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    dyn = _cli_config("--abits", "8", "--a-dynamic")
    assert dyn.quant.a_dynamic and dyn.quant.abits == 8 and dyn.calib.gptq == GPTQConfig()
    assert _cli_config("--abits", "16").quant.abits == 16


def test_cli_bad_abits_is_a_one_line_error(capsys):
    from qcalib.cli import main

    assert main(["quantize", "--abits", "eight"]) == 2
    assert "16 / none" in capsys.readouterr().err
    assert main(["quantize", "--abits", "12", "--no-progress"]) == 2
    assert "16 / none" in capsys.readouterr().err
