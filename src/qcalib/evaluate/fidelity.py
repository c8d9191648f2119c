"""Fidelity of a quantized model to its full-precision original.

``embedding_cosine``: for encoders (``x [B, 2, L] -> [B, H]``, mean-pooled embeddings,
:class:`qcalib.zoo.hf.HFEncoder`), the cosine similarity of the quantized and the FP
embedding of each sample, averaged over the samples (each sample weighs the same,
whatever its length). 1.0 means the quantized model preserves every embedding's
direction; the FP model against itself is 1.0 by definition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from qcalib.data.pool import Pool
from qcalib.errors import QCalibError
from qcalib.evaluate.language import token_batches, token_budget_split


def paired_outputs(
    model_fp: nn.Module,
    model_q: nn.Module,
    batches: Iterable[Tensor],
    device: torch.device | str,
    need: str,
    fix: str,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(FP output, quantized output)`` per batch, both models in eval mode; outputs that
    are not one ``[B, D]`` row per input, alike in shape, raise ``"{need} from both
    models, got ...; {fix}"``."""
    model_fp.eval()
    model_q.eval()
    for x in batches:
        x = x.to(device)
        ref, out = model_fp(x), model_q(x)
        if ref.dim() != 2 or ref.shape != out.shape:
            raise QCalibError(
                f"{need} from both models, got {tuple(ref.shape)} and {tuple(out.shape)}; {fix}"
            )
        yield ref, out


@torch.no_grad()
def embedding_cosine(
    model_fp: nn.Module,
    model_q: nn.Module,
    data: Pool | Dataset | Tensor,
    batch_size: int = 32,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> float:
    """Mean cosine similarity of ``model_q``'s and ``model_fp``'s embeddings on ``data``."""
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    batches = token_budget_split(
        token_batches(data, batch_size, "embedding cosine" if progress else None)
    )
    for ref, out in paired_outputs(
        model_fp, model_q, batches, device,
        "embedding_cosine needs [B, H] embeddings", "use an encoder (HFEncoder)",
    ):  # fmt: skip
        total += F.cosine_similarity(out.double(), ref.double(), dim=1).sum().cpu()
        n += ref.shape[0]
    if n == 0:
        raise QCalibError("the evaluation set is empty; give more held-out text")
    return float(total) / n
