"""SmoothQuant: function preserved, activation channels flattened, W8A8 error reduced."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from qcalib.calibrate import CALIBRATORS
from qcalib.config import CalibConfig, QuantConfig
from qcalib.data.tokens import pack_tokens
from qcalib.errors import QCalibError
from qcalib.model.smooth import (
    apply_smoothquant,
    channel_abs_max,
    find_linear_pairs,
    find_smooth_groups,
)
from qcalib.pipeline import build_quant_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:qcalib. these modules")


def _tiny_llama(seed: int = 0, heads: int = 2) -> nn.Module:
    """``heads`` query heads over two key/value heads (4: grouped-query attention, as
    SmolLM2's three query heads per key/value head)."""
    from qcalib.zoo.hf import HFCausalLM

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    return HFCausalLM(transformers.LlamaForCausalLM(cfg)).eval()


def _tiny_gpt2(seed: int = 0) -> nn.Module:
    from qcalib.zoo.hf import HFCausalLM

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    return HFCausalLM(transformers.GPT2LMHeadModel(cfg)).eval()


def _tokens(n: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, length - 5 :] = 0
    return pack_tokens(ids, mask)


def _plant_outliers(model: nn.Module, channels=(3, 17), factor: float = 40.0) -> None:
    """Make a few hidden channels huge at the inputs of every attention / MLP linear
    group (what LLM activations look like)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("input_layernorm", "post_attention_layernorm", "ln_1", "ln_2")):
                m.weight[list(channels)] *= factor


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_gpt2])
def test_smoothquant_keeps_the_fp_function(build):
    model = build()
    _plant_outliers(model)
    x = _tokens()
    with torch.no_grad():
        before = model(x)
    report = apply_smoothquant(model, x, alpha=0.5)
    with torch.no_grad():
        after = model(x)
    assert len(report["groups"]) == 4 and report["skipped"] == []
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_llama_groups_are_the_standard_pairs():
    groups, skipped = find_smooth_groups(_tiny_llama())
    layer0 = "model.model.layers.0"
    assert [(g.norm, g.linears) for g in groups[:2]] == [
        (
            f"{layer0}.input_layernorm",
            tuple(f"{layer0}.self_attn.{p}_proj" for p in "qkv"),
        ),
        (
            f"{layer0}.post_attention_layernorm",
            (f"{layer0}.mlp.gate_proj", f"{layer0}.mlp.up_proj"),
        ),
    ]
    assert skipped == []


def test_smoothquant_flattens_activation_channels_and_follows_the_formula():
    model = _tiny_llama()
    _plant_outliers(model)
    x = _tokens()
    groups, _ = find_smooth_groups(model)
    norms = {g.norm: model.get_submodule(g.norm) for g in groups}
    act_before = channel_abs_max(model, x, norms)
    g0 = groups[0]
    w_before = torch.stack(
        [model.get_submodule(n).weight.detach().abs().amax(0) for n in g0.linears]
    ).amax(0)
    q_weight_before = model.get_submodule(g0.linears[0]).weight.detach().clone()
    report = apply_smoothquant(model, x, alpha=0.5)
    act_after = channel_abs_max(model, x, norms)
    for g, row in zip(groups, report["groups"], strict=True):
        a0, a1 = act_before[g.norm], act_after[g.norm]
        spread0 = float(a0.max() / a0.median())
        spread1 = float(a1.max() / a1.median())
        assert spread1 < spread0 / 2
        assert row["act_spread_before"] == pytest.approx(spread0, rel=1e-3)
        assert row["act_spread_after"] == pytest.approx(spread1, rel=1e-3)
    # s_j = sqrt(max|X_j|) / sqrt(max|W_:,j|) at alpha 0.5: check the folded weight.
    s = act_before[g0.norm].sqrt() / w_before.sqrt()
    torch.testing.assert_close(
        model.get_submodule(g0.linears[0]).weight, q_weight_before * s[None, :]
    )


def test_padding_tokens_do_not_enter_the_maxima():
    model = _tiny_llama()
    x = _tokens()
    # Padding reads token 99 only, whose embedding is a spike on channel 5: after the
    # RMSNorm that channel is sqrt(32) = 5.7 at every padded position, well above what
    # the valid tokens reach there, so a leak cannot hide in the comparison below.
    ids, mask = x[:, 0], x[:, 1]
    ids[ids == 99] = 98
    ids[mask == 0] = 99
    with torch.no_grad():
        spike = model.get_submodule("model.model.embed_tokens").weight[99]
        spike.zero_()
        spike[5] = 1.0
    norm = {"n": model.get_submodule("model.model.layers.0.input_layernorm")}
    masked = channel_abs_max(model, x, norm)["n"]
    assert float(masked[5]) < 4.0
    # Recompute on the valid prefix only: the same maxima.
    valid = []
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        valid.append(channel_abs_max(model, pack_tokens(ids[i : i + 1, :n]), norm)["n"])
    # Causal attention: a prefix computes the same activations with or without padding after.
    torch.testing.assert_close(masked, torch.stack(valid).amax(0), atol=1e-5, rtol=1e-5)


def test_smoothquant_lowers_w8a8_minmax_error_with_outlier_channels():
    model = _tiny_llama()
    _plant_outliers(model, factor=60.0)
    x = _tokens(n=16)
    with torch.no_grad():
        fp = model(x)
    cfg = QuantConfig(wbits=8, abits=8, first_last_bits=None)
    errors = {}
    for smooth in (False, True):
        net = model
        if smooth:
            import copy

            net = copy.deepcopy(model)
            apply_smoothquant(net, x, alpha=0.5)
        qm = build_quant_model(net, cfg, x[:1])
        CALIBRATORS.get("minmax")(CalibConfig()).calibrate(qm, x, progress=False)
        with torch.no_grad():
            errors[smooth] = float((qm(x) - fp).square().mean())
    assert errors[True] < 0.7 * errors[False]


def test_model_without_foldable_pairs_is_left_unchanged_with_a_warning(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="qcalib.model.smooth"):
        report = apply_smoothquant(model, torch.randn(4, 8), alpha=0.5)
    assert report["groups"] == [] and report["skipped"] == ["Sequential"]
    assert "no foldable" in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(QCalibError, match="--smoothquant"):
        apply_smoothquant(model, torch.randn(4, 8), alpha=1.5)
    with pytest.raises(QCalibError, match="--smoothquant"):
        QuantConfig(smoothquant_alpha=-0.1)


def _text_bench(model: nn.Module, tokens: torch.Tensor):
    """A Workbench over an in-memory token pool, not evaluated."""
    from torch.utils.data import TensorDataset

    from qcalib.config import TextConfig
    from qcalib.data.pool import Pool
    from qcalib.pipeline import Workbench

    pool = Pool(TensorDataset(tokens), name="tokens")
    return Workbench(model, pool, eval_data="none", text=TextConfig(seq_len=tokens.shape[-1]))


def test_pipeline_applies_smoothquant_to_a_copy_and_records_it():
    from qcalib.config import RunConfig
    from qcalib.pipeline import quantize

    model = _tiny_llama()
    _plant_outliers(model)
    tokens = _tokens(n=12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = RunConfig(
        model="tiny-llama",
        quant=QuantConfig(wbits=4, abits=8, smoothquant_alpha=0.5, group_size=16),
        calib=CalibConfig(calibrator="gptq", num_calib=8, batch_size=4),
        eval_data="none",
    )
    qmodel, result = quantize(cfg, bench=_text_bench(model, tokens), progress=False)
    sq = result.calib_stats["smoothquant"]
    assert sq["alpha"] == 0.5 and len(sq["groups"]) == 4
    assert result.calib_stats["gptq_layers"] == 14  # lm_head stays float by default
    assert result.config["quant"]["smoothquant_alpha"] == 0.5
    assert result.config["calib"]["gptq"]["percdamp"] == 0.01
    for k, v in model.state_dict().items():  # the workbench's FP model is untouched
        assert torch.equal(v, state[k])
    name = "model.model.layers.0.input_layernorm"
    smoothed = qmodel.model.get_submodule(name).weight
    assert not torch.equal(smoothed, model.get_submodule(name).weight)
    with torch.no_grad():
        assert torch.isfinite(qmodel(tokens)).all()


def test_calibration_score_smooths_a_copy_with_the_set_like_a_run():
    # The label-free score must rank sets for the model the run builds: with
    # smoothquant_alpha it scores the set-smoothed copy, not the unsmoothed model.
    import copy
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    from qcalib.data.pool import Pool
    from qcalib.select.quality import calibration_score

    model = _tiny_llama()
    _plant_outliers(model, factor=60.0)
    pool = Pool(TensorDataset(_tokens(n=16)), name="tokens")
    idx = [0, 3, 5, 8, 9, 12]
    smooth = QuantConfig(wbits=8, abits=8, first_last_bits=None, smoothquant_alpha=0.5)
    plain = replace(smooth, smoothquant_alpha=None)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def score(net: nn.Module, q: QuantConfig) -> float:
        return calibration_score(net, pool, idx, q, eval_samples=8, batch_size=4)

    got = score(model, smooth)
    by_hand = copy.deepcopy(model)
    apply_smoothquant(by_hand, pool.get(idx), 0.5)
    assert got == pytest.approx(score(by_hand, plain), rel=1e-3)
    assert got < 0.7 * score(model, plain)
    for k, v in model.state_dict().items():  # the caller's model is not smoothed
        assert torch.equal(v, state[k])


def _tiny_gqa_llama(seed: int = 0) -> nn.Module:
    return _tiny_llama(seed, heads=4)


def _plant_pair_outliers(model: nn.Module, factor: float = 40.0) -> None:
    """Huge channels at the inputs of down_proj (up_proj rows 5, 40) and o_proj (v_proj
    rows 2, 9: every query head of a group reads them)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("mlp.up_proj"):
                m.weight[[5, 40]] *= factor
            if name.endswith("self_attn.v_proj"):
                m.weight[[2, 9]] *= factor


def test_linear_pairs_keep_the_fp_function_with_grouped_query_attention():
    model = _tiny_gqa_llama()
    _plant_outliers(model)
    _plant_pair_outliers(model)
    pairs, skipped = find_linear_pairs(model)
    layer0 = "model.model.layers.0"
    assert [(p.producer, p.consumer, p.group, p.head_dim) for p in pairs[:2]] == [
        (f"{layer0}.self_attn.v_proj", f"{layer0}.self_attn.o_proj", 2, 8),
        (f"{layer0}.mlp.up_proj", f"{layer0}.mlp.down_proj", 1, 1),
    ]
    assert len(pairs) == 4 and skipped == []
    x = _tokens()
    with torch.no_grad():
        before = model(x)
    report = apply_smoothquant(model, x, alpha=0.5, pairs="all")
    with torch.no_grad():
        after = model(x)
    assert len(report["groups"]) == 4 and len(report["linear_pairs"]) == 4
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_linear_pair_scales_follow_the_formula_per_kv_channel_and_flatten_the_inputs():
    model = _tiny_gqa_llama()
    _plant_pair_outliers(model)
    x = _tokens()
    layer = "model.model.layers.1"
    o, down = (model.get_submodule(f"{layer}.{n}") for n in ("self_attn.o_proj", "mlp.down_proj"))
    consumers = {"o": o, "down": down}
    act = channel_abs_max(model, x, {}, inputs=consumers)
    o_w, down_w = o.weight.detach().clone(), down.weight.detach().clone()
    report = apply_smoothquant(model, x, alpha=0.5, pairs="all")
    # up -> down, one to one: s_j = sqrt(max|X_j|) / sqrt(max_i |W_ij|) at alpha 0.5.
    s_down = act["down"].sqrt() / down_w.abs().amax(0).sqrt()
    torch.testing.assert_close(down.weight, down_w * s_down[None, :])

    # v -> o with 2 query heads per kv head (head_dim 8): o_proj input channel h*8 + d
    # reads v channel (h // 2)*8 + d, so one s per v channel from its group's maxima.
    def per_v(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 2, 8).amax(1).reshape(16)

    s_v = per_v(act["o"]).sqrt() / per_v(o_w.abs().amax(0)).sqrt()
    s_o = s_v.view(2, 1, 8).expand(2, 2, 8).reshape(32)
    torch.testing.assert_close(o.weight, o_w * s_o[None, :])
    after = channel_abs_max(model, x, {}, inputs=consumers)
    for name in ("o", "down"):
        spread = [float(a.max() / a.median()) for a in (act[name], after[name])]
        assert spread[1] < spread[0] / 2, (name, spread)
    rows = {r["consumer"]: r for r in report["linear_pairs"]}
    assert rows[f"{layer}.mlp.down_proj"]["act_spread_before"] == pytest.approx(
        float(act["down"].max() / act["down"].median()), rel=1e-3
    )


def test_norm_pairs_only_by_default_and_a_bad_pairs_value_names_the_flag():
    model = _tiny_gqa_llama()
    down = model.get_submodule("model.model.layers.0.mlp.down_proj")
    down_w = down.weight.detach().clone()
    report = apply_smoothquant(model, _tokens(), alpha=0.5)
    assert report["linear_pairs"] == [] and torch.equal(down.weight, down_w)
    with pytest.raises(QCalibError, match="--smoothquant-pairs must be one of norm, all"):
        apply_smoothquant(model, _tokens(), pairs="some")
    with pytest.raises(QCalibError, match="--smoothquant-pairs must be norm or all"):
        QuantConfig(smoothquant_alpha=0.5, smoothquant_pairs="some")
