"""The exported artifact of a run, and loading it back.

``OUT/run_config.json`` (the run's config, written before any work so an unfinished run
can be recognized), ``OUT/calib_indices.json`` (written as soon as selection ends),
``OUT/calib_state/`` (per-block checkpoints of the reconstruction calibrators and GPTQ,
removed once the run has finished),
``OUT/result.json`` (config, accuracies, timings; written last, so its presence marks a
finished run), ``OUT/quant_state.safetensors`` (every tensor of the calibrated QuantModel:
folded weights, scales, zero points) and ``OUT/quant_layers.json`` (the grid of each
quantized layer, readable without torch); the SHA-256 of both is recorded in
``result.json``.

Reusing a run directory (:func:`prepare_run_dir`), choices made here:

* a finished run is never replaced silently: it is refused unless ``overwrite`` (CLI
  ``--overwrite``), which deletes qcalib's own files there first (other files stay);
* an unfinished run (no ``result.json``, but calibration indices or a reconstruction
  checkpoint) resumes when its saved config equals the new
  one: the saved calibration indices are reused (selection is not run again) and a
  reconstruction calibrator restarts at its first unfinished block. With another config
  it is refused, naming the fields that differ. One without ``run_config.json`` (an older
  qcalib) selects again and keeps only a reconstruction checkpoint whose fingerprint
  matches.

Loading (:func:`load_run`) checks every file it reads and names the file and what is
wrong with it (see :mod:`qcalib.files`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qcalib.config import RunConfig
from qcalib.errors import QCalibError
from qcalib.files import (
    atomic_write_text,
    check_sha256,
    describe_mismatch,
    read_json,
    read_safetensors,
    sha256_file,
    writable_dir,
    write_failed,
)
from qcalib.model.build import build_quant_model
from qcalib.model.wrap import QuantModel
from qcalib.result import RunResult

log = logging.getLogger(__name__)

STATE_FILE, RESULT_FILE, LAYERS_FILE, INDICES_FILE = (
    "quant_state.safetensors",
    "result.json",
    "quant_layers.json",
    "calib_indices.json",
)
CONFIG_FILE, WORK_DIR = "run_config.json", "calib_state"
STATE_FORMAT = "qcalib-quant-state-v1"
RUN_FILES = (CONFIG_FILE, INDICES_FILE, STATE_FILE, LAYERS_FILE, RESULT_FILE)


def _rerun(run_dir: Path) -> str:
    return f"rerun `qcalib quantize ... --out {run_dir} --overwrite`"


# -- writing -----------------------------------------------------------------------------


def _config_json(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as read back


def save_config(out: Path, cfg: RunConfig) -> None:
    writable_dir(out)
    atomic_write_text(out / CONFIG_FILE, json.dumps(_config_json(cfg), indent=1))


def save_indices(out: Path, indices: torch.Tensor) -> None:
    writable_dir(out)
    atomic_write_text(out / INDICES_FILE, json.dumps(indices.tolist()))


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


def _unaliased(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, {alias: name})``: a tensor that several names share (an LM head tied to
    its embedding table, as SmolLM2's) once, under its first name; safetensors refuses to
    write shared memory. Distinct views of one storage are copied apart."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                t.stride(), t.dtype)  # fmt: skip
        if t.numel() and view in first:
            aliases[name] = first[view]
            continue
        first.setdefault(view, name)
        kept[name] = t.detach().cpu()
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in kept.values())
    tensors = {
        k: t.clone() if storages[t.untyped_storage().data_ptr()] > 1 else t.contiguous()
        for k, t in kept.items()
    }
    return tensors, aliases


def save_run(out: Path, result: RunResult, qmodel: QuantModel) -> None:
    writable_dir(out)
    tensors, aliases = _unaliased(qmodel.state_dict())
    tmp = out / (STATE_FILE + ".tmp")
    metadata = {"format": STATE_FORMAT}
    if aliases:
        metadata["aliases"] = json.dumps(aliases)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out / STATE_FILE)
    except OSError as e:
        raise write_failed(out / STATE_FILE, e) from None
    atomic_write_text(out / LAYERS_FILE, json.dumps(layer_table(qmodel), indent=1))
    files = {name: sha256_file(out / name) for name in (STATE_FILE, LAYERS_FILE)}
    record = {**asdict(result), "files": files}
    atomic_write_text(out / RESULT_FILE, json.dumps(record, indent=1))
    # A finished run is never resumed, and its per-block checkpoint holds the calibrated
    # weights once more (an LLM's whole size again): it goes once the result is written.
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


# -- reusing a run directory ------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["quant.wbits: 4 -> 3", ...]``: the fields of two config dicts that differ."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]  # fmt: skip


def clear_run(out: Path) -> None:
    """Delete qcalib's own files of a run in ``out`` (not the directory, not other files)."""
    try:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        if (out / WORK_DIR).exists():
            shutil.rmtree(out / WORK_DIR)
    except OSError as e:
        raise write_failed(out, e) from None


