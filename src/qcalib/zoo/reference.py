"""The project's reference models: architecture builders and committed checkpoints.

Checkpoints are safetensors files beside a JSON card holding their SHA-256, the training
config, the per-epoch log and the command that rebuilds them. Loading verifies the hash,
so a silently corrupted or swapped file is refused, and names what differs when a
checkpoint (with a matching card) holds another architecture's tensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from qcalib.errors import QCalibError
from qcalib.files import check_sha256, describe_mismatch, read_json, read_safetensors, sha256_file
from qcalib.zoo.mobilenet import MobileNetV2Small
from qcalib.zoo.resnet import ResNet20
from qcalib.zoo.vgg import VGG7Small

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
        # The check model of issue 12: never used to choose a default.
        ReferenceModel("fmnist-vgg7", VGG7Small, "fashion-mnist", 91.0),
    )
}


def reference_entry(name: str) -> ReferenceModel:
    if name not in REFERENCE_MODELS:
        raise QCalibError(
            f"unknown reference model {name!r}; choose one of: {', '.join(REFERENCE_MODELS)}"
        )
    return REFERENCE_MODELS[name]


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
    fix = f"restore it from git or rebuild with `qcalib train --model {name}`"
    card = read_json(card_path, fix)
    if not isinstance(card, dict) or not isinstance(card.get("sha256"), str):
        raise QCalibError(f"{card_path} has no sha256 entry; it is not a checkpoint card: {fix}")
    check_sha256(path, card["sha256"], fix)
    tensors, _ = read_safetensors(path, fix)
    model = entry.builder()
    diff = describe_mismatch(model.state_dict(), tensors)
    if diff is not None:
        raise QCalibError(f"{path} does not fit {name}: {diff}; {fix}")
    model.load_state_dict(tensors)
    return model.eval()
