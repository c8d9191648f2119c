"""Reconstruction loss and Fisher weights of token outputs ``[B, L, H]``: features are the
last dimension, padding is masked out, LM logits are normalized over the vocabulary."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from qcalib.calibrate.base import MinMaxCalibrator  # noqa: E402
from qcalib.calibrate.reconstruct import (  # noqa: E402
    BlockReconstructor,
    ReconstructionLoss,
    _fisher_kl,
    feature_last,
    token_mask,
)
from qcalib.config import CalibConfig, QuantConfig, ReconConfig  # noqa: E402
from qcalib.data.tokens import pack_tokens  # noqa: E402
from qcalib.model.partition import Block, partition_blocks  # noqa: E402
from qcalib.pipeline import build_quant_model  # noqa: E402
from text_models import tiny_llama, tiny_tokenizer  # noqa: E402


class Ctx:
    q_out = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [5.0, 5.0]]])
    fp_out = torch.zeros(1, 3, 2)
    fisher = torch.full((1, 3, 2), 2.0)
    tokens = True
    token_mask = torch.tensor([[True, True, False]])


def test_token_loss_sums_features_and_averages_real_tokens_by_hand():
    # Per-token squared error summed over features: 5, 9, 50; the third token is padding.
    assert ReconstructionLoss()(Ctx).item() == pytest.approx((5 + 9) / 2)
    assert ReconstructionLoss(p=1.0)(Ctx).item() == pytest.approx((3 + 3) / 2)
    assert ReconstructionLoss(fisher=True)(Ctx).item() == pytest.approx(4 * (5 + 9) / 2)

    class NoMask(Ctx):
        token_mask = None

    assert ReconstructionLoss()(NoMask).item() == pytest.approx((5 + 9 + 50) / 3)

    class ChannelFirst(Ctx):  # the CNN reduction: sum over dim 1, mean over the rest
        tokens = False

    assert ReconstructionLoss()(ChannelFirst).item() == pytest.approx(((1 + 9 + 25) + 29) / 2)


def test_fisher_kl_of_lm_logits_is_over_the_vocabulary_and_skips_padding():
    # Token 0: FP p = (1/4, 3/4), Q uniform; token 1 is padding and must not count.
    q = torch.zeros(1, 2, 2)
    fp = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    x = pack_tokens(torch.tensor([[7, 8]]), torch.tensor([[1, 0]]))
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert _fisher_kl(q, fp, x).item() == pytest.approx(kl, rel=1e-6)
    # Two sequences: a sum over each sequence's tokens, a mean over sequences.
    q2, fp2 = q.repeat(2, 1, 1), fp.repeat(2, 1, 1)
    x2 = pack_tokens(torch.tensor([[7, 8], [7, 8]]), torch.tensor([[1, 0], [1, 1]]))
    pad = torch.softmax(fp[0, 1], 0)
    kl_pad = float((pad * (pad.log() - math.log(0.5))).sum())
    assert _fisher_kl(q2, fp2, x2).item() == pytest.approx((2 * kl + kl_pad) / 2, rel=1e-5)
    # Class logits keep the image formula (softmax over dim 1, batch mean).
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    expected = torch.nn.functional.kl_div(
        a.log_softmax(1), b.softmax(1), reduction="batchmean"
    ).item()
    assert _fisher_kl(a, b, None).item() == expected


def test_feature_last_and_token_mask_rules():
    lin = build_quant_model(nn.Sequential(nn.Linear(4, 4)), QuantConfig(8, 8), torch.randn(1, 4))
    layer = lin.model[0]
    t3 = torch.zeros(2, 5, 4)
    assert feature_last(Block("l", layer, "transformer"), t3)
    assert feature_last(Block("l", layer, "layer"), t3)
    assert not feature_last(Block("c", nn.Conv1d(4, 4, 1), "layer"), t3)  # [B, C, L]
    assert not feature_last(Block("l", layer, "transformer"), torch.zeros(2, 4))
    assert not feature_last(Block("r", layer, "residual"), torch.zeros(2, 4, 3, 3))
    x = pack_tokens(torch.ones(2, 5, dtype=torch.long), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]))
    assert token_mask(x, t3).tolist() == [[True] * 5, [True, True, False, False, False]]
    assert token_mask(x, torch.zeros(2, 6, 4)) is None  # another length: no mask
    assert token_mask(torch.randn(2, 3, 5), t3) is None  # not a token batch


def test_engine_caches_the_padding_mask_and_fisher_ignores_padded_tokens():
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tok), (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[[0, 2], -3:] = 0  # right padding in the one capture batch
    x = pack_tokens(ids, mask)
    q = build_quant_model(tiny_llama(tok), QuantConfig(4, 8), x[:1])
    MinMaxCalibrator(CalibConfig()).calibrate(q, x, progress=False)
    blocks = partition_blocks(q, example_input=x[:1])
    cfg = ReconConfig(iters=2, batch_size=2, fisher=True, w_observer="minmax")
    eng = BlockReconstructor(q, blocks, lambda b: [], x, cfg, capture_batch_size=8)
    eng.fp_model = copy.deepcopy(q)
    eng.fp_model.set_quant_state(False, False)
    cache = eng.capture(0)
    assert cache.tokens and torch.equal(cache.token_mask, mask.bool())
    # Causal model, right padding: a padded token only reaches padded tokens' logits,
    # which the KL skips, so its gradient is 0 and its weight exactly |0| + 1.
    pad = ~mask.bool()
    assert torch.equal(cache.fisher[pad], torch.ones_like(cache.fisher[pad]))
    assert (cache.fisher[mask.bool()] > 1).any()
