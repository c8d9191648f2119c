"""The pipeline on text models: select -> calibrate -> perplexity / embedding cosine -> save."""

from __future__ import annotations

import json

import pytest
import torch

from qcalib.artifact import load_run
from qcalib.cli import build_parser, config_from_args
from qcalib.config import CalibConfig, QuantConfig, RunConfig, SelectConfig, TextConfig
from qcalib.errors import QCalibError
from qcalib.evaluate import perplexity
from qcalib.pipeline import Workbench, quantize
from text_models import sentences, tiny_bert, tiny_llama, tiny_tokenizer

TEXT = TextConfig(seq_len=8, eval_fraction=0.2, split_seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):  # noqa: ANN001, ANN201
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(sentences(60, seed=2)) + "\n")
    return path


def run_config(path, selector: str = "random", **select_params) -> RunConfig:  # noqa: ANN001
    return RunConfig(
        model="tiny-llama",
        data=f"text:{path}",
        quant=QuantConfig(wbits=8, abits=8),
        calib=CalibConfig(calibrator="minmax", num_calib=8, batch_size=4),
        select=SelectConfig(selector, tuple(sorted(select_params.items()))),
        eval_batch_size=4,
        text=TEXT,
    )


def test_causal_lm_run_reports_perplexity_and_saves(corpus, tmp_path, caplog):
    tok = tiny_tokenizer(bos=True)
    bench = Workbench(tiny_llama(tok), f"text:{corpus}", eval_batch_size=4, text=TEXT)
    assert bench.metric == "perplexity"
    assert bench.example_input().shape == (1, 2, 8)
    cfg = run_config(corpus)
    with caplog.at_level("INFO", logger="qcalib"):
        qmodel, res = quantize(cfg, bench=bench, out=tmp_path / "run", progress=False)
    # Without progress bars the stages still show, in the log and in OUT/qcalib.log.
    stages = [r.getMessage() for r in caplog.records if r.name == "qcalib.pipeline"]
    assert stages[0].startswith(f"calibration set: 8 of {len(bench.pool)} pool samples (random)")
    assert stages[1].startswith("calibrated with minmax in ")
    assert stages[2].startswith(
        f"evaluated: perplexity FP {res.fp_metric:.4g}, quantized {res.quant_metric:.4g}"
    )
    assert res.metric == "perplexity" and res.fp_top1 is None and res.quant_top1 is None
    fp_ppl, scored = perplexity(bench.model, bench.test_set, 4)
    assert res.fp_metric == pytest.approx(fp_ppl) and res.eval_tokens == scored > 0
    assert scored == len(bench.test_set) * 7  # seq_len - 1 predictions a window
    # random weights: near-uniform over the vocabulary; W8A8 moves it little
    assert 0.8 * len(tok) < res.fp_metric < 1.5 * len(tok)
    assert res.quant_metric == pytest.approx(res.fp_metric, rel=0.05)
    assert res.quant_metric != res.fp_metric  # the quantizers are really there
    assert "perplexity FP" in res.summary()
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["metric"] == "perplexity" and saved["eval_tokens"] == scored
    cfg2, qmodel2, _ = load_run(tmp_path / "run", model=tiny_llama(tok))
    assert cfg2 == cfg
    assert perplexity(qmodel2, bench.test_set, 4)[0] == pytest.approx(res.quant_metric)


def tied_llama(tok):  # noqa: ANN001, ANN201
    model = tiny_llama(tok)
    model.model.lm_head.weight = model.model.model.embed_tokens.weight  # as in SmolLM2
    return model


def test_a_tied_lm_head_is_saved_once_and_reloaded_tied(corpus, tmp_path):
    import json as json_module

    from safetensors import safe_open

    tok = tiny_tokenizer(bos=True)
    bench = Workbench(tied_llama(tok), f"text:{corpus}", eval_batch_size=4, text=TEXT)
    cfg = run_config(corpus)
    _, res = quantize(cfg, bench=bench, out=tmp_path / "run", progress=False)
    with safe_open(str(tmp_path / "run" / "quant_state.safetensors"), "pt") as f:
        names, meta = set(f.keys()), f.metadata()
    head, table = "model.model.lm_head.weight", "model.model.model.embed_tokens.weight"
    assert json_module.loads(meta["aliases"]) == {head: table} and head not in names
    _, qmodel2, _ = load_run(tmp_path / "run", model=tied_llama(tok))
    loaded = qmodel2.model.model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still one tensor
    assert perplexity(qmodel2, bench.test_set, 4)[0] == pytest.approx(res.quant_metric)


def test_embedding_bits_and_token_dir_run_saves_and_reloads(corpus, tmp_path):
    from dataclasses import replace

    import numpy as np

    tok = tiny_tokenizer(bos=True)
    text = replace(TEXT, token_dir=str(tmp_path / "tokens"))
    bench = Workbench(tied_llama(tok), f"text:{corpus}", eval_batch_size=4, text=text)
    assert isinstance(bench.pool.dataset.tokens, np.memmap)
    plain = Workbench(tied_llama(tok), f"text:{corpus}", eval_batch_size=4, text=TEXT)
    assert torch.equal(bench.pool.get(list(range(len(plain.pool)))),
                       plain.pool.get(list(range(len(plain.pool)))))  # fmt: skip
    cfg = replace(run_config(corpus), quant=QuantConfig(wbits=8, abits=8, embedding_bits=4),
                  text=text)  # fmt: skip
    qmodel, res = quantize(cfg, bench=bench, out=tmp_path / "run", progress=False)
    assert qmodel.quantized_embeddings == {"model.model.embed_tokens": 4}
    base, base_res = quantize(run_config(corpus), bench=plain, progress=False)
    assert res.quant_metric != base_res.quant_metric  # the 4-bit table changes the model
    cfg2, qmodel2, _ = load_run(tmp_path / "run", model=tied_llama(tok))
    assert cfg2 == cfg and cfg2.quant.embedding_bits == 4
    assert perplexity(qmodel2, bench.test_set, 4)[0] == pytest.approx(res.quant_metric)
    assert torch.equal(qmodel2.model.get_submodule("model.model.embed_tokens").weight,
                       qmodel.model.get_submodule("model.model.embed_tokens").weight)  # fmt: skip


