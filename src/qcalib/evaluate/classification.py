"""Top-1 accuracy of a classifier on a labeled dataset."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from tqdm import tqdm

from qcalib.data.pool import iterate_labeled


@torch.no_grad()
def accuracy(
    model: nn.Module,
    dataset,  # noqa: ANN001
    batch_size: int = 500,
    progress: bool = False,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
) -> float:
    """Top-1 accuracy in percent.

    Image batches run channels-last by default: oneDNN's convolutions (depthwise ones
    above all) are 1.5-3x faster that way on CPU, and the logits are unchanged up to float
    rounding. The model's 4-D tensors are put back in their own layout afterwards: a model
    left channels-last would make the next calibration of it (a run quantizes a copy)
    round its reductions differently from the first, and one process's runs would differ.
    """
    model.eval()
    # Exact strides, not is_contiguous(): a [O, 1, k, k] weight is "contiguous" in both
    # layouts, yet oneDNN picks its output layout from the strides.
    strides = []
    if channels_last:
        strides = [(t, t.stride()) for t in itertools.chain(model.parameters(), model.buffers())
                   if t.dim() == 4]  # fmt: skip
        model.to(memory_format=torch.channels_last)
    try:
        correct = total = 0
        batches = iterate_labeled(dataset, batch_size)
        if progress:
            batches = tqdm(batches, total=-(-len(dataset) // batch_size), desc="eval", leave=False)
        for x, y in batches:
            x = x.to(device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            pred = model(x).argmax(1).cpu()
            correct += (pred == y).sum().item()
            total += y.numel()
    finally:
        for t, stride in strides:
            if t.stride() != stride:
                back = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
                t.data = back.copy_(t)
    return 100.0 * correct / total
