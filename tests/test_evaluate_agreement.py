"""Label-free fidelity (top-1 agreement, KL(FP || quantized)), top-k accuracy, seeded views."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qcalib.data.imagefolder import EvalTransform
from qcalib.data.views import ImageViews, labeled_photos
from qcalib.errors import QCalibError
from qcalib.evaluate import agreement_and_kl, kl_divergence, topk_accuracy

PIL = pytest.importorskip("PIL.Image")


class Shift(nn.Module):
    """Logits = input + a fixed shift: a classifier whose outputs are known by hand."""

    def __init__(self, shift: list[float]) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def test_identical_models_agree_fully_with_zero_kl() -> None:
    x = torch.randn(7, 5)
    model = Shift([0.0] * 5)
    result = agreement_and_kl(model, model, x, batch_size=3)
    assert result.top1_agreement == 100.0
    assert result.mean_kl == 0.0
    assert result.num_inputs == 7


def test_a_known_logit_shift_gives_the_hand_computed_kl_and_agreement() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    fp, q = Shift([0.0, 0.0]), Shift([math.log(3.0), 0.0])
    # Row 1: p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    kl1 = 0.5 * math.log(4.0 / 3.0)
    # Row 2: p = softmax(0, 1), q = softmax(ln 3, 1); the arg-max moves from 1 to 0.
    p = [1 / (1 + math.e), math.e / (1 + math.e)]
    qq = [3 / (3 + math.e), math.e / (3 + math.e)]
    kl2 = sum(a * math.log(a / b) for a, b in zip(p, qq, strict=True))
    result = agreement_and_kl(fp, q, x)
    assert result.top1_agreement == 50.0
    # The models run in float32 (ln 3 rounded to float32): 1e-6 relative.
    assert result.mean_kl == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    torch.testing.assert_close(
        kl_divergence(x.double(), x.double() + math.log(3.0) * torch.tensor([1.0, 0.0]).double()),
        torch.tensor([kl1, kl2], dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )


def test_kl_is_stable_for_huge_logits() -> None:
    big = torch.tensor([[1000.0, 0.0]])
    assert float(kl_divergence(big, big)) == 0.0
    # log p = [0, -1000], log q = [-1000, 0]: KL = 1 * 1000 + e^-1000 * (-1000) = 1000
    # (an implementation that clamps log-probabilities or underflows p gives ~100 or NaN)
    assert float(kl_divergence(big, big.flip(1))) == pytest.approx(1000.0, rel=1e-9)


def test_agreement_rejects_non_classifier_outputs() -> None:
    with pytest.raises(QCalibError, match=r"\[B, classes\] logits"):
        agreement_and_kl(nn.Identity(), nn.Identity(), torch.randn(2, 3, 4))


def test_topk_accuracy_counts_by_hand() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])
    labels = torch.tensor([0, 1, 2])  # top-1 hit, rank 2, rank 3
    data = torch.utils.data.TensorDataset(logits, labels)
    acc = topk_accuracy(nn.Identity(), data, ks=(1, 2, 5))
    assert acc == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 5: 100.0}


@pytest.fixture()
def photos(tmp_path):  # noqa: ANN001, ANN201
    paths = []
    for i in range(2):
        arr = torch.arange(40 * 30 * 3, dtype=torch.int64).reshape(30, 40, 3).mul(7 + i) % 251
        path = tmp_path / f"photo{i}.png"
        PIL.fromarray(arr.to(torch.uint8).numpy()).save(path)
        paths.append(path)
    return paths


PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), backend="pil")


def test_views_are_seeded_and_view_zero_is_the_center_crop(photos) -> None:  # noqa: ANN001
    tf = EvalTransform(resize=16, crop=12, **PLAIN)
    views = ImageViews(photos, tf, views=4, seed=3, labels=[5, 9])
    assert len(views) == 8
    assert views.labels.tolist() == [5] * 4 + [9] * 4
    again = ImageViews(photos, tf, views=4, seed=3)
    other = ImageViews(photos, tf, views=4, seed=4)
    x, y = views[5]
    assert y == 9 and x.shape == (3, 12, 12)
    torch.testing.assert_close(x, again[5])
    assert not torch.equal(x, other[5])
    torch.testing.assert_close(views[4][0], tf(PIL.open(photos[1])))  # view 0 of photo 1
    assert views.crop_box(4, 40, 30) is None


def test_a_view_is_its_crop_flipped_and_resized(photos) -> None:  # noqa: ANN001
    tf = EvalTransform(resize=16, crop=12, **PLAIN)
    views = ImageViews(photos, tf, views=6, seed=0, min_area=0.5)
    image = PIL.open(photos[0]).convert("RGB")
    for i in range(1, 6):
        left, top, right, bottom = views.crop_box(i, 40, 30)
        side = right - left
        assert side == bottom - top and 30 * math.sqrt(0.5) - 1 <= side <= 30
        assert 0 <= left <= 40 - side and 0 <= top <= 30 - side
        crop = image.crop((left, top, right, bottom))
        if bool(views._flip[i]):
            crop = crop.transpose(PIL.Transpose.FLIP_LEFT_RIGHT)
        want = EvalTransform(resize=12, crop=12, **PLAIN)(crop)
        torch.testing.assert_close(views[i], want)
    assert views._flip[1:6].any() and not views._flip[1:6].all()  # both kinds drawn


def test_views_reject_bad_settings(photos) -> None:  # noqa: ANN001
    tf = EvalTransform(resize=16, crop=12, **PLAIN)
    with pytest.raises(QCalibError, match="views must be at least 1"):
        ImageViews(photos, tf, views=0)
    with pytest.raises(QCalibError, match="one each"):
        ImageViews(photos, tf, labels=[1])
    with pytest.raises(QCalibError, match="crop size"):
        ImageViews(photos, EvalTransform(resize=16, crop=None, **PLAIN))


def test_labeled_photos_read_the_label_from_the_name(tmp_path) -> None:  # noqa: ANN001
    for name in ("imagenet_01_559.jpg", "imagenet_00_243.jpg", "cifar10_00_3.png"):
        PIL.new("RGB", (4, 4)).save(tmp_path / name)
    paths, labels = labeled_photos(tmp_path)
    assert [p.name for p in paths] == ["imagenet_00_243.jpg", "imagenet_01_559.jpg"]
    assert labels == [243, 559]
    with pytest.raises(QCalibError, match="pip install foolbox"):
        labeled_photos(tmp_path / "cifar")


def test_accuracy_leaves_the_models_layout_as_it_was() -> None:
    """Evaluation runs channels-last, then puts every 4-D tensor back: a model left
    channels-last made the next calibration of it round differently from the first."""
    from torch.utils.data import TensorDataset

    from qcalib.evaluate import accuracy

    torch.manual_seed(0)
    # conv1's weight [8, 1, 3, 3] is "contiguous" in both layouts: its strides still count.
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(1))
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    x = torch.randn(6, 1, 3, 3)
    y = model(x).argmax(1)
    assert accuracy(model, TensorDataset(x, y), batch_size=4) == 100.0
    after = {k: (v, v.stride()) for k, v in model.state_dict().items()}
    for k, (v, stride) in before.items():
        assert torch.equal(after[k][0], v) and after[k][1] == stride, k
