"""The project's reference models: architecture builders and committed checkpoints.

Checkpoints are safetensors files beside a JSON card holding their SHA-256, the training
config, the per-epoch log and the command that rebuilds them. Loading verifies the hash,
so a silently corrupted or swapped file is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from qcalib.errors import QCalibError
from qcalib.zoo.mobilenet import MobileNetV2Small
from qcalib.zoo.resnet import ResNet20

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    builder: Callable[[], nn.Module]
    dataset: str
    target_top1: float


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    m.name: m
    for m in (
        ReferenceModel("fmnist-resnet20", ResNet20, "fashion-mnist", 92.5),
        ReferenceModel("fmnist-mobilenetv2", MobileNetV2Small, "fashion-mnist", 91.0),
    )
}


def reference_entry(name: str) -> ReferenceModel:
    if name not in REFERENCE_MODELS:
        raise QCalibError(
            f"unknown reference model {name!r}; choose one of: {', '.join(REFERENCE_MODELS)}"
        )
    return REFERENCE_MODELS[name]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_reference(
    model: nn.Module, name: str, card: dict, directory: Path = CHECKPOINT_DIR
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"name": name})
    card = {"name": name, "file": path.name, "sha256": sha256_file(path), **card}
    (directory / f"{name}.json").write_text(json.dumps(card, indent=1) + "\n")
    return path


def load_reference(name: str, directory: Path = CHECKPOINT_DIR) -> nn.Module:
    """Build the architecture and load its verified checkpoint."""
    entry = reference_entry(name)
    path, card_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not path.exists() or not card_path.exists():
        raise QCalibError(
            f"checkpoint for {name} not found in {directory}; rebuild it with "
            f"`qcalib train --model {name}`"
        )
    expected = json.loads(card_path.read_text())["sha256"]
    actual = sha256_file(path)
    if actual != expected:
        raise QCalibError(
            f"{path} has SHA-256 {actual[:12]}… but its card says {expected[:12]}…; the file "
            f"is corrupted or was replaced: restore it from git or rebuild with "
            f"`qcalib train --model {name}`"
        )
    model = entry.builder()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
