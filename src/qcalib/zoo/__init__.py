"""Models: the project's reference models and loaders for torchvision/timm/HF models."""

from qcalib.zoo.external import (
    HFImageClassifier,
    load_model,
    load_weights,
    model_input_shape,
    parse_spec,
    read_state_dict,
)
from qcalib.zoo.reference import REFERENCE_MODELS, load_reference, reference_entry

__all__ = [
    "REFERENCE_MODELS",
    "HFImageClassifier",
    "load_model",
    "load_reference",
    "load_weights",
    "model_input_shape",
    "parse_spec",
    "read_state_dict",
    "reference_entry",
]
