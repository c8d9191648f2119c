"""ONNX export in QDQ form, checked in ONNX Runtime as it is written.

How the graph is built:

* A copy of the calibrated network gets export stand-ins for its quantizers, from the
  records of :func:`qcalib.export.encodings.layer_encodings`. Each quantized layer's
  ``weight`` becomes an integer buffer holding the weight's codes (with the learned
  rounding of AdaRound / BRECQ / QDrop: see that module), and its weight quantizer a
  module that dequantizes it; its input quantizer becomes a quantize-dequantize module.
* Both are ``torch.library`` custom ops (``qcalib::dequantize_weight``,
  ``qcalib::quantize_dequantize``, ``qcalib::quantize_dequantize_clipped``). In PyTorch
  they compute what qcalib's fake quantizer computes (the same
  :func:`~qcalib.quant.functional.fake_quantize`); ``torch.onnx.export(dynamo=True)``
  translates them, through ``custom_translation_table``, into ONNX
  ``DequantizeLinear(int weight initializer, scale, zero point, axis=0)`` and
  ``QuantizeLinear -> DequantizeLinear`` on activations. Everything else (residual adds,
  pooling, activations, the float bias) is exported by torch as usual, in float.
* **Narrowed ranges.** ONNX QuantizeLinear saturates to its container's range
  (``[0, 255]`` for ``uint8``), not to a 4-bit grid's ``[0, 15]``. Where the grid is
  narrower than the container, a ``Clip`` to ``[(qmin - z) s, (qmax - z) s]`` in float
  sits right before the QuantizeLinear, so Q and DQ stay adjacent (the pattern QDQ
  tools look for). This is exact: a clipped value is within a few float32 ulps of
  ``(qmax - z) s``, so ``x / s`` rounds to ``qmax - z`` as the fake quantizer's clamp
  does; unclipped values are untouched. Weights need no clip (their codes are stored).
* **int4.** With ``int4=True`` grids of at most 4 bits are stored as ONNX ``INT4`` /
  ``UINT4`` (opset 21): the export is made with 8-bit buffers and the weight codes and
  zero points of those grids are retyped afterwards with the ``onnx`` package. Refused
  with a clear error when the installed ONNX Runtime cannot run int4 QuantizeLinear.
* **Deterministic.** The exporter runs without its optimizer pass (which merges equal
  initializers, e.g. two layers' zero points, and so would tie one layer's int4 retyping
  to another's) and without report files; the same run exported twice gives
  byte-identical files (tested). The batch dimension is dynamic (named ``batch``).
* **Checked on write.** ``onnx.checker.check_model(full_check=True)``, then ONNX Runtime
  (CPUExecutionProvider) on the check inputs against the PyTorch fake-quant model, twice
  (:func:`verify_onnx`): with graph optimizations off, i.e. the QDQ graph's own
  arithmetic, and with ONNX Runtime's defaults, as a user runs it. :class:`ExportReport`
  carries the max absolute output difference of both and their top-1 agreement (mean
  cosine for an encoder's embeddings; per position for next-token logits). Ops torch
  cannot export, or that ONNX Runtime cannot run, raise
  :class:`~qcalib.errors.QCalibError` naming them.

Expected differences from fake quant. *As written*: weights are bit-identical (same
integers, same ``(q - z) * s`` in float32) and activations are quantized with the same
``x / s`` and round-half-to-even, so only float32 summation order inside convolutions
differs (~1e-7 relative; 6e-8 on the tests' tiny models). Such a difference can carry
a value across a rounding boundary and change that activation by one step ``s``, which
then propagates: on the ResNet-20 reference at W8A8 the max logit difference on 16
images was 0.041 (logits up to 13.7), but the float32 fake-quant model itself differs
from its float64 evaluation by 0.042, and ONNX Runtime is 0.030 from float64: the
float32 noise floor of a fine grid, not an export error. The tests bound it by a small
fraction of the output range. *As deployed*: ONNX Runtime's ``WeightBiasQuantization``
transform (on by default) rounds the float bias of the convs it groups with their Q/DQ
inputs to int32 at scale ``s_x * s_w`` (integer kernels need it), moving it by up to
``s_x * s_w / 2`` per channel; with that one transform disabled the deployed outputs
equal the as-written ones exactly (tested), so it is the whole of the difference. qcalib
keeps biases in float (see :mod:`qcalib.model.qmodules`); the deployed figure is the one
a user of ONNX Runtime gets. It grows as the grids get coarser: on the ResNet-20
reference at W4A4 it moved logits by up to 1.6 and changed 2.4% of the test predictions
(top-1 92.71% fake quant, 92.72% as written, 92.65% deployed). To run the exact
fake-quant function, pass ``disabled_optimizers=["WeightBiasQuantization"]`` to
``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qcalib.errors import QCalibError

try:
    import onnx
    import onnxruntime  # noqa: F401 - checked here, used lazily
    import onnxscript  # noqa: F401
except ImportError as e:
    raise QCalibError(
        f"ONNX export needs the onnx, onnxruntime and onnxscript packages ({e.name} is "
        "missing): pip install 'qcalib[export]'"
    ) from e
from qcalib.export.encodings import (
    LayerEncoding,
    TensorEncoding,
    encodings_dict,
    layer_encodings,
    write_encodings,
)
from qcalib.model.wrap import QuantModel
from qcalib.quant.functional import broadcast_param, fake_quantize

__all__ = [
    "DEFAULT_OPSET",
    "INT4_OPSET",
    "ExportReport",
    "export_onnx",
    "ort_supports_int4",
    "run_onnx",
    "verify_onnx",
]

log = logging.getLogger(__name__)

# 18 is the opset the torch exporter's op library is written for; 21 introduces int4.
DEFAULT_OPSET, INT4_OPSET, MIN_OPSET = 18, 21, 18
_ONNX_INT_TYPE = {
    "int8": onnx.TensorProto.INT8,
    "uint8": onnx.TensorProto.UINT8,
    "int4": onnx.TensorProto.INT4,
    "uint4": onnx.TensorProto.UINT4,
}
_TORCH_CONTAINER = {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.int8,
                    "uint4": torch.uint8}  # fmt: skip


# --- custom ops: fake quant in PyTorch, Q/DQ nodes in ONNX --------------------------------


@torch.library.custom_op("qcalib::dequantize_weight", mutates_args=())
def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    s = broadcast_param(scale, codes, 0)
    z = broadcast_param(zero_point, codes, 0)
    return (codes.to(torch.float32) - z.to(torch.float32)) * s


@dequantize_weight.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("qcalib::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    return fake_quantize(x, scale, zero_point.to(torch.float32), qmin, qmax)


@quantize_dequantize.register_fake
def _(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qcalib::quantize_dequantize_clipped", mutates_args=())
def quantize_dequantize_clipped(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    clip_lo: torch.Tensor,
    clip_hi: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    # The clip bounds are what the ONNX graph clips with; the PyTorch value is the fake
    # quantizer's, which the module docstring shows to be the same.
    return fake_quantize(x, scale, zero_point.to(torch.float32), qmin, qmax)


@quantize_dequantize_clipped.register_fake
def _(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    clip_lo: torch.Tensor,
    clip_hi: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    return torch.empty_like(x)


@functools.cache
def _translation_table() -> dict:
    from onnxscript import opset18 as op

    def dq_weight(codes, scale, zero_point):  # noqa: ANN001, ANN202
        return op.DequantizeLinear(codes, scale, zero_point, axis=0)

    def qdq(x, scale, zero_point, qmin: int, qmax: int):  # noqa: ANN001, ANN202
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def qdq_clipped(x, scale, zero_point, clip_lo, clip_hi, qmin: int, qmax: int):  # noqa: ANN001, ANN202
        q = op.QuantizeLinear(op.Clip(x, clip_lo, clip_hi), scale, zero_point)
        return op.DequantizeLinear(q, scale, zero_point)

    return {
        torch.ops.qcalib.dequantize_weight.default: dq_weight,
        torch.ops.qcalib.quantize_dequantize.default: qdq,
        torch.ops.qcalib.quantize_dequantize_clipped.default: qdq_clipped,
    }


# --- export stand-ins -----------------------------------------------------------------------


class WeightDequantizer(nn.Module):
    """Stands in for a weight quantizer: receives the integer codes, returns the weight."""

    def __init__(self, enc: TensorEncoding, int4: bool) -> None:
        super().__init__()
        dtype = _TORCH_CONTAINER[enc.container(int4)[0]]
        self.register_buffer("scale", enc.scale.clone())
        self.register_buffer("zero_point", enc.zero_point.to(dtype))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return dequantize_weight(codes, self.scale, self.zero_point)


class ActQuantDequant(nn.Module):
    """Stands in for an input quantizer: Q/DQ, clipped first when the grid is narrowed."""

    def __init__(self, enc: TensorEncoding, int4: bool) -> None:
        super().__init__()
        dtype = _TORCH_CONTAINER[enc.container(int4)[0]]
        self.qmin, self.qmax = enc.qmin, enc.qmax
        self.clipped = enc.narrowed(int4)
        self.register_buffer("scale", enc.scale.clone())
        self.register_buffer("zero_point", enc.zero_point.to(dtype))
        if self.clipped:
            z = enc.zero_point.to(torch.float32)
            self.register_buffer("clip_lo", (self.qmin - z) * enc.scale)
            self.register_buffer("clip_hi", (self.qmax - z) * enc.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            return quantize_dequantize_clipped(
                x, self.scale, self.zero_point, self.clip_lo, self.clip_hi, self.qmin, self.qmax
            )
        return quantize_dequantize(x, self.scale, self.zero_point, self.qmin, self.qmax)


def export_network(qmodel: QuantModel, layers: list[LayerEncoding], int4: bool) -> nn.Module:
    """A copy of ``qmodel``'s network with the export stand-ins in place (see module doc)."""
    net = copy.deepcopy(qmodel.model).eval()
    for layer in layers:
        m = net.get_submodule(layer.name)
        if layer.weight is not None:
            dtype = _TORCH_CONTAINER[layer.weight.container(int4)[0]]
            del m.weight  # the float parameter; the codes take its name
            m.register_buffer("weight", layer.weight_codes.to(dtype))
            m.weight_quantizer = WeightDequantizer(layer.weight, int4)
        if layer.activation is not None:
            m.act_quantizer = ActQuantDequant(layer.activation, int4)
        else:
            m.use_act_quant = False
    return net


