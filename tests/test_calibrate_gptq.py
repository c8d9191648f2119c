"""GPTQ: the algorithm against a direct implementation, its error against RTN, the
calibrator on a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qcalib.calibrate import CALIBRATORS
from qcalib.calibrate.base import calibrate_activations
from qcalib.calibrate.gptq import collect_hessians, gptq_quantize, rtn_column_quantizer
from qcalib.config import CalibConfig, GPTQConfig, QuantConfig
from qcalib.data.tokens import pack_tokens
from qcalib.errors import QCalibError
from qcalib.model.partition import Block
from qcalib.pipeline import build_quant_model
from qcalib.quant.functional import qparams_from_range


def _np_round_to_grid(w: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: int) -> np.ndarray:
    return (np.clip(np.round(w / s) + z, 0, qmax) - z) * s


def _np_gptq_reference(W, H, scale, zero, qmax, percdamp, order=None, group_size=None):
    """The paper's sequential OBS form, written directly: no Cholesky, no lazy batches.

    Column by column (in ``order``): round it, spread its error over the remaining
    columns with the inverse Hessian of the remaining columns, then eliminate it from
    that inverse (``H^-1 - H^-1_:j H^-1_j: / H^-1_jj``).
    """
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    k = W.shape[1]
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = np.arange(k) if order is None else np.asarray(order)
    W, H = W[:, order], H[np.ix_(order, order)]
    H += percdamp * np.mean(np.diag(H)) * np.eye(k)
    Hinv = np.linalg.inv(H)
    Q = np.zeros_like(W)
    for j in range(k):
        g = order[j] // group_size if group_size else None
        s = scale if g is None else scale[:, g]
        z = zero if g is None else zero[:, g]
        Q[:, j] = _np_round_to_grid(W[:, j], s, z, qmax)
        e = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= np.outer(e, Hinv[j, j:])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    out = np.zeros_like(Q)
    out[:, order] = Q
    return out


def _minmax_grid(w: torch.Tensor, bits: int, group_size: int | None = None):
    rows = w if group_size is None else w.reshape(w.shape[0], -1, group_size)
    lo, hi = rows.amin(-1), rows.amax(-1)
    return qparams_from_range(lo, hi, 0, 2**bits - 1, symmetric=False)


def test_gptq_matches_the_direct_algorithm_on_a_hand_case():
    W = torch.tensor([[0.3, -0.7, 1.2], [0.9, 0.1, -0.4]], dtype=torch.float64)
    H = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.5]], dtype=torch.float64)
    s = torch.tensor([0.5, 0.25], dtype=torch.float64)
    z = torch.tensor([2.0, 2.0], dtype=torch.float64)
    col = rtn_column_quantizer(s, z, 0, 3)
    # Column 0 by hand: both entries round to the grid (0.3 -> 0.5, 0.9 -> 0.25 clipped to
    # (3 - 2) * 0.25), and the errors move onto column 1 through the dampened H^-1.
    Hd = H.numpy() + 0.01 * np.mean(np.diag(H.numpy())) * np.eye(3)
    Hinv = np.linalg.inv(Hd)
    q0 = np.array([0.5, 0.25])
    w1_after = W[:, 1].numpy() - (W[:, 0].numpy() - q0) / Hinv[0, 0] * Hinv[0, 1]
    ref = _np_gptq_reference(W.numpy(), H.numpy(), s.numpy(), z.numpy(), 3, 0.01)
    np.testing.assert_allclose(ref[:, 0], q0)
    np.testing.assert_allclose(ref[:, 1], _np_round_to_grid(w1_after, s.numpy(), 2.0, 3))
    for block_size in (1, 2, 128):
        Q = gptq_quantize(W, H, col, block_size=block_size, percdamp=0.01)
        np.testing.assert_allclose(Q.numpy(), ref, rtol=0, atol=1e-12)
    # Not plain rounding: the error feedback changed at least one column's rounding.
    rtn = _np_round_to_grid(W.numpy(), s.numpy()[:, None], 2.0, 3)
    assert not np.allclose(ref, rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gptq_matches_the_direct_algorithm_random(act_order, group_size):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 12, generator=g, dtype=torch.float64)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 12)
    H = 2 * X.T @ X / 40
    s, z = _minmax_grid(W, 3, group_size)
    col = rtn_column_quantizer(s, z, 0, 7, group_size)
    Q = gptq_quantize(W, H, col, block_size=5, percdamp=0.01, act_order=act_order)
    order = torch.argsort(torch.diagonal(H), descending=True).numpy() if act_order else None
    ref = _np_gptq_reference(W.numpy(), H.numpy(), s.numpy(), z.numpy(), 7, 0.01, order, group_size)
    np.testing.assert_allclose(Q.numpy(), ref, rtol=0, atol=1e-10)


def _output_error(X, W, Q):
    return float((X @ W.T - X @ Q.T).square().sum())


@pytest.mark.parametrize("seed", range(5))
def test_gptq_output_error_beats_rtn_and_options_matter(seed):
    g = torch.Generator().manual_seed(seed)
    k = 32
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = (torch.randn(512, k, generator=g) * torch.linspace(0.1, 4, k)) @ mix
    W = torch.randn(16, k, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    results = {}
    for gs in (None, 8):
        s, z = _minmax_grid(W, 3, gs)
        col = rtn_column_quantizer(s, z, 0, 7, gs)
        rtn = torch.stack([col(W[:, j], j) for j in range(k)], dim=1)
        for act_order in (False, True):
            Q = gptq_quantize(W, H, col, act_order=act_order)
            # Every weight lies on its fixed grid.
            assert torch.equal(torch.stack([col(Q[:, j], j) for j in range(k)], dim=1), Q)
            assert _output_error(X, W, Q) < _output_error(X, W, rtn)
            results[gs, act_order] = Q
    assert not torch.equal(results[None, False], results[None, True])
    assert not torch.equal(results[None, False], results[8, False])


def test_dead_columns_are_zeroed_and_do_not_break_the_factorization():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, generator=g)
    X[:, 2] = 0.0  # an input that is never active
    H = 2 * X.T @ X / 64
    W = torch.randn(4, 6, generator=g)
    s, z = _minmax_grid(W, 4)
    Q = gptq_quantize(W, H, rtn_column_quantizer(s, z, 0, 15), act_order=True)
    assert torch.isfinite(Q).all()
    assert torch.equal(Q[:, 2], torch.zeros(4))
    ref = _np_gptq_reference(
        W.double().numpy(), H.double().numpy(), s.double().numpy(), z.double().numpy(), 15,
        0.01, torch.argsort(torch.diagonal(H), descending=True, stable=True).numpy(),
    )  # fmt: skip
    np.testing.assert_allclose(Q.numpy(), ref, atol=1e-5)


def test_indefinite_hessian_names_the_flag():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    W = torch.ones(1, 2)
    with pytest.raises(QCalibError, match="--percdamp"):
        gptq_quantize(W, H, rtn_column_quantizer(torch.ones(()), torch.zeros(()), 0, 15))


class _EmbedLinear(nn.Module):
    """Packed tokens -> embedding -> linear: the linear's input rows are known exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(x[:, 0]))


