"""Run directories: no silent overwrite, resume of unfinished runs, bit-identical
artifacts, and one-line errors for every corrupt or mismatched file a run reads back."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import tiny_resnet
from qcalib.artifact import (
    CONFIG_FILE,
    INDICES_FILE,
    LAYERS_FILE,
    RESULT_FILE,
    STATE_FILE,
    load_run,
    read_indices,
)
from qcalib.calibrate import CALIBRATORS
from qcalib.cli import main
from qcalib.config import CalibConfig, QuantConfig, ReconConfig, RunConfig
from qcalib.errors import QCalibError
from qcalib.pipeline import Workbench, quantize


@pytest.fixture(scope="module")
def bench(trained_tiny):
    return Workbench(trained_tiny, "digits")


def _cfg(wbits=4, abits=4, calibrator="minmax", **recon) -> RunConfig:
    calib = CalibConfig(calibrator, num_calib=32, recon=ReconConfig(**recon))
    return RunConfig(model="api", data="digits", quant=QuantConfig(wbits, abits), calib=calib)


def _files(run) -> dict[str, bytes]:
    return {n: (run / n).read_bytes() for n in (RESULT_FILE, STATE_FILE)}


def test_finished_run_is_not_overwritten_by_another_config(bench, tmp_path):
    run = tmp_path / "run"
    quantize(_cfg(4, 4), bench, out=run, progress=False)
    before = _files(run)
    with pytest.raises(QCalibError, match="finished run.*--overwrite.*another --out"):
        quantize(_cfg(3, 3), bench, out=run, progress=False)
    assert _files(run) == before  # the W4A4 result and artifact are intact
    _, r3 = quantize(_cfg(3, 3), bench, out=run, progress=False, overwrite=True)
    saved = json.loads((run / RESULT_FILE).read_text())
    assert saved["config"]["quant"]["wbits"] == 3 and saved["quant_top1"] == r3.quant_top1


@pytest.fixture
def cli_model(monkeypatch, trained_tiny):
    import qcalib.pipeline as pipeline
    import qcalib.zoo.external as external

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: trained_tiny)
    monkeypatch.setattr(external, "load_model", lambda *a, **k: trained_tiny)


def _quantize_cli(run, *flags):
    return main(["quantize", "--no-progress", "--data", "digits", "--model", "x:tiny",
                 "--num-calib", "32", "--out", str(run), *flags])  # fmt: skip


def test_cli_refuses_a_finished_run_in_one_line_and_overwrite_replaces(cli_model, tmp_path,
                                                                       capsys):  # fmt: skip
    run = tmp_path / "run"
    assert _quantize_cli(run) == 0
    before = _files(run)
    capsys.readouterr()
    assert _quantize_cli(run, "--wbits", "3", "--abits", "3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "another --out" in err
    assert _files(run) == before
    assert _quantize_cli(run, "--wbits", "3", "--abits", "3", "--overwrite") == 0
    assert json.loads((run / RESULT_FILE).read_text())["config"]["quant"]["wbits"] == 3


def test_overwrite_without_out_is_refused(capsys):
    assert main(["quantize", "--no-progress", "--overwrite"]) == 2
    assert "--overwrite only applies with --out" in capsys.readouterr().err


def test_unfinished_run_of_another_config_is_refused_naming_what_differs(bench, tmp_path):
    run = tmp_path / "run"
    quantize(_cfg(4, 4), bench, out=run, progress=False)
    (run / RESULT_FILE).unlink()  # as if killed after selection
    with pytest.raises(QCalibError, match=r"another config \(quant.abits: 4 -> 3; quant.wbits"):
        quantize(_cfg(3, 3), bench, out=run, progress=False)


def test_a_run_that_failed_before_any_work_does_not_block_the_corrected_rerun(bench, tmp_path):
    run = tmp_path / "run"
    bad = RunConfig(model="api", data="digits", calib=CalibConfig(num_calib=10**6))
    with pytest.raises(QCalibError, match="larger than the pool"):
        quantize(bad, bench, out=run, progress=False)
    assert (run / CONFIG_FILE).exists() and not (run / INDICES_FILE).exists()
    quantize(_cfg(), bench, out=run, progress=False)
    assert (run / RESULT_FILE).exists()


def test_identical_seeds_give_bit_identical_artifacts(bench, tmp_path):
    for name in ("a", "b"):
        quantize(_cfg(calibrator="mse"), bench, out=tmp_path / name, progress=False)
    a, b = (tmp_path / n / STATE_FILE for n in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


def test_interrupted_reconstruction_resumes_to_the_same_artifact(bench, tmp_path, caplog):
    cfg = _cfg(2, 4, "qdrop", iters=3, batch_size=8)
    quantize(cfg, bench, out=tmp_path / "ref", progress=False)

    calibrator = CALIBRATORS.get("qdrop")(cfg.calib)

    def kill_after_block_1(index, _block):
        if index == 1:
            raise KeyboardInterrupt

    calibrator.on_block_end = kill_after_block_1
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        quantize(cfg, bench, out=run, progress=False, calibrator=calibrator)
    assert not (run / RESULT_FILE).exists() and (run / INDICES_FILE).exists()

    with caplog.at_level(logging.INFO, logger="qcalib"):
        _, result = quantize(cfg, bench, out=run, progress=False)
    assert "resuming the unfinished run" in caplog.text
    assert result.calib_stats["resumed_from_block"] == 2
    assert (run / STATE_FILE).read_bytes() == (tmp_path / "ref" / STATE_FILE).read_bytes()
    ref = json.loads((tmp_path / "ref" / RESULT_FILE).read_text())
    assert result.calib_indices == ref["calib_indices"]
    assert result.quant_top1 == ref["quant_top1"]


# -- corrupt and mismatched files ---------------------------------------------------------


@pytest.fixture
def finished(bench, tmp_path):
    run = tmp_path / "run"
    quantize(_cfg(), bench, out=run, progress=False)
    return run


def test_eval_of_a_truncated_state_is_one_line_exit_2(finished, cli_model, capsys):
    path = finished / STATE_FILE
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    # No hash recorded (an older run): the safetensors reader itself must catch it.
    result = json.loads((finished / RESULT_FILE).read_text())
    del result["files"]
    (finished / RESULT_FILE).write_text(json.dumps(result))
    capsys.readouterr()
    assert main(["eval", "--no-progress", str(finished)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and STATE_FILE in err and "truncated" in err
    assert "Traceback" not in err


def test_a_flipped_byte_in_the_state_is_a_hash_mismatch(finished, trained_tiny):
    path = finished / STATE_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(raw))
    with pytest.raises(QCalibError, match=rf"{STATE_FILE} has SHA-256 .* corrupted"):
        load_run(finished, model=trained_tiny)


def test_a_safetensors_file_of_another_kind_is_refused(finished, trained_tiny):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(finished / STATE_FILE))
    result = json.loads((finished / RESULT_FILE).read_text())
    result["files"] = {}
    (finished / RESULT_FILE).write_text(json.dumps(result))
    with pytest.raises(QCalibError, match="not a qcalib quantization state"):
        load_run(finished, model=trained_tiny)


def test_a_state_of_another_architecture_names_what_differs(finished):
    other = tiny_resnet()
    with pytest.raises(QCalibError, match=r"another architecture.*missing \(.*unexpected \("):
        load_run(finished, model=other)


def test_a_state_with_other_shapes_names_the_shape_mismatch(finished, trained_tiny):
    from conftest import TinyNet

    wide = TinyNet()
    wide.fc = torch.nn.Linear(16, 12)
    with pytest.raises(QCalibError, match=r"shape mismatch\(es\) \(model.fc.weight: file"):
        load_run(finished, model=wide)


def _forget_recorded(run, name: str) -> None:
    """As a result.json written before ``name``'s hash was recorded."""
    result = json.loads((run / RESULT_FILE).read_text())
    del result["files"][name]
    (run / RESULT_FILE).write_text(json.dumps(result))


