"""Resumable block-by-block walks: a fingerprint of what a walk starts from, and per-block
checkpoint files that a rerun with the same fingerprint continues from.

Used by GPTQ (:mod:`qcalib.calibrate.gptq`); the reconstruction engine keeps its own
whole-model checkpoint (:mod:`qcalib.calibrate.reconstruct`), since a reconstructed block
also changes step sizes and rounding state. One file per finished block, holding only
what that block changed, so a 135M-parameter model writes its weights once in all, not
once per block; ``progress.json`` is written after the block's file, so a block counts as
done only once its tensors are on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (any dtype, any device), for hashing."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def state_digest(meta: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over ``meta`` (JSON, sorted keys) and every named tensor's shape, dtype and
    bytes, in the given order."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in tensors:
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


class BlockCheckpoint:
    """Per-block results of one walk in ``directory``, valid for one ``fingerprint``."""

    def __init__(self, directory: str | Path, fingerprint: str, what: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.what = what

    def _block_file(self, index: int) -> Path:
        return self.directory / f"block-{index:04d}.safetensors"

    def load(self) -> tuple[int, dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
        """``(blocks done, saved info, {block index: tensors})``; ``(0, {}, {})`` when there
        is nothing to continue from (no checkpoint, another fingerprint, a damaged file)."""
        path = self.directory / PROGRESS_FILE
        if not path.is_file():
            return 0, {}, {}
        try:
            progress = json.loads(path.read_text())
            if progress.get("fingerprint") != self.fingerprint:
                log.warning(
                    "ignoring the %s checkpoint in %s: made with another model, data or "
                    "configuration; starting over", self.what, self.directory,
                )  # fmt: skip
                return 0, {}, {}
            done = int(progress["done"])
            tensors = {i: load_file(str(self._block_file(i))) for i in range(done)}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            log.warning("ignoring a damaged %s checkpoint in %s (%s); starting over",
                        self.what, self.directory, e)  # fmt: skip
            return 0, {}, {}
        return done, dict(progress.get("info") or {}), tensors

    def save(self, index: int, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Record block ``index`` as finished (blocks before it must be recorded already)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        block = self._block_file(index)
        tmp = block.with_name(block.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, block)
        progress = {"fingerprint": self.fingerprint, "done": index + 1, "info": info}
        path = self.directory / PROGRESS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, path)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
