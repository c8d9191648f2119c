"""Quantization encodings of a calibrated model: what each quantizer's integer grid is.

:func:`layer_encodings` reads a :class:`~qcalib.model.wrap.QuantModel` into plain records
(one :class:`LayerEncoding` per quantized layer); the ONNX exporter builds its
QuantizeLinear / DequantizeLinear nodes from the same records, so the graph and the JSON
cannot disagree. :func:`encodings_dict` turns them into the JSON written next to an
exported ``.onnx`` (``MODEL.encodings.json``), readable by another runtime without torch.

Choices:

* **Integer weights come from the fake-quant forward.** The weight is passed through the
  layer's own weight quantizer (the call :class:`~qcalib.model.qmodules.QuantModule`
  makes), so whatever put the weight on the grid (plain rounding, AdaRound / BRECQ /
  QDrop learned rounding baked in by ``harden``, or a hard-mode AdaRound quantizer still
  in place) is what is exported. The codes are ``round(w_hat / s) + z``; an export is
  refused unless ``(q - z) * s`` gives back ``w_hat`` bit for bit (soft rounding, or a
  quantizer that is not a uniform grid, fails that check).
* **Containers.** Symmetric grids are signed (``int8``), asymmetric ones unsigned
  (``uint8``), whatever the bit width: a 4-bit asymmetric activation is ``uint8`` with
  values in ``[0, 15]``. With ``int4=True`` grids of at most 4 bits use ``int4`` /
  ``uint4`` instead (ONNX opset 21).
* **Disabled or uncalibrated quantizers are left out**: a layer whose weight or input
  quantizer is switched off (``use_weight_quant`` / ``use_act_quant``) or has no
  parameters computes in float, and its entry says ``null``.

JSON schema (``"format": "qcalib-encodings", "version": 1``)::

    {
      "format": "qcalib-encodings", "version": 1,
      "model": "model.onnx",                 # the ONNX file it describes (or null)
      "layers": [                            # quantized layers in execution order
        {
          "name": "layer1.0.conv1",          # qualified module name in the torch model
          "type": "QuantConv2d",
          "weight": {                        # null: float weight
            "tensor": "layer1.0.conv1.weight",   # ONNX initializer holding the codes
            "bits": 4, "symmetric": false, "dtype": "uint8", "qmin": 0, "qmax": 15,
            "axis": 0,                       # per output channel; null: per tensor
            "scale": [..], "zero_point": [..]    # one per channel (a number if per tensor)
          },
          "activation": {                    # the layer's input; null: float input
            "tensor": "relu",                # ONNX tensor that is quantized (or null)
            "bits": 4, "symmetric": false, "dtype": "uint8", "qmin": 0, "qmax": 15,
            "axis": null, "scale": 0.031, "zero_point": 3
          }
        }
      ]
    }

Dequantization is ``x = (q - zero_point) * scale`` and quantization
``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``, as in ONNX
QuantizeLinear but clamped to ``[qmin, qmax]`` rather than the container's range. Scales
are float32 values written as JSON numbers (Python's shortest round-trip repr, so a
float32 read back is bit-identical).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcalib.errors import QCalibError
from qcalib.model.wrap import QuantModel
from qcalib.quant.functional import broadcast_param

__all__ = [
    "LayerEncoding",
    "TensorEncoding",
    "container_range",
    "encodings_dict",
    "layer_encodings",
    "write_encodings",
]

ENCODINGS_FORMAT, ENCODINGS_VERSION = "qcalib-encodings", 1


def container_range(bits: int, symmetric: bool, int4: bool = False) -> tuple[str, int, int]:
    """The integer type holding a ``bits``-bit grid and that type's own range."""
    if int4 and bits <= 4:
        return ("int4", -8, 7) if symmetric else ("uint4", 0, 15)
    return ("int8", -128, 127) if symmetric else ("uint8", 0, 255)


@dataclass(frozen=True)
class TensorEncoding:
    """One quantizer's grid: ``x_hat = (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``.

    ``scale`` is float32 and ``zero_point`` int64, both 0-d (per tensor) or 1-d along
    ``axis`` (per channel).
    """

    bits: int
    symmetric: bool
    qmin: int
    qmax: int
    axis: int | None
    scale: torch.Tensor
    zero_point: torch.Tensor

    def container(self, int4: bool = False) -> tuple[str, int, int]:
        return container_range(self.bits, self.symmetric, int4)

    def narrowed(self, int4: bool = False) -> bool:
        """Whether the grid is smaller than its container (needs an explicit clamp)."""
        _, lo, hi = self.container(int4)
        return (self.qmin, self.qmax) != (lo, hi)

    def to_json(self, tensor: str | None, int4: bool = False) -> dict[str, Any]:
        def num(t: torch.Tensor, cast: type) -> Any:
            values = [cast(v) for v in t.flatten().tolist()]
            return values if t.dim() else values[0]

        return {
            "tensor": tensor,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "dtype": self.container(int4)[0],
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.axis,
            "scale": num(self.scale, float),
            "zero_point": num(self.zero_point, int),
        }


