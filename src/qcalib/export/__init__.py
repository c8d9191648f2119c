"""Exporting a calibrated model out of PyTorch: one module per format, registered by name.

``EXPORTERS`` maps a format name to a function
``(qmodel, example_input, path, **options) -> ExportReport | Path``:

* ``onnx`` (:mod:`qcalib.export.onnx`): QDQ ONNX model + encodings JSON beside it,
  checked in ONNX Runtime when written.
* ``encodings`` (:mod:`qcalib.export.encodings`): the encodings JSON alone.

:func:`export_run` exports a finished run directory (``qcalib export RUN``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qcalib.export.encodings import encodings_dict, layer_encodings, write_encodings
from qcalib.export.onnx import ExportReport, export_onnx
from qcalib.registry import Registry

__all__ = ["EXPORTERS", "ExportReport", "export_onnx", "export_run"]

EXPORTERS: Registry = Registry("export format")
EXPORTERS.register("onnx")(export_onnx)

# Default file names inside a run directory, per format.
DEFAULT_FILES = {"onnx": "model.onnx", "encodings": "model.encodings.json"}
# Pool samples run through ONNX Runtime and PyTorch to check an export of a run.
CHECK_SAMPLES = 16


@EXPORTERS.register("encodings")
def export_encodings(qmodel: Any, example_input: Any, path: str | Path, **options: Any) -> Path:
    """Write only the encodings JSON (``example_input`` and ``options`` are unused)."""
    return write_encodings(encodings_dict(layer_encodings(qmodel)), path)


def export_run(
    run_dir: str | Path,
    format: str = "onnx",  # noqa: A002 - the CLI flag's name
    out: str | Path | None = None,
    *,
    model: torch.nn.Module | None = None,
    **options: Any,
) -> ExportReport | Path:
    """Export the calibrated model of a finished run (see :func:`qcalib.load_run`).

    ``out`` defaults to ``RUN/model.onnx`` (``RUN/model.encodings.json`` for
    ``encodings``). The ONNX check runs the first :data:`CHECK_SAMPLES` samples of the
    run's calibration pool. ``model`` is needed for runs made from an in-memory module;
    ``options`` go to the exporter (``int4``, ``opset``).
    """
    from qcalib.artifact import load_run
    from qcalib.data.preprocess import image_transform
    from qcalib.data.registry import load_pool

    exporter = EXPORTERS.get(format)
    run_dir = Path(run_dir)
    cfg, qmodel, _ = load_run(run_dir, model=model)
    # The run's own preprocessing, so the check sees inputs like those calibrated on.
    transform = image_transform(cfg.preprocess, qmodel.model)
    # Text runs need the model's tokenizer and the run's text settings (the same samples
    # as calibrated on: packed token batches).
    pool = load_pool(cfg.data, cfg.data_root, split="train", transform=transform,
                     tokenizer=getattr(qmodel.model, "tokenizer", None), text=cfg.text)  # fmt: skip
    inputs = pool.get(list(range(min(CHECK_SAMPLES, len(pool)))))
    path = Path(out) if out is not None else run_dir / DEFAULT_FILES[format]
    if format == "onnx":
        return exporter(qmodel.cpu(), inputs, path, check_inputs=inputs, **options)
    return exporter(qmodel.cpu(), inputs, path, **options)
