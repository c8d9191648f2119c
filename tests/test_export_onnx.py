"""ONNX QDQ export: ONNX Runtime against fake quant, stored integer codes, the narrowed
range, int4, determinism, the encodings JSON, the CLI and the error paths."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from conftest import tiny_resnet
from qcalib.calibrate import CALIBRATORS
from qcalib.cli import main
from qcalib.config import CalibConfig, QuantConfig, ReconConfig, RunConfig
from qcalib.errors import QCalibError
from qcalib.export import EXPORTERS, export_onnx, export_run
from qcalib.export import onnx as onnx_export
from qcalib.model.wrap import quantize_model
from qcalib.pipeline import Workbench, quantize
from qcalib.quant.quantizer import QuantSpec


def tiny_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 10)
    ).eval()


def _inputs(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 12, 12) if kind == "cnn" else (n, 16)
    return torch.randn(shape, generator=g)


def _calibrated(kind, wbits, abits, calibrator="minmax", recon=None):  # noqa: ANN001, ANN202
    model = tiny_resnet() if kind == "cnn" else tiny_mlp()
    x = _inputs(kind, 32)
    q = quantize_model(
        model, QuantSpec(wbits, per_channel=True), QuantSpec(abits), example_input=x[:2]
    )
    cfg = CalibConfig(calibrator=calibrator, num_calib=32, recon=recon or ReconConfig())
    CALIBRATORS.get(calibrator)(cfg).calibrate(q, x, seed=0, progress=False)
    return q


def _initializers(path) -> dict[str, onnx.TensorProto]:  # noqa: ANN001
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def _as_int(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t).astype(np.int64)


def _fake_quant_weight_codes(m) -> torch.Tensor:  # noqa: ANN001
    """Codes of the weight the fake-quant forward uses, from the quantizer's buffers."""
    with torch.no_grad():
        w_hat = m.weight_quantizer(m.weight)
    s = m.weight_quantizer.scale.reshape(-1, *[1] * (w_hat.dim() - 1))
    z = m.weight_quantizer.zero_point.reshape(-1, *[1] * (w_hat.dim() - 1))
    return (torch.round(w_hat / s) + z).to(torch.int64)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_onnx_runtime_matches_fake_quant(kind, bits, tmp_path):
    q = _calibrated(kind, *bits)
    # 3x the calibration data's spread: activations beyond the calibrated ranges reach the
    # clamps, so the narrowed range (W4A4) is exercised, not just the grid's inside.
    x = 3 * _inputs(kind, 64, seed=1)
    report = export_onnx(q, x[:4], tmp_path / "m.onnx", check_inputs=x)
    with torch.no_grad():
        ref = q(x)
    # Same integers and same float32 (q - z) * s: only summation order differs (~1e-7
    # relative). One activation moved across a rounding boundary would cost a whole
    # activation step (>= 1e-2 here), so 1e-4 of the output range separates the two.
    assert report.max_abs_diff <= 1e-4 * float(ref.abs().max())
    assert report.top1_agreement == 100.0
    assert report.check_inputs == 64
    assert report.deployed_top1_agreement >= 95.0  # int32 bias (see the test below)

    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = [n.op_type for n in graph.node]
    layers = q.quant_modules()
    assert ops.count("QuantizeLinear") == len(layers)  # one per quantized layer's input
    inits = _initializers(tmp_path / "m.onnx")
    for name, m in layers:
        t = inits[f"{name}.weight"]
        expect = (
            onnx.TensorProto.INT8 if m.weight_quantizer.spec.symmetric else onnx.TensorProto.UINT8
        )  # noqa: E501
        assert t.data_type == expect
        assert np.array_equal(_as_int(t), _fake_quant_weight_codes(m).numpy())
        axis = [
            a.i
            for n in graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}.weight"
            for a in n.attribute
            if a.name == "axis"
        ]
        assert axis == [0]


