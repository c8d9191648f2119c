"""Label-free fidelity of a quantized classifier, and top-k accuracy.

Without a labeled test set, a user can still measure how far quantization moved a
classifier: over a fixed set of inputs (e.g. :class:`qcalib.data.views.ImageViews` of
photos kept out of calibration),

* **top-1 agreement**: the share (percent) of inputs whose quantized arg-max class is the
  FP model's;
* **mean KL(FP || quantized)**: ``sum_c p_c (log p_c - log q_c)`` of the two softmax
  distributions, in nats, averaged over the inputs (each input weighs the same). It is 0
  exactly when the distributions match and, unlike agreement, sees changes of confidence
  and of the runner-up classes.

Both are computed in float64 from ``log_softmax`` of the logits (stable for large logits).
Arg-max ties are broken by ``torch.argmax`` (the first maximal class) for both models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from qcalib.errors import QCalibError
from qcalib.evaluate.fidelity import paired_outputs


@dataclass(frozen=True)
class Agreement:
    """Fidelity of a quantized classifier to its FP original on ``num_inputs`` inputs."""

    top1_agreement: float  # percent
    mean_kl: float  # nats, KL(FP || quantized)
    num_inputs: int


def _inputs(dataset: Dataset | torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(dataset, torch.Tensor):
        yield from dataset.split(batch_size)
        return
    for item in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield item[0] if isinstance(item, (tuple, list)) else item


def kl_divergence(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(fp) || softmax(q)) in nats, float64."""
    log_p = F.log_softmax(fp_logits.double(), dim=-1)
    log_q = F.log_softmax(q_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def agreement_and_kl(
    fp_model: nn.Module,
    q_model: nn.Module,
    dataset: Dataset | torch.Tensor,
    batch_size: int = 32,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> Agreement:
    """Top-1 agreement and mean KL(FP || quantized) of two classifiers on ``dataset``
    (inputs, or ``(input, label)`` pairs whose labels are ignored, or one input tensor)."""
    agree, kl_sum, n = 0, 0.0, 0
    batches = _inputs(dataset, batch_size)
    if progress:
        batches = tqdm(batches, total=-(-len(dataset) // batch_size), desc="agreement",
                       leave=False)  # fmt: skip
    for ref, out in paired_outputs(
        fp_model, q_model, batches, device,
        "agreement needs [B, classes] logits", "compare two classifiers",
    ):  # fmt: skip
        agree += int((ref.argmax(1) == out.argmax(1)).sum())
        kl_sum += float(kl_divergence(ref, out).sum())
        n += ref.shape[0]
    if n == 0:
        raise QCalibError("the agreement set is empty; give at least one input")
    return Agreement(100.0 * agree / n, kl_sum / n, n)


@torch.no_grad()
def topk_accuracy(
    model: nn.Module,
    dataset: Dataset,
    ks: Sequence[int] = (1, 5),
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> dict[int, float]:
    """``{k: percent of (input, label) pairs whose label is among the k top classes}``."""
    model.eval()
    hits = dict.fromkeys(ks, 0)
    n = 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = model(x.to(device)).cpu()
        top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
        y = torch.as_tensor(y)
        for k in ks:
            hits[k] += int((top[:, :k] == y[:, None]).any(1).sum())
        n += y.numel()
    if n == 0:
        raise QCalibError("the labeled set is empty; give at least one labeled image")
    return {k: 100.0 * h / n for k, h in hits.items()}
