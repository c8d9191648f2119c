"""Image files on disk: ImageNet-style class folders, flat unlabeled folders, file lists.

Images are decoded on access, so a 50k-image ImageNet split streams from disk instead of
sitting in memory. Every image goes through the standard *evaluation* transform that
ImageNet classifiers are trained to expect (resize the shorter side to 256, center-crop
224, scale to [0, 1], normalize with the ImageNet mean/std); calibrating on inputs
preprocessed differently from evaluation would calibrate the wrong activation ranges.

Pillow and torchvision are optional dependencies of qcalib. Pillow is required here (it
decodes the files); torchvision is used for the transform when present, and otherwise a
small PIL + torch implementation reproduces torchvision's arithmetic (same output size
rounding, same PIL bilinear resampling, same crop anchor and zero padding), so results do
not depend on whether torchvision happens to be installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from qcalib.errors import QCalibError

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Recognized image file extensions (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_BACKENDS = ("auto", "torchvision", "pil")


def _require_pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise QCalibError(
            "reading image files needs Pillow, which is not installed; run `pip install pillow`"
        ) from None
    return Image


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMG_EXTENSIONS)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` after resizing the shorter side to ``size``, keeping the aspect ratio.

    Mirrors torchvision's rounding (the long side is truncated, not rounded) so both
    transform backends produce identically sized images.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    """``(top, left)`` of a ``crop``-square centered in an image at least that large.

    ``round`` (banker's rounding) matches torchvision, so odd margins resolve the same way.
    """
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


class EvalTransform:
    """PIL image -> normalized float tensor ``[C, crop, crop]``.

    ``resize`` / ``crop`` may be ``None`` to skip that step (then images of different
    sizes cannot be batched together). ``mode`` is the PIL mode images are converted to:
    ``"RGB"`` (grayscale files become 3 identical channels, as ImageNet models expect) or
    ``"L"`` for 1-channel models; ``mean``/``std`` need one entry per channel.
    ``backend``: ``"auto"`` uses torchvision.transforms.v2 when importable, ``"pil"``
    forces the built-in fallback, ``"torchvision"`` requires torchvision.
    """

    def __init__(
        self,
        resize: int | None = 256,
        crop: int | None = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        mode: str = "RGB",
        backend: str = "auto",
    ) -> None:
        if backend not in _BACKENDS:
            raise QCalibError(f"unknown transform backend {backend!r}; use one of {_BACKENDS}")
        channels = {"RGB": 3, "L": 1}.get(mode)
        if channels is None:
            raise QCalibError(f"unsupported image mode {mode!r}; use 'RGB' or 'L'")
        if len(mean) != channels or len(std) != channels:
            raise QCalibError(
                f"mode {mode!r} has {channels} channel(s) but mean/std have "
                f"{len(mean)}/{len(std)} entries; give one value per channel"
            )
        if any(s <= 0 for s in std):
            raise QCalibError(f"std must be positive, got {tuple(std)}")
        for name, value in (("resize", resize), ("crop", crop)):
            if value is not None and value <= 0:
                raise QCalibError(f"{name} must be a positive number of pixels, got {value}")
        self.resize, self.crop, self.mode = resize, crop, mode
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._tv = None if backend == "pil" else self._build_torchvision(required=backend != "auto")
        self.backend = "pil" if self._tv is None else "torchvision"
        self._mean_t = torch.tensor(self.mean).view(-1, 1, 1)
        self._std_t = torch.tensor(self.std).view(-1, 1, 1)

    def _build_torchvision(self, required: bool) -> Any:
        try:
            from torchvision.transforms import v2
        except ImportError:
            if required:
                raise QCalibError(
                    "transform backend 'torchvision' requested but torchvision is not "
                    "installed; run `pip install torchvision` or use backend='pil'"
                ) from None
            return None
        steps: list[Any] = []
        if self.resize is not None:
            # Applied to the PIL image (PIL bilinear with antialiasing), exactly as
            # torchvision's own ImageClassification eval preset does.
            steps.append(v2.Resize(self.resize, interpolation=v2.InterpolationMode.BILINEAR))
        if self.crop is not None:
            steps.append(v2.CenterCrop(self.crop))
        steps += [
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(self.mean), list(self.std)),
        ]
        return v2.Compose(steps)

    def __call__(self, image: Image) -> torch.Tensor:
        image = image.convert(self.mode)
        if self._tv is not None:
            return self._tv(image).as_subclass(torch.Tensor)
        return self._pil(image)

    def _pil(self, image: Image) -> torch.Tensor:
        Image = _require_pil()
        if self.resize is not None:
            new_h, new_w = resized_size(image.height, image.width, self.resize)
            if (new_h, new_w) != (image.height, image.width):
                image = image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
        if self.crop is not None:
            c = self.crop
            if c > image.height or c > image.width:
                # Zero-pad up to the crop size first, left/top getting the smaller half.
                pad_l = (c - image.width) // 2 if c > image.width else 0
                pad_t = (c - image.height) // 2 if c > image.height else 0
                canvas = Image.new(image.mode, (max(c, image.width), max(c, image.height)), color=0)
                canvas.paste(image, (pad_l, pad_t))
                image = canvas
            top, left = center_crop_box(image.height, image.width, c)
            image = image.crop((left, top, left + c, top + c))
        arr = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(arr.copy())
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        return (x.float() / 255.0 - self._mean_t) / self._std_t

    def __repr__(self) -> str:
        return (
            f"EvalTransform(resize={self.resize}, crop={self.crop}, mean={self.mean}, "
            f"std={self.std}, mode={self.mode!r}, backend={self.backend!r})"
        )


def open_image(path: Path) -> Image:
    """Decode an image fully, turning any decoder failure into an error naming the file.

    PIL opens lazily and may only fail on ``load()`` (a truncated JPEG), so we force the
    decode here rather than deep inside a DataLoader worker.
    """
    Image = _require_pil()
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy() if img.mode != "P" else img.convert("RGBA")
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise QCalibError(
            f"cannot read image {path}: {e}; delete or replace the file (or remove it "
            "from the list), or pass --unreadable-images skip"
        ) from None


UNREADABLE_CHOICES = ("error", "skip")


def readable_images(paths: Sequence[Path], where: str) -> list[int]:
    """Positions in ``paths`` of the files that decode; the others are logged with a count.

    Decodes every file once (the cost of ``unreadable="skip"``), so that what is left
    never fails mid-run."""
    from tqdm import tqdm

    keep, bad = [], []
    for i, path in enumerate(tqdm(paths, desc="checking images", leave=False)):
        try:
            open_image(path)
            keep.append(i)
        except QCalibError as e:
            bad.append((path, e))
    if bad:
        log.warning("%s: skipped %d unreadable image(s) of %d, e.g. %s", where, len(bad),
                    len(paths), bad[0][1])  # fmt: skip
    if not keep:
        raise QCalibError(
            f"{where}: none of its {len(paths)} image(s) can be read, e.g. {bad[0][1]}"
        )
    return keep


class _ImageFiles(Dataset):
    """Shared on-demand decoding for the folder and list datasets.

    ``unreadable``: ``"error"`` (default) decodes lazily and stops at the first file that
    does not decode, naming it; ``"skip"`` decodes every file once up front and leaves the
    unreadable ones out, logging how many (CLI ``--unreadable-images``).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: torch.Tensor | None,
        transform: EvalTransform | None,
        unreadable: str = "error",
        where: str = "",
    ) -> None:
        if unreadable not in UNREADABLE_CHOICES:
            raise QCalibError(
                f"--unreadable-images must be one of {', '.join(UNREADABLE_CHOICES)}, got "
                f"{unreadable!r}"
            )
        paths = list(paths)
        self.skipped = 0  # unreadable files left out
        if unreadable == "skip":
            keep = readable_images(paths, where or "image files")
            labels = labels[keep] if labels is not None else None
            self.skipped = len(paths) - len(keep)
            paths = [paths[i] for i in keep]
        self.paths = paths
        self.labels = labels
        self.transform = transform if transform is not None else EvalTransform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):  # noqa: ANN204
        x = self.transform(open_image(self.paths[i]))
        if self.labels is None:
            return x
        return x, int(self.labels[i])


