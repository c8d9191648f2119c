"""Calibration-set selectors, scikit-learn style: ``Selector(**params).fit(pool).select(n)``.

Every strategy is one class registered by name in :data:`SELECTORS`. ``fit`` sees the
unlabeled pool (and the FP model, for strategies that read activations); ``select``
returns sorted, unique pool indices and is deterministic for a seed.

``fit(..., calibrator_reads=...)`` tells the selector what the calibrator will read from
the set (one of :data:`~qcalib.config.CALIBRATOR_READS`: ``"range"``, ``"distribution"``,
``"fit"``; the pipeline passes ``Calibrator.reads``), a plain string so that ``select/``
never imports ``calibrate/``. Strategies that do not depend on it ignore it; SelectQ's
``within="auto"`` resolves its ranking rule from it. ``activation_reads`` (same
vocabulary; the pipeline passes ``Calibrator.activation_reads(quant)``) says what sets
the run's static activation ranges reads, None when no activation range is calibrated
(weight-only, per-token dynamic); SelectQ's ``ranges="auto"`` resolves from it.
"""

from __future__ import annotations

import inspect
from abc import ABC, ABCMeta, abstractmethod
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qcalib.config import CALIBRATOR_READS
from qcalib.data.pool import Pool
from qcalib.errors import QCalibError
from qcalib.registry import Registry
from qcalib.select.stats import StatRowCache


def check_budget(n: int, pool_size: int) -> None:
    """``n`` calibration samples can be drawn from a pool of ``pool_size``, or a
    :class:`QCalibError` naming the flag (cheap: the pipeline checks it before any work)."""
    if n < 1:
        raise QCalibError(f"--num-calib must be at least 1, got {n}")
    if n > pool_size:
        raise QCalibError(
            f"--num-calib {n} is larger than the pool ({pool_size} samples); "
            f"lower --num-calib or use a larger --data pool"
        )


def selector_params(cls: type) -> list[str]:
    """Constructor parameter names of a selector class (what ``--selector-param`` takes)."""
    sig = inspect.signature(cls.__init__)
    return [
        p.name
        for p in list(sig.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


class _SelectorMeta(ABCMeta):
    """Turns unknown constructor parameters into a :class:`QCalibError` listing valid ones.

    Checked against the signature before ``__init__`` runs, so a ``TypeError`` raised
    *inside* a constructor (a bug) keeps its traceback; this runs however the class is
    called (the pipeline calls ``SELECTORS.get(name)(seed=..., **params)``).
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        sig = inspect.signature(cls.__init__)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not takes_any:
            valid = selector_params(cls)
            unknown = sorted(k for k in kwargs if k not in valid)
            if unknown:
                raise QCalibError(
                    f"selector {cls.__name__} has no parameter "
                    f"{', '.join(repr(u) for u in unknown)}; valid --selector-param names: "
                    f"{', '.join(v for v in valid if v != 'seed') or '(none)'}"
                )
        return super().__call__(*args, **kwargs)


class Selector(ABC, metaclass=_SelectorMeta):
    #: Whether ``fit`` needs the full-precision model (activation-based strategies).
    needs_model = False
    #: Show a bar over passes through the pool. Set by the caller, not a parameter: it
    #: does not change the selection.
    progress = False
    #: A :class:`~qcalib.select.stats.StatRowCache` shared by selectors on one model and
    #: pool (set by the caller, like ``progress``; it does not change the selection).
    row_cache: StatRowCache | None = None

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.pool_size_: int | None = None
        self.calibrator_reads_: str | None = None
        self.activation_reads_: str | None = None

    def fit(
        self,
        pool: Pool,
        model: nn.Module | None = None,
        calibrator_reads: str | None = None,
        activation_reads: str | None = None,
    ) -> Selector:
        """One pass over ``pool``. ``model`` is the FP model; selectors that read no
        activations accept and ignore it, so callers need not branch on
        :attr:`needs_model`."""
        for name, value, attr in (("calibrator_reads", calibrator_reads, "reads"),
                                  ("activation_reads", activation_reads, "act_reads")):  # fmt: skip
            if value is not None and value not in CALIBRATOR_READS:
                raise QCalibError(
                    f"{name} must be one of {', '.join(CALIBRATOR_READS)} (or None), "
                    f"got {value!r}; set the calibrator class's `{attr}` attribute"
                )
        self.calibrator_reads_ = calibrator_reads
        self.activation_reads_ = activation_reads
        if self.needs_model and model is None:
            raise QCalibError(f"selector {type(self).__name__} needs the model passed to fit()")
        if len(pool) == 0:
            raise QCalibError(
                f"the pool {getattr(pool, 'name', '')!r} is empty; point --data at a "
                "non-empty dataset"
            )
        self.pool_size_ = len(pool)
        self._fit(pool, model)
        return self

    def _fit(self, pool: Pool, model: nn.Module | None) -> None:  # noqa: B027
        """Strategy-specific pass over the pool; nothing to do for random selection."""

    def select(self, n: int) -> torch.Tensor:
        if self.pool_size_ is None:
            raise RuntimeError("call fit(pool) before select(n)")
        check_budget(n, self.pool_size_)
        idx = self._select(n)
        assert idx.numel() == n and idx.unique().numel() == n, "selector returned duplicates"
        return idx.sort().values

    @abstractmethod
    def _select(self, n: int) -> torch.Tensor: ...

    def _pass(self, pool: Pool, batch_size: int, indices: Any = None, desc: str = "pool"):  # noqa: ANN202
        """``pool.batches(...)`` behind a progress bar when :attr:`progress` is set."""
        total = len(pool) if indices is None else len(indices)
        return tqdm(
            pool.batches(batch_size, indices),
            total=-(-total // batch_size),
            desc=f"{type(self).__name__}: {desc}",
            leave=False,
            disable=not self.progress,
        )


SELECTORS: Registry[type[Selector]] = Registry("selector")


@SELECTORS.register("random")
class RandomSelector(Selector):
    """Uniform sampling without replacement: the field's default and the baseline."""

    def _select(self, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        assert self.pool_size_ is not None
        return torch.randperm(self.pool_size_, generator=gen)[:n]


def select_indices(
    name: str,
    pool: Pool,
    n: int,
    *,
    model: nn.Module | None = None,
    seed: int = 0,
    calibrator_reads: str | None = None,
    activation_reads: str | None = None,
    **params: object,
) -> torch.Tensor:
    """Build the selector ``name`` with ``params``, fit it (with ``model`` if it needs one,
    and the calibrator's needs ``calibrator_reads`` / ``activation_reads`` when known) and
    return its ``n`` sorted indices: the one-call API of every strategy."""
    selector = SELECTORS.get(name)(seed=seed, **params)
    if selector.needs_model and model is None:
        raise QCalibError(f"selector {name!r} reads activations: pass the FP model")
    selector.fit(
        pool, model=model, calibrator_reads=calibrator_reads, activation_reads=activation_reads
    )
    return selector.select(n)