def prepare_run_dir(out: str | Path, cfg: RunConfig, overwrite: bool = False) -> list[int] | None:
    """Make ``out`` ready for a run of ``cfg``; the saved calibration indices when an
    unfinished run of the same config resumes, else None (see the module docstring)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QCalibError(f"--out {out} is a file, not a directory; choose another --out")
    finished = (out / RESULT_FILE).exists()
    # A lone run_config.json is a run that failed before any work (a bad option): nothing
    # to keep, so a corrected rerun simply starts.
    unfinished = not finished and any(
        (out / n).exists() for n in (INDICES_FILE, STATE_FILE, WORK_DIR)
    )
    if overwrite and (finished or unfinished):
        log.info("--overwrite: replacing the run in %s", out)
        clear_run(out)
    elif finished:
        raise QCalibError(
            f"{out} holds a finished run ({RESULT_FILE}); pass --overwrite to replace it, or "
            "choose another --out"
        )
    elif unfinished and not (out / CONFIG_FILE).exists():
        # Made before run_config.json existed: its config is unknown, so its indices are not
        # trusted (selection runs again); a reconstruction checkpoint is still used only if
        # its fingerprint (model, data, config, seed) matches.
        log.warning(
            "%s holds an unfinished run of unknown config (no %s): selecting again; its "
            "reconstruction checkpoint is reused only if it matches", out, CONFIG_FILE,
        )  # fmt: skip
    elif unfinished:
        fix = "pass --overwrite to replace it, or choose another --out"
        saved = read_json(out / CONFIG_FILE, fix)
        if not isinstance(saved, dict):
            raise QCalibError(
                f"{out / CONFIG_FILE} is not a qcalib run config (a JSON object expected); {fix}"
            )
        diffs = config_differences(saved, _config_json(cfg))
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; +{len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise QCalibError(
                f"{out} holds an unfinished run of another config ({shown}); rerun with the "
                f"same options to resume it, {fix}"
            )
        indices = read_indices(out / INDICES_FILE) if (out / INDICES_FILE).exists() else None
        log.info(
            "resuming the unfinished run in %s (same config): %s", out,
            "reusing its calibration indices" if indices is not None else "selecting again",
        )  # fmt: skip
        writable_dir(out)
        return indices
    save_config(out, cfg)
    return None


# -- reading -----------------------------------------------------------------------------


def read_indices(path: str | Path) -> list[int]:
    """The indices of a ``calib_indices.json`` file (a JSON list of non-negative ints)."""
    path = Path(path)
    fix = f"delete it to select again, or {_rerun(path.parent)}"
    data = read_json(path, fix)
    if isinstance(data, dict) and "indices" in data:
        data = data["indices"]
    if not isinstance(data, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data
    ):
        raise QCalibError(f"{path}: expected a JSON list of non-negative integers; {fix}")
    return data


def read_result(run_dir: str | Path) -> tuple[RunConfig, dict]:
    """The config and record of a finished run's ``result.json``."""
    path = Path(run_dir) / RESULT_FILE
    fix = _rerun(Path(run_dir))
    result = read_json(path, fix)
    if not isinstance(result, dict) or not isinstance(result.get("config"), dict):
        raise QCalibError(f"{path} has no 'config' object; it is not a qcalib result; {fix}")
    try:
        cfg = RunConfig.from_dict(result["config"])
    except QCalibError as e:
        raise QCalibError(f"{path}: its config is invalid ({e}); {fix}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise QCalibError(f"{path}: its config does not fit this qcalib ({e}); {fix}") from None
    return cfg, result


def _check_recorded_hash(path: Path, result: dict | None, fix: str) -> None:
    """``path`` must match the SHA-256 that ``result.json`` recorded for it (files of
    runs made before a hash was recorded are not checked; a missing file is its
    reader's error)."""
    recorded = ((result or {}).get("files") or {}).get(path.name)
    if recorded is not None and path.is_file():
        check_sha256(path, recorded, fix)


def load_quant_state(run_dir: str | Path, qmodel: QuantModel, result: dict | None = None) -> None:
    """Load ``run_dir``'s quantization state into ``qmodel``, checking the file's hash (as
    recorded in ``result``), its format and that it was made for this architecture."""
    run_dir = Path(run_dir)
    path, fix = run_dir / STATE_FILE, _rerun(run_dir)
    _check_recorded_hash(path, result, fix)
    tensors, metadata = read_safetensors(path, fix)
    if metadata.get("format") != STATE_FORMAT:
        raise QCalibError(
            f"{path} is a safetensors file but not a qcalib quantization state (format "
            f"{metadata.get('format')!r}, expected {STATE_FORMAT!r}); {fix}"
        )
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
        tensors.update({alias: tensors[name] for alias, name in aliases.items()})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise QCalibError(f"{path} has a damaged alias table in its metadata; {fix}") from None
    expected = qmodel.state_dict()
    # A fresh quantizer holds scalar scale / zero point until calibrated or loaded.
    placeholders = {
        k for k, v in expected.items() if k.endswith(("scale", "zero_point")) and v.dim() == 0
    }
    diff = describe_mismatch(expected, tensors, placeholders)
    if diff is not None:
        raise QCalibError(
            f"{path} was made for another architecture or grid than {type(qmodel.model).__name__}"
            f" as configured: {diff}; check --model/--weights, or {fix}"
        )
    qmodel.load_state_dict(tensors)


def check_layer_map(run_dir: str | Path, qmodel: QuantModel, result: dict | None = None) -> None:
    """``run_dir``'s layer map (what another runtime reads) must be intact and describe
    ``qmodel`` as loaded: a corrupted, edited or foreign ``quant_layers.json`` is named."""
    run_dir = Path(run_dir)
    path, fix = run_dir / LAYERS_FILE, _rerun(run_dir)
    _check_recorded_hash(path, result, fix)
    saved = read_json(path, fix)
    expected = json.loads(json.dumps(layer_table(qmodel)))
    if saved == expected:
        return
    if not isinstance(saved, list) or not all(isinstance(r, dict) for r in saved):
        raise QCalibError(f"{path}: expected a JSON list of layer objects; {fix}")
    names = [r.get("name") for r in saved]
    if names != [r["name"] for r in expected]:
        missing = sorted({r["name"] for r in expected} - set(names))
        extra = sorted(set(names) - {r["name"] for r in expected})
        raise QCalibError(
            f"{path} lists other layers than the run's model (missing {missing[:3]}, extra "
            f"{extra[:3]}); {fix}"
        )
    row, ref = next((r, e) for r, e in zip(saved, expected, strict=True) if r != e)
    keys = sorted(k for k in ref.keys() | row.keys() if row.get(k) != ref.get(k))
    raise QCalibError(
        f"{path}: layer {ref['name']} differs from the run's state ({', '.join(keys)}); {fix}"
    )


def load_run(
    run_dir: str | Path, model: nn.Module | None = None
) -> tuple[RunConfig, QuantModel, dict]:
    """Rebuild the calibrated QuantModel of a finished run.

    ``model`` is needed only for runs made from an in-memory ``nn.Module`` through the
    API; runs of named models rebuild it from the name.
    """
    from qcalib.data.preprocess import image_transform
    from qcalib.data.registry import load_pool
    from qcalib.zoo.external import load_model

    run_dir = Path(run_dir)
    if not (run_dir / RESULT_FILE).exists() or not (run_dir / STATE_FILE).exists():
        raise QCalibError(
            f"{run_dir} holds no finished run ({RESULT_FILE} and {STATE_FILE} are needed); "
            f"run `qcalib quantize ... --out {run_dir}` first"
        )
    cfg, result = read_result(run_dir)
    if model is None:
        model = load_model(cfg.model, cfg.weights)
    tokenizer = getattr(model, "tokenizer", None)
    transform = image_transform(cfg.preprocess, model)
    example = load_pool(
        cfg.data, cfg.data_root, tokenizer=tokenizer, text=cfg.text, transform=transform,
        unreadable=cfg.unreadable_images,
    ).example()  # fmt: skip
    qmodel = build_quant_model(model.eval(), cfg.quant, example)
    load_quant_state(run_dir, qmodel, result)
    check_layer_map(run_dir, qmodel, result)
    return cfg, qmodel.eval(), result
