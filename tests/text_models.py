"""Tiny text models and tokenizers built in-process (no downloads) for the text tests."""

from __future__ import annotations

import torch

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "to",
    "park",
    "bird",
    "sang",
    "in",
    "tree",
    "sun",
    "rose",
    "over",
    "hill",
    "fish",
    "swam",
    "river",
    "boy",
    "read",
    "book",
    "girl",
    "wrote",
    "letter",
    "rain",
    "fell",
    "city",
    "wind",
    "blew",
    "sea",
]


def tiny_tokenizer(bos: bool = False, pad: bool = True):  # noqa: ANN201
    """A whitespace word-level tokenizer over :data:`WORDS` with [PAD]/[UNK]/</s> (+ <s>)."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "</s>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    kwargs = {"unk_token": "[UNK]", "eos_token": "</s>", "bos_token": "<s>"}
    if pad:
        kwargs["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tiny_llama(tokenizer, seed: int = 0):  # noqa: ANN001, ANN201
    """``HFCausalLM`` over a 2-layer, 32-wide Llama with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcalib.zoo.hf import HFCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=128,
    )  # fmt: skip
    return HFCausalLM(LlamaForCausalLM(cfg).eval(), tokenizer)


def tiny_bert(tokenizer, seed: int = 0):  # noqa: ANN001, ANN201
    """``HFEncoder`` over a 2-layer, 32-wide BERT with random weights."""
    from transformers import BertConfig, BertModel

    from qcalib.zoo.hf import HFEncoder

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=len(tokenizer), max_position_embeddings=128,
    )  # fmt: skip
    return HFEncoder(BertModel(cfg).eval(), tokenizer)


def sentences(n: int, seed: int = 0, lo: int = 3, hi: int = 12) -> list[str]:
    """``n`` seeded random word sequences of ``lo``..``hi`` words."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        idx = torch.randint(len(WORDS), (k,), generator=gen).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out
