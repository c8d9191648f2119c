"""Hugging Face text models: loading, wrapping, coverage, block partition, reconstruction.

Every model is a tiny randomly initialised one built here (hidden 32, 2 layers, vocab 100);
nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from qcalib.calibrate import CALIBRATORS  # noqa: E402
from qcalib.config import CalibConfig, QuantConfig, ReconConfig  # noqa: E402
from qcalib.data.tokens import pack_tokens  # noqa: E402
from qcalib.errors import QCalibError  # noqa: E402
from qcalib.model import QuantModel, partition_blocks, quantize_model  # noqa: E402
from qcalib.model.qmodules import QuantConv1D, QuantCustomForward, QuantLinear  # noqa: E402
from qcalib.model.wrap import quant_coverage, quantize_embeddings  # noqa: E402
from qcalib.pipeline import build_quant_model  # noqa: E402
from qcalib.quant import QuantSpec  # noqa: E402
from qcalib.quant.functional import fake_quantize  # noqa: E402
from qcalib.quant.quantizer import WeightQuantizer  # noqa: E402
from qcalib.zoo.external import load_model  # noqa: E402
from qcalib.zoo.hf import (  # noqa: E402
    HFCausalLM,
    HFEncoder,
    load_hf_text_model,
    require_tokenizer,
)

W8, A8 = QuantSpec(8, per_channel=True), QuantSpec(8)
VOCAB, LAYERS = 100, 2


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=LAYERS, n_head=2, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def tokens(n: int = 4, length: int = 16, seed: int = 1, pad: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -pad:] = 0
    return pack_tokens(ids, mask)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def wrap(model: nn.Module, **kw) -> QuantModel:
    return quantize_model(model, W8, A8, example_input=tokens(2, 8), **kw)


# -- loader ----------------------------------------------------------------------------


def test_load_saved_llama_with_tokenizer_round_trip(tmp_path) -> None:
    lm = tiny_llama()
    lm.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = load_hf_text_model(tmp_path)
    assert isinstance(loaded, HFCausalLM) and not loaded.training
    assert require_tokenizer(loaded)("w3 w7 w99")["input_ids"] == [3, 7, 99]
    x = tokens(pad=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), HFCausalLM(lm)(x))
    via_spec = load_model(f"hf:{tmp_path}")
    assert isinstance(via_spec, HFCausalLM)
    with torch.no_grad():
        assert torch.equal(via_spec(x), loaded(x))


def test_load_encoder_by_auto_task_and_missing_tokenizer(tmp_path) -> None:
    bert = tiny_bert()
    bert.save_pretrained(tmp_path)
    enc = load_hf_text_model(tmp_path)
    assert isinstance(enc, HFEncoder) and enc.tokenizer is None
    x = tokens(pad=5)
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (4, 32)
        torch.testing.assert_close(out, HFEncoder(bert)(x))
    with pytest.raises(QCalibError, match=r"no tokenizer found with .*tokenizer\.save_pretrained"):
        require_tokenizer(enc)


def test_loader_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(QCalibError, match=r"no config\.json.*save_pretrained"):
        load_hf_text_model(tmp_path)
    with pytest.raises(QCalibError, match="neither a model directory nor a .gguf file"):
        load_hf_text_model(tmp_path / "nope")
    with pytest.raises(QCalibError, match="task must be one of auto, causal-lm, embedding"):
        load_hf_text_model(tmp_path, task="seq2seq")
    vit = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=1).save_pretrained(vit)
    with pytest.raises(QCalibError, match=r"cannot tell whether .*task='causal-lm'"):
        load_hf_text_model(vit)
    with pytest.raises(QCalibError, match=r"unsupported architecture 'vit' for causal-lm"):
        load_hf_text_model(vit, task="causal-lm")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(QCalibError, match="cannot read the config of"):
        load_hf_text_model(bad)
    # Through `--model hf:DIR` (load_model): a local folder is never sent to the hub advice.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QCalibError, match=r"no config\.json.*save_pretrained") as info:
        load_model(f"hf:{empty}")
    assert "\n" not in str(info.value)
    with pytest.raises(QCalibError, match=r"cannot load .*bad.*save_pretrained") as info:
        load_model(f"hf:{bad}")
    assert "huggingface-cli" not in str(info.value)
    with pytest.raises(QCalibError, match=r"huggingface-cli download no-such/model"):
        load_model("hf:no-such/model")
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(QCalibError, match=r"pip install gguf"):
        load_hf_text_model(gguf_file)


# -- wrapping --------------------------------------------------------------------------

LLAMA_LINEARS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]  # fmt: skip
GPT2_LINEARS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
BERT_LINEARS = [
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
]  # fmt: skip
CASES = {
    "llama": (tiny_llama, HFCausalLM, "model.model.layers.{i}.", LLAMA_LINEARS, QuantLinear),
    "gpt2": (tiny_gpt2, HFCausalLM, "model.transformer.h.{i}.", GPT2_LINEARS, QuantConv1D),
    "bert": (tiny_bert, HFEncoder, "model.encoder.layer.{i}.", BERT_LINEARS, QuantLinear),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_wrapping_covers_every_attention_and_mlp_linear(arch: str) -> None:
    build, adapter, prefix, linears, twin = CASES[arch]
    model = adapter(build())
    x = tokens(pad=4)
    with torch.no_grad():
        fp = model(x)
    q = wrap(model)
    names = {n for n, _ in q.quant_modules()}
    expected = {prefix.format(i=i) + s for i in range(LAYERS) for s in linears}
    if arch == "bert":
        expected.add("model.pooler.dense")  # BertModel computes its pooler too
    assert names == expected
    for name in expected - {"model.pooler.dense"}:
        assert type(q.model.get_submodule(name)) is twin, name
    head = {"llama": "model.lm_head", "gpt2": "model.lm_head", "bert": None}[arch]
    cov = quant_coverage(q)
    assert cov["weight_share"] == 1.0 and cov["float_layers"] == []
    assert cov["float_by_option"] == ([head] if head else [])
    assert cov["act_sites_quantized"] == len(expected) and cov["act_share"] == 1.0
    assert q.first_layer is None and q.last_layer is None  # first_last_bits ignored
    with torch.no_grad():
        q.set_quant_state(False, False)
        assert torch.equal(q(x), fp)
        q.set_quant_state(True, True)
        CALIBRATORS.get("minmax")(CalibConfig("minmax")).calibrate(q, tokens(8), progress=False)
        out = q(x)
    assert not torch.equal(out, fp)
    assert cosine(out, fp) > 0.99


def test_lm_head_bits_quantizes_the_head_only() -> None:
    model = HFCausalLM(tiny_llama())
    q = wrap(model, lm_head_bits=6)
    head = q.model.get_submodule("model.lm_head")
    assert isinstance(head, QuantLinear)
    assert head.weight_quantizer.spec.bits == 6 and head.act_quantizer.spec.bits == 6
    q_proj = q.model.get_submodule("model.model.layers.0.self_attn.q_proj")
    assert q_proj.weight_quantizer.spec.bits == 8  # the first linear is not "first layer"
    assert quant_coverage(q)["float_by_option"] == []
    cfg_q = build_quant_model(model, QuantConfig(4, 4, lm_head_bits=8), tokens(1))
    head = cfg_q.model.get_submodule("model.lm_head")
    assert head.weight_quantizer.spec.bits == 8
    assert (
        cfg_q.model.get_submodule("model.model.layers.0.mlp.up_proj").weight_quantizer.spec.bits
        == 4
    )
    with pytest.raises(QCalibError, match="--lm-head-bits"):
        QuantConfig(lm_head_bits=1)


def test_embedding_bits_rounds_each_row_on_its_own_grid_by_hand() -> None:
    table = nn.Embedding(2, 4)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[-1.0, 0.0, 0.5, 3.0], [0.1, 0.2, 0.3, 0.4]]))
    holder = nn.Sequential(table)
    assert quantize_embeddings(holder, 2) == ("0",)
    # Row 0 at 2 bits: range [-1, 3], step 4/3, zero point 1: grid {-4/3, 0, 4/3, 8/3}.
    # Row 1: range widened to [0, 0.4] (zero stays exact), step 0.4/3.
    step = 0.4 / 3
    want = torch.tensor([[-4 / 3, 0.0, 0.0, 8 / 3], [step, 2 * step, 2 * step, 3 * step]])
    torch.testing.assert_close(table.weight, want)
    assert not table.weight.requires_grad


def test_embedding_bits_rounds_the_tables_and_unties_a_float_head() -> None:
    lm = tiny_llama()
    lm.lm_head.weight = lm.model.embed_tokens.weight  # tied, as in SmolLM2
    model = HFCausalLM(lm)
    fp_table = lm.model.embed_tokens.weight.detach().clone()
    x = tokens(2, 8)
    with torch.no_grad():
        fp = model(x)
    q = wrap(model, embedding_bits=4)
    table = q.model.get_submodule("model.model.embed_tokens").weight
    head = q.model.get_submodule("model.lm_head")
    assert q.quantized_embeddings == {"model.model.embed_tokens": 4}
    assert quant_coverage(q)["quantized_embeddings"] == {"model.model.embed_tokens": 4}
    assert torch.equal(head.weight, fp_table)  # the float head kept the float weights
    assert torch.equal(lm.model.embed_tokens.weight, fp_table)  # the input model untouched
    assert not torch.equal(table, fp_table)
    assert max(len(torch.unique(row)) for row in table) <= 16
    step = (fp_table.amax(1).clamp_min(0) - fp_table.amin(1).clamp_max(0)) / 15
    assert ((table - fp_table).abs() <= step[:, None] / 2 + 1e-6).all()
    with torch.no_grad():
        q.set_quant_state(False, False)  # the rounding is part of the model, not a switch
        out = q(x)
    assert not torch.equal(out, fp) and cosine(out, fp) > 0.98
    bert = wrap(HFEncoder(tiny_bert()), embedding_bits=8)
    assert sorted(bert.quantized_embeddings) == [
        "model.embeddings.position_embeddings", "model.embeddings.token_type_embeddings",
        "model.embeddings.word_embeddings",
    ]  # fmt: skip
    with pytest.raises(QCalibError, match="--embedding-bits applies to text models"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), W8, A8, embedding_bits=8)
    with pytest.raises(QCalibError, match="--embedding-bits"):
        QuantConfig(embedding_bits=1)


def test_quant_conv1d_matches_gpt2_conv1d_per_output_channel() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # nx=4 inputs, nf=6 outputs, weight [4, 6]
    with torch.no_grad():
        conv.weight.mul_(torch.arange(1.0, 7.0))  # output channels differ in range
        conv.bias.normal_()
    x = torch.randn(3, 5, 4)
    spec = QuantSpec(4, symmetric=True, per_channel=True)
    wq = WeightQuantizer(spec)
    twin = QuantConv1D.from_float(conv, wq)
    assert twin.weight.shape == (6, 4) and twin.weight.is_contiguous()
    assert torch.equal(twin(x), conv(x))  # no parameters yet: the float layer
    # Hand reference: symmetric 4-bit per *output* channel = per column of conv.weight.
    scale = conv.weight.detach().abs().amax(0) / 7
    wq.set_qparams(scale, torch.zeros(6))
    w_hat = (conv.weight.detach() / scale).round().clamp(-8, 7) * scale
    torch.testing.assert_close(twin(x), x @ w_hat + conv.bias.detach())


class SamePadConv(nn.Conv2d):
    """EfficientNet's Conv2dStaticSamePadding: pads, then convolves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_forward_overriding_subclass_keeps_its_forward() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), SamePadConv(4, 3, 2, stride=2), nn.ReLU())
    x = torch.randn(2, 2, 7, 7)
    q = quantize_model(net, W8, A8, example_input=x, first_last_bits=None)
    twin = q.model[2]
    assert isinstance(twin, QuantCustomForward) and isinstance(twin.inner, SamePadConv)
    assert not list(twin.inner.parameters())  # weight / bias live in the twin only
    with torch.no_grad():
        assert torch.equal(q(x), net(x))
        wq = twin.weight_quantizer
        s, z = twin.weight.abs().amax((1, 2, 3)) / 100, torch.full((3,), 128.0)
        wq.set_qparams(s, z)
        w_hat = fake_quantize(twin.weight, s, z, wq.qmin, wq.qmax, 0)
        assert not torch.equal(w_hat, twin.weight)
        h = net[1](net[0](x))
        ref = F.conv2d(F.pad(h, (0, 1, 0, 1)), w_hat, net[2].bias, 2)
        torch.testing.assert_close(twin(h), ref)
    assert quant_coverage(q)["weight_share"] == 1.0


class WithConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)  # 64 weights
        self.conv1d = nn.Conv1d(8, 2, 1)  # 16 weights, no twin
        self.emb = nn.Embedding(10, 8)  # float by design, not counted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1d(self.fc(x).transpose(1, 2))


def test_coverage_counts_and_refusal() -> None:
    x = torch.randn(2, 5, 8)
    with pytest.raises(QCalibError, match=r"20\.0% .*\(conv1d \(Conv1d\)\).*allow_float"):
        quantize_model(WithConv1d(), W8, A8, example_input=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_model(WithConv1d(), W8, A8, example_input=x, allow_float=True)
    cov = quant_coverage(q)
    assert (cov["weights_quantized"], cov["weights_float"]) == (64, 16)
    assert cov["weight_share"] == pytest.approx(0.8)
    assert (cov["act_sites_quantized"], cov["act_sites_float"]) == (1, 1)
    assert cov["float_layers"] == ["conv1d (Conv1d)"]


# -- block partition and reconstruction ------------------------------------------------


@pytest.mark.parametrize("arch", list(CASES))
def test_partition_finds_every_layer(arch: str) -> None:
    build, adapter, prefix, _, _ = CASES[arch]
    model = adapter(build())
    blocks = partition_blocks(wrap(model), example_input=tokens(1))
    layers = [(prefix.format(i=i).rstrip("."), "transformer") for i in range(LAYERS)]
    extra = [("model.pooler.dense", "layer")] if arch == "bert" else []
    assert [(b.name, b.kind) for b in blocks] == layers + extra


def test_partition_of_unknown_transformers_architecture_names_it() -> None:
    class OddModel(transformers.PreTrainedModel):
        config_class = transformers.LlamaConfig

        def __init__(self, config) -> None:
            super().__init__(config)
            self.stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

        def forward(self, x):
            for m in self.stack:
                x = m(x)
            return x

    odd = OddModel(transformers.LlamaConfig(hidden_size=8, num_attention_heads=2))
    with pytest.raises(QCalibError, match=r"decoder/encoder layers of OddModel"):
        partition_blocks(odd)


def test_qdrop_reconstructs_every_block_of_a_tiny_llama() -> None:
    model = HFCausalLM(tiny_llama())
    calib = tokens(8, 16, seed=2)
    test = tokens(4, 16, seed=3)
    qcfg = QuantConfig(4, 8)
    with torch.no_grad():
        fp = model(test)

    def error(calibrator: str, **recon) -> tuple[float, object]:
        q = build_quant_model(model, qcfg, calib[:1])
        cfg = CalibConfig(calibrator, batch_size=4, recon=ReconConfig(**recon))
        cal = CALIBRATORS.get(calibrator)(cfg)
        cal.calibrate(q, calib, seed=0, progress=False)
        with torch.no_grad():
            return F.mse_loss(q(test), fp).item(), cal

    e_minmax, _ = error("minmax")
    # QDrop as published: ranges initialized by MSE search (the ReconConfig default).
    e_qdrop, cal = error("qdrop", iters=20, act_iters=10, batch_size=4)
    done = [h["block"] for h in cal.engine.history if "stage" in h]
    assert done == [f"model.model.layers.{i}" for i in range(LAYERS)]
    assert e_qdrop <= e_minmax


def test_reconstruction_cache_with_padding_masks() -> None:
    """A 4-D padding mask in every batch is batch-first and cached per sample; a mask that
    transformers skips in some batches only (no padding there) is refused with the fix."""
    model = HFCausalLM(tiny_llama())
    qcfg = QuantConfig(4, 8)
    cfg = CalibConfig("qdrop", batch_size=2, recon=ReconConfig(iters=2, batch_size=2))
    padded = tokens(4, 8, seed=4)
    padded[[0, 2], 1, -2:] = 0  # padding in both capture batches
    q = build_quant_model(model, qcfg, padded[:1])
    cal = CALIBRATORS.get("qdrop")(cfg)
    cal.calibrate(q, padded, seed=0, progress=False)
    assert len([h for h in cal.engine.history if "stage" in h]) == LAYERS
    mixed = tokens(4, 8, seed=4, pad=2)  # padding in the first batch only
    q = build_quant_model(model, qcfg, mixed[:1])
    with pytest.raises(QCalibError, match=r"'attention_mask' .* None in some calibration batches"):
        CALIBRATORS.get("qdrop")(cfg).calibrate(q, mixed, seed=0, progress=False)


# -- passes that read no logits stop at the output head ---------------------------------


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _act_qparams(q: QuantModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        n: (m.act_quantizer.scale.clone(), m.act_quantizer.zero_point.clone())
        for n, m in q.quant_modules()
        if m.act_quantizer is not None
    }


def test_observer_pass_skips_a_float_head_and_gets_the_full_forward_ranges(monkeypatch) -> None:
    import qcalib.model.observe as observe

    data = tokens(6, 16, pad=3)
    q = wrap(HFCausalLM(tiny_llama()))
    full = wrap(HFCausalLM(tiny_llama()))
    assert not isinstance(q.model.get_submodule("model.lm_head"), QuantLinear)  # float head
    calls = _count_calls(q.model.get_submodule("model.lm_head"))
    observe.calibrate_activations(q, data, "minmax", batch_size=4, progress=False)
    assert calls == [0]
    monkeypatch.setattr(observe, "unread_output_head", lambda *_: None)  # the old full forward
    full_calls = _count_calls(full.model.get_submodule("model.lm_head"))
    observe.calibrate_activations(full, data, "minmax", batch_size=4, progress=False)
    assert full_calls == [2]
    ours, ref = _act_qparams(q), _act_qparams(full)
    assert ours.keys() == ref.keys() and len(ours) == 7 * LAYERS
    for n in ref:
        assert torch.equal(ours[n][0], ref[n][0]) and torch.equal(ours[n][1], ref[n][1]), n


def test_observer_pass_runs_a_quantized_head_to_observe_its_input() -> None:
    from qcalib.model.observe import calibrate_activations

    q = wrap(HFCausalLM(tiny_llama()), lm_head_bits=8)
    head = q.model.get_submodule("model.lm_head")
    calls = _count_calls(head)
    seen: list[torch.Tensor] = []
    head.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    calibrate_activations(q, tokens(4, 16), "minmax", batch_size=2, progress=False)
    assert calls == [2]
    lo = min(float(x.min()) for x in seen + [torch.zeros(1)])
    hi = max(float(x.max()) for x in seen + [torch.zeros(1)])
    # min-max, 8 bits asymmetric: the step spans the observed range of the head's input.
    assert float(head.act_quantizer.scale) == pytest.approx((hi - lo) / 255, rel=1e-5)


def test_statistics_pass_reads_the_head_input_without_computing_logits(monkeypatch) -> None:
    import qcalib.select.stats as stats

    model = HFCausalLM(tiny_llama())
    calls = _count_calls(model.get_submodule("model.lm_head"))
    data = tokens(4, 16, pad=5)
    rows = stats.ActivationStatsCollector(model, extremes=True)(data)
    assert calls == [0]
    monkeypatch.setattr(stats, "unread_output_head", lambda *_: None)
    ref = stats.ActivationStatsCollector(model, extremes=True)(data)
    assert calls == [2]  # the full path: the probe forward and the batch
    assert list(rows) == list(ref) and "model.lm_head" in rows  # the head's input is a site
    for k in ref:
        assert torch.equal(rows[k], ref[k]), k


def test_smoothquant_maxima_skip_the_head(monkeypatch) -> None:
    import qcalib.model.smooth as smooth

    model = HFCausalLM(tiny_llama())
    norms = {n: m for n, m in model.named_modules() if n.endswith("norm")}
    calls = _count_calls(model.get_submodule("model.lm_head"))
    data = tokens(4, 16, pad=2)
    got = smooth.channel_abs_max(model, data, norms, batch_size=2)
    assert calls == [0] and "model.model.norm" in got  # the norm right before the head
    monkeypatch.setattr(smooth, "unread_output_head", lambda *_: None)
    ref = smooth.channel_abs_max(model, data, norms, batch_size=2)
    assert calls == [2] and got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_layer_sqnr_skips_a_float_head(monkeypatch) -> None:
    import qcalib.diagnostics as diagnostics
    from qcalib.model.observe import calibrate_activations

    q = wrap(HFCausalLM(tiny_llama()))
    data = tokens(4, 16)
    calibrate_activations(q, data, "minmax", batch_size=2, progress=False)
    calls = _count_calls(q.model.get_submodule("model.lm_head"))
    rows = diagnostics.layer_sqnr(q, data, batch_size=2)
    assert calls == [0] and len(rows) == 7 * LAYERS
    monkeypatch.setattr(diagnostics, "unread_output_head", lambda *_: None)
    assert diagnostics.layer_sqnr(q, data, batch_size=2) == rows and calls == [4]
