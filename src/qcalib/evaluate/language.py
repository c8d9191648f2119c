"""Perplexity of a causal language model on held-out text.

Protocol (design.md §7; the GPTQ / HF ``stride = seq_len`` convention): the held-out
documents in ``chunk`` layout, i.e. non-overlapping windows of ``seq_len`` tokens, each
scored on its own (no context carried across windows). In a window, token ``t + 1`` is
predicted from tokens ``<= t``, so a full window scores ``seq_len - 1`` tokens; a pair
counts only when both the context token and the target are valid under the attention
mask (padding never scores). The result is ``exp`` of the token-weighted mean negative
log-likelihood over every scored token of every window (not a mean of per-window
perplexities); log-probabilities and their sum are float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from qcalib.data.pool import Pool
from qcalib.data.tokens import unpack_tokens
from qcalib.errors import QCalibError

# Elements of the float64 logits block scored at once (128 MB): float32 log-softmax would
# carry ~1e-7 relative error into every token, float64 keeps a uniform model at exactly V.
_BLOCK_ELEMS = 1 << 24
# Logits one forward may return (1 GiB of float32): a batch is forwarded in as many
# windows at a time as fit. The batch size alone cannot bound them: 500 windows of 512
# tokens over SmolLM2's 49,152-word vocabulary are 50 GB of logits.
_LOGITS_ELEMS = 1 << 28
# Tokens one forward may carry (32 windows of 512): activations and, with eager attention,
# the B x heads x L x L score matrices grow with it, whatever --eval-batch-size says.
FORWARD_TOKENS = 1 << 14


def token_budget_split(
    batches: Iterator[Tensor], max_tokens: int | None = None
) -> Iterator[Tensor]:
    """Each ``[B, 2, L]`` batch in pieces of at most ``max_tokens`` tokens (default
    ``FORWARD_TOKENS``; at least one window each)."""
    budget = FORWARD_TOKENS if max_tokens is None else max_tokens
    for x in batches:
        yield from torch.split(x, max(1, budget // x.shape[-1]))


def _nll_sum(logits: Tensor, target: Tensor) -> Tensor:
    """Sum of ``-log softmax(logits)[target]`` over rows, in float64 and in row blocks."""
    rows = max(1, _BLOCK_ELEMS // max(1, logits.shape[-1]))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for r0 in range(0, logits.shape[0], rows):
        block = F.log_softmax(logits[r0 : r0 + rows].double(), dim=-1)
        total -= block.gather(1, target[r0 : r0 + rows, None]).sum()
    return total


def _batches(data: Pool | Dataset | Tensor, batch_size: int) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        yield from torch.split(data, batch_size)
    elif isinstance(data, Pool):
        for _, x in data.batches(batch_size):
            yield x
    else:
        yield from DataLoader(data, batch_size=batch_size, shuffle=False)


def token_batches(
    data: Pool | Dataset | Tensor, batch_size: int, desc: str | None = None
) -> Iterator[Tensor]:
    """``[B, 2, L]`` batches of a text pool, a dataset of ``[2, L]`` samples or one tensor;
    behind a progress bar named ``desc`` when one is given."""
    if desc is None:
        return _batches(data, batch_size)
    n = data.shape[0] if isinstance(data, Tensor) else len(data)  # type: ignore[arg-type]
    return tqdm(_batches(data, batch_size), total=-(-n // batch_size), desc=desc, leave=False)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data: Pool | Dataset | Tensor,
    batch_size: int = 8,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """``(perplexity, number of tokens scored)`` of ``model`` (``x [B, 2, L] -> logits
    [B, L, V]``) on packed text ``data`` (see the module notes)."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    rows = 1  # windows per forward: one until the vocabulary size is known
    batches = token_batches(data, batch_size, "perplexity" if progress else None)
    for batch in batches:
        start = 0
        while start < batch.shape[0]:
            x = batch[start : start + rows].to(device)
            start += x.shape[0]
            ids, mask = unpack_tokens(x)
            logits = model(x)
            if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                raise QCalibError(
                    f"perplexity needs next-token logits [B, L, V] for input ids "
                    f"{tuple(ids.shape)}, got {tuple(logits.shape)}; use a causal LM "
                    "(HFCausalLM), not an encoder"
                )
            length, vocab = logits.shape[1], logits.shape[2]
            rows = max(1, min(_LOGITS_ELEMS // (length * vocab), FORWARD_TOKENS // length))
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            target = ids[:, 1:][valid]
            scored = logits[:, :-1][valid]
            nll += _nll_sum(scored, target).cpu()
            count += int(target.numel())
            del logits, scored
    if count == 0:
        raise QCalibError(
            "no token was scored for perplexity (empty evaluation set or sequences of one "
            "token); give more held-out text or a larger --seq-len"
        )
    return math.exp(float(nll) / count), count