@pytest.mark.parametrize("calibrator", ["adaround", "qdrop"])
def test_learned_rounding_is_exported_as_stored_integers(calibrator, tmp_path):
    # A high rounding lr so that a few iterations move some weights off round-to-nearest.
    recon = ReconConfig(
        iters=12, act_iters=2, batch_size=8, w_lr=0.5, w_observer="minmax", a_observer="minmax"
    )
    q = _calibrated("cnn", 2, 4, calibrator, recon)
    fp = quantize_model(tiny_resnet(), QuantSpec(2, per_channel=True), QuantSpec(4))
    x = _inputs("cnn", 32, seed=2)
    report = export_onnx(q, x[:4], tmp_path / "m.onnx", check_inputs=x)
    assert report.top1_agreement == 100.0
    with torch.no_grad():
        assert report.max_abs_diff <= 1e-4 * float(q(x).abs().max())

    inits = _initializers(tmp_path / "m.onnx")
    flipped = 0
    for name, m in q.quant_modules():
        codes = _as_int(inits[f"{name}.weight"])
        assert np.array_equal(codes, _fake_quant_weight_codes(m).numpy())
        # Dequantized, the stored codes are exactly the weight the fake-quant model uses.
        s = numpy_helper.to_array(inits[f"{name}.weight_quantizer.scale"])
        z = _as_int(inits[f"{name}.weight_quantizer.zero_point"])
        shape = (-1,) + (1,) * (codes.ndim - 1)
        w_onnx = (codes - z.reshape(shape)).astype(np.float32) * s.reshape(shape)
        with torch.no_grad():
            assert np.array_equal(w_onnx, m.weight_quantizer(m.weight).numpy())
        # Re-rounding the FP weight to nearest would give other integers.
        fp_w = fp.model.get_submodule(name).weight.detach()
        sq = m.weight_quantizer
        nearest = torch.clamp(
            torch.round(fp_w / sq.scale.reshape(shape)) + sq.zero_point.reshape(shape),
            sq.spec.qmin,
            sq.spec.qmax,
        )
        flipped += int((torch.from_numpy(codes) != nearest.long()).sum())
    assert flipped > 0


def test_deployed_difference_is_ort_rounding_the_bias_to_int32(tmp_path):
    # ONNX Runtime's default optimizations round some conv biases to int32 at s_x * s_w
    # (its WeightBiasQuantization transform). Without that one transform, the optimized
    # graph (fused, reordered) computes exactly what the graph as written computes.
    q = _calibrated("cnn", 4, 4)
    x = 3 * _inputs("cnn", 32, seed=4)
    report = export_onnx(q, x[:4], tmp_path / "m.onnx", check_inputs=x)
    path = tmp_path / "m.onnx"
    written = onnx_export.run_onnx(path, x, optimized=False)
    no_bias_rounding = onnx_export.run_onnx(
        path, x, disabled_optimizers=("WeightBiasQuantization",)
    )
    assert report.deployed_max_abs_diff > 100 * report.max_abs_diff  # a real difference...
    assert float((no_bias_rounding - written).abs().max()) <= 1e-6  # ...and all of it


def _single_linear(a_bits: int, a_scale: float, a_zp: float, symmetric: bool = False):  # noqa: ANN202
    """One Linear (identity weight, no bias) with hand-set grids."""
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    q = quantize_model(
        nn.Sequential(lin), QuantSpec(4, symmetric=True, per_channel=True),
        QuantSpec(a_bits, symmetric=symmetric), first_last_bits=None,
    )  # fmt: skip
    ((_, m),) = q.quant_modules()
    m.weight_quantizer.set_qparams(torch.full((4,), 0.25), torch.zeros(4))
    m.act_quantizer.set_qparams(torch.tensor(a_scale), torch.tensor(a_zp))
    return q


@pytest.mark.parametrize("int4", [False, True])
def test_narrowed_range_clamps_like_fake_quant_by_hand(int4, tmp_path):
    if int4 and not onnx_export.ort_supports_int4():
        pytest.skip("the installed onnxruntime has no int4 QuantizeLinear")
    # 4-bit asymmetric input grid: scale 0.5, zero point 3 -> values (q - 3) * 0.5 for
    # q in [0, 15], i.e. [-1.5, 6.0]. A uint8 QuantizeLinear alone would give 9.0 for 9.0.
    q = _single_linear(4, 0.5, 3.0)
    x = torch.tensor([[-9.0, 0.2, 1.3, 9.0], [5.9, 6.3, -1.4, -1.6]])
    expect = torch.tensor([[-1.5, 0.0, 1.5, 6.0], [6.0, 6.0, -1.5, -1.5]])
    with torch.no_grad():
        assert torch.equal(q(x), expect)
    export_onnx(q, x, tmp_path / "m.onnx", int4=int4)
    for optimized in (False, True):
        got = onnx_export.run_onnx(tmp_path / "m.onnx", x, optimized=optimized)
        assert torch.equal(got, expect)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ("Clip" in ops) is (not int4)  # uint4 saturates to [0, 15] by itself


def test_int4_stores_4bit_grids_as_int4_and_8bit_ones_as_uint8(tmp_path):
    if not onnx_export.ort_supports_int4():
        with pytest.raises(QCalibError, match="--int4"):
            export_onnx(_calibrated("mlp", 4, 4), _inputs("mlp", 4), tmp_path / "m.onnx", int4=True)  # noqa: E501
        return
    q = _calibrated("cnn", 4, 4)
    x = _inputs("cnn", 32, seed=3)
    report = export_onnx(q, x[:4], tmp_path / "m.onnx", int4=True, check_inputs=x)
    assert report.opset == 21 and report.int4
    assert report.top1_agreement == 100.0
    inits = _initializers(tmp_path / "m.onnx")
    for name, m in q.quant_modules():
        t, zp = inits[f"{name}.weight"], inits[f"{name}.act_quantizer.zero_point"]
        four = m.weight_quantizer.spec.bits == 4
        assert t.data_type == (onnx.TensorProto.UINT4 if four else onnx.TensorProto.UINT8)
        assert zp.data_type == (onnx.TensorProto.UINT4 if four else onnx.TensorProto.UINT8)
        assert np.array_equal(_as_int(t), _fake_quant_weight_codes(m).numpy())


