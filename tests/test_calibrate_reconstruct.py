"""The block-reconstruction engine: drop semantics, what is trained, Fisher weights,
loss reduction and resumability (bit-identical results after an interruption)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_resnet
from qcalib.calibrate import CALIBRATORS
from qcalib.calibrate.base import MinMaxCalibrator, calibrate_weights
from qcalib.calibrate.reconstruct import (
    STATE_FILE,
    BlockReconstructor,
    ReconstructionLoss,
    block_layers,
    stage_quantizers,
)
from qcalib.config import CalibConfig, QuantConfig, ReconConfig
from qcalib.model.partition import Block, partition_blocks
from qcalib.pipeline import build_quant_model

FAST = {"iters": 4, "act_iters": 2, "batch_size": 8, "w_observer": "minmax", "a_observer": "minmax"}


@pytest.fixture(scope="module")
def tiny():
    model = tiny_resnet()
    x = torch.randn(16, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    return model, x


def _qmodel(model: nn.Module, x: torch.Tensor, wbits: int = 2, abits: int = 4):
    return build_quant_model(model, QuantConfig(wbits, abits), x[:1])


def _calibrator(name: str, **recon):
    cfg = CalibConfig(calibrator=name, batch_size=8, recon=ReconConfig(**{**FAST, **recon}))
    return CALIBRATORS.get(name)(cfg)


def _block_input(qmodel, block, x):
    store = {}

    def hook(_m, args):
        store["x"] = args[0].detach().clone()
        raise StopIteration

    h = block.module.register_forward_pre_hook(hook)
    try:
        qmodel(x)
    except StopIteration:
        pass
    finally:
        h.remove()
    return store["x"]


def test_registered_and_stages_follow_the_methods():
    for name in ("adaround", "brecq", "qdrop"):
        assert name in CALIBRATORS
    block = partition_blocks(tiny_resnet())[1]
    ada = _calibrator("adaround").stages(block)
    brecq = _calibrator("brecq").stages(block)
    qdrop = _calibrator("qdrop", drop_prob=0.25).stages(block)
    assert [(s.learn_weights, s.learn_act, s.drop_prob) for s in ada] == [(True, False, 0.0)]
    assert [(s.learn_weights, s.learn_act, s.drop_prob) for s in brecq] == [
        (True, False, 0.0),
        (False, True, 1.0),
    ]
    assert [(s.learn_weights, s.learn_act, s.drop_prob) for s in qdrop] == [(True, True, 0.25)]
    assert brecq[1].iters == 2 and brecq[1].rec_p == 2.4


def test_qdrop_p0_is_brecq_forward_and_p1_is_full_quantization(tiny):
    model, x = tiny
    q = _qmodel(model, x)
    MinMaxCalibrator(CalibConfig()).calibrate(q, x, progress=False)
    block = next(b for b in partition_blocks(q, x[:1]) if len(block_layers(b)) == 3)
    inp = _block_input(q, block, x)
    brecq_stage = _calibrator("brecq").stages(block)[0]
    gen = torch.Generator().manual_seed(0)

    with stage_quantizers(block, brecq_stage, gen, commit=False):
        brecq_out = block.module(inp)
        for m in block_layers(block):  # BRECQ's rounding stage: activations in float
            m.set_quant_state(True, False)
        assert torch.equal(block.module(inp), brecq_out)
    for p, want in ((0.0, "brecq"), (1.0, "full"), (0.5, "neither")):
        stage = _calibrator("qdrop", drop_prob=p).stages(block)[0]
        with stage_quantizers(block, stage, gen, commit=False) as (rounding, acts):
            out = block.module(inp)
            for m, a in zip(block_layers(block), acts, strict=True):
                m.act_quantizer = a.base[0]  # the plain quantizers: full quantization
            full = block.module(inp)
            for m, a in zip(block_layers(block), acts, strict=True):
                m.act_quantizer = a
        assert len(rounding) == len(acts) == len(block_layers(block)) == 3
        if want == "brecq":
            assert torch.equal(out, brecq_out)
        elif want == "full":
            assert torch.equal(out, full)
        else:
            assert not torch.equal(out, brecq_out) and not torch.equal(out, full)
    # Leaving without commit restores the original quantizers and flags.
    assert all(type(m.weight_quantizer).__name__ == "WeightQuantizer" for m in block_layers(block))
    assert all(m.use_weight_quant and m.use_act_quant for m in block_layers(block))


def test_gradients_reach_only_rounding_variables_and_act_steps(tiny):
    model, x = tiny
    q = _qmodel(model, x)
    MinMaxCalibrator(CalibConfig()).calibrate(q, x, progress=False)
    block = next(b for b in partition_blocks(q, x[:1]) if len(block_layers(b)) == 3)
    inp = _block_input(q, block, x)
    stage = _calibrator("qdrop").stages(block)[0]
    for p in q.parameters():
        p.requires_grad_(False)
    with stage_quantizers(block, stage, torch.Generator().manual_seed(0), commit=False) as (
        rounding,
        acts,
    ):
        block.module(inp).square().sum().backward()
        assert all(r.v.grad is not None and r.v.grad.abs().sum() > 0 for r in rounding)
        assert all(a.scale.grad is not None for a in acts)
        fp_params = [p for m in block_layers(block) for p in (m.weight, m.bias) if p is not None]
        assert fp_params and all(p.grad is None for p in fp_params)
        trained = {id(r.v) for r in rounding} | {id(a.scale) for a in acts}
        others = [p for p in block.module.parameters() if id(p) not in trained]
        assert all(p.grad is None for p in others)


def test_run_trains_no_fp_weight_restores_flags_and_keeps_biases(tiny):
    model, x = tiny
    q = _qmodel(model, x)
    q.model.fc.weight.requires_grad_(False)  # a mixed pattern to restore
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    original = {n: p.detach().clone() for n, p in q.named_parameters()}
    cal = _calibrator("qdrop")
    seen = []

    def on_iteration(index, stage, it):
        block = cal.engine.blocks[index]
        for name, m in block.layers():
            seen.append(torch.equal(m.weight, original[f"model.{name}.weight"]))

    cal.on_iteration = on_iteration
    cal.calibrate(q, x, progress=False)
    assert seen and all(seen)  # the FP weights never move while a block is optimized
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags
    for name, m in q.quant_modules():
        if m.bias is not None:
            assert torch.equal(m.bias, original[f"model.{name}.bias"])
        w, fp = m.weight.detach(), original[f"model.{name}.weight"]
        s = m.weight_quantizer.scale.view(-1, *([1] * (w.dim() - 1)))
        z = m.weight_quantizer.zero_point.view_as(s)
        lo, hi = (m.weight_quantizer.qmin - z) * s, (m.weight_quantizer.qmax - z) * s
        # Only re-rounded: within one step of the (clipped) FP weight, on the grid.
        assert ((w - torch.minimum(torch.maximum(fp, lo), hi)).abs() <= s * 1.0001).all()
        assert torch.equal(m.weight_quantizer(m.weight), m.weight)


def test_reconstruction_beats_nearest_rounding_on_digits(trained_tiny):
    from qcalib.data.registry import load_pool

    x = load_pool("digits", None, split="train").get(list(range(128)))
    qcfg = QuantConfig(2, 8, first_last_bits=None)

    def run(iters):
        q = build_quant_model(trained_tiny, qcfg, x[:1])
        cal = _calibrator("adaround", iters=iters, batch_size=32, w_observer="mse")
        cal.calibrate(q, x, seed=0, progress=False)
        return q

    def layer_outputs(qmodel, quant):
        outs = {}
        hooks = [
            m.register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o.detach()))
            for n, m in qmodel.quant_modules()
        ]
        qmodel.set_quant_state(quant, quant)
        with torch.no_grad():
            logits = qmodel(x)
        for h in hooks:
            h.remove()
        return outs, logits

    # 0 iterations hardens the initial rounding variables: rounding to nearest.
    near_feats, near_logits = layer_outputs(run(0), True)
    q_feats, q_logits = layer_outputs(run(300), True)
    fp_feats, fp_logits = layer_outputs(build_quant_model(trained_tiny, qcfg, x[:1]), False)
    for name in fp_feats:
        e_near = F.mse_loss(near_feats[name], fp_feats[name])
        e_learn = F.mse_loss(q_feats[name], fp_feats[name])
        assert e_learn < e_near, name
    assert F.mse_loss(q_logits, fp_logits) < 0.7 * F.mse_loss(near_logits, fp_logits)


def test_reconstruction_loss_reduction_and_fisher():
    class Ctx:
        q_out = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [3.0, 0.0]]])
        fp_out = torch.zeros(2, 2, 2)
        fisher = torch.full((2, 2, 2), 2.0)

    # BRECQ lp_loss: sum over dim 1, mean over batch and the rest: ((1+0)+(4+0)+(0+9)+0)/4
    assert ReconstructionLoss()(Ctx).item() == pytest.approx(14 / 4)
    assert ReconstructionLoss(p=1.0)(Ctx).item() == pytest.approx(6 / 4)
    assert ReconstructionLoss(fisher=True)(Ctx).item() == pytest.approx(4 * 14 / 4)


def test_fisher_weights_are_kl_gradient_plus_one(tiny):
    model, x = tiny
    q = _qmodel(model, x)
    MinMaxCalibrator(CalibConfig()).calibrate(q, x, progress=False)
    blocks = partition_blocks(q, x[:1])
    cfg = ReconConfig(**FAST, fisher=True)
    eng = BlockReconstructor(q, blocks, lambda b: [], x, cfg, capture_batch_size=8)
    eng.fp_model = copy.deepcopy(q)
    eng.fp_model.set_quant_state(False, False)
    last = eng.capture(len(blocks) - 1)  # the classifier: its output is the logits
    with torch.no_grad():
        q_logits, fp_logits = q(x), eng.fp_model(x)
    expected = torch.cat(
        [
            (F.softmax(a, 1) - F.softmax(b, 1)).abs() / a.shape[0] + 1.0
            for a, b in zip(q_logits.split(8), fp_logits.split(8), strict=True)
        ]
    )
    assert torch.allclose(last.fisher, expected, atol=1e-6)
    assert torch.equal(last.fp_out, fp_logits)
    mid = eng.capture(1)
    assert mid.fisher.shape == mid.fp_out.shape and (mid.fisher >= 1).all()
    assert (mid.fisher > 1).any()


def _state(q):
    return {k: v.clone() for k, v in q.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Kill(Exception):
    pass


@pytest.mark.parametrize("method", ["qdrop", "brecq"])
def test_interrupted_run_resumes_to_the_identical_result(tiny, tmp_path, method):
    model, x = tiny
    extra = {"fisher": True} if method == "brecq" else {}

    def run(work_dir, on_block_end=None, on_iteration=None):
        q = _qmodel(model, x)
        cal = _calibrator(method, **extra)
        cal.on_block_end, cal.on_iteration = on_block_end, on_iteration
        cal.calibrate(q, x, seed=3, progress=False, work_dir=work_dir)
        return q, cal.engine

    reference, eng = run(tmp_path / "a")
    ref = _state(reference)
    assert len(eng.blocks) == 5 and eng.resumed_from == 0
    assert (tmp_path / "a" / STATE_FILE).exists()

    def kill_after_block(index, _block):
        if index == 1:
            raise _Kill

    with pytest.raises(_Kill):
        run(tmp_path / "b", on_block_end=kill_after_block)
    resumed, eng = run(tmp_path / "b")
    assert eng.resumed_from == 2
    _assert_same_state(_state(resumed), ref)
    # The history covers every block: the first two restored from the state file.
    assert [(h["index"], h.get("stage")) for h in eng.history] == [
        (h["index"], h.get("stage")) for h in run(None)[1].history
    ]
    assert {h["index"] for h in eng.history if h.get("restored")} == {0, 1}

    def kill_mid_block(index, stage, it):
        if index == 3 and stage == 0 and it == 1:
            raise _Kill

    with pytest.raises(_Kill):
        run(tmp_path / "c", on_iteration=kill_mid_block)
    resumed, eng = run(tmp_path / "c")
    assert eng.resumed_from == 3  # the interrupted block restarts from its beginning
    _assert_same_state(_state(resumed), ref)

    # A finished state replays without any work; no work_dir gives the same result too.
    again, eng = run(tmp_path / "a")
    assert eng.resumed_from == 5 and all(h["restored"] for h in eng.history)
    assert len([h for h in eng.history if "stage" not in h]) == 5
    _assert_same_state(_state(again), ref)
    _assert_same_state(_state(run(None)[0]), ref)


def test_state_from_another_config_is_ignored(tiny, tmp_path, caplog):
    model, x = tiny
    q = _qmodel(model, x)
    _calibrator("qdrop").calibrate(q, x, seed=0, progress=False, work_dir=tmp_path)
    q2 = _qmodel(model, x)
    cal = _calibrator("qdrop", iters=3)
    with caplog.at_level(logging.WARNING):
        cal.calibrate(q2, x, seed=0, progress=False, work_dir=tmp_path)
    assert cal.engine.resumed_from == 0
    assert "another model, data, seed or configuration" in caplog.text
    q3 = _qmodel(model, x)
    cal = _calibrator("qdrop", iters=3)
    cal.calibrate(q3, x, seed=1, progress=False, work_dir=tmp_path)  # another seed
    assert cal.engine.resumed_from == 0


def test_brecq_learns_activation_steps_and_adaround_keeps_observer_ranges(tiny):
    model, x = tiny
    init = _qmodel(model, x)
    MinMaxCalibrator(CalibConfig()).calibrate(init, x, progress=False)
    steps = {n: q.scale.clone() for n, q in init.quantizers() if "act_" in n}
    for method, changes in (("brecq", True), ("qdrop", True), ("adaround", False)):
        q = _qmodel(model, x)
        _calibrator(method).calibrate(q, x, progress=False)
        after = {n: q.scale for n, q in q.quantizers() if "act_" in n}
        changed = [not torch.equal(after[n], steps[n]) for n in steps]
        assert any(changed) == changes, method


def test_block_the_forward_pass_never_reaches_is_skipped(caplog):
    class WithAuxHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.aux = nn.Linear(4, 3)  # e.g. an auxiliary classifier unused in eval
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(8, 1, 6, 6)
    q = _qmodel(WithAuxHead().eval(), x)
    # Observer calibration itself needs every layer reached, so set ranges by hand here.
    calibrate_weights(q, "minmax")
    for _, m in q.quant_modules():
        m.act_quantizer.set_qparams(torch.tensor(0.05), torch.tensor(8.0))
    blocks = [Block(n, m, "layer") for n, m in q.quant_modules()]
    stages = _calibrator("adaround").stages
    eng = BlockReconstructor(q, blocks, stages, x, ReconConfig(**FAST), capture_batch_size=4)
    with caplog.at_level(logging.WARNING):
        eng.run()
    assert "aux is not reached" in caplog.text
    assert [h["block"] for h in eng.history if "stage" in h] == ["conv", "fc"]


@pytest.mark.parametrize("method", ["adaround", "brecq"])
def test_observer_options_set_the_initial_ranges(method):
    # Documented: reconstruction starts from w_observer / a_observer ranges. With no
    # iterations the ranges are the observers' own, so the options must show: the MSE
    # search clips (scale at most min-max's, strictly smaller where an outlier sits): two
    # pixels at +-12 in a standard-normal input set min-max's first range to 24 / 7 at 3
    # bits; clipping them (2 x ~80) costs far less than that step does on the 1,598
    # others (~0.9 each).
    x = torch.randn(16, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 12.0, -12.0
    scales = {}
    for obs in ("minmax", "mse"):
        q = build_quant_model(tiny_resnet(), QuantConfig(3, 3, first_last_bits=None), x[:1])
        cal = _calibrator(method, iters=0, act_iters=0, w_observer=obs, a_observer=obs)
        cal.calibrate(q, x, progress=False)
        mods = dict(q.quant_modules())
        scales[obs] = {
            n: (m.weight_quantizer.scale.detach().clone(), m.act_quantizer.scale.detach().clone())
            for n, m in mods.items()
        }
    first = next(iter(scales["minmax"]))
    w_mm, a_mm = scales["minmax"][first]
    w_mse, a_mse = scales["mse"][first]
    assert a_mm.item() == pytest.approx(24.0 / 7, rel=1e-6)
    assert a_mse.item() < 0.5 * a_mm.item()
    for n in scales["minmax"]:
        w_mm, _ = scales["minmax"][n]
        w_mse, _ = scales["mse"][n]
        assert bool((w_mse <= w_mm * (1 + 1e-6)).all()), n
    assert any(bool((scales["mse"][n][0] < scales["minmax"][n][0]).any()) for n in scales["mse"])
