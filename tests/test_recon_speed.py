"""The engine's speed changes (issue 14): the same draws, frozen weights, and the
``amp`` / ``compile`` switches (run on CPU; they must at least work and stay close)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_resnet
from qcalib.calibrate import CALIBRATORS
from qcalib.calibrate.reconstruct import (
    BlockReconstructor,
    FrozenWeightQuantizer,
    Stage,
    _recon_identity,
    _sample_indices,
    stage_quantizers,
)
from qcalib.cli import build_parser, config_from_args
from qcalib.config import CalibConfig, QuantConfig, ReconConfig
from qcalib.model.partition import partition_blocks
from qcalib.pipeline import build_quant_model

FAST = {"iters": 6, "act_iters": 3, "batch_size": 8, "w_observer": "minmax", "a_observer": "minmax"}


def _run(method: str, x: torch.Tensor, **recon) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    q = build_quant_model(tiny_resnet(), QuantConfig(2, 4), x[:1])
    cfg = CalibConfig(calibrator=method, batch_size=8, recon=ReconConfig(**{**FAST, **recon}))
    cal = CALIBRATORS.get(method)(cfg)
    cal.calibrate(q, x, progress=False)
    return q, cal


def _x() -> torch.Tensor:
    return torch.randn(16, 1, 10, 10, generator=torch.Generator().manual_seed(1))


def test_sample_indices_are_the_per_iteration_randperm_stream():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    got = _sample_indices(20, 6, 5, g1)
    want = torch.stack([torch.randperm(20, generator=g2)[:6] for _ in range(5)])
    assert torch.equal(got, want)
    assert all(len(set(row.tolist())) == 6 for row in got)  # without replacement
    assert _sample_indices(20, 6, 0, g1).shape == (0, 6)


def test_stage_without_weight_learning_freezes_and_restores_weight_quantizers():
    x = _x()
    q = build_quant_model(tiny_resnet(), QuantConfig(2, 4), x[:1])
    CALIBRATORS.get("minmax")(CalibConfig(calibrator="minmax")).calibrate(q, x, progress=False)
    block = partition_blocks(q, x[:1])[1]
    layers = [m for _, m in block.layers() if hasattr(m, "weight_quantizer")]
    before = [m.weight_quantizer for m in layers]
    ref = [m.weight_quantizer(m.weight).detach() for m in layers]
    with stage_quantizers(block, Stage("act", 1, False, True, 1.0)):
        assert all(isinstance(m.weight_quantizer, FrozenWeightQuantizer) for m in layers)
        assert all(
            torch.equal(m.weight_quantizer(m.weight), r) for m, r in zip(layers, ref, strict=True)
        )
    assert [m.weight_quantizer for m in layers] == before


def test_amp_runs_and_stays_close_to_float32():
    x = _x()[:8]  # bfloat16 convolutions are slow on CPUs without bf16 units: keep it tiny
    q32, _ = _run("qdrop", x, iters=2)
    q16, cal = _run("qdrop", x, iters=2, amp=True)
    with torch.no_grad():
        y32, y16 = q32(x), q16(x)
    assert y16.dtype == torch.float32 and torch.isfinite(y16).all()
    # bfloat16 convolutions (8-bit mantissa) during the optimization, float at the end:
    # the result moves, but stays a calibration of the same network.
    rel = (y16 - y32).norm() / y32.norm()
    print(f"amp relative output change {rel:.4f}")
    assert 0 < rel < 0.3
    assert all(h["last"] is not None for h in cal.engine.history if h.get("iters"))


def test_compile_runs_and_matches_eager(monkeypatch):
    # The dynamo front end with the eager backend: the block step really goes through
    # torch.compile's tracing (graph breaks included) without a C++ toolchain run.
    calls = []
    real = torch.compile

    def eager_compile(module, **kwargs):
        calls.append(module)
        return real(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    x = _x()
    ref, _ = _run("brecq", x)
    got, _ = _run("brecq", x, compile=True)
    assert calls  # the switch reached torch.compile
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


def test_speed_switches_off_keep_the_fingerprint_of_earlier_runs():
    cfg = ReconConfig()
    ident = _recon_identity(cfg)
    assert "amp" not in ident and "compile" not in ident
    assert _recon_identity(ReconConfig(amp=True))["amp"] is True
    x = _x()
    q = build_quant_model(tiny_resnet(), QuantConfig(2, 4), x[:1])
    blocks = partition_blocks(q, x[:1])
    stages = lambda b: [Stage("round", 1, True, False, 0.0)]  # noqa: E731

    def fp(**kw) -> str:
        return BlockReconstructor(q, blocks, stages, x, ReconConfig(**kw)).fingerprint()

    assert fp() == fp(amp=False, compile=False)
    assert len({fp(), fp(amp=True), fp(compile=True)}) == 3


def test_cli_speed_flags():
    def recon(*flags: str) -> ReconConfig:
        return config_from_args(build_parser().parse_args(["quantize", *flags])).calib.recon

    assert (recon().amp, recon().compile) == (False, False)
    assert (recon("--amp").amp, recon("--compile").compile) == (True, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronization is a CUDA matter")
def test_cuda_iterations_do_not_synchronize_with_the_host():
    # Between the stamps of iterations 1 and 4 nothing reads a device value back (the
    # loss is read at iterations 0 and 5 only, without a progress bar).
    x = _x().cuda()
    q = build_quant_model(tiny_resnet(), QuantConfig(2, 4), x[:1].cpu()).cuda()
    cfg = CalibConfig(calibrator="qdrop", batch_size=8, recon=ReconConfig(**FAST))
    cal = CALIBRATORS.get("qdrop")(cfg)
    marks: dict[tuple[int, int, int], int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def on_iteration(b: int, s: int, it: int) -> None:
            marks[(b, s, it)] = len(caught)

        cal.on_iteration = on_iteration
        torch.cuda.set_sync_debug_mode("warn")
        try:
            cal.calibrate(q, x, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    blocks = {b for b, _, _ in marks}
    assert blocks
    for b in blocks:
        assert marks[(b, 0, 4)] == marks[(b, 0, 1)], [str(w.message) for w in caught][:3]
