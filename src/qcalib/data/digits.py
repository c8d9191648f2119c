"""scikit-learn's bundled handwritten digits: a tiny real dataset that needs no download.

``load_digits`` ships inside scikit-learn (1797 8x8 images, 16 gray levels), so it works
offline and in CI where Fashion-MNIST may be absent. It has no official train/test split,
so we make one with a seeded permutation: the same seed always gives the same split, on
every machine, which keeps calibration/evaluation results comparable across runs.
"""

from __future__ import annotations

import numpy as np
import torch

from qcalib.data.pool import TensorImageDataset
from qcalib.errors import QCalibError

NUM_CLASSES = 10
#: Fraction held out for the test split, and the permutation seed that defines it.
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_SPLITS = ("train", "test")


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 ``[N, 8, 8]`` in 0..255, and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise QCalibError(
            "the 'digits' dataset comes from scikit-learn, which is not installed; "
            "run `pip install scikit-learn`"
        ) from None
    bunch = sk_load_digits()
    # Pixel values are counts 0..16; map them onto the full uint8 range so the usual
    # x/255 normalization of TensorImageDataset applies unchanged.
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    return images.astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)


def split_indices(
    n: int, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint ``(train, test)`` index arrays covering ``range(n)``.

    numpy's ``default_rng`` (PCG64) is used because its stream is stable across numpy
    versions, unlike the legacy global ``np.random`` state.
    """
    if not 0.0 < test_fraction < 1.0:
        raise QCalibError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_digits(
    split: str = "train", test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> TensorImageDataset:
    """The ``train`` or ``test`` part of the digits as 1-channel 8x8 uint8 images.

    Mean and std come from the train part only, for both splits, so no statistic of the
    test images leaks into the preprocessing.
    """
    if split not in _SPLITS:
        raise QCalibError(f"unknown split {split!r} for digits; use 'train' or 'test'")
    images, labels = _raw_digits()
    train_idx, test_idx = split_indices(len(images), test_fraction, seed)
    train_pixels = images[train_idx].astype(np.float64) / 255.0
    mean, std = (float(train_pixels.mean()),), (float(train_pixels.std()),)
    idx = train_idx if split == "train" else test_idx
    return TensorImageDataset(
        torch.from_numpy(images[idx].copy()).unsqueeze(1),
        torch.from_numpy(labels[idx].copy()),
        mean,
        std,
    )
