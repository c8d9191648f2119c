"""CL-Calib inside transformer blocks (tiny Llama / BERT built here) and the λ schedule:
the critic replays the block's mask and rotary tables, pools real tokens, trains nothing
and stays bit-identical; only quantization parameters get gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from qcalib.calibrate import CALIBRATORS  # noqa: E402
from qcalib.calibrate.contrastive import (  # noqa: E402
    ContrastiveLoss,
    FrozenTailCritic,
    pool_features,
    scheduled_weight,
)
from qcalib.cli import build_parser, config_from_args  # noqa: E402
from qcalib.config import CalibConfig, ContrastiveConfig, QuantConfig, ReconConfig  # noqa: E402
from qcalib.data.tokens import pack_tokens  # noqa: E402
from qcalib.errors import QCalibError  # noqa: E402
from qcalib.pipeline import build_quant_model  # noqa: E402
from text_models import tiny_bert, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def x(tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tok), (8, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[[1, 4, 6], -3:] = 0  # right padding, in the one capture batch
    return pack_tokens(ids, mask)


def _qdrop(model, x, cl, iters=3):
    q = build_quant_model(model, QuantConfig(4, 8), x[:1])
    recon = ReconConfig(iters=iters, act_iters=2, batch_size=4, w_observer="minmax",
                        a_observer="minmax", contrastive=cl)  # fmt: skip
    return q, CALIBRATORS.get("qdrop")(CalibConfig("qdrop", batch_size=4, recon=recon))


class _Spy(ContrastiveLoss):
    """Per block: the critic's state at the start; per iteration: where gradients went."""

    def __init__(self, cfg, model_fp):
        super().__init__(cfg)
        self.engine = None
        self.model_fp = model_fp  # the FP model's last hidden state, to check the critic
        self.checked = 0
        self.critic_ok: list[bool] = []

    def begin_block(self, info):
        super().begin_block(info)
        self.snapshot = {k: v.clone() for k, v in self._critic.state_dict().items()}
        if info.index == 0 and self.cfg.critic == "full":
            # The full critic of layer 0 (layer 1 with the cached mask and rotary tables,
            # then the final norm), pooled over real tokens, is the FP model's own last
            # hidden state pooled the same way.
            cache = info.cache
            idx = torch.arange(len(cache))
            with torch.no_grad():
                got = self._map(cache.fp_out, cache.inputs(idx), cache.token_mask)
                ids, mask = info.calib_data[:, 0], info.calib_data[:, 1]
                inner = info.fp_model.model.model.model
                hidden = inner(input_ids=ids, attention_mask=mask).last_hidden_state
            self.critic_ok.append(torch.allclose(got, pool_features(hidden, mask.bool()),
                                                 atol=1e-5))  # fmt: skip

    def end_block(self, info):
        for k, v in self._critic.state_dict().items():
            assert torch.equal(v, self.snapshot[k]), k
        super().end_block(info)

    def on_iteration(self, *_):
        eng = self.engine
        assert all(p.grad is None for p in eng.fp_model.parameters())
        assert all(p.grad is None for p in self._critic.parameters())
        trained = [n for n, p in eng.qmodel.named_parameters() if p.grad is not None]
        assert trained and all(n.endswith((".v", ".scale")) for n in trained), trained
        self.checked += 1