def test_int4_without_runtime_support_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "ort_supports_int4", lambda: False)
    with pytest.raises(QCalibError, match="drop --int4"):
        export_onnx(_calibrated("mlp", 4, 4), _inputs("mlp", 4), tmp_path / "m.onnx", int4=True)


def test_export_is_byte_identical_twice_and_encodings_describe_the_graph(tmp_path):
    q = _calibrated("cnn", 4, 4)
    x = _inputs("cnn", 8)
    a = export_onnx(q, x, tmp_path / "a.onnx")
    export_onnx(q, x, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    doc = json.loads((tmp_path / "a.encodings.json").read_text())
    assert a.encodings_path == str(tmp_path / "a.encodings.json")
    assert doc["format"] == "qcalib-encodings" and doc["model"] == "a.onnx"

    graph = onnx.load(str(tmp_path / "a.onnx")).graph
    inits = {t.name for t in graph.initializer}
    values = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    layers = q.quant_modules()
    assert [row["name"] for row in doc["layers"]] == [name for name, _ in layers]
    for row, (_, m) in zip(doc["layers"], layers, strict=True):
        w, a_ = row["weight"], row["activation"]
        wq, aq = m.weight_quantizer, m.act_quantizer
        assert w["tensor"] in inits and a_["tensor"] in values
        assert (w["bits"], w["axis"], w["symmetric"]) == (wq.spec.bits, 0, False)
        assert (w["dtype"], w["qmin"], w["qmax"]) == ("uint8", 0, 2**wq.spec.bits - 1)
        assert torch.equal(torch.tensor(w["scale"], dtype=torch.float32), wq.scale)
        assert w["zero_point"] == [int(v) for v in wq.zero_point.tolist()]
        assert (a_["bits"], a_["axis"]) == (aq.spec.bits, None)
        assert torch.tensor(a_["scale"], dtype=torch.float32) == aq.scale
        assert a_["zero_point"] == int(aq.zero_point)
    assert doc["layers"][0]["activation"]["tensor"] == "input"  # the network's input


def test_soft_rounding_is_refused(tmp_path):
    from qcalib.calibrate.rounding import AdaRoundQuantizer

    q = _calibrated("mlp", 4, 4)
    (_, m), *_ = q.quant_modules()
    m.weight_quantizer = AdaRoundQuantizer(m.weight_quantizer, m.weight)  # soft by default
    with pytest.raises(QCalibError, match="not on its integer grid"):
        export_onnx(q, _inputs("mlp", 4), tmp_path / "m.onnx")


@torch.library.custom_op("qcalib_test::wobble", mutates_args=())
def _wobble(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_wobble.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Wobbly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_wobble(x))


def test_unsupported_op_is_named(tmp_path):
    x = _inputs("mlp", 8)
    q = quantize_model(_Wobbly(), QuantSpec(8, per_channel=True), QuantSpec(8))
    CALIBRATORS.get("minmax")(CalibConfig(num_calib=8)).calibrate(q, x, seed=0, progress=False)
    with pytest.raises(QCalibError, match="qcalib_test.wobble"):
        export_onnx(q, x, tmp_path / "m.onnx")


def test_bad_arguments_are_clear_errors(tmp_path):
    q = _calibrated("mlp", 8, 8)
    with pytest.raises(QCalibError, match="--opset 18"):
        export_onnx(q, _inputs("mlp", 4), tmp_path / "m.onnx", opset=13)
    with pytest.raises(QCalibError, match="at least 2"):
        export_onnx(q, _inputs("mlp", 1), tmp_path / "m.onnx")
    with pytest.raises(QCalibError, match="onnx"):
        EXPORTERS.get("tflite")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A saved run of a named model (the CLI rebuilds it from the name) on digits."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = RunConfig(
        model="zoo:fmnist-resnet20", data="digits", eval_data="none",
        quant=QuantConfig(4, 4), calib=CalibConfig(num_calib=16),
    )  # fmt: skip
    quantize(cfg, Workbench(cfg.model, cfg.data, eval_data="none"), out=out, progress=False)
    return out


