"""Hugging Face text models (causal LMs, encoders) behind qcalib's one-tensor contract.

A wrapped model takes a packed text batch ``[B, 2, L]`` (:mod:`qcalib.data.tokens`) and
returns one tensor, so pools, selectors, observer passes and the reconstruction engine
treat it like an image classifier. The HF model stays a child (``.model``) so its layers
are visible to the quantizer and its decoder / encoder layers to the block partition.

:func:`load_hf_text_model` loads one offline (``local_files_only=True``: a hub is never
asked) from a directory saved with ``save_pretrained`` or from a ``.gguf`` file, which
transformers dequantizes to ``dtype`` on load (``from_pretrained(dir, gguf_file=name)``,
needs the ``gguf`` package). Causal LMs come from ``AutoModelForCausalLM``, encoders from
``AutoModel``. ``task="auto"`` decides from the config, in this order: ``architectures``
naming a ``...ForCausalLM`` / ``...LMHeadModel`` class, ``is_decoder``, a known decoder
``model_type`` (causal LM); an encoder ``model_type`` or ``...ForMaskedLM`` / ``...Model``
architectures (embedding). The tokenizer is loaded when the directory has one; code that
needs it calls :func:`require_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcalib.data.tokens import unpack_tokens
from qcalib.errors import QCalibError

TASKS = ("auto", "causal-lm", "embedding")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
)  # fmt: skip
_DECODER_TYPES = frozenset(
    [
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "gpt2",
        "gpt_neox",
        "gptj",
        "gpt_bigcode",
        "opt",
        "phi",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "falcon",
        "bloom",
        "olmo",
        "olmo2",
        "stablelm",
        "starcoder2",
        "cohere",
    ]
)
_ENCODER_TYPES = frozenset(
    [
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "albert",
        "electra",
        "mpnet",
        "deberta",
        "deberta-v2",
        "camembert",
        "modernbert",
        "nomic_bert",
    ]
)


class HFTextModel(nn.Module):
    """Common base: the wrapped HF model, its tokenizer (optional) and the mask accessor.

    ``task`` names what :meth:`forward` returns: ``"causal-lm"`` (next-token logits
    ``[B, L, V]``) or ``"embedding"`` (mask-mean-pooled last hidden state ``[B, H]``).
    """

    task = ""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        # Not a module: kept out of state_dict and .to().
        self.__dict__["tokenizer"] = tokenizer

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @staticmethod
    def token_mask(x: Tensor) -> Tensor:
        """The attention mask ``[B, L]`` of a packed batch (statistics skip padding)."""
        return unpack_tokens(x)[1]


class HFCausalLM(HFTextModel):
    """``forward(x [B, 2, L]) -> logits [B, L, V]`` of an ``AutoModelForCausalLM``."""

    task = "causal-lm"

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = unpack_tokens(x)
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = getattr(out, "logits", None)
        return out[0] if logits is None else logits


class HFEncoder(HFTextModel):
    """``forward(x [B, 2, L]) -> [B, H]``: an ``AutoModel`` encoder's last hidden state,
    averaged over the real tokens (sentence-transformers' mean pooling)."""

    task = "embedding"

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = unpack_tokens(x)
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden = getattr(out, "last_hidden_state", None)
        hidden = out[0] if hidden is None else hidden
        w = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def text_task(config: Any) -> str | None:
    """``"causal-lm"``, ``"embedding"`` or None (not recognisably a text model)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    archs = [str(a) for a in (get("architectures") or [])]
    model_type = str(get("model_type", "") or "")
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or get("is_decoder"):
        return "causal-lm"
    if model_type in _DECODER_TYPES:
        return "causal-lm"
    if model_type in _ENCODER_TYPES:
        return "embedding"
    is_image = get("image_size") is not None or get("num_channels") is not None
    if (
        not is_image
        and get("vocab_size")
        and any(a.endswith(("ForMaskedLM", "Model")) for a in archs)
    ):
        return "embedding"
    return None


def is_text_model_path(path: str | Path) -> bool:
    """A ``.gguf`` file, or a directory whose ``config.json`` describes a text model."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return text_task(json.loads(config.read_text())) is not None
    except (OSError, ValueError):
        return False


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_hf_text_model(
    path: str | Path, task: str = "auto", dtype: torch.dtype = torch.float32
) -> HFTextModel:
    """Load a local transformers text model (directory or ``.gguf`` file), eval mode."""
    if task not in TASKS:
        raise QCalibError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    try:
        import transformers
    except ImportError:
        raise QCalibError(f"hf:{path} needs transformers; run `pip install transformers`") from None
    path = Path(path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise QCalibError(f"GGUF file {path} does not exist")
        try:
            import gguf  # noqa: F401  (transformers reads GGUF through it)
        except ImportError:
            raise QCalibError(f"{path} is a GGUF file; run `pip install gguf` to read it") from None
        directory, kwargs["gguf_file"] = path.parent, path.name
    else:
        if not path.is_dir():
            raise QCalibError(
                f"{path} is neither a model directory nor a .gguf file; pass the directory "
                "written by save_pretrained (qcalib never downloads)"
            )
        if not (path / "config.json").is_file():
            raise QCalibError(
                f"{path} is not a transformers model (no config.json); pass the directory "
                "written by save_pretrained, or a .gguf file"
            )
        directory = path
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise QCalibError(
            f"cannot read the config of {path} ({_first_line(e)}); is it a transformers "
            "model your transformers version supports?"
        ) from None
    if task == "auto":
        detected = text_task(config)
        if detected is None:
            raise QCalibError(
                f"cannot tell whether {path} ({config.model_type}) is a causal LM or an "
                "encoder; pass task='causal-lm' or task='embedding'"
            )
        task = detected
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    try:
        model = auto.from_pretrained(str(directory), dtype=dtype, **kwargs)
    except ValueError as e:
        raise QCalibError(
            f"unsupported architecture {config.model_type!r} for {task} in {path} "
            f"({_first_line(e)}); pass the other task or convert the model"
        ) from None
    except (OSError, RuntimeError) as e:
        raise QCalibError(f"cannot load the weights of {path} ({_first_line(e)})") from None
    tokenizer = None
    # Without tokenizer files transformers 5 builds a default (empty-vocabulary) tokenizer
    # for some model types: that is no tokenizer.
    if "gguf_file" in kwargs or any((directory / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs)
        except Exception:  # noqa: BLE001 - no usable tokenizer is fine until one is needed
            tokenizer = None
    wrapper = HFCausalLM if task == "causal-lm" else HFEncoder
    adapter = wrapper(model.eval(), tokenizer)
    adapter.__dict__["source"] = str(path)
    return adapter.eval()


def require_tokenizer(model: HFTextModel) -> Any:
    """The model's tokenizer, or a QCalibError saying where to put one."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        where = model.__dict__.get("source", "the model directory")
        raise QCalibError(
            f"no tokenizer found with {where}; save one there with "
            "tokenizer.save_pretrained(...) (tokenizer.json), or pass pre-tokenized data"
        )
    return tokenizer
