"""Language-model metrics: perplexity against hand computations, embedding cosine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qcalib.data.tokens import pack_tokens, unpack_tokens
from qcalib.errors import QCalibError
from qcalib.evaluate import accuracy, embedding_cosine, perplexity
from text_models import tiny_bert, tiny_llama, tiny_tokenizer


class UniformLM(nn.Module):
    """Equal logits for every token: each prediction costs log(V) nats."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, _ = unpack_tokens(x)
        return torch.full((*ids.shape, self.vocab), 3.7)


def test_perplexity_matches_a_hand_computation_on_two_windows():
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    gen = torch.Generator().manual_seed(0)
    windows = pack_tokens(torch.randint(4, len(tok), (2, 6), generator=gen))
    ppl, n = perplexity(model, windows, batch_size=1)
    nll = 0.0
    for w in windows:
        ids = w[0].tolist()
        with torch.no_grad():
            logits = model(w[None])[0].double()
        for t in range(5):
            row = logits[t]
            nll += float(torch.logsumexp(row, 0) - row[ids[t + 1]])
    assert n == 10
    assert ppl == pytest.approx(math.exp(nll / 10), rel=1e-5)
    ppl2, n2 = perplexity(model, windows, batch_size=2)  # batching changes nothing
    assert n2 == n and ppl2 == pytest.approx(ppl, rel=1e-5)


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size():
    x = pack_tokens(torch.randint(0, 50, (3, 9)))
    ppl, n = perplexity(UniformLM(50), x, batch_size=2)
    assert n == 3 * 8
    assert ppl == pytest.approx(50.0, rel=1e-12)


class CountingLM(UniformLM):
    """A uniform LM that records how many windows each forward received."""

    def __init__(self, vocab: int) -> None:
        super().__init__(vocab)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return super().forward(x)


def test_a_large_batch_is_forwarded_in_windows_whose_logits_fit_the_budget(monkeypatch):
    from qcalib.evaluate import language

    # Room for 3 windows of 9 tokens x 50 words: the 500-window default batch of a CLI
    # run would otherwise return all its logits at once (50 GB on SmolLM2).
    monkeypatch.setattr(language, "_LOGITS_ELEMS", 3 * 9 * 50)
    x = pack_tokens(torch.randint(0, 50, (10, 9)))
    model = CountingLM(50)
    ppl, n = perplexity(model, x, batch_size=500)
    assert model.rows == [1, 3, 3, 3]  # one window until the vocabulary is known
    assert (ppl, n) == (pytest.approx(50.0, rel=1e-12), 10 * 8)
    tok = tiny_tokenizer()
    lm = tiny_llama(tok)
    windows = pack_tokens(torch.randint(4, len(tok), (5, 6), generator=torch.Generator()))
    monkeypatch.setattr(language, "_LOGITS_ELEMS", 2 * 6 * len(tok))
    split = perplexity(lm, windows, batch_size=5)
    monkeypatch.setattr(language, "_LOGITS_ELEMS", 1 << 28)
    assert split == (pytest.approx(perplexity(lm, windows, batch_size=5)[0], rel=1e-9), 25)


def test_padding_is_never_scored():
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    ppl, n = perplexity(model, pack_tokens(ids, mask), batch_size=2)
    assert n == 3 + 5
    # token-weighted: the same as both sequences scored without padding
    p1, n1 = perplexity(model, pack_tokens(ids[:1, :4]))
    p2, n2 = perplexity(model, pack_tokens(ids[1:]))
    expected = math.exp((n1 * math.log(p1) + n2 * math.log(p2)) / (n1 + n2))
    assert ppl == pytest.approx(expected, rel=1e-5)


def test_perplexity_errors():
    tok = tiny_tokenizer()
    with pytest.raises(QCalibError, match="causal LM"):
        perplexity(tiny_bert(tok), pack_tokens(torch.randint(4, 20, (2, 5))))
    with pytest.raises(QCalibError, match="no token was scored"):
        perplexity(UniformLM(10), pack_tokens(torch.randint(0, 10, (2, 1))))


def test_embedding_cosine():
    tok = tiny_tokenizer()
    enc = tiny_bert(tok)
    x = pack_tokens(torch.randint(4, len(tok), (5, 7)))
    assert embedding_cosine(enc, enc, x, batch_size=2) == pytest.approx(1.0, abs=1e-12)

    class Negated(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -enc(x)

    assert embedding_cosine(enc, Negated(), x) == pytest.approx(-1.0, abs=1e-12)


def test_embedding_cosine_forwards_at_most_the_token_budget(monkeypatch):
    from qcalib.evaluate import language

    tok = tiny_tokenizer()
    enc = tiny_bert(tok)
    x = pack_tokens(torch.randint(4, len(tok), (5, 7)))
    sizes: list[int] = []

    class Recorded(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(x.shape[0])
            return -enc(x)

    monkeypatch.setattr(language, "FORWARD_TOKENS", 2 * 7)  # two windows of 7 tokens
    assert embedding_cosine(enc, Recorded(), x, batch_size=500) == pytest.approx(-1.0)
    assert sizes == [2, 2, 1]

    class Fixed(nn.Module):
        def __init__(self, rows: list[list[float]]) -> None:
            super().__init__()
            self.rows = torch.tensor(rows)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rows[: x.shape[0]]

    x2 = pack_tokens(torch.zeros(2, 3, dtype=torch.long))
    fp, q = Fixed([[1.0, 0.0], [0.0, 2.0]]), Fixed([[1.0, 1.0], [0.0, 5.0]])
    # cos 45 deg = 1/sqrt(2), and 1: the mean over samples
    assert embedding_cosine(fp, q, x2) == pytest.approx((2**-0.5 + 1.0) / 2, rel=1e-12)
    with pytest.raises(QCalibError, match="encoder"):
        embedding_cosine(UniformLM(5), UniformLM(5), x2)


def test_accuracy_is_still_importable_from_the_package():
    from qcalib.evaluate.classification import accuracy as acc

    assert acc is accuracy
