"""Hugging Face text models (causal LMs, encoders) behind qcalib's one-tensor contract.

A wrapped model takes a packed text batch ``[B, 2, L]`` (:mod:`qcalib.data.tokens`) and
returns one tensor, so pools, selectors, observer passes and the reconstruction engine
treat it like an image classifier. The HF model stays a child (``.model``) so its layers
are visible to the quantizer and its decoder / encoder layers to the block partition.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from qcalib.data.tokens import unpack_tokens


class HFTextModel(nn.Module):
    """Common base: the wrapped HF model, its tokenizer (optional) and the mask accessor.

    ``task`` names what :meth:`forward` returns: ``"causal-lm"`` (next-token logits
    ``[B, L, V]``) or ``"embedding"`` (mask-mean-pooled last hidden state ``[B, H]``).
    """

    task = ""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        # Not a module: kept out of state_dict and .to().
        self.__dict__["tokenizer"] = tokenizer

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @staticmethod
    def token_mask(x: Tensor) -> Tensor:
        """The attention mask ``[B, L]`` of a packed batch (statistics skip padding)."""
        return unpack_tokens(x)[1]


class HFCausalLM(HFTextModel):
    """``forward(x [B, 2, L]) -> logits [B, L, V]`` of an ``AutoModelForCausalLM``."""

    task = "causal-lm"

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = unpack_tokens(x)
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = getattr(out, "logits", None)
        return out[0] if logits is None else logits


class HFEncoder(HFTextModel):
    """``forward(x [B, 2, L]) -> [B, H]``: an ``AutoModel`` encoder's last hidden state,
    averaged over the real tokens (sentence-transformers' mean pooling)."""

    task = "embedding"

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = unpack_tokens(x)
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden = getattr(out, "last_hidden_state", None)
        hidden = out[0] if hidden is None else hidden
        w = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
