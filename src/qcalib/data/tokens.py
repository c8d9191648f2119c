"""The one tensor format of a tokenized text sample.

Everything downstream of a pool (selection, observer passes, the reconstruction engine's
block cache, ``torch.split`` of a calibration batch) handles one batch-first tensor per
sample. A text sample keeps that contract by stacking its token ids and attention mask:
``LongTensor [2, L]``, row 0 the ids, row 1 the mask (1 = real token, 0 = padding); a
batch is ``[B, 2, L]``. Models that read text (:mod:`qcalib.zoo.hf`) unpack it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcalib.errors import QCalibError


def pack_tokens(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``[B, L]`` ids (+ mask, default all ones) -> ``[B, 2, L]`` (or ``[L]`` -> ``[2, L]``)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.shape != attention_mask.shape:
        raise QCalibError(
            f"token ids {tuple(input_ids.shape)} and attention mask "
            f"{tuple(attention_mask.shape)} differ in shape"
        )
    return torch.stack([input_ids.long(), attention_mask.long()], dim=-2)


def unpack_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, 2, L]`` -> ``(input_ids [B, L], attention_mask [B, L])``."""
    if x.dim() != 3 or x.shape[1] != 2 or x.is_floating_point():
        raise QCalibError(
            f"a text batch is an integer tensor [B, 2, L] (token ids, attention mask), got "
            f"{x.dtype} {tuple(x.shape)}; build it with qcalib.data.tokens.pack_tokens"
        )
    return x[:, 0], x[:, 1]


def is_token_batch(x: object) -> bool:
    return isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == 2 and not x.is_floating_point()
