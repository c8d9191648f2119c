"""Bad input at every entry point (API and CLI): each is a one-line QCalibError naming
what is wrong and the fix, never a traceback; plus property tests over generated inputs.

Run-directory files (overwrite, resume, corrupt artifacts) are in ``test_run_dir.py``.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from conftest import TinyNet
from qcalib.cli import main
from qcalib.config import CalibConfig, QuantConfig, RunConfig, SelectConfig
from qcalib.data.fashion_mnist import read_idx
from qcalib.data.pool import Pool, TensorImageDataset
from qcalib.data.registry import load_pool
from qcalib.errors import QCalibError
from qcalib.pipeline import Workbench, quantize
from qcalib.zoo.external import load_model, load_weights, read_state_dict
from qcalib.zoo.reference import load_reference, save_reference


def _cfg(**kw) -> RunConfig:
    kw.setdefault("calib", CalibConfig(num_calib=8))
    return RunConfig(model="api", data="digits", **kw)


def _one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- IDX files ------------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    return (
        bytes([0, 0, code, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + (array.tobytes())
    )


GOOD = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_idx(GOOD)[:9], "truncated: its header needs 16 bytes, the file has 9"),
        (_idx(GOOD)[:-5], r"truncated: dims \(2, 3, 4\) need 24 data bytes, the file has 19"),
        (_idx(GOOD) + b"xx", "longer than its header says"),
        (b"PK\x03\x04junk", "not an IDX file"),
        (b"", "not an IDX file"),
    ],
)
def test_damaged_idx_files_name_the_file_and_the_damage(tmp_path, raw, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(QCalibError, match=message) as e:
        read_idx(path)
    assert str(path) in str(e.value) and "--data-root" in str(e.value)


def test_truncated_gzip_idx_is_one_line_from_the_cli(tmp_path, capsys):
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # fmt: skip
        (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(_idx(GOOD))[:-8])
    err = _one_line_error(capsys, "quantize", "--no-progress", "--data-root", str(tmp_path))
    assert "is not a complete gzip file" in err and "train-images-idx3-ubyte.gz" in err


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.data())
def test_idx_round_trips_and_any_cut_is_refused(tmp_path_factory, dims, data):
    array = np.arange(int(np.prod(dims)), dtype=">i4").reshape(dims)
    raw = _idx(array)
    path = tmp_path_factory.mktemp("idx") / "f"
    path.write_bytes(raw)
    assert np.array_equal(read_idx(path), array)
    cut = data.draw(st.integers(0, len(raw) - 1))
    path.write_bytes(raw[:cut])
    with pytest.raises(QCalibError, match="truncated|not an IDX file"):
        read_idx(path)


# -- image folders ----------------------------------------------------------------------------


def _png(path, seed: int, size: int = 40) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


@pytest.fixture
def folder_with_bad_files(tmp_path):
    root = tmp_path / "pool"
    for i in range(4):
        _png(root / f"{i}.png", i)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    raw = (root / "0.png").read_bytes()
    (root / "cut.png").write_bytes(raw[: len(raw) // 2])
    return root


def test_unreadable_images_stop_with_the_file_named_by_default(folder_with_bad_files):
    pool = load_pool(f"imagefolder:{folder_with_bad_files}")
    assert len(pool) == 6
    with pytest.raises(QCalibError, match=r"cannot read image .*broken.png.*--unreadable-images"):
        pool.get(list(range(6)))


def test_unreadable_images_are_skipped_with_a_count(folder_with_bad_files, caplog):
    pool = load_pool(f"imagefolder:{folder_with_bad_files}", unreadable="skip")
    assert len(pool) == 4 and pool.dataset.skipped == 2
    assert [p.name for p in pool.dataset.paths] == ["0.png", "1.png", "2.png", "3.png"]
    assert "skipped 2 unreadable image(s) of 6" in caplog.text
    assert pool.get(list(range(4))).shape == (4, 3, 224, 224)


def test_unreadable_images_flag_is_typed_and_reaches_the_run(
    folder_with_bad_files, capsys, monkeypatch
):
    err = _one_line_error(capsys, "quantize", "--unreadable-images", "ignore")
    assert "--unreadable-images" in err and "'error', 'skip'" in err
    with pytest.raises(QCalibError, match="--unreadable-images must be one of error, skip"):
        RunConfig(unreadable_images="ignore")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 7, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))  # fmt: skip
    spec = f"imagefolder:{folder_with_bad_files}"
    cfg = RunConfig(model="api", data=spec, eval_data="none", calib=CalibConfig(num_calib=4),
                    unreadable_images="skip")  # fmt: skip
    bench = Workbench(model, spec, eval_data="none", unreadable_images="skip")
    _, result = quantize(cfg, bench, progress=False)
    assert result.calib_indices == [0, 1, 2, 3]
    # From the config alone (the CLI's path): "skip" leaves the 4 readable images in the
    # pool, the default "error" stops at the first unreadable one a full pass reads.
    import qcalib.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *_a, **_k: model)
    _, result = quantize(cfg, progress=False)
    assert result.calib_indices == [0, 1, 2, 3]
    strict = RunConfig(model="api", data=spec, eval_data="none", calib=CalibConfig(num_calib=6))
    with pytest.raises(QCalibError, match=r"cannot read image .*--unreadable-images"):
        quantize(strict, progress=False)


def test_a_folder_of_only_unreadable_images_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    with pytest.raises(QCalibError, match="none of its 1 image"):
        load_pool(f"imagefolder:{tmp_path}", unreadable="skip")


# -- shapes, bits, sizes -----------------------------------------------------------------


def test_pool_of_the_wrong_channel_count_names_both_shapes(trained_tiny):
    rgb = TensorImageDataset(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), None, (0.5,) * 3,
                             (0.5,) * 3)  # fmt: skip
    with pytest.raises(QCalibError, match=r"shape \(3, 8, 8\), the model expects 1 channel"):
        quantize(_cfg(), Workbench(trained_tiny, Pool(rgb)), progress=False)


def test_pool_of_the_wrong_image_size_names_the_sample_shape():
    """A head sized for 8x8 inputs (flatten + Linear) fed 12x12 images."""
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    big = TensorImageDataset(torch.zeros(10, 1, 12, 12, dtype=torch.uint8), None, (0.5,),
                             (0.5,))  # fmt: skip
    message = r"a sample has shape \(1, 12, 12\), the model expects 1 channel\(s\) at its first"
    with pytest.raises(QCalibError, match=message):
        quantize(_cfg(), Workbench(fixed.eval(), Pool(big)), progress=False)


BAD_BITS = [("--wbits", "1"), ("--wbits", "9"), ("--abits", "0"), ("--first-last-bits", "12")]


@pytest.mark.parametrize(("flag", "value"), BAD_BITS)
def test_bits_outside_2_to_8_are_refused_by_the_cli(capsys, flag, value):
    err = _one_line_error(capsys, "quantize", flag, value)
    assert flag in err


@pytest.mark.parametrize("bits", [1, 9, 0, -3])
def test_bits_outside_2_to_8_are_refused_by_the_api(bits):
    with pytest.raises(QCalibError, match="--wbits: bits must be an integer from 2 to 8"):
        QuantConfig(wbits=bits)


def test_n_larger_than_the_pool(trained_tiny):
    with pytest.raises(QCalibError, match="larger than the pool"):
        quantize(_cfg(calib=CalibConfig(num_calib=10**5)), Workbench(trained_tiny, "digits"),
                 progress=False)  # fmt: skip


def test_k_larger_than_the_pool(trained_tiny):
    select = SelectConfig("selectq", (("num_clusters", 5000),))
    with pytest.raises(QCalibError, match="num_clusters=5000 exceeds the pool size 1438"):
        quantize(_cfg(select=select), Workbench(trained_tiny, "digits"), progress=False)


def test_empty_pools(tmp_path):
    empty = TensorImageDataset(torch.zeros(0, 8, 8, dtype=torch.uint8), None, (0.5,), (0.5,))
    with pytest.raises(QCalibError, match="is empty"):
        Pool(empty)
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    with pytest.raises(QCalibError, match="names no images"):
        load_pool(f"files:{tmp_path / 'list.txt'}")
    (tmp_path / "dir").mkdir()
    with pytest.raises(QCalibError, match="no images"):
        load_pool(f"imagefolder:{tmp_path / 'dir'}")


def test_nan_in_the_weights_names_the_layer(trained_tiny):
    import copy

    model = copy.deepcopy(trained_tiny)
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(QCalibError, match="the weights of layer conv2 contain NaN"):
        quantize(_cfg(), Workbench(model, "digits", eval_data="none"), progress=False)


class _Blowup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b((self.a(x) * 1e38 * 1e38).mean((2, 3)))  # overflows to Inf


def test_inf_in_activations_names_the_layer():
    torch.manual_seed(0)
    with pytest.raises(QCalibError, match="input activations of layer b contain NaN or Inf"):
        quantize(_cfg(quant=QuantConfig(first_last_bits=None)),
                 Workbench(_Blowup(), "digits", eval_data="none"), progress=False)  # fmt: skip


def test_nan_in_the_calibration_data_blames_the_data(trained_tiny):
    data = torch.zeros(10, 1, 8, 8)
    data[3, 0, 2, 2] = float("nan")

    class Raw(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    with pytest.raises(QCalibError, match="layer conv1 .*from the calibration data itself"):
        quantize(_cfg(calib=CalibConfig(num_calib=10)), Workbench(trained_tiny, Pool(Raw())),
                 progress=False)  # fmt: skip


def test_a_model_without_quantizable_layers():
    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    with pytest.raises(QCalibError, match="has no quantizable layer"):
        quantize(_cfg(), Workbench(Flat(), "digits"), progress=False)


# -- model files -------------------------------------------------------------------------------


def test_user_weights_truncated_pickled_and_of_another_architecture(tmp_path):
    model = TinyNet()
    good = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(QCalibError, match="cannot read safetensors file .*cut.safetensors"):
        read_state_dict(cut)
    pickled = tmp_path / "model.pt"
    torch.save(model, pickled)  # a whole pickled module: refused, never unpickled
    with pytest.raises(QCalibError, match="refuses to unpickle"):
        read_state_dict(pickled)
    other = nn.Sequential(nn.Conv2d(1, 8, 3))
    with pytest.raises(QCalibError, match=r"missing '0.weight'.*right architecture"):
        load_weights(other, good)
    wide = TinyNet()
    wide.fc = nn.Linear(16, 12)
    with pytest.raises(QCalibError, match=r"shape mismatch at 'fc.weight'.*\(10, 16\).*\(12, 16\)"):
        load_weights(wide, good)


@pytest.fixture
def reference_dir(tmp_path):
    from qcalib.zoo.resnet import ResNet20

    save_reference(ResNet20(), "fmnist-resnet20", {"test_top1": 0.0}, tmp_path)
    return tmp_path


def test_reference_checkpoint_hash_mismatch(reference_dir):
    path = reference_dir / "fmnist-resnet20.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(QCalibError, match="has SHA-256 .* corrupted or was replaced"):
        load_reference("fmnist-resnet20", reference_dir)


def test_reference_card_that_is_not_json(reference_dir):
    (reference_dir / "fmnist-resnet20.json").write_text('{"sha256": ')
    with pytest.raises(QCalibError, match=r"fmnist-resnet20.json is not valid JSON"):
        load_reference("fmnist-resnet20", reference_dir)
    (reference_dir / "fmnist-resnet20.json").write_text("{}")
    with pytest.raises(QCalibError, match="has no sha256"):
        load_reference("fmnist-resnet20", reference_dir)


def test_reference_checkpoint_of_another_architecture(reference_dir):
    from qcalib.files import sha256_file
    from qcalib.zoo.mobilenet import MobileNetV2Small

    # A well-formed, correctly hashed checkpoint of the wrong network under the name.
    save_reference(MobileNetV2Small(), "fmnist-resnet20", {}, reference_dir)
    assert sha256_file(reference_dir / "fmnist-resnet20.safetensors")
    with pytest.raises(QCalibError, match=r"does not fit fmnist-resnet20: \d+ missing \("):
        load_model("zoo:fmnist-resnet20", reference_dir=reference_dir)


# -- properties ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 8),
    st.floats(1e-3, 10.0),
    st.integers(0, 255),
    st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=64),
)
def test_fake_quantize_lands_on_the_grid_and_is_idempotent(bits, scale, zero, values):
    from qcalib.quant.functional import fake_quantize

    qmin, qmax = 0, 2**bits - 1
    z = torch.tensor(float(min(zero, qmax)))
    s = torch.tensor(scale)
    x = torch.tensor(values, dtype=torch.float32)
    y = fake_quantize(x, s, z, qmin, qmax)
    q = y / s + z
    assert torch.allclose(q, q.round(), atol=1e-3)  # on the grid
    assert bool((q.round() >= qmin).all() and (q.round() <= qmax).all())
    assert torch.allclose(fake_quantize(y, s, z, qmin, qmax), y, atol=1e-5 * scale)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.data())
def test_allocate_quotas_sums_to_n_and_never_exceeds_a_group(masses, data):
    from qcalib.select.budget import allocate_quotas

    n = data.draw(st.integers(0, sum(masses)))
    share = data.draw(st.sampled_from([0.0, 1.0]))
    quotas = allocate_quotas(masses, n, min_share=share)
    assert sum(quotas) == n and len(quotas) == len(masses)
    assert all(0 <= q <= m for q, m in zip(quotas, masses, strict=True))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 16), st.data())
def test_pack_unpack_tokens_round_trip(batch, length, data):
    from qcalib.data.tokens import pack_tokens, unpack_tokens

    size = batch * length
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 50000), min_size=size, max_size=size)))
    mask = torch.tensor(data.draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
    ids, mask = ids.view(batch, length), mask.view(batch, length)
    packed = pack_tokens(ids, mask)
    assert packed.shape == (batch, 2, length)
    ids2, mask2 = unpack_tokens(packed)
    assert torch.equal(ids2, ids) and torch.equal(mask2, mask)
