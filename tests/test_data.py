"""Datasets: digits, image folders / file lists with both transform backends, spec registry."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qcalib.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageFileList,
    ImageFolder,
    Pool,
    TensorImageDataset,
    iterate_labeled,
    load_dataset,
    load_digits,
    load_pool,
)
from qcalib.data.digits import split_indices
from qcalib.data.imagefolder import center_crop_box, resized_size
from qcalib.errors import QCalibError

needs_tv = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision not installed"
)
BACKENDS = (pytest.param("torchvision", marks=needs_tv), "pil")


def _noise_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _make_folder(root: Path, classes=("cat", "dog", "fish"), per_class: int = 4) -> Path:
    """Per class: RGB PNG, grayscale PNG, RGB JPEG, grayscale JPEG, of varied sizes."""
    sizes = [(300, 260), (260, 300), (257, 333), (410, 256)]
    formats = [("RGB", ".png"), ("L", ".PNG"), ("RGB", ".jpg"), ("L", ".jpeg")]
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes):
        (root / name).mkdir()
        for i in range(per_class):
            mode, ext = formats[i % 4]
            w, h = sizes[i % 4]
            _noise_image(w, h, mode, seed=10 * c + i).save(root / name / f"img{i}{ext}")
        (root / name / "notes.txt").write_text("not an image")
    return root


# -- digits ------------------------------------------------------------------------------


def test_digits_split_is_deterministic_disjoint_and_complete() -> None:
    train, test = load_digits("train"), load_digits("test")
    assert isinstance(train, TensorImageDataset)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    tr, te = split_indices(1797)
    assert not set(tr) & set(te) and len(set(tr) | set(te)) == 1797
    again = load_digits("train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    assert set(train.labels.tolist()) == set(range(10))


def test_digits_stats_come_from_train_part() -> None:
    train, test = load_digits("train"), load_digits("test")
    pixels = train.images.double() / 255
    assert torch.allclose(train.mean.flatten().double(), pixels.mean().view(1), atol=1e-6)
    assert torch.allclose(
        train.std.flatten().double(), pixels.std(unbiased=False).view(1), atol=1e-6
    )
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    x, y = next(iterate_labeled(train, batch_size=2000))
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert y.shape == (len(train),)


def test_digits_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QCalibError, match="unknown split"):
        load_digits("val")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(QCalibError, match="pip install scikit-learn"):
        load_digits("train")


# -- transform ---------------------------------------------------------------------------


def test_resize_and_crop_geometry_match_torchvision_rules() -> None:
    assert resized_size(300, 512, 256) == (256, 436)  # long side truncated: 436.9 -> 436
    assert resized_size(512, 300, 256) == (436, 256)
    assert resized_size(256, 300, 256) == (256, 300)
    assert center_crop_box(256, 300, 224) == (16, 38)
    assert center_crop_box(256, 261, 224) == (16, 18)  # round(18.5) == 18 (banker's)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_color_normalization(backend: str) -> None:
    img = Image.new("RGB", (320, 270), (255, 128, 0))
    x = EvalTransform(backend=backend)(img)
    assert x.shape == (3, 224, 224)
    expected = [
        (1.0 - 0.485) / 0.229,
        (128 / 255 - 0.456) / 0.224,
        (0.0 - 0.406) / 0.225,
    ]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((224, 224), expected[c]), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_center_crop_takes_the_middle(backend: str) -> None:
    # Shorter side already 256, so resize is a no-op and pixel (y, x) encodes (y, x).
    w, h = 300, 256
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    arr = np.stack([xx % 256, yy % 256, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    t = EvalTransform(mean=(0, 0, 0), std=(1, 1, 1), backend=backend)
    x = t(Image.fromarray(arr, "RGB"))
    top, left = 16, 38
    assert round(float(x[0, 0, 0]) * 255) == left and round(float(x[1, 0, 0]) * 255) == top
    expected = torch.from_numpy(arr[top : top + 224, left : left + 224]).permute(2, 0, 1)
    assert torch.equal((x * 255).round().to(torch.uint8), expected)


@needs_tv
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"resize": 64, "crop": 56},
        {"resize": 40, "crop": 57},  # crop larger than the resized image: zero padding
        {"resize": None, "crop": 100},
        {"resize": 48, "crop": None, "mode": "L", "mean": (0.5,), "std": (0.25,)},
    ],
)
def test_pil_fallback_matches_torchvision(kwargs: dict) -> None:
    tv, pil = EvalTransform(**kwargs, backend="torchvision"), EvalTransform(**kwargs, backend="pil")
    assert tv.backend == "torchvision" and pil.backend == "pil"
    for seed, (w, h, mode) in enumerate([(301, 257, "RGB"), (97, 150, "L"), (64, 64, "RGB")]):
        img = _noise_image(w, h, mode, seed)
        a, b = tv(img), pil(img)
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        assert type(a) is torch.Tensor
        assert torch.allclose(a, b, atol=1e-5), (kwargs, float((a - b).abs().max()))


@needs_tv
def test_auto_backend_falls_back_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EvalTransform().backend == "torchvision"
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", None)
    t = EvalTransform()
    assert t.backend == "pil"
    assert t(_noise_image(300, 280, "RGB", 0)).shape == (3, 224, 224)
    with pytest.raises(QCalibError, match="pip install torchvision"):
        EvalTransform(backend="torchvision")


def test_transform_argument_errors() -> None:
    with pytest.raises(QCalibError, match="one value per channel"):
        EvalTransform(mode="L")
    with pytest.raises(QCalibError, match="backend"):
        EvalTransform(backend="cv2")
    with pytest.raises(QCalibError, match="crop"):
        EvalTransform(crop=0)


# -- folders and lists -------------------------------------------------------------------


def test_image_folder_labels_and_shapes(tmp_path: Path) -> None:
    ds = ImageFolder(_make_folder(tmp_path / "data"), EvalTransform(resize=40, crop=32))
    assert ds.classes == ["cat", "dog", "fish"]
    assert len(ds) == 12  # .txt files skipped; .PNG / .jpeg accepted case-insensitively
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [p.parent.name for p in ds.paths] == ["cat"] * 4 + ["dog"] * 4 + ["fish"] * 4
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y == 1
    pool = Pool(ds, labels=ds.labels)
    got = pool.get([0, 11])
    assert got.shape == (2, 3, 32, 32)
    assert torch.allclose(got[1], ds[11][0])
    xs, ys = next(iterate_labeled(ds, batch_size=12))
    assert xs.shape == (12, 3, 32, 32) and ys.tolist() == ds.labels.tolist()


def test_image_folder_class_list_and_nested_files(tmp_path: Path) -> None:
    root = tmp_path / "val"
    (root / "fish" / "sub").mkdir(parents=True)
    (root / "ant").mkdir()  # empty: keeps index 0
    _noise_image(20, 20, "RGB", 0).save(root / "fish" / "sub" / "a.bmp")
    _noise_image(20, 20, "RGB", 1).save(root / "fish" / "b.webp")
    ds = ImageFolder(root, EvalTransform(resize=None, crop=16), classes=["ant", "cat", "fish"])
    assert ds.labels.tolist() == [2, 2]
    assert [p.name for p in ds.paths] == ["b.webp", "a.bmp"]
    with pytest.raises(QCalibError, match="not among"):
        ImageFolder(root, classes=["cat", "dog"])


def test_unlabeled_flat_folder(tmp_path: Path) -> None:
    for i in range(3):
        _noise_image(50 + i, 40, "RGB", i).save(tmp_path / f"{i}.png")
    ds = ImageFolder(tmp_path, EvalTransform(resize=32, crop=32))
    assert ds.labels is None and ds.classes is None and len(ds) == 3
    assert ds[0].shape == (3, 32, 32)
    pool = Pool(ds)
    assert pool.labels is None and pool.get([0, 1, 2]).shape == (3, 3, 32, 32)


def test_file_list(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        _noise_image(30, 30, "RGB", i).save(tmp_path / "imgs" / f"{i}.jpg")
    absolute = tmp_path / "elsewhere.png"
    _noise_image(30, 30, "L", 5).save(absolute)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# calibration set\nimgs/0.jpg\n\n  imgs/1.jpg  \n{absolute}\n")
    ds = ImageFileList(listing, EvalTransform(resize=None, crop=24))
    assert [p.name for p in ds.paths] == ["0.jpg", "1.jpg", "elsewhere.png"]
    assert ds.labels is None and ds[2].shape == (3, 24, 24)


def test_folder_and_list_errors(tmp_path: Path) -> None:
    with pytest.raises(QCalibError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(QCalibError, match="no images"):
        ImageFolder(tmp_path / "empty")
    mixed = _make_folder(tmp_path / "mixed", classes=("a",), per_class=1)
    _noise_image(10, 10, "RGB", 0).save(mixed / "loose.png")
    with pytest.raises(QCalibError, match="loose.png"):
        ImageFolder(mixed)

    (tmp_path / "blank.txt").write_text("# only a comment\n\n")
    with pytest.raises(QCalibError, match="names no images"):
        ImageFileList(tmp_path / "blank.txt")
    (tmp_path / "typo.txt").write_text("missing.png\n")
    with pytest.raises(QCalibError, match=r"missing\.png"):
        ImageFileList(tmp_path / "typo.txt")
    with pytest.raises(QCalibError, match="does not exist"):
        ImageFileList(tmp_path / "no-list.txt")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    _noise_image(20, 20, "RGB", 0).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = (tmp_path / "good.png").read_bytes()[:60]
    (tmp_path / "truncated.png").write_bytes(truncated)
    ds = ImageFolder(tmp_path, EvalTransform(resize=None, crop=16))
    names = [p.name for p in ds.paths]
    for bad in ("broken.png", "truncated.png"):
        with pytest.raises(QCalibError, match=bad):
            ds[names.index(bad)]
    assert ds[names.index("good.png")].shape == (3, 16, 16)


# -- registry ----------------------------------------------------------------------------


def test_registry_builtin_specs() -> None:
    train = load_dataset("digits", "train")
    assert len(train) == 1438 and len(load_dataset("digits", "val")) == 359
    pool = load_pool("digits")
    assert isinstance(pool, Pool) and len(pool) == 1438 and pool.labels is not None
    assert pool.name == "digits"


def test_registry_fashion_mnist_missing_root(tmp_path: Path) -> None:
    with pytest.raises(QCalibError, match="data-root"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))


def test_registry_imagefolder_splits(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    _make_folder(root / "train", per_class=2)
    val = root / "val"
    (val / "fish").mkdir(parents=True)  # val lacks 'cat' and 'dog': labels follow train
    _noise_image(40, 40, "RGB", 0).save(val / "fish" / "x.png")
    t = EvalTransform(resize=32, crop=32)
    train = load_dataset(f"imagefolder:{root}", "train", transform=t)
    assert len(train) == 6 and train.classes == ["cat", "dog", "fish"]
    test = load_dataset(f"imagefolder:{root}", "test", transform=t)
    assert test.labels.tolist() == [2]
    assert len(load_dataset("imagefolder", "val", root=str(root), transform=t)) == 1
    pool = load_pool(f"imagefolder:{root}")
    assert pool.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # A plain class folder (no train/val inside) is its own train split only.
    plain = load_dataset(f"imagefolder:{root / 'train'}", "train", transform=t)
    assert len(plain) == 6
    with pytest.raises(QCalibError, match="val"):
        load_dataset(f"imagefolder:{root / 'train'}", "val")


def test_registry_imagefolder_without_train(tmp_path: Path) -> None:
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(QCalibError, match="no train/"):
        load_dataset(f"imagefolder:{tmp_path}", "train")


def test_registry_unlabeled_specs_are_pools_only(tmp_path: Path) -> None:
    _noise_image(30, 30, "RGB", 0).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png\n")
    pool = load_pool(f"files:{tmp_path / 'list.txt'}")
    assert len(pool) == 1 and pool.labels is None
    with pytest.raises(QCalibError, match="no labels"):
        load_dataset(f"files:{tmp_path / 'list.txt'}", "test")
    (tmp_path / "flatroot" / "val").mkdir(parents=True)
    _noise_image(30, 30, "RGB", 0).save(tmp_path / "flatroot" / "val" / "c.png")
    assert load_pool(f"imagefolder:{tmp_path / 'flatroot'}", split="val").labels is None
    with pytest.raises(QCalibError, match="no labels"):
        load_dataset(f"imagefolder:{tmp_path / 'flatroot'}", "val")


def test_registry_errors() -> None:
    with pytest.raises(QCalibError, match="imagefolder:PATH.*files:LISTFILE"):
        load_dataset("cifar10", "train")
    with pytest.raises(QCalibError, match="choose one of"):
        load_pool("digits:foo")
    with pytest.raises(QCalibError, match="unknown split"):
        load_dataset("digits", "validation")
    with pytest.raises(QCalibError, match="imagefolder:PATH"):
        load_dataset("imagefolder", "train")
    with pytest.raises(QCalibError, match="files:LISTFILE"):
        load_pool("files:")


def test_imagenet_constants() -> None:
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