# --- ONNX Runtime -----------------------------------------------------------------------------


def _ort_session(
    model: bytes | str | Path, optimized: bool = True, disabled_optimizers: tuple[str, ...] = ()
) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(
            src, opts, ["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers)
        )
    except Exception as e:  # ORT raises its own exception types per failure
        ops = sorted(set(re.findall(r"implementation for (\w+)\(\d+\)", str(e))))
        if ops:
            raise QCalibError(
                f"ONNX Runtime {ort.__version__} (CPU) cannot run op(s) {', '.join(ops)} of "
                "the exported graph; keep those layers out of the model or use another "
                "runtime"
            ) from e
        raise


def run_onnx(
    path: str | Path,
    inputs: torch.Tensor,
    optimized: bool = True,
    disabled_optimizers: tuple[str, ...] = (),
) -> torch.Tensor:
    """ONNX Runtime (CPU) outputs of the exported model on one batch.

    ``optimized=False`` turns graph optimizations off; ``disabled_optimizers`` names ONNX
    Runtime transformers to skip (e.g. ``("WeightBiasQuantization",)``).
    """
    sess = _ort_session(Path(path), optimized, disabled_optimizers)
    name = sess.get_inputs()[0].name
    return torch.from_numpy(sess.run(None, {name: inputs.detach().cpu().numpy()})[0])


@functools.cache
def ort_supports_int4() -> bool:
    """Whether the installed ONNX Runtime runs an int4 QuantizeLinear / DequantizeLinear."""
    h = onnx.helper
    nodes = [
        h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    inits = [h.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.5]),
             h.make_tensor("z", onnx.TensorProto.UINT4, [], [3])]  # fmt: skip
    graph = h.make_graph(
        nodes, "int4_probe",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], inits,
    )  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", INT4_OPSET)])
    try:
        sess = _ort_session(model.SerializeToString())
        x = np.array([-9.0, 0.2, 1.3, 9.0], dtype=np.float32)
        y = sess.run(None, {"x": x})[0]
    except Exception:  # noqa: BLE001 - any failure means: not supported
        return False
    return bool(np.array_equal(y, np.array([-1.5, 0.0, 1.5, 6.0], dtype=np.float32)))


