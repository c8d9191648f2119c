"""Datasets and calibration pools; :func:`load_dataset` / :func:`load_pool` take a spec string.

Optional dependencies (scikit-learn for ``digits``, Pillow/torchvision for image files)
are imported only when the dataset that needs them is loaded.
"""

from qcalib.data.digits import load_digits
from qcalib.data.fashion_mnist import load_fashion_mnist
from qcalib.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageFileList,
    ImageFolder,
)
from qcalib.data.pool import Pool, TensorImageDataset, iterate_labeled
from qcalib.data.registry import SPECS, load_dataset, load_pool

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPECS",
    "EvalTransform",
    "ImageFileList",
    "ImageFolder",
    "Pool",
    "TensorImageDataset",
    "iterate_labeled",
    "load_digits",
    "load_dataset",
    "load_fashion_mnist",
    "load_pool",
]