def test_selectq_on_a_text_pool(corpus):
    tok = tiny_tokenizer(bos=True)
    bench = Workbench(tiny_llama(tok), f"text:{corpus}", eval_batch_size=4, text=TEXT)
    cfg = run_config(corpus, "selectq", num_clusters=2, init_size=8, batch_size=8)
    _, res = quantize(cfg, bench=bench, progress=False)
    assert len(res.calib_indices) == 8 and max(res.calib_indices) < len(bench.pool)
    assert res.quant_metric == pytest.approx(res.fp_metric, rel=0.05)


def test_selectq_then_qdrop_over_the_decoder_layers_saves_and_reloads(corpus, tmp_path):
    from dataclasses import replace

    from qcalib.config import ReconConfig

    tok = tiny_tokenizer(bos=True)
    bench = Workbench(tiny_llama(tok), f"text:{corpus}", eval_batch_size=4, text=TEXT)
    base = run_config(corpus, "selectq", num_clusters=2, init_size=8, batch_size=8)
    base = replace(base, quant=QuantConfig(wbits=4, abits=8))
    _, minmax = quantize(base, bench=bench, progress=False)
    recon = ReconConfig(iters=10, batch_size=4)
    cfg = replace(base, calib=CalibConfig(calibrator="qdrop", num_calib=8, batch_size=4,
                                          recon=recon))  # fmt: skip
    _, res = quantize(cfg, bench=bench, out=tmp_path / "run", progress=False)
    # SelectQ is calibrator-aware: reconstruction gets its own set from the same pool.
    assert len(res.calib_indices) == 8 and max(res.calib_indices) < len(bench.pool)
    assert res.quant_metric != minmax.quant_metric  # the blocks were reconstructed
    assert res.quant_metric == pytest.approx(res.fp_metric, rel=0.2)
    cfg2, qmodel2, _ = load_run(tmp_path / "run", model=tiny_llama(tok))
    assert cfg2 == cfg
    assert perplexity(qmodel2, bench.test_set, 4)[0] == pytest.approx(res.quant_metric)


def test_encoder_run_reports_embedding_cosine(corpus):
    tok = tiny_tokenizer()
    text = TextConfig(seq_len=8, mode="doc", eval_fraction=0.2)
    bench = Workbench(tiny_bert(tok), f"text:{corpus}", eval_batch_size=4, text=text)
    assert bench.metric == "embedding_cosine"
    cfg = RunConfig(
        data=f"text:{corpus}", quant=QuantConfig(wbits=8, abits=8),
        calib=CalibConfig(num_calib=8, batch_size=4), text=text,
    )  # fmt: skip
    _, res = quantize(cfg, bench=bench, progress=False)
    assert res.fp_metric == 1.0
    assert 0.9 < res.quant_metric < 1.0
    assert res.eval_tokens == bench.test_set.num_tokens > 0


def test_text_run_errors(corpus):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    with pytest.raises(QCalibError, match=r"fewer than --seq-len 8 x --num-calib 1000 = 8000"):
        cfg = run_config(corpus)
        cfg = RunConfig(data=cfg.data, calib=CalibConfig(num_calib=1000), text=TEXT)
        quantize(cfg, bench=Workbench(model, f"text:{corpus}", text=TEXT), progress=False)
    from conftest import TinyNet

    with pytest.raises(QCalibError, match="Hugging Face text model"):
        Workbench(TinyNet(), f"text:{corpus}", text=TEXT)
    no_tok = tiny_llama(tok)
    no_tok.__dict__["tokenizer"] = None
    with pytest.raises(QCalibError, match="tokenizer"):
        Workbench(no_tok, f"text:{corpus}", text=TEXT)
    with pytest.raises(QCalibError, match="is not text"):
        Workbench(model, f"text:{corpus}", eval_data="digits", text=TEXT)
    bench = Workbench(model, f"text:{corpus}", eval_data="none", text=TEXT)
    _, res = quantize(run_config(corpus), bench=bench, progress=False)
    assert res.quant_metric is None and "not evaluated" in res.summary()
    with pytest.raises(QCalibError, match="no top-1 accuracy"):
        bench.accuracy(model)


def test_eval_max_tokens_caps_the_scored_tokens(corpus):
    text = TextConfig(seq_len=8, eval_fraction=0.2, split_seed=1, eval_max_tokens=20)
    bench = Workbench(tiny_llama(tiny_tokenizer()), f"text:{corpus}", text=text)
    assert len(bench.test_set) == 2 and bench.perplexity(bench.model)[1] == 14


def test_cli_text_flags():
    args = build_parser().parse_args(
        ["quantize", "--data", "text:x.json", "--seq-len", "128", "--text-mode", "doc",
         "--text-field", "extract"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.text == TextConfig(seq_len=128, mode="doc", field="extract")
    assert config_from_args(build_parser().parse_args(["quantize"])).text == TextConfig()
    # A bare --smoothquant is the paper's alpha; pairs default to the norms only.
    bare = config_from_args(build_parser().parse_args(["quantize", "--smoothquant"])).quant
    assert (bare.smoothquant_alpha, bare.smoothquant_pairs) == (0.5, "norm")
    off = config_from_args(build_parser().parse_args(["quantize"])).quant
    assert off.smoothquant_alpha is None
