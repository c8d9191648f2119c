"""A fixed, seeded set of views (crops and flips) of a few photos, for label-free evaluation.

With a handful of photos and no labeled test set, a quantized model is judged on how it
agrees with its FP original over many views of held-out photos
(:mod:`qcalib.evaluate.agreement`). The same views also make a calibration pool out of a
few photos.

Choices: view 0 of each photo is the plain evaluation preprocessing (the preset's resize +
center crop); every other view is a square crop whose area is a uniform share in
``[min_area, 1]`` of the photo's largest centered square, at a uniform position, flipped
left-right with probability 1/2, then resized to the preset's crop size (bilinear) and
normalized with the preset's mean / std. Crop boxes are drawn once, as fractions of the
photo, from ``seed`` at construction: the set of views is a pure function of
``(paths, views, seed, min_area)``, so every model of a comparison sees the same inputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from qcalib.data.imagefolder import EvalTransform, open_image
from qcalib.errors import QCalibError


class ImageViews(Dataset):
    """``len(paths) * views`` inputs; item ``i`` is view ``i % views`` of photo
    ``i // views``, with that photo's label when ``labels`` are given."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: EvalTransform,
        views: int = 8,
        seed: int = 0,
        min_area: float = 0.35,
        labels: Sequence[int] | None = None,
    ) -> None:
        if views < 1:
            raise QCalibError(f"views must be at least 1, got {views}")
        if not 0.0 < min_area <= 1.0:
            raise QCalibError(f"min_area must be in (0, 1], got {min_area}")
        if not paths:
            raise QCalibError("no photos given for the views; give at least one image file")
        if labels is not None and len(labels) != len(paths):
            raise QCalibError(f"{len(labels)} labels for {len(paths)} photos; give one each")
        if transform.crop is None:
            raise QCalibError("views need a transform with a crop size (e.g. crop=224)")
        self.paths = [Path(p) for p in paths]
        self.views = views
        self.center = transform
        size = transform.crop
        self.view_transform = EvalTransform(
            resize=size, crop=size, mean=transform.mean, std=transform.std, mode=transform.mode
        )
        self.photo_labels = None if labels is None else torch.as_tensor(labels).long()
        gen = torch.Generator().manual_seed(seed)
        n = len(self.paths) * views
        # (side, left, top) as fractions of the centered square / the free margins, flip.
        area = min_area + (1.0 - min_area) * torch.rand(n, generator=gen, dtype=torch.float64)
        self._side = area.sqrt()
        self._pos = torch.rand(n, 2, generator=gen, dtype=torch.float64)
        self._flip = torch.rand(n, generator=gen) < 0.5

    def __len__(self) -> int:
        return len(self.paths) * self.views

    @property
    def labels(self) -> torch.Tensor | None:
        """One label per view (its photo's), or None."""
        if self.photo_labels is None:
            return None
        return self.photo_labels.repeat_interleave(self.views)

    def crop_box(self, i: int, width: int, height: int) -> tuple[int, int, int, int] | None:
        """``(left, top, right, bottom)`` of view ``i`` in a ``width x height`` photo;
        None for the center view (view 0)."""
        if i % self.views == 0:
            return None
        side = max(1, int(math.floor(float(self._side[i]) * min(width, height))))
        left = int(round(float(self._pos[i, 0]) * (width - side)))
        top = int(round(float(self._pos[i, 1]) * (height - side)))
        return left, top, left + side, top + side

    def __getitem__(self, i: int):  # noqa: ANN204
        if not 0 <= i < len(self):
            raise IndexError(i)
        image = open_image(self.paths[i // self.views])
        box = self.crop_box(i, image.width, image.height)
        if box is None:
            x = self.center(image)
        else:
            view = image.crop(box)
            if bool(self._flip[i]):
                from PIL import Image

                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            x = self.view_transform(view)
        if self.photo_labels is None:
            return x
        return x, int(self.photo_labels[i // self.views])


_LABELED_NAME = re.compile(r"^imagenet_\d+_(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def labeled_photos(directory: str | Path) -> tuple[list[Path], list[int]]:
    """Sorted ``imagenet_<i>_<label>.jpg`` files of ``directory`` (foolbox's 20 labeled
    ImageNet photos) and their labels, the last number of each name."""
    directory = Path(directory)
    found = sorted(p for p in directory.glob("*") if _LABELED_NAME.match(p.name))
    if not found:
        raise QCalibError(
            f"no imagenet_<i>_<label>.jpg photos in {directory}; point at foolbox's data/ "
            "folder (`pip install foolbox`)"
        )
    return found, [int(_LABELED_NAME.match(p.name).group(1)) for p in found]  # type: ignore[union-attr]


def foolbox_photos_dir() -> Path:
    """Where the installed foolbox package keeps its labeled photos (found without
    importing foolbox, whose own imports need more packages than its data does)."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise QCalibError("foolbox's labeled ImageNet photos need `pip install foolbox`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"