@pytest.mark.filterwarnings("ignore:qcalib. these modules")
def test_hessian_skips_padding_tokens():
    model = _EmbedLinear()
    ids = torch.randint(0, 20, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    x = pack_tokens(ids, mask)
    qm = build_quant_model(model, QuantConfig(wbits=4, abits=16), x[:1])
    layer = qm.model.proj
    acc = collect_hessians(qm, Block("proj", layer, "layer"), {"proj": layer}, x, batch_size=3)
    rows = model.embed.weight[ids[mask.bool()]].detach()
    assert acc["proj"].rows == int(mask.sum()) == rows.shape[0]
    torch.testing.assert_close(acc["proj"].hessian(), 2 * rows.T @ rows / rows.shape[0])


@pytest.mark.filterwarnings("ignore:qcalib. these modules")
def test_first_token_weight_counts_each_sequences_first_kept_token_w_times():
    model = _EmbedLinear()
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: row 1's first kept token is at position 2
    mask[2, 4:] = 0
    x = pack_tokens(ids, mask)
    qm = build_quant_model(model, QuantConfig(wbits=4, abits=16), x[:1])
    layer = qm.model.proj
    block = Block("proj", layer, "layer")
    acc = collect_hessians(qm, block, {"proj": layer}, x, batch_size=2, first_token_weight=9.0)
    emb = model.embed.weight.detach()
    expect = torch.zeros(8, 8)
    n = 0
    for b, first in ((0, 0), (1, 2), (2, 0)):
        for t in range(5):
            if mask[b, t]:
                e = emb[ids[b, t]]
                expect += (9.0 if t == first else 1.0) * torch.outer(e, e)
                n += 1
    assert acc["proj"].rows == n == int(mask.sum())
    torch.testing.assert_close(acc["proj"].hessian(), 2 * expect / n)
    plain = collect_hessians(qm, block, {"proj": layer}, x, batch_size=2)
    assert not torch.allclose(plain["proj"].hessian(), acc["proj"].hessian())


def test_first_token_weight_must_be_positive():
    with pytest.raises(QCalibError, match="--gptq-first-token-weight"):
        GPTQConfig(first_token_weight=0.0)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    from qcalib.zoo.hf import HFCausalLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    return HFCausalLM(transformers.LlamaForCausalLM(cfg)).eval()


def _tokens(n=16, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 4, length - 6 :] = 0
    return pack_tokens(ids, mask)


@pytest.mark.filterwarnings("ignore:qcalib. these modules")
def test_gptq_end_to_end_tiny_llama_w4a16():
    model = _tiny_llama()
    x = _tokens()
    with torch.no_grad():
        fp = model(x)
    cfg = QuantConfig(wbits=4, abits=16, group_size=16)
    errors = {}
    for name in ("minmax", "gptq"):
        qm = build_quant_model(model, cfg, x[:1])
        calib = CALIBRATORS.get(name)(CalibConfig(calibrator=name, batch_size=8))
        calib.calibrate(qm, x, progress=False)
        with torch.no_grad():
            errors[name] = float((qm(x) - fp).square().mean())
        if name == "gptq":
            rep = calib.report()
            # 2 layers x 7 linears; lm_head stays float by default (QuantConfig.lm_head_bits)
            assert rep["gptq_layers"] == len(qm.quant_modules()) == 14
            for _, m in qm.quant_modules():
                assert m.act_quantizer is None
                # The stored weight is the GPTQ grid point: the quantizer maps it to itself.
                assert torch.equal(m.weight_quantizer(m.weight), m.weight)
            fresh = build_quant_model(model, cfg, x[:1])
            fresh.load_state_dict(qm.state_dict())
            with torch.no_grad():
                assert torch.equal(fresh(x), qm(x))
    assert errors["gptq"] < errors["minmax"]


@pytest.mark.filterwarnings("ignore:qcalib. these modules")
def test_first_token_weight_reaches_the_calibrator_and_changes_the_rounding():
    model = _tiny_llama()
    x = _tokens()
    cfg = QuantConfig(wbits=4, abits=16, group_size=16)
    weights = {}
    for w in (1.0, 64.0):
        qm = build_quant_model(model, cfg, x[:1])
        calib = CALIBRATORS.get("gptq")(
            CalibConfig(calibrator="gptq", batch_size=8, gptq=GPTQConfig(first_token_weight=w))
        )
        calib.calibrate(qm, x, progress=False)
        assert calib.report()["first_token_weight"] == w
        weights[w] = {n: m.weight.detach().clone() for n, m in qm.quant_modules()}
    changed = [n for n in weights[1.0] if not torch.equal(weights[1.0][n], weights[64.0][n])]
    assert len(changed) == len(weights[1.0])


@pytest.mark.filterwarnings("ignore:qcalib. these modules")
def test_gptq_w4a8_calibrates_activations_after_the_weights():
    model = _tiny_llama()
    x = _tokens(n=8)
    qcfg = QuantConfig(wbits=4, abits=8)
    qm = build_quant_model(model, qcfg, x[:1])
    cfg = CalibConfig(calibrator="gptq", gptq=GPTQConfig(act_order=True, block_size=8))
    calib = CALIBRATORS.get("gptq")(cfg)
    calib.calibrate(qm, x, progress=False)
    assert calib.report()["act_order"] is True and calib.report()["block_size"] == 8
    scales = {}
    for name, m in qm.quant_modules():
        assert bool(m.act_quantizer.initialized) and m.act_quantizer.observer is None
        assert torch.equal(m.weight_quantizer(m.weight), m.weight)
        scales[name] = m.act_quantizer.scale.detach().clone()
    with torch.no_grad():
        assert torch.isfinite(qm(x)).all()
    # The ranges are those of the GPTQ-rounded network: observing the same data again
    # through these weights gives them back bit for bit...
    calibrate_activations(qm, x, calib.act_observer, cfg.batch_size, progress=False)
    for name, m in qm.quant_modules():
        assert torch.equal(m.act_quantizer.scale, scales[name]), name
    # ...and not those of round-to-nearest weights, except where no quantized layer is
    # upstream (the first layer's input is the normed embedding either way).
    rtn = build_quant_model(model, qcfg, x[:1])
    CALIBRATORS.get("minmax")(CalibConfig(calibrator="minmax")).calibrate(rtn, x, progress=False)
    rtn_scales = {name: m.act_quantizer.scale for name, m in rtn.quant_modules()}
    first = next(iter(scales))
    assert torch.equal(rtn_scales[first], scales[first])
    differ = [n for n in scales if not torch.allclose(rtn_scales[n], scales[n], rtol=1e-4)]
    assert len(differ) >= len(scales) // 2, differ


def test_gptq_on_a_conv_net_beats_rtn():
    from conftest import TinyNet

    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        fp = model(x)
    errs = {}
    for name in ("minmax", "gptq"):
        qm = build_quant_model(model, QuantConfig(wbits=3, abits=16, first_last_bits=None), x[:1])
        CALIBRATORS.get(name)(CalibConfig(calibrator=name)).calibrate(qm, x, progress=False)
        with torch.no_grad():
            errs[name] = float((qm(x) - fp).square().mean())
    assert errs["gptq"] < errs["minmax"]


def test_gptq_config_errors_name_the_flag():
    with pytest.raises(QCalibError, match="--percdamp"):
        GPTQConfig(percdamp=0)
    cfg = CalibConfig(gptq={"act_order": True})
    assert cfg.gptq == GPTQConfig(act_order=True)


@pytest.mark.filterwarnings("ignore:qcalib. these modules")
def test_gptq_walks_decoder_layer_blocks(monkeypatch):
    """When the partition makes decoder layers blocks, each layer's Hessians come from one
    pass with the earlier decoder layers quantized (the paper's setting)."""
    import qcalib.calibrate.gptq as gptq_mod

    model = _tiny_llama()
    x = _tokens()

    def decoder_blocks(qmodel, example_input=None):
        net = qmodel.model
        layers = [
            Block(
                f"model.model.layers.{i}",
                net.get_submodule(f"model.model.layers.{i}"),
                "transformer",
            )
            for i in range(2)
        ]
        return layers  # lm_head stays float by default (QuantConfig.lm_head_bits)

    monkeypatch.setattr(gptq_mod, "partition_blocks", decoder_blocks)
    passes = []
    real_collect = gptq_mod.collect_hessians

    def counting_collect(qm, block, layers, *args, **kwargs):
        passes.append(sorted(layers))
        return real_collect(qm, block, layers, *args, **kwargs)

    monkeypatch.setattr(gptq_mod, "collect_hessians", counting_collect)
    with torch.no_grad():
        fp = model(x)
    cfg = QuantConfig(wbits=4, abits=16)
    qm = build_quant_model(model, cfg, x[:1])
    calib = CALIBRATORS.get("gptq")(CalibConfig(calibrator="gptq", batch_size=8))
    calib.calibrate(qm, x, progress=False)
    assert calib.report()["blocks"] == 2 and calib.report()["gptq_layers"] == 14
    assert [len(p) for p in passes] == [7, 7]
    rtn = build_quant_model(model, cfg, x[:1])
    CALIBRATORS.get("minmax")(CalibConfig()).calibrate(rtn, x, progress=False)
    with torch.no_grad():
        assert (qm(x) - fp).square().mean() < (rtn(x) - fp).square().mean()


@pytest.mark.filterwarnings("ignore:qcalib. these modules")
def test_gptq_cached_stack_inputs_equal_full_forwards(monkeypatch):
    """Decoder layers of one stack take the previous layer's quantized output as input
    (one block forward each); the result equals re-running the network up to every
    block, which is what the walk does without the cache."""
    import qcalib.calibrate.gptq as gptq_mod

    model = _tiny_llama()
    x = _tokens()
    cfg = QuantConfig(wbits=3, abits=16)
    weights = {}
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(
                gptq_mod, "stacked_after", lambda blocks, root: [False] * len(blocks)
            )
        qm = build_quant_model(model, cfg, x[:1])
        calib = CALIBRATORS.get("gptq")(CalibConfig(calibrator="gptq", batch_size=8))
        calib.calibrate(qm, x, progress=False)
        assert calib.report()["blocks"] == 2 and calib.report()["gptq_layers"] == 14
        weights[cached] = {n: m.weight.detach().clone() for n, m in qm.quant_modules()}
    assert weights[True].keys() == weights[False].keys()
    for n in weights[True]:
        torch.testing.assert_close(weights[True][n], weights[False][n], rtol=0, atol=1e-6)


def test_stacked_after_marks_consecutive_members_of_one_module_list():
    from torch import nn

    from qcalib.calibrate.gptq import stacked_after

    stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    other = nn.ModuleList([nn.Linear(2, 2)])
    root = nn.ModuleDict({"a": stack, "b": other})
    blocks = [Block(f"b{i}", m, "transformer") for i, m in enumerate([*stack, other[0]])]
    assert stacked_after(blocks, root) == [False, True, True, False]
    swapped = [blocks[0], blocks[2], blocks[1]]
    assert stacked_after(swapped, root) == [False, False, False]


class _Interrupt(Exception):
    pass


@pytest.mark.filterwarnings("ignore:qcalib. these modules")
def test_an_interrupted_gptq_walk_resumes_at_its_first_unfinished_block(tmp_path, monkeypatch,
                                                                        caplog):  # fmt: skip
    from qcalib.calibrate.gptq import GPTQCalibrator

    model, x = _tiny_llama(), _tokens()
    cfg = QuantConfig(wbits=4, abits=16, group_size=16)
    calib_cfg = CalibConfig(calibrator="gptq", batch_size=8)

    def run(work_dir, calib_cfg=calib_cfg):  # noqa: ANN001, ANN202
        qm = build_quant_model(model, cfg, x[:1])
        calib = CALIBRATORS.get("gptq")(calib_cfg)
        calib.calibrate(qm, x, progress=False, work_dir=work_dir)
        return {n: m.weight.detach().clone() for n, m in qm.quant_modules()}, calib.report()

    reference, _ = run(None)
    solve, calls = GPTQCalibrator._quantize_layer, []

    def interrupted(m, hessian, g):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) > 7:  # block 0's seven linears are done, block 1's first is not
            raise _Interrupt
        return solve(m, hessian, g)

    monkeypatch.setattr(GPTQCalibrator, "_quantize_layer", staticmethod(interrupted))
    with pytest.raises(_Interrupt):
        run(tmp_path)
    monkeypatch.setattr(GPTQCalibrator, "_quantize_layer", staticmethod(solve))
    with caplog.at_level("INFO", logger="qcalib.calibrate.gptq"):
        resumed, report = run(tmp_path)
    assert report["resumed_blocks"] == 1 and report["gptq_layers"] == 14
    # One log line for the resume, one per block solved (only block 2 of 2 this time).
    lines = [r.getMessage() for r in caplog.records if r.name == "qcalib.calibrate.gptq"]
    assert lines[0] == "gptq: resuming at block 2/2"
    assert [line.split(" in ")[0] for line in lines[1:]] == ["gptq: block 2/2 (7 layers)"]
    caplog.clear()
    assert "model.model.layers.0" in report["hessian_seconds"]  # the finished block's timing
    assert resumed.keys() == reference.keys()
    for name, w in reference.items():  # block 1 got block 0's GPTQ outputs as its inputs
        assert torch.equal(resumed[name], w), name
    # Another configuration does not continue from this checkpoint.
    other = CalibConfig(calibrator="gptq", batch_size=8, gptq=GPTQConfig(first_token_weight=4))
    with caplog.at_level("WARNING"):
        _, report = run(tmp_path, other)
    assert report["resumed_blocks"] == 0 and "made with another model" in caplog.text
