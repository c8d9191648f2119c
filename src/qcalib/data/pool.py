"""Unlabeled calibration pools and labeled evaluation sets.

A *pool* is what selection and calibration draw from: indexable, possibly far larger
than memory, labels optional (only class-balanced baselines use them). Anything that
is a ``torch.utils.data.Dataset`` of images, or of ``(image, label)`` pairs, becomes a
pool; items are fetched on demand, so an ImageNet folder streams from disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from qcalib.errors import QCalibError


class TensorImageDataset(Dataset):
    """Images held as uint8 ``[N, C, H, W]``, normalized on access (4x less memory)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dtype != torch.uint8:
            raise TypeError("TensorImageDataset expects uint8 images")
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std

    def __getitem__(self, i: int):  # noqa: ANN204
        x = self.normalize(self.images[i])
        if self.labels is None:
            return x
        return x, int(self.labels[i])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectorized fetch: much faster than a DataLoader for in-memory tensors."""
        x = (self.images[indices].float() / 255.0 - self.mean) / self.std
        y = None if self.labels is None else self.labels[indices]
        return x, y


def _split_item(item):  # noqa: ANN001, ANN202
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


class Pool:
    """An unlabeled pool of inputs, addressed by integer index.

    ``labels`` are kept when the dataset has them (class-balanced selection uses them);
    calibration never sees them.
    """

    def __init__(
        self,
        dataset: Dataset,
        name: str = "pool",
        labels: torch.Tensor | None = None,
        num_workers: int = 0,
    ) -> None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise QCalibError(f"the pool {name!r} is empty; point --data at a non-empty dataset")
        self.dataset = dataset
        self.name = name
        self.num_workers = num_workers
        if labels is None and isinstance(dataset, TensorImageDataset):
            labels = dataset.labels
        self.labels = labels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(
        self, batch_size: int = 256, indices: Sequence[int] | torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(indices, inputs)`` in index order, ``batch_size`` at a time."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices).long()
        if isinstance(self.dataset, TensorImageDataset):
            for start in range(0, idx.numel(), batch_size):
                chunk = idx[start : start + batch_size]
                yield chunk, self.dataset.batch(chunk)[0]
            return
        loader = DataLoader(
            Subset(self.dataset, idx.tolist()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
        start = 0
        for item in loader:
            x, _ = _split_item(item)
            yield idx[start : start + x.shape[0]], x
            start += x.shape[0]

    def get(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The inputs at ``indices`` stacked into one tensor."""
        idx = torch.as_tensor(indices).long()
        if idx.numel() == 0:
            raise QCalibError("no indices given; select at least one calibration sample")
        if int(idx.max()) >= len(self) or int(idx.min()) < 0:
            raise QCalibError(f"index out of range for pool {self.name!r} of size {len(self)}")
        return torch.cat([x for _, x in self.batches(len(idx) or 1, idx)])

    def example(self) -> torch.Tensor:
        """One input with a batch dimension, for tracing layer order."""
        return self.get([0])


def iterate_labeled(
    dataset: Dataset, batch_size: int = 512, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, labels)`` batches of a labeled evaluation set in order."""
    if isinstance(dataset, TensorImageDataset):
        n = len(dataset)
        for start in range(0, n, batch_size):
            x, y = dataset.batch(torch.arange(start, min(n, start + batch_size)))
            assert y is not None
            yield x, y
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for x, y in loader:
        yield x, torch.as_tensor(y)