@dataclass(frozen=True)
class LayerEncoding:
    """A quantized layer's weight grid and integer codes, and its input's grid."""

    name: str
    type: str
    weight: TensorEncoding | None
    weight_codes: torch.Tensor | None  # int64, the weight's shape; None when float
    activation: TensorEncoding | None


def _grid(q: nn.Module, name: str, axis: int | None) -> TensorEncoding:
    spec = q.spec
    scale = q.scale.detach().cpu().to(torch.float32)
    zp = q.zero_point.detach().cpu()
    if not torch.equal(zp, zp.round()):
        raise QCalibError(f"{name}: zero point is not an integer; only integer grids export")
    if axis is not None and scale.dim() == 0:
        axis = None
    zp = zp.round().to(torch.int64)
    return TensorEncoding(spec.bits, spec.symmetric, spec.qmin, spec.qmax, axis, scale, zp)


def _active(q: nn.Module | None, enabled: bool) -> bool:
    # Mirrors QuantModule._apply / UniformQuantizer.forward: a quantizer changes the tensor
    # only when enabled, fake-quantizing and holding parameters.
    if q is None or not enabled:
        return False
    return bool(getattr(q, "fake_quant_enabled", True)) and bool(getattr(q, "initialized", True))


def _weight_codes(m: nn.Module, enc: TensorEncoding) -> torch.Tensor:
    with torch.no_grad():
        w_hat = m.weight_quantizer(m.weight).detach().cpu().to(torch.float32)
    # Weight grids are per output channel (QuantModule enforces ch_axis=0) or per tensor.
    s = broadcast_param(enc.scale, w_hat, 0)
    z = broadcast_param(enc.zero_point.to(torch.float32), w_hat, 0)
    codes = torch.round(w_hat / s) + z
    inside = bool(((codes >= enc.qmin) & (codes <= enc.qmax)).all())
    if not inside or not torch.equal((codes - z) * s, w_hat):
        raise QCalibError(
            f"{m.layer_name or type(m).__name__}: the quantized weight is not on its integer "
            "grid (a reconstruction left unfinished, with soft rounding?); export a finished "
            "run, whose rounding was hardened"
        )
    return codes.to(torch.int64)


def layer_encodings(qmodel: QuantModel) -> list[LayerEncoding]:
    """The encodings of every quantized layer of ``qmodel``, in execution order."""
    out = []
    for name, m in qmodel.quant_modules():
        w_enc = codes = a_enc = None
        wq = m.weight_quantizer
        if _active(wq, m.use_weight_quant):
            axis = wq.spec.ch_axis if wq.spec.per_channel else None
            w_enc = _grid(wq, f"{name}.weight_quantizer", axis)
            codes = _weight_codes(m, w_enc)
        if _active(m.act_quantizer, m.use_act_quant):
            a_enc = _grid(m.act_quantizer, f"{name}.act_quantizer", None)
        out.append(LayerEncoding(name, type(m).__name__, w_enc, codes, a_enc))
    return out


def encodings_dict(
    layers: list[LayerEncoding],
    *,
    model_file: str | None = None,
    tensor_names: dict[str, dict[str, str | None]] | None = None,
    int4: bool = False,
) -> dict[str, Any]:
    """The JSON document of the module docstring.

    ``tensor_names`` maps a layer name to the ONNX names of its ``"weight"`` and
    ``"activation"`` tensors (the exporter knows them); missing names are ``null``.
    """
    names = tensor_names or {}
    rows = []
    for layer in layers:
        tn = names.get(layer.name, {})
        w, a = layer.weight, layer.activation
        rows.append(
            {
                "name": layer.name,
                "type": layer.type,
                "weight": w.to_json(tn.get("weight"), int4) if w else None,
                "activation": a.to_json(tn.get("activation"), int4) if a else None,
            }
        )
    return {
        "format": ENCODINGS_FORMAT,
        "version": ENCODINGS_VERSION,
        "model": model_file,
        "layers": rows,
    }


def write_encodings(document: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path