@dataclass(frozen=True)
class Comparison:
    """ONNX Runtime vs PyTorch fake quant on the same inputs."""

    max_abs_diff: float
    # Percent of argmax matches over the last dim: classifier logits [N, C], or next-token
    # logits [N, L, V] per position; None for embeddings and single outputs.
    top1_agreement: float | None
    # Mean cosine of the rows: embeddings [N, D] (an argmax over an embedding means nothing).
    mean_cosine: float | None = None


def compare_outputs(got: torch.Tensor, ref: torch.Tensor, task: str | None = None) -> Comparison:
    """``task`` is the model's output kind (``HFTextModel.task``): ``"embedding"`` compares
    by cosine, anything else with a last dim > 1 by top-1 agreement."""
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {tuple(got.shape)} != torch {tuple(ref.shape)}")
    diff = float((got.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    agree = cosine = None
    if task == "embedding":
        cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
        cosine = float(cos.mean())
    elif ref.dim() >= 2 and ref.shape[-1] > 1:
        agree = 100.0 * float((got.argmax(-1) == ref.argmax(-1)).double().mean())
    return Comparison(diff, agree, cosine)


def verify_onnx(
    path: str | Path, qmodel: nn.Module, inputs: torch.Tensor
) -> tuple[Comparison, Comparison]:
    """Compare the ONNX file with ``qmodel`` on ``inputs``: (graph as written, as deployed).

    *As written*: ONNX Runtime with graph optimizations off, i.e. the QDQ graph's own
    arithmetic; it should match fake quant up to float32 summation order. *As deployed*:
    ONNX Runtime's defaults, whose ``WeightBiasQuantization`` transform rounds the float
    bias of the convs it groups with their Q/DQ inputs to int32 at scale ``s_x * s_w``
    (what integer kernels need); that rounding (up to half a step of ``s_x * s_w`` per
    output channel) is a real deployment difference, reported separately.
    """
    param = next(iter(qmodel.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        ref = qmodel(inputs.to(device)).detach().cpu().to(torch.float32)
    task = getattr(getattr(qmodel, "model", None), "task", None)
    written = compare_outputs(run_onnx(path, inputs, optimized=False), ref, task)
    deployed = compare_outputs(run_onnx(path, inputs, optimized=True), ref, task)
    return written, deployed


# --- export -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how its ONNX Runtime outputs compare."""

    path: str
    encodings_path: str
    opset: int
    int4: bool
    quantized_layers: int
    check_inputs: int
    # ONNX Runtime vs fake quant, graph optimizations off (the QDQ graph as written).
    max_abs_diff: float
    top1_agreement: float | None
    # The same with ONNX Runtime's default optimizations (int32 bias, fused kernels).
    deployed_max_abs_diff: float
    deployed_top1_agreement: float | None
    # Encoders (embedding outputs): mean cosine to fake quant instead of top-1 agreement.
    mean_cosine: float | None = None
    deployed_mean_cosine: float | None = None

    def summary(self) -> str:
        def match(agree: float | None, cosine: float | None) -> str:
            if cosine is not None:
                return f", mean cosine {cosine:.6f}"
            return "" if agree is None else f", top-1 agreement {agree:.1f}%"

        return (
            f"{self.path}: opset {self.opset}{' int4' if self.int4 else ''}, "
            f"{self.quantized_layers} quantized layers; ONNX Runtime vs fake quant on "
            f"{self.check_inputs} inputs: max |output diff| {self.max_abs_diff:.3g}"
            f"{match(self.top1_agreement, self.mean_cosine)}; with ONNX Runtime's "
            f"optimizations (int32 bias) {self.deployed_max_abs_diff:.3g}"
            f"{match(self.deployed_top1_agreement, self.deployed_mean_cosine)}"
        )


def _unsupported_ops(err: BaseException) -> list[str]:
    text = "".join(str(e) for e in _chain(err))
    found = re.findall(r"Unsupported FX nodes: \{'call_function': \[([^\]]*)\]", text)
    names = [n.strip().strip("'\"") for group in found for n in group.split(",")]
    names += re.findall(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    return sorted(set(n for n in names if n))


def _chain(err: BaseException | None) -> list[BaseException]:
    out = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _retype_int4(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Store the initializers named in ``names`` (name -> "int4"/"uint4") as int4 types."""
    todo = dict(names)
    for i, init in enumerate(model.graph.initializer):
        if init.name not in todo:
            continue
        values = onnx.numpy_helper.to_array(init).astype(np.int64)
        kind = _ONNX_INT_TYPE[todo.pop(init.name)]
        model.graph.initializer[i].CopyFrom(
            onnx.helper.make_tensor(init.name, kind, list(values.shape), values.flatten().tolist())
        )
    if todo:
        raise RuntimeError(f"int4 export: initializers not found in the graph: {sorted(todo)}")
    # The exporter's recorded types of QuantizeLinear outputs still say 8-bit; shape
    # inference (the checker's full check) re-derives all of them.
    del model.graph.value_info[:]


def _tensor_names(model: onnx.ModelProto, layers: list[LayerEncoding]) -> dict[str, dict]:
    """ONNX names of each layer's weight initializer and quantized input tensor."""
    inits = {i.name for i in model.graph.initializer}
    q_input = {}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            src = node.input[0]
            clip = producers.get(src)
            if clip is not None and clip.op_type == "Clip":
                src = clip.input[0]
            q_input[node.input[1]] = src
    out = {}
    for layer in layers:
        w = f"{layer.name}.weight" if layer.name else "weight"
        a = f"{layer.name}.act_quantizer.scale" if layer.name else "act_quantizer.scale"
        out[layer.name] = {
            "weight": w if layer.weight is not None and w in inits else None,
            "activation": q_input.get(a) if layer.activation is not None else None,
        }
    return out


def _int4_names(layers: list[LayerEncoding]) -> dict[str, str]:
    names = {}
    for layer in layers:
        prefix = f"{layer.name}." if layer.name else ""
        for enc, tensors in (
            (layer.weight, ("weight", "weight_quantizer.zero_point")),
            (layer.activation, ("act_quantizer.zero_point",)),
        ):
            if enc is None or enc.container(True)[0] not in ("int4", "uint4"):
                continue
            for t in tensors:
                names[prefix + t] = enc.container(True)[0]
    return names


def export_onnx(
    qmodel: QuantModel,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    int4: bool = False,
    opset: int | None = None,
    check_inputs: torch.Tensor | None = None,
) -> ExportReport:
    """Write ``qmodel`` as a QDQ ONNX model to ``path`` and ``PATH.encodings.json`` beside it.

    ``example_input`` is one batch (at least 2 samples: the batch dimension is exported as
    dynamic). ``check_inputs`` (default ``example_input``) are run in ONNX Runtime and
    compared with ``qmodel``. ``opset`` defaults to 18, or 21 with ``int4``.
    """
    if not isinstance(qmodel, QuantModel):
        raise QCalibError(f"export_onnx needs a calibrated QuantModel, got {type(qmodel).__name__}")
    if opset is None:
        opset = INT4_OPSET if int4 else DEFAULT_OPSET
    if opset < MIN_OPSET or (int4 and opset < INT4_OPSET):
        need = INT4_OPSET if int4 else MIN_OPSET
        raise QCalibError(f"--opset {opset} is too old for this export; use --opset {need}+")
    if int4 and not ort_supports_int4():
        import onnxruntime as ort

        raise QCalibError(
            f"the installed onnxruntime {ort.__version__} cannot run int4 QuantizeLinear / "
            "DequantizeLinear; drop --int4 (sub-8-bit grids then use int8/uint8 containers) "
            "or upgrade onnxruntime"
        )
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise QCalibError("export_onnx needs an example batch tensor (ONNX export takes one input)")
    if example_input.shape[0] < 2:
        raise QCalibError("the example batch needs at least 2 samples (the batch is dynamic)")
    path = Path(path)
    layers = layer_encodings(qmodel)
    net = export_network(qmodel, layers, int4).cpu()
    example = example_input.detach().cpu()
    batch = torch.export.Dim("batch")
    try:
        program = torch.onnx.export(
            net, (example,), dynamo=True, opset_version=opset, external_data=False,
            input_names=["input"], output_names=["output"],
            dynamic_shapes=({0: batch},), custom_translation_table=_translation_table(),
            optimize=False, verify=False, report=False, verbose=False,
        )  # fmt: skip
    except Exception as e:  # the exporter wraps failures in several exception types
        ops = _unsupported_ops(e)
        if ops:
            raise QCalibError(
                f"cannot export op(s) {', '.join(ops)} to ONNX; replace those modules "
                "with exportable ones (or register an ONNX translation for them)"
            ) from e
        raise
    model = program.model_proto
    if int4:
        _retype_int4(model, _int4_names(layers))
    model.producer_name, model.producer_version = "qcalib", ""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"the exported ONNX model fails the ONNX checker: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))

    enc_path = path.with_suffix(".encodings.json")
    doc = encodings_dict(layers, model_file=path.name, tensor_names=_tensor_names(model, layers),
                         int4=int4)  # fmt: skip
    write_encodings(doc, enc_path)

    inputs = example if check_inputs is None else check_inputs.detach().cpu()
    written, deployed = verify_onnx(path, qmodel, inputs)
    report = ExportReport(
        path=str(path), encodings_path=str(enc_path), opset=opset, int4=int4,
        quantized_layers=sum(1 for layer in layers if layer.weight or layer.activation),
        check_inputs=int(inputs.shape[0]),
        max_abs_diff=written.max_abs_diff, top1_agreement=written.top1_agreement,
        deployed_max_abs_diff=deployed.max_abs_diff,
        deployed_top1_agreement=deployed.top1_agreement,
        mean_cosine=written.mean_cosine, deployed_mean_cosine=deployed.mean_cosine,
    )  # fmt: skip
    log.info("%s", report.summary())
    return report
