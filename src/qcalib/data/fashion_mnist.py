"""Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist`` package)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from qcalib.data.pool import TensorImageDataset
from qcalib.errors import QCalibError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = (0.2860,), (0.3530,)
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic ``00 00 dtype ndim``, big-endian dims.

    A damaged file (bad gzip stream, short header, missing or extra bytes) is a
    :class:`QCalibError` naming the file and what is wrong."""
    fix = "reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) or fix --data-root"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise QCalibError(f"{path} is not a complete gzip file ({e}); {fix}") from None
    except OSError as e:
        raise QCalibError(f"cannot read {path} ({e.strerror or e}); {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise QCalibError(f"{path} is not an IDX file (bad magic number); {fix}")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise QCalibError(
            f"{path} is truncated: its header needs {header} bytes, the file has {len(raw)}; {fix}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    itemsize = np.dtype(_DTYPES[raw[2]]).itemsize
    expected = int(np.prod(dims)) * itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise QCalibError(
            f"{path} is {what}: dims {tuple(dims)} need {expected} data bytes, the file has "
            f"{len(raw) - header}; {fix}"
        )
    return np.frombuffer(raw, dtype=_DTYPES[raw[2]], offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise QCalibError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install it with "
        "`apt-get install -y dataset-fashion-mnist` or pass --data-root DIR"
    )


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> TensorImageDataset:
    if split not in _FILES:
        raise QCalibError(f"unknown split {split!r}; use 'train' or 'test'")
    root = Path(root) if root is not None else DEFAULT_ROOT
    img_stem, lbl_stem = _FILES[split]
    images = torch.from_numpy(read_idx(_find(root, img_stem)).copy())
    labels = torch.from_numpy(read_idx(_find(root, lbl_stem)).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise QCalibError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return TensorImageDataset(images, labels, MEAN, STD)