@pytest.mark.parametrize("critic", ["truncated", "full"])
def test_llama_gradients_reach_only_quantization_parameters_critic_frozen(tok, x, critic):
    model = tiny_llama(tok)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ContrastiveConfig(critic=critic)
    q, cal = _qdrop(model, x, cfg)
    spy = _Spy(cfg, model)
    cal.extra_terms = lambda: [spy]

    def on_iteration(*a):
        spy.engine = cal.engine
        spy.on_iteration(*a)

    cal.on_iteration = on_iteration
    cal.calibrate(q, x, seed=0, progress=False)
    assert spy.checked == 3 * 2  # every iteration of both decoder layers was checked
    tails = [h["tail"] for h in spy.history]
    last = ["model.model.norm"]
    if critic == "full":
        assert tails == [["model.model.layers.1", *last], last]
        assert spy.critic_ok == [True]
    else:
        assert tails == [["model.model.layers.1"], last]
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_traced_llama_tail_replays_context_for_layers_only(tok, x):
    q, cal = _qdrop(tiny_llama(tok), x, ContrastiveConfig(critic="full"), iters=1)
    seen = []

    class Keep(ContrastiveLoss):
        def begin_block(self, info):
            super().begin_block(info)
            seen.append((self._critic.names, self._critic.with_context))

    cal.extra_terms = lambda: [Keep(ContrastiveConfig(critic="full"))]
    cal.calibrate(q, x, seed=0, progress=False)
    assert seen[0] == (["model.model.layers.1", "model.model.norm"], [True, False])


def test_masked_pool_by_hand():
    t = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert pool_features(t, torch.tensor([[True, True, False]])).tolist() == [[2.0, 3.0]]
    assert pool_features(t)[0].tolist() == pytest.approx([104 / 3, 106 / 3])


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_qdrop_with_cl_end_to_end_and_it_changes_the_result(tok, x, build):
    outs = []
    for cl in (None, ContrastiveConfig(schedule="fade")):
        q, cal = _qdrop(build(tok), x, cl)
        cal.calibrate(q, x, seed=1, progress=False)
        with torch.no_grad():
            outs.append(q(x))
        assert torch.isfinite(outs[-1]).all()
    term = cal.engine.extra_terms[0]
    assert len(term.history) == len(cal.engine.blocks)
    assert all(h["iterations"] == 3 for h in term.history)
    assert not torch.equal(outs[0], outs[1])


# -- the λ schedule ---------------------------------------------------------------------


def test_fade_schedule_values_by_hand():
    # T = 4: w * (1 + cos(pi t / 4)) / 2 for t = 0..3.
    expected = [2.0, 1.0 + math.sqrt(0.5), 1.0, 1.0 - math.sqrt(0.5)]
    got = [scheduled_weight(2.0, "fade", t, 4) for t in range(4)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert [scheduled_weight(2.0, "constant", t, 4) for t in range(4)] == [2.0] * 4
    assert scheduled_weight(1.0, "fade", 0, 1) == 1.0
    with pytest.raises(QCalibError, match="constant or fade"):
        scheduled_weight(1.0, "step", 0, 4)


def test_the_term_applies_the_schedule_at_the_context_iteration():
    z_f = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    values = {}
    for schedule in ("constant", "fade"):
        term = ContrastiveLoss(ContrastiveConfig(weight=2.0, schedule=schedule))
        term._critic = FrozenTailCritic([], [])
        term._z_fp = z_f
        stage = type("Stage", (), {"iters": 4})
        ctx = type("Ctx", (), {"q_out": z_f, "fp_out": z_f, "batch_indices": torch.arange(4),
                               "iteration": 3, "stage": stage})  # fmt: skip
        values[schedule] = term(ctx).item()
    ratio = (1.0 - math.sqrt(0.5)) / 2.0  # fade at t = 3 of 4 over the constant weight
    assert values["fade"] == pytest.approx(values["constant"] * ratio, rel=1e-6)


def test_schedule_config_cli_and_fingerprint():
    assert ContrastiveConfig().schedule == "constant"
    with pytest.raises(QCalibError, match="--cl-schedule must be one of constant, fade"):
        ContrastiveConfig(schedule="linear")

    def cl(*flags):
        args = build_parser().parse_args(["quantize", "--contrastive", *flags])
        return config_from_args(args).calib.recon.contrastive

    assert cl("--cl-schedule", "fade") == ContrastiveConfig(schedule="fade")
    assert cl() == ContrastiveConfig()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--contrastive", "--cl-schedule", "cosine"])
    # The constant schedule leaves the fingerprint of runs made before the option existed.
    assert "schedule" not in ContrastiveLoss(ContrastiveConfig()).fingerprint()
    assert "'fade'" in ContrastiveLoss(ContrastiveConfig(schedule="fade")).fingerprint()
