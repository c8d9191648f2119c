"""Typed, frozen run configuration. One :class:`RunConfig` flows from the CLI / API down.

Defaults follow the field's standard PTQ protocol (design.md §1): BN folded, weights
per output channel, activations per tensor on the inputs of quantized layers, first and
last layer at 8 bits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qcalib.errors import QCalibError
from qcalib.quant.functional import check_bits

# ``abits`` value meaning "activations stay float" (weight-only W4A16, W3A16 ...).
FLOAT_ABITS = 16


@dataclass(frozen=True)
class QuantConfig:
    """The quantization grid of a run.

    ``abits=16`` (or None, stored as 16) keeps every activation float: weight-only
    quantization, first and last layer included. ``a_dynamic`` quantizes activations per
    token at run time (no calibrated range; a "token" is a row of the input's last
    dimension, meant for ``[B, L, C]`` transformer inputs). ``group_size`` gives each
    group of that many input channels of a weight row its own scale / zero point (None:
    one per output channel), for every calibrator. ``smoothquant_alpha`` (None: off)
    migrates activation outliers into the weights before wrapping
    (:mod:`qcalib.model.smooth`), into the norms only (``smoothquant_pairs="norm"``) or
    also through the v -> o and up -> down linear pairs (``"all"``).
    """

    wbits: int = 4
    abits: int | None = 4
    # Asymmetric per-channel weights are what BRECQ/QDrop report with; at 2 bits an
    # asymmetric grid keeps all four levels inside the channel's range.
    w_symmetric: bool = False
    w_per_channel: bool = True
    a_symmetric: bool = False
    # Bits of the first and last quantized layer (weights and input activation);
    # None quantizes them like every other layer.
    # Text models (HF causal LMs / encoders) ignore first_last_bits: their attention and MLP
    # linears are all quantized alike and the output head (lm_head) stays float unless
    # lm_head_bits gives its width (weights and input); the embedding tables stay float
    # unless embedding_bits rounds them (per row, weight only; model/wrap.py).
    first_last_bits: int | None = 8
    lm_head_bits: int | None = None
    embedding_bits: int | None = None
    fold_bn: bool = True
    # quantize_model refuses a model whose conv/linear-like weights stay float beyond 5%
    # (no quantized twin: Conv1d, MultiheadAttention, ...); True quantizes the rest anyway.
    allow_float_layers: bool = False
    group_size: int | None = None
    a_dynamic: bool = False
    smoothquant_alpha: float | None = None
    smoothquant_pairs: str = "norm"

    def __post_init__(self) -> None:
        if self.abits is None:
            object.__setattr__(self, "abits", FLOAT_ABITS)
        for name in ("wbits", "abits"):
            if name == "abits" and self.abits == FLOAT_ABITS:
                continue
            try:
                check_bits(getattr(self, name))
            except QCalibError as e:
                raise QCalibError(
                    f"--{name}: {e} (or 16 / none for float activations)"
                    if name == "abits"
                    else f"--{name}: {e}"
                ) from None
        for name in ("first_last_bits", "lm_head_bits", "embedding_bits"):
            if getattr(self, name) is not None:
                try:
                    check_bits(getattr(self, name))
                except QCalibError as e:
                    raise QCalibError(f"--{name.replace('_', '-')}: {e}") from None
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise QCalibError(f"--group-size must be a positive integer, got {self.group_size!r}")
        if self.group_size is not None and not self.w_per_channel:
            raise QCalibError("--group-size needs per-channel weights; drop --per-tensor-weights")
        if self.a_dynamic and not self.quantize_activations:
            raise QCalibError("--a-dynamic needs quantized activations; set --abits 2..8")
        alpha = self.smoothquant_alpha
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise QCalibError(f"--smoothquant ALPHA must be in [0, 1], got {alpha}")
        if self.smoothquant_pairs not in ("norm", "all"):
            raise QCalibError(
                f"--smoothquant-pairs must be norm or all, got {self.smoothquant_pairs!r}"
            )

    @property
    def quantize_activations(self) -> bool:
        return self.abits != FLOAT_ABITS


# Per-block iterations and batch size of the reconstruction profiles (AdaRound / BRECQ /
# QDrop). "paper" is the published setting: 20k iterations per block (the weight-rounding
# stage; BRECQ's separate activation-step stage runs 5k), batch 32. "fast" is for CPU use:
# in a smoke run W2A4 on the ResNet-20 reference model took 1-2 minutes on two cores.
RECON_PROFILES: dict[str, dict[str, int]] = {
    "fast": {"iters": 500, "act_iters": 200, "batch_size": 32},
    "paper": {"iters": 20000, "act_iters": 5000, "batch_size": 32},
}


CONTRASTIVE_LOSSES = ("nce", "infonce")
CONTRASTIVE_CRITICS = ("truncated", "full", "projection")
CONTRASTIVE_SCHEDULES = ("constant", "fade")


@dataclass(frozen=True)
class ContrastiveConfig:
    """CL-Calib's contrastive term, added to every reconstruction stage's loss.

    ``L = L_rec + weight * L_CL`` with similarities ``<z_q,i, z_f,j> / temperature`` of
    L2-normalized critic features. ``critic``: ``truncated`` (the next ``tail_blocks``
    blocks of the frozen FP network, then global average pooling), ``full`` (every block
    after this one, as far as they chain), or ``projection`` (a trainable linear head on
    the pooled block output, ``proj_dim`` wide, Adam at ``proj_lr``: an ablation, the one
    critic that trains something). ``center`` subtracts the mean FP feature of the
    calibration set before normalizing (frozen critics). ``schedule``: ``constant`` keeps
    ``weight`` for every iteration, ``fade`` decays it to 0 over each reconstruction
    stage (cosine). Defaults: see :mod:`qcalib.calibrate.contrastive`; ``weight`` = 0.1 was
    chosen on a validation split (``bench/results/contrastive-ablation.md``), the paper's
    1.0 cost 0.65 point there.
    """

    weight: float = 0.1
    temperature: float = 0.1
    loss: str = "nce"
    critic: str = "truncated"
    tail_blocks: int = 1
    center: bool = True
    proj_dim: int = 128
    proj_lr: float = 1e-3
    schedule: str = "constant"

    def __post_init__(self) -> None:
        checks = (
            (self.weight >= 0, f"--cl-weight must be at least 0, got {self.weight}"),
            (
                self.schedule in CONTRASTIVE_SCHEDULES,
                f"--cl-schedule must be one of {', '.join(CONTRASTIVE_SCHEDULES)}, "
                f"got {self.schedule!r}",
            ),
            (self.temperature > 0, f"--cl-temperature must be positive, got {self.temperature}"),
            (
                self.loss in CONTRASTIVE_LOSSES,
                f"--cl-loss must be one of {', '.join(CONTRASTIVE_LOSSES)}, got {self.loss!r}",
            ),
            (
                self.critic in CONTRASTIVE_CRITICS,
                f"--cl-critic must be one of {', '.join(CONTRASTIVE_CRITICS)}, got {self.critic!r}",
            ),
            (self.tail_blocks >= 0, f"--cl-tail-blocks must be at least 0, got {self.tail_blocks}"),
            (self.proj_dim >= 1, f"proj_dim must be at least 1, got {self.proj_dim}"),
            (self.proj_lr > 0, f"proj_lr must be positive, got {self.proj_lr}"),
        )
        for ok, message in checks:
            if not ok:
                raise QCalibError(message)


@dataclass(frozen=True)
class ReconConfig:
    """Settings of the reconstruction calibrators (``adaround``, ``brecq``, ``qdrop``).

    ``iters`` / ``act_iters`` / ``batch_size`` left at ``None`` take the profile's values,
    so ``ReconConfig(profile="paper")`` is the published setting. Other defaults follow
    the BRECQ / QDrop code: Adam lr 1e-3 on the rounding variables and 4e-5 on activation
    step sizes (cosine-annealed), rounding regularizer weight 0.01 with beta annealed from
    20 to 2 after a 20% warm-up, QDrop probability 0.5, weights initialized by a
    per-channel MSE search, activations by an MSE search. ``amp`` (bfloat16 autocast of
    the block's forward) and ``compile`` (``torch.compile`` of it) are speed switches, off
    by default (see :mod:`qcalib.calibrate.reconstruct`).
    """

    profile: str = "fast"
    iters: int | None = None
    act_iters: int | None = None
    batch_size: int | None = None
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    reg_weight: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    fisher: bool = False
    w_observer: str = "mse"
    a_observer: str = "mse"
    # CL-Calib add-on (None: off); a nested dict (from RunConfig.from_dict) is accepted.
    contrastive: ContrastiveConfig | None = None
    # Speed switches (qcalib.calibrate.reconstruct): the block's forward in bfloat16 autocast,
    # and through torch.compile.
    amp: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.contrastive, dict):
            object.__setattr__(self, "contrastive", ContrastiveConfig(**self.contrastive))
        if self.profile not in RECON_PROFILES:
            raise QCalibError(
                f"--profile must be one of {', '.join(RECON_PROFILES)}, got {self.profile!r}"
            )
        for name, value in RECON_PROFILES[self.profile].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        checks = (
            (self.iters >= 0, f"--iters must be at least 0, got {self.iters}"),
            (self.act_iters >= 0, f"--act-iters must be at least 0, got {self.act_iters}"),
            (self.batch_size >= 1, f"--recon-batch-size must be at least 1, got {self.batch_size}"),
            (self.w_lr > 0, f"--w-lr must be positive, got {self.w_lr}"),
            (self.a_lr > 0, f"--a-lr must be positive, got {self.a_lr}"),
            (self.reg_weight >= 0, f"--reg-weight must be at least 0, got {self.reg_weight}"),
            (self.b_start > 0 and self.b_end > 0, "beta (b_start, b_end) must be positive"),
            (0.0 <= self.warmup < 1.0, f"--warmup must be in [0, 1), got {self.warmup}"),
            (0.0 <= self.drop_prob <= 1.0, f"--drop-prob must be in [0, 1], got {self.drop_prob}"),
        )
        for ok, message in checks:
            if not ok:
                raise QCalibError(message)
        from qcalib.quant.observers import OBSERVERS

        for name in (self.w_observer, self.a_observer):
            if name not in OBSERVERS:
                raise QCalibError(
                    f"unknown observer {name!r}; choose one of: {', '.join(OBSERVERS.names())}"
                )


@dataclass(frozen=True)
class GPTQConfig:
    """Settings of the ``gptq`` calibrator (Frantar et al. 2022; defaults of the paper's
    code). The group size is a property of the grid: ``QuantConfig.group_size``."""

    act_order: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    # Weight of each token sequence's first token in H (1 = the paper's plain mean over
    # tokens; 16 was best of 1/4/16/64/256 on SmolLM2 validation windows). See
    # qcalib.calibrate.gptq, "First-token weight".
    first_token_weight: float = 16.0

    def __post_init__(self) -> None:
        if not self.first_token_weight > 0:
            raise QCalibError(
                f"--gptq-first-token-weight must be positive, got {self.first_token_weight}"
            )
        if not self.percdamp > 0:
            raise QCalibError(f"--percdamp must be positive, got {self.percdamp}")
        if self.block_size < 1:
            raise QCalibError(f"GPTQ block_size must be at least 1, got {self.block_size}")


@dataclass(frozen=True)
class CalibConfig:
    calibrator: str = "minmax"
    num_calib: int = 64
    batch_size: int = 64
    percentile: float = 99.99
    mse_candidates: int = 100
    mse_norm: float = 2.0
    # Values kept per activation tensor (a seeded uniform subsample of all batches). The
    # MSE search reads its sample once per candidate, hence the smaller default.
    percentile_max_samples: int = 2**21
    mse_max_samples: int = 2**18
    # Reconstruction calibrators only; a nested dict (from RunConfig.from_dict) is accepted.
    recon: ReconConfig = field(default_factory=ReconConfig)
    # The gptq calibrator only; a nested dict (from RunConfig.from_dict) is accepted.
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    def __post_init__(self) -> None:
        if isinstance(self.recon, dict):
            object.__setattr__(self, "recon", ReconConfig(**self.recon))
        if isinstance(self.gptq, dict):
            object.__setattr__(self, "gptq", GPTQConfig(**self.gptq))
        if self.num_calib < 1:
            raise QCalibError(f"--num-calib must be at least 1, got {self.num_calib}")
        if self.batch_size < 1:
            raise QCalibError(f"--calib-batch-size must be at least 1, got {self.batch_size}")
        if not 50.0 < self.percentile <= 100.0:
            raise QCalibError(f"--percentile must be in (50, 100], got {self.percentile}")


#: What a calibrator reads from its calibration set, the vocabulary the pipeline passes
#: from ``Calibrator.reads`` to ``Selector.fit(calibrator_reads=...)`` (both layers sit on
#: this floor, neither imports the other): ``"range"``: the set's extremes (min-max and
#: percentile observers); ``"distribution"``: the shape of its whole distribution (MSE
#: clipping search); ``"fit"``: an optimization fitted to the set that must generalize to
#: the pool (reconstruction, GPTQ's Hessians).
CALIBRATOR_READS = ("range", "distribution", "fit")


@dataclass(frozen=True)
class SelectConfig:
    selector: str = "random"
    # Extra constructor parameters of the selector, as sorted (name, value) pairs so the
    # config stays hashable and frozen.
    params: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


TEXT_MODES = ("chunk", "doc")
UNREADABLE_IMAGES = ("error", "skip")


@dataclass(frozen=True)
class TextConfig:
    """How a ``text:PATH`` pool is tokenized and split (see :mod:`qcalib.data.text`).

    ``seq_len`` tokens a sample; ``mode`` ``"chunk"`` (documents concatenated and cut into
    windows, GPTQ's convention) or ``"doc"`` (one padded sample per document); ``field`` the
    text entry of JSON / JSONL documents. The held-out split (perplexity / embedding
    evaluation) is ``eval_fraction`` of the documents, at most ``eval_max_docs``, drawn
    with ``split_seed``; ``eval_max_tokens`` caps the tokens scored (None: all windows).
    ``token_dir`` (optional) keeps the token ids in a memory-mapped file there instead of
    RAM, reused by later runs on the same text (a pool larger than memory).
    """

    seq_len: int = 512
    mode: str = "chunk"
    field: str = "text"
    eval_fraction: float = 0.1
    eval_max_docs: int | None = 1000
    eval_max_tokens: int | None = None
    split_seed: int = 0
    token_dir: str | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}"),
            (
                self.mode in TEXT_MODES,
                f"--text-mode must be one of {', '.join(TEXT_MODES)}, got {self.mode!r}",
            ),
            (bool(self.field), "--text-field must name a field, got an empty string"),
            (
                0.0 <= self.eval_fraction < 1.0,
                f"eval_fraction must be in [0, 1), got {self.eval_fraction}",
            ),
            (
                self.eval_max_docs is None or self.eval_max_docs >= 0,
                f"eval_max_docs must be at least 0, got {self.eval_max_docs}",
            ),
            (
                self.eval_max_tokens is None or self.eval_max_tokens >= 1,
                f"eval_max_tokens must be at least 1, got {self.eval_max_tokens}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise QCalibError(message)


@dataclass(frozen=True)
class RunConfig:
    model: str = "zoo:fmnist-resnet20"
    data: str = "fashion-mnist"
    data_root: str | None = None
    weights: str | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    seed: int = 0
    eval_batch_size: int = 500
    device: str = "cpu"
    # Labeled evaluation data when ``data`` is an unlabeled pool (a spec like ``data``);
    # None: the test/val split of ``data``; "none": no evaluation (no accuracy reported).
    eval_data: str | None = None
    # Tokenization and held-out split of ``text:`` data (ignored for image data).
    text: TextConfig = field(default_factory=TextConfig)
    # Preprocessing of image files (qcalib.data.preprocess): "auto" (the model's own),
    # "imagenet" or "efficientnet-lite"; tensor and text datasets ignore it.
    preprocess: str = "auto"
    # Image files that do not decode: "error" stops at the first, naming it; "skip" checks
    # every file once when the pool / evaluation set loads and leaves them out (a count is
    # logged). Ignored for non-file data.
    unreadable_images: str = "error"

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", TextConfig(**self.text))
        from qcalib.data.preprocess import check_preprocess

        check_preprocess(self.preprocess)
        if self.unreadable_images not in UNREADABLE_IMAGES:
            raise QCalibError(
                f"--unreadable-images must be one of {', '.join(UNREADABLE_IMAGES)}, got "
                f"{self.unreadable_images!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["select"]["params"] = dict(self.select.params)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        sel = dict(d.pop("select", {}))
        sel["params"] = tuple(sorted(sel.get("params", {}).items()))
        known = {f.name for f in fields(cls)}
        top = {k: v for k, v in d.items() if k in known and k not in ("quant", "calib")}
        return cls(
            quant=QuantConfig(**d.get("quant", {})),
            calib=CalibConfig(**d.get("calib", {})),
            select=SelectConfig(**sel),
            **top,
        )