def test_a_corrupted_layer_map_is_a_hash_mismatch(finished, trained_tiny, cli_model, capsys):
    path = finished / LAYERS_FILE
    path.write_text(path.read_text().replace('"wbits": 4', '"wbits": 3', 1))
    with pytest.raises(QCalibError, match=rf"{LAYERS_FILE} has SHA-256 .* corrupted"):
        load_run(finished, model=trained_tiny)
    assert main(["eval", str(finished), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and LAYERS_FILE in err


def test_an_edited_layer_map_names_the_layer_and_field(finished, trained_tiny):
    _forget_recorded(finished, LAYERS_FILE)
    path = finished / LAYERS_FILE
    rows = json.loads(path.read_text())
    rows[1]["abits"] = 8
    path.write_text(json.dumps(rows))
    with pytest.raises(QCalibError, match=rf"{LAYERS_FILE}: layer {rows[1]['name']} differs "
                                          r"from the run's state \(abits\)"):  # fmt: skip
        load_run(finished, model=trained_tiny)


def test_a_layer_map_of_other_layers_or_missing_is_named(finished, trained_tiny):
    _forget_recorded(finished, LAYERS_FILE)
    path = finished / LAYERS_FILE
    rows = json.loads(path.read_text())
    path.write_text(json.dumps(rows[1:]))
    with pytest.raises(QCalibError, match=rf"{LAYERS_FILE} lists other layers .*missing \["):
        load_run(finished, model=trained_tiny)
    path.write_text('{"not": "a list"}')
    with pytest.raises(QCalibError, match="expected a JSON list of layer objects"):
        load_run(finished, model=trained_tiny)
    path.unlink()
    with pytest.raises(QCalibError, match=rf"{LAYERS_FILE} does not exist; rerun"):
        load_run(finished, model=trained_tiny)


@pytest.mark.parametrize("content, message", [
    ('{"quant": {"wbits": 4', "is not valid JSON"),
    ("[4, 4]", "is not a qcalib run config"),
])  # fmt: skip
def test_a_corrupt_run_config_of_an_unfinished_run_is_named(bench, tmp_path, content, message):
    run = tmp_path / "run"
    quantize(_cfg(), bench, out=run, progress=False)
    (run / RESULT_FILE).unlink()  # as if killed after selection
    (run / CONFIG_FILE).write_text(content)
    with pytest.raises(QCalibError, match=rf"{CONFIG_FILE} {message}.*--overwrite"):
        quantize(_cfg(), bench, out=run, progress=False)


def test_truncated_result_json_names_the_file(finished, trained_tiny):
    path = finished / RESULT_FILE
    path.write_text(path.read_text()[:40])
    with pytest.raises(QCalibError, match=rf"{RESULT_FILE} is not valid JSON .*--overwrite"):
        load_run(finished, model=trained_tiny)


def test_result_json_with_a_foreign_config_names_the_file(finished, trained_tiny):
    path = finished / RESULT_FILE
    result = json.loads(path.read_text())
    result["config"]["quant"]["wbits"] = 11
    path.write_text(json.dumps(result))
    with pytest.raises(QCalibError, match=rf"{RESULT_FILE}: its config is invalid .*--wbits"):
        load_run(finished, model=trained_tiny)
    result["config"]["quant"]["bogus"] = 1
    path.write_text(json.dumps(result))
    with pytest.raises(QCalibError, match="does not fit this qcalib"):
        load_run(finished, model=trained_tiny)


def test_corrupt_calib_indices_stop_a_resume_with_the_file_named(bench, finished):
    (finished / RESULT_FILE).unlink()
    (finished / INDICES_FILE).write_text("[1, 2,")
    with pytest.raises(QCalibError, match=rf"{INDICES_FILE} is not valid JSON"):
        quantize(_cfg(), bench, out=finished, progress=False)
    (finished / INDICES_FILE).write_text('[1, "x"]')
    with pytest.raises(QCalibError, match="non-negative integers"):
        read_indices(finished / INDICES_FILE)


def test_out_that_cannot_be_written_is_one_line(tmp_path, cli_model, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _quantize_cli(blocker / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to" in err and "--out" in err


def test_read_only_out_is_one_line(bench, tmp_path, monkeypatch):
    import os
    from pathlib import Path

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a 0o555 directory: refuse as the kernel would
        write_bytes = Path.write_bytes

        def refused(self, data):  # noqa: ANN001, ANN202
            if ro in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            return write_bytes(self, data)

        monkeypatch.setattr(Path, "write_bytes", refused)
    try:
        with pytest.raises(QCalibError, match="cannot write to .*--out"):
            quantize(_cfg(), bench, out=ro / "run", progress=False)
    finally:
        ro.chmod(0o755)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_indices(
    bench, tmp_path, monkeypatch, caplog
):
    import qcalib.artifact as artifact

    def no_space(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact, "save_file", no_space)
    run = tmp_path / "run"
    with pytest.raises(QCalibError, match=rf"cannot write .*{STATE_FILE} \(No space left"):
        quantize(_cfg(), bench, out=run, progress=False)
    kept = read_indices(run / INDICES_FILE)
    assert kept and not (run / RESULT_FILE).exists()
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="qcalib.artifact"):
        _, result = quantize(_cfg(), bench, out=run, progress=False)  # resumes, then finishes
    assert "resuming the unfinished run" in caplog.text
    assert "reusing its calibration indices" in caplog.text
    assert result.calib_indices == kept and (run / RESULT_FILE).exists()


def _train_set(n: int = 64):
    from qcalib.data.pool import TensorImageDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TensorImageDataset(images, torch.randint(0, 10, (n,), generator=g), (0.5,), (0.5,))


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, caplog):
    import qcalib.train as training
    from conftest import TinyNet

    data = _train_set(32)
    cfg = training.TrainConfig(epochs=2, batch_size=16, seed=1)

    def fresh():
        torch.manual_seed(0)
        return TinyNet()

    reference = fresh()
    training.train(reference, data, data, cfg, tmp_path / "ref")

    calls = {"n": 0}
    real_accuracy = training.accuracy

    def interrupt_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_accuracy(*a, **k)

    monkeypatch.setattr(training, "accuracy", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        training.train(fresh(), data, data, cfg, tmp_path / "run")
    resumed_calls = []

    def count(*a, **k):
        resumed_calls.append(1)
        return real_accuracy(*a, **k)

    monkeypatch.setattr(training, "accuracy", count)
    resumed = fresh()
    with caplog.at_level(logging.INFO, logger="qcalib.train"):
        history = training.train(resumed, data, data, cfg, tmp_path / "run")
    assert [h["epoch"] for h in history] == [1, 2]
    # A resume, not a rerun from scratch (which would also reach these weights): only
    # epoch 2 is trained and evaluated again.
    assert len(resumed_calls) == 1 and "resuming at epoch 2 from" in caplog.text
    # Measured: equal up to 1 ulp (<= 6e-8) after a resume, while two uninterrupted runs
    # are bit-identical (cause of the drift not found yet; see the branch report).
    for key, value in reference.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key].float(), value.float(), atol=1e-6), key

    other = training.TrainConfig(epochs=2, batch_size=8, seed=1)
    with pytest.raises(QCalibError, match=r"another training config \(batch_size: 16 -> 8"):
        training.train(fresh(), data, data, other, tmp_path / "run")
    (tmp_path / "run" / "train_state.pt").write_bytes(b"torn")
    with pytest.raises(QCalibError, match="not a readable training state"):
        training.train(fresh(), data, data, cfg, tmp_path / "run")


def test_inspect_calib_on_a_damaged_run_is_one_line(finished, capsys):
    (finished / RESULT_FILE).write_text("{")
    assert main(["inspect-calib", "--run", str(finished)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "result.json is not valid JSON" in err


def test_an_unfinished_run_of_an_older_qcalib_selects_again(bench, finished, caplog):
    (finished / RESULT_FILE).unlink()
    (finished / CONFIG_FILE).unlink()
    (finished / INDICES_FILE).write_text("[0, 1, 2]")  # not trusted without its config
    with caplog.at_level(logging.WARNING, logger="qcalib"):
        _, result = quantize(_cfg(), bench, out=finished, progress=False)
    assert "unknown config" in caplog.text
    assert len(result.calib_indices) == 32 and read_indices(finished / INDICES_FILE) != [0, 1, 2]
