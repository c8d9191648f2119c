"""The exported artifact of a run, and loading it back.

``OUT/calib_indices.json`` (written as soon as selection ends), ``OUT/result.json``
(config, accuracies, timings), ``OUT/quant_state.safetensors`` (every tensor of the
calibrated QuantModel: folded weights, scales, zero points) and ``OUT/quant_layers.json``
(the grid of each quantized layer, readable without torch).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qcalib.config import RunConfig
from qcalib.errors import QCalibError
from qcalib.model.build import build_quant_model
from qcalib.model.wrap import QuantModel
from qcalib.result import RunResult

STATE_FILE, RESULT_FILE, LAYERS_FILE, INDICES_FILE = (
    "quant_state.safetensors",
    "result.json",
    "quant_layers.json",
    "calib_indices.json",
)


def _atomic_write(path: Path, text: str) -> None:
    # A crash mid-write must not leave a truncated result behind.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_indices(out: Path, indices: torch.Tensor) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / INDICES_FILE, json.dumps(indices.tolist()))


def layer_table(qmodel: QuantModel) -> list[dict]:
    rows = []
    for name, m in qmodel.quant_modules():
        w, a = m.weight_quantizer.spec, m.act_quantizer.spec if m.act_quantizer else None
        rows.append(
            {
                "name": name,
                "type": type(m).__name__,
                "weight_shape": list(m.weight.shape),
                "wbits": w.bits,
                "w_symmetric": w.symmetric,
                "w_per_channel": w.per_channel,
                "w_group_size": w.group_size,
                "abits": a.bits if a else None,
                "a_symmetric": a.symmetric if a else None,
                "a_dynamic": a.dynamic if a else None,
            }
        )
    return rows


def save_run(out: Path, result: RunResult, qmodel: QuantModel) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
    tmp = out / (STATE_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "qcalib-quant-state-v1"})
    os.replace(tmp, out / STATE_FILE)
    _atomic_write(out / LAYERS_FILE, json.dumps(layer_table(qmodel), indent=1))
    _atomic_write(out / RESULT_FILE, json.dumps(asdict(result), indent=1))


def load_run(
    run_dir: str | Path, model: nn.Module | None = None
) -> tuple[RunConfig, QuantModel, dict]:
    """Rebuild the calibrated QuantModel of a finished run.

    ``model`` is needed only for runs made from an in-memory ``nn.Module`` through the
    API; runs of named models rebuild it from the name.
    """
    from qcalib.data.registry import load_pool
    from qcalib.zoo.external import load_model

    run_dir = Path(run_dir)
    if not (run_dir / RESULT_FILE).exists() or not (run_dir / STATE_FILE).exists():
        raise QCalibError(
            f"{run_dir} holds no finished run ({RESULT_FILE} and {STATE_FILE} are needed); "
            f"run `qcalib quantize ... --out {run_dir}` first"
        )
    result = json.loads((run_dir / RESULT_FILE).read_text())
    cfg = RunConfig.from_dict(result["config"])
    if model is None:
        model = load_model(cfg.model, cfg.weights)
    tokenizer = getattr(model, "tokenizer", None)
    example = load_pool(cfg.data, cfg.data_root, tokenizer=tokenizer, text=cfg.text).example()
    qmodel = build_quant_model(model.eval(), cfg.quant, example)
    qmodel.load_state_dict(load_file(str(run_dir / STATE_FILE)))
    return cfg, qmodel.eval(), result
