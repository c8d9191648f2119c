"""Reading the files qcalib is given or wrote, with one-line errors that name the file.

Choices made here:

* Tensors come only from safetensors (or, for user weights, ``torch.load(weights_only=True)``
  in :mod:`qcalib.zoo.external`); configs and reports only from JSON. Nothing qcalib reads
  is unpickled into arbitrary objects.
* Every failure is a :class:`~qcalib.errors.QCalibError` naming the file, what is wrong
  (missing, truncated, not safetensors, not JSON, hash mismatch, another architecture)
  and the fix the caller passes in (``fix``: rerun, restore, retrain ...).
* A state dict that does not fit a model is described by what differs, not by torch's
  multi-line blob: the counts of missing / unexpected keys and shape mismatches with the
  first few names (``describe_mismatch``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from qcalib.errors import QCalibError

_SHOWN = 3  # names listed per kind of mismatch


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first(names: list[str]) -> str:
    more = f", +{len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def describe_mismatch(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    any_shape: Collection[str] = (),
) -> str | None:
    """What differs between a model's state dict (``expected``) and a file's (``found``):
    None when keys and shapes agree, else e.g. ``"2 missing (conv9.weight, ...); 1 shape
    mismatch (fc.weight: file (10, 16), model (12, 16))"``. Keys in ``any_shape`` take
    whatever shape the file has (a fresh quantizer's scalar placeholders)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: file {tuple(found[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and k not in any_shape and tuple(found[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ({_first(shapes)})")
    return "; ".join(parts) or None


def read_json(path: str | Path, fix: str) -> Any:
    """The JSON document in ``path``; a missing, unreadable or malformed file raises."""
    path = Path(path)
    if not path.is_file():
        raise QCalibError(f"{path} does not exist; {fix}")
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise QCalibError(f"{path} is not a text (JSON) file; {fix}") from None
    except json.JSONDecodeError as e:
        raise QCalibError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}; truncated?); {fix}"
        ) from None
    except OSError as e:
        raise QCalibError(f"cannot read {path} ({e.strerror}); {fix}") from None


def read_safetensors(path: str | Path, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; truncated or foreign files raise."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise QCalibError(f"{path} does not exist; {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except SafetensorError as e:
        what = str(e).replace("Error while deserializing header: ", "")
        raise QCalibError(
            f"{path} is truncated or not a safetensors file ({what}); {fix}"
        ) from None
    except OSError as e:
        raise QCalibError(f"cannot read {path} ({e.strerror or e}); {fix}") from None
    return tensors, metadata


def check_sha256(path: Path, expected: str, fix: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise QCalibError(
            f"{path} has SHA-256 {actual[:12]}… but {expected[:12]}… was recorded; the file is "
            f"corrupted or was replaced: {fix}"
        )


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` if needed and prove a file can be written there, or raise naming
    ``flag``. Checked before the work starts, so a read-only or full disk fails at once."""
    path = Path(path)
    # One probe name per process: ranks of a torchrun job check the same directory at
    # once, and a shared name let one rank delete the other's probe mid-check.
    probe = path / f".qcalib-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise QCalibError(
            f"cannot write to {path} ({e.strerror or e}); choose a writable directory with {flag}"
        ) from None
    return path


def write_failed(path: Path, error: OSError, flag: str = "--out") -> QCalibError:
    """A failed write (full disk, directory made read-only mid-run) as a one-line error."""
    return QCalibError(
        f"cannot write {path} ({error.strerror or error}); free space or choose another {flag}, "
        "then rerun: finished stages are kept"
    )


def atomic_write_text(path: Path, text: str, flag: str = "--out") -> None:
    # A crash mid-write must not leave a truncated file behind. ``flag``: what the error
    # tells the user to change (see write_failed).
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e, flag) from None