def find_classes(root: Path) -> list[str]:
    """Sorted names of ``root``'s non-hidden sub-directories: the class list, index order.

    Only directory names are read (no walk), so asking an ImageNet train folder for its
    classes is cheap.
    """
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(directory: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in directory.iterdir() if p.is_file() and is_image_file(p.name))
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        found += [Path(dirpath) / f for f in sorted(filenames) if is_image_file(f)]
    return found


class ImageFolder(_ImageFiles):
    """A directory of images, labeled by class sub-directory or unlabeled when flat.

    Layouts:

    * ``root/<class>/**/<image>``: labeled; classes are the sorted sub-directory names
      (or ``classes`` when given) and a label is the class's index. Empty class
      directories keep their index, so labels stay aligned with the model's outputs.
    * ``root/<image>``: unlabeled (``labels`` is ``None``), e.g. a flat ImageNet val dump
      or a user's own calibration photos.

    A mixture of both is refused rather than guessed at. Pass ``classes`` (e.g. from the
    train folder) to a val folder that lacks some class directories, so that its labels
    use the same indices.
    """

    def __init__(
        self,
        root: str | Path,
        transform: EvalTransform | None = None,
        classes: Sequence[str] | None = None,
        unreadable: str = "error",
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise QCalibError(f"image folder {root} does not exist or is not a directory")
        subdirs = find_classes(root)
        per_class = {name: _images_in(root / name, recursive=True) for name in subdirs}
        loose = _images_in(root, recursive=False)
        has_class_images = any(per_class.values())
        if has_class_images and loose:
            raise QCalibError(
                f"{root} has both class sub-directories and {len(loose)} loose image(s) such "
                f"as {loose[0].name}; move the loose images into a class directory (labeled) "
                "or into their own folder (unlabeled)"
            )
        if not has_class_images and not loose:
            raise QCalibError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) found in {root} or its class "
                "sub-directories; point at a folder of images"
            )
        if not has_class_images:
            self.classes: list[str] | None = None
            super().__init__(loose, None, transform, unreadable, str(root))
            return
        self.classes = list(classes) if classes is not None else subdirs
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in subdirs if per_class[name] and name not in index]
        if unknown:
            raise QCalibError(
                f"{root} has class directories not among the {len(self.classes)} known "
                f"classes, e.g. {unknown[0]!r}; use the same class names as the train folder"
            )
        empty = [name for name in subdirs if not per_class[name]]
        if empty:
            log.warning(
                "%s: %d class directories hold no images, e.g. %s", root, len(empty), empty[0]
            )
        paths, labels = [], []
        for name in subdirs:
            paths += per_class[name]
            labels += [index[name]] * len(per_class[name])
        super().__init__(paths, torch.tensor(labels, dtype=torch.int64), transform, unreadable,
                         str(root))  # fmt: skip


class ImageFileList(_ImageFiles):
    """Unlabeled images named in a text file, one path per line.

    Blank lines and lines starting with ``#`` are skipped; a whole line is one path (paths
    may contain spaces). Relative paths are resolved against the list file's directory, so
    a list shipped beside its images works from any working directory. Every listed file
    is checked up front, so a typo fails now rather than halfway through calibration.
    """

    def __init__(
        self,
        list_file: str | Path,
        transform: EvalTransform | None = None,
        unreadable: str = "error",
    ) -> None:
        list_file = Path(list_file)
        if not list_file.is_file():
            raise QCalibError(f"image list {list_file} does not exist; give a text file of paths")
        base = list_file.parent
        paths = []
        for raw in list_file.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            paths.append(p if p.is_absolute() else base / p)
        if not paths:
            raise QCalibError(f"image list {list_file} names no images; add one path per line")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise QCalibError(
                f"{len(missing)} file(s) named in {list_file} do not exist, e.g. {missing[0]}; "
                "fix the paths (relative ones are relative to the list file)"
            )
        super().__init__(paths, None, transform, unreadable, str(list_file))