def test_cli_exports_a_saved_run(run_dir, capsys):
    assert main(["export", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "max |output diff|" in printed and "top-1 agreement 100.0%" in printed
    assert onnx.load(str(run_dir / "model.onnx")).graph.node
    doc = json.loads((run_dir / "model.encodings.json").read_text())
    bits = [(row["weight"]["bits"], row["activation"]["bits"]) for row in doc["layers"]]
    assert bits[0] == bits[-1] == (8, 8) and (4, 4) in bits  # first / last at 8 bits

    again = run_dir / "again.onnx"
    report = export_run(run_dir, "onnx", again)
    assert report.top1_agreement == 100.0
    assert again.read_bytes() == (run_dir / "model.onnx").read_bytes()


def test_cli_encodings_only_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "enc.json"
    assert main(["export", str(run_dir), "--format", "encodings", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["layers"]
    assert main(["export", str(run_dir), "--format", "encodings", "--int4"]) == 2
    assert "--format onnx only" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "qcalib quantize" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_bert_encoder_embeddings_in_onnx_runtime_match_fake_quant(bits, tmp_path):
    """Issue 13: a transformer encoder's exported embeddings keep the fake-quant model's
    cosine to FP within 1e-3 (ONNX Runtime as written and with its defaults)."""
    pytest.importorskip("transformers")
    from qcalib.data.tokens import pack_tokens
    from text_models import tiny_bert, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_bert(tok)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (24, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[:6, 8:] = 0  # padded sequences: the mask travels through the exported graph
    x = pack_tokens(ids, mask)
    q = quantize_model(
        model, QuantSpec(bits[0], per_channel=True), QuantSpec(bits[1]), example_input=x[:2]
    )
    CALIBRATORS.get("minmax")(CalibConfig(num_calib=16)).calibrate(q, x[:16], progress=False)
    report = export_onnx(q, x[:4], tmp_path / "bert.onnx", check_inputs=x)
    # Embeddings are compared by cosine: an argmax over embedding dims means nothing.
    assert report.top1_agreement is None and report.deployed_top1_agreement is None
    assert report.mean_cosine >= 1 - 1e-3 and report.deployed_mean_cosine >= 1 - 1e-3
    assert "mean cosine" in report.summary() and "top-1" not in report.summary()
    # 2 layers x (query, key, value, attention output, intermediate, output) + the pooler
    assert report.quantized_layers == len(q.quant_modules()) == 13
    with torch.no_grad():
        fp, fq = model(x), q(x)
    fq_cos = torch.nn.functional.cosine_similarity(fq, fp, dim=1)
    assert (fq - fp).abs().max() > 1e-4 * fp.abs().max()  # the quantization is visible
    for optimized in (False, True):
        got = onnx_export.run_onnx(tmp_path / "bert.onnx", x, optimized=optimized)
        cos = torch.nn.functional.cosine_similarity(got, fp, dim=1)
        assert abs(float(cos.mean()) - float(fq_cos.mean())) <= 1e-3
        assert float(torch.nn.functional.cosine_similarity(got, fq, dim=1).min()) >= 1 - 1e-3


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_cli_exports_a_text_model_run(kind, tmp_path, capsys):
    """A run of an ``hf:`` text model exports from the CLI: the check inputs are the run's
    own token samples (the model's tokenizer, the run's --seq-len)."""
    pytest.importorskip("transformers")
    from test_text import write_lines
    from text_models import sentences, tiny_bert, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(bos=True)
    wrapped = (tiny_llama if kind == "llama" else tiny_bert)(tok)
    model_dir = tmp_path / "model"
    wrapped.model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_lines(tmp_path / "docs.txt", sentences(60, seed=3))
    run = tmp_path / "run"
    argv = ["quantize", "--model", f"hf:{model_dir}", "--data", f"text:{data}",
            "--seq-len", "8", "--text-mode", "doc", "--wbits", "8", "--abits", "8",
            "--num-calib", "8", "--out", str(run), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "quantized layers" in out
    report_line = next(line for line in out.splitlines() if "max |output diff|" in line)
    diff = float(report_line.split("max |output diff| ")[1].split(",")[0].split(";")[0])
    assert diff < 1e-3


def test_compare_outputs_matches_by_argmax_per_position_or_by_cosine_for_embeddings():
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    got = torch.tensor([[0.9, 0.0, 0.1], [0.0, 0.0, 3.0]])
    c = onnx_export.compare_outputs(got, ref)
    assert c.top1_agreement == 50.0 and c.mean_cosine is None
    assert c.max_abs_diff == pytest.approx(3.0)
    # next-token logits [N, L, V]: agreement over the 2 x 2 positions
    ref3 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    got3 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    assert onnx_export.compare_outputs(got3, ref3).top1_agreement == 75.0
    # embeddings: rows at 0 and 90 degrees -> mean cosine (1 + 0) / 2, no top-1
    emb, emb_ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    e = onnx_export.compare_outputs(emb, emb_ref, task="embedding")
    assert e.top1_agreement is None and e.mean_cosine == pytest.approx(0.5)
