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


@dataclass(frozen=True)
class QuantConfig:
    wbits: int = 4
    abits: int = 4
    # Asymmetric per-channel weights are what BRECQ/QDrop report with; at 2 bits an
    # asymmetric grid keeps all four levels inside the channel's range.
    w_symmetric: bool = False
    w_per_channel: bool = True
    a_symmetric: bool = False
    # Bits of the first and last quantized layer (weights and input activation);
    # None quantizes them like every other layer.
    first_last_bits: int | None = 8
    fold_bn: bool = True

    def __post_init__(self) -> None:
        for name in ("wbits", "abits"):
            try:
                check_bits(getattr(self, name))
            except QCalibError as e:
                raise QCalibError(f"--{name}: {e}") from None
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits)


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


@dataclass(frozen=True)
class ContrastiveConfig:
    """CL-Calib's contrastive term, added to every reconstruction stage's loss.

    ``L = L_rec + weight * L_CL`` with similarities ``<z_q,i, z_f,j> / temperature`` of
    L2-normalized critic features. ``critic``: ``truncated`` (the next ``tail_blocks``
    blocks of the frozen FP network, then global average pooling), ``full`` (every block
    after this one, as far as they chain), or ``projection`` (a trainable linear head on
    the pooled block output, ``proj_dim`` wide, Adam at ``proj_lr``: an ablation, the one
    critic that trains something). ``center`` subtracts the mean FP feature of the
    calibration set before normalizing (frozen critics). Defaults: see
    :mod:`qcalib.calibrate.contrastive`.
    """

    weight: float = 1.0
    temperature: float = 0.1
    loss: str = "nce"
    critic: str = "truncated"
    tail_blocks: int = 1
    center: bool = True
    proj_dim: int = 128
    proj_lr: float = 1e-3

    def __post_init__(self) -> None:
        checks = (
            (self.weight >= 0, f"--cl-weight must be at least 0, got {self.weight}"),
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

    def __post_init__(self) -> None:
        if isinstance(self.recon, dict):
            object.__setattr__(self, "recon", ReconConfig(**self.recon))
        if self.num_calib < 1:
            raise QCalibError(f"--num-calib must be at least 1, got {self.num_calib}")
        if self.batch_size < 1:
            raise QCalibError(f"--calib-batch-size must be at least 1, got {self.batch_size}")
        if not 50.0 < self.percentile <= 100.0:
            raise QCalibError(f"--percentile must be in (50, 100], got {self.percentile}")


@dataclass(frozen=True)
class SelectConfig:
    selector: str = "random"
    # Extra constructor parameters of the selector, as sorted (name, value) pairs so the
    # config stays hashable and frozen.
    params: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


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
