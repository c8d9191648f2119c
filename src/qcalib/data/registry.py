"""Dataset specs: one string names where calibration and evaluation data come from.

The CLI and configs carry a single ``--data SPEC`` string instead of per-dataset flags:

* ``fashion-mnist``      Fashion-MNIST IDX files (``root`` overrides their directory)
* ``digits``             scikit-learn's bundled 8x8 digits (no download needed)
* ``imagefolder:PATH``   ImageNet-style folders; ``train`` reads ``PATH/train`` (or ``PATH``
  itself when it has no train/val/test sub-folders), ``test``/``val`` read ``PATH/val`` or
  ``PATH/test``. ``imagefolder`` alone takes PATH from ``root``.
* ``files:LISTFILE``     a text file of image paths: an unlabeled calibration pool only.
* ``text:PATH``          documents (``.txt`` / ``.jsonl`` / ``.json`` / a folder of ``.txt``)
  tokenized by the model's tokenizer (:mod:`qcalib.data.text`); ``train`` is the
  calibration pool, ``test``/``val`` the held-out documents. Needs ``tokenizer=``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from qcalib.data.pool import Pool
from qcalib.errors import QCalibError

if TYPE_CHECKING:
    from qcalib.config import TextConfig
    from qcalib.data.imagefolder import EvalTransform

SPECS = ("fashion-mnist", "digits", "imagefolder:PATH", "files:LISTFILE", "text:PATH")
_TRAIN, _EVAL = ("train",), ("test", "val")


def _check_split(split: str) -> str:
    if split not in _TRAIN + _EVAL:
        raise QCalibError(f"unknown split {split!r}; use 'train', 'test' or 'val'")
    return split


def _imagefolder_dir(path: Path, split: str) -> tuple[Path, Path | None]:
    """The folder for ``split``, plus the train folder whose class list labels must share."""
    if not path.is_dir():
        raise QCalibError(f"image folder {path} does not exist or is not a directory")
    train = path / "train"
    evals = [path / name for name in ("val", "test") if (path / name).is_dir()]
    if split in _TRAIN:
        if train.is_dir():
            return train, None
        if evals:
            # Without this check PATH itself would be read with 'val' as one of its classes.
            raise QCalibError(
                f"{path} has {evals[0].name}/ but no train/ folder; add {train} or use "
                "split 'val'/'test'"
            )
        return path, None
    if not evals:
        raise QCalibError(
            f"no evaluation folder for {path}: expected {path / 'val'} or {path / 'test'}"
        )
    return evals[0], (train if train.is_dir() else None)


def is_text_spec(spec: str) -> bool:
    return spec.partition(":")[0] == "text"


def _load(
    spec: str,
    split: str,
    root: str | None,
    transform: EvalTransform | None,
    tokenizer: object = None,
    text: TextConfig | None = None,
    unreadable: str = "error",
) -> Dataset:
    kind, sep, arg = spec.partition(":")
    if kind == "text":
        from qcalib.data.text import load_text_pool

        if not arg:
            raise QCalibError("text needs a file or folder: use text:PATH")
        pool = load_text_pool(arg, tokenizer, text, "train" if split in _TRAIN else "test")
        return pool.dataset
    if kind == "fashion-mnist" and not sep:
        from qcalib.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist("train" if split in _TRAIN else "test", root)
    if kind == "digits" and not sep:
        from qcalib.data.digits import load_digits

        return load_digits("train" if split in _TRAIN else "test")
    if kind == "imagefolder":
        from qcalib.data.imagefolder import ImageFolder, find_classes

        if not arg and root is None:
            raise QCalibError("imagefolder needs a directory: use imagefolder:PATH")
        directory, train_dir = _imagefolder_dir(Path(arg or str(root)).expanduser(), split)
        classes = find_classes(train_dir) if train_dir is not None else None
        return ImageFolder(directory, transform, classes=classes, unreadable=unreadable)
    if kind == "files":
        from qcalib.data.imagefolder import ImageFileList

        if not arg:
            raise QCalibError("files needs a list file: use files:LISTFILE")
        return ImageFileList(Path(arg).expanduser(), transform, unreadable=unreadable)
    raise QCalibError(f"unknown dataset {spec!r}; choose one of: {', '.join(SPECS)}")


def load_dataset(
    spec: str,
    split: str,
    root: str | None = None,
    *,
    transform: EvalTransform | None = None,
    tokenizer: object = None,
    text: TextConfig | None = None,
    unreadable: str = "error",
) -> Dataset:
    """The ``split`` of the dataset named by ``spec`` (see module docstring).

    ``test``/``val`` splits are for evaluation and must be labeled: an unlabeled
    ``files:`` list or flat folder is refused here (use :func:`load_pool` for those).
    ``root`` is the data directory for ``fashion-mnist`` and the folder for a bare
    ``imagefolder``; ``transform`` (an :class:`~qcalib.data.imagefolder.EvalTransform`)
    overrides the ImageNet eval preprocessing of image-file datasets. ``text:`` specs need
    the model's ``tokenizer`` and a ``TextConfig`` (``text``, default ``TextConfig()``);
    their evaluation split is unlabeled text (language-model metrics need no labels).
    ``unreadable`` (``"error"`` / ``"skip"``): what image-file datasets do with files that
    do not decode (:class:`~qcalib.data.imagefolder.ImageFolder`).
    """
    split = _check_split(split)
    dataset = _load(spec, split, root, transform, tokenizer, text, unreadable)
    if is_text_spec(spec):
        return dataset
    if split in _EVAL and getattr(dataset, "labels", None) is None:
        raise QCalibError(
            f"the {split} split of {spec} has no labels, so it cannot be evaluated on; "
            "name labeled data with --eval-data SPEC (a folder with one sub-directory per "
            "class, e.g. imagefolder:PATH, whose val/ is read) or skip evaluation with "
            "--eval-data none"
        )
    return dataset


def load_pool(
    spec: str,
    root: str | None = None,
    split: str = "train",
    *,
    transform: EvalTransform | None = None,
    tokenizer: object = None,
    text: TextConfig | None = None,
    unreadable: str = "error",
) -> Pool:
    """A calibration :class:`Pool` over the ``split`` of ``spec``; labels are optional.

    Labels are carried along when the dataset has them (class-balanced selection
    baselines use them); calibration itself never reads them. A ``files:`` list is the
    same pool whatever the split. ``text:`` specs need ``tokenizer`` (and ``text``).
    """
    dataset = _load(spec, _check_split(split), root, transform, tokenizer, text, unreadable)
    return Pool(dataset, name=spec, labels=getattr(dataset, "labels", None))
