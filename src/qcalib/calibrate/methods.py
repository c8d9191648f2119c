"""Reconstruction calibrators: ``adaround``, ``brecq`` and ``qdrop``.

All three share one flow: initialize every range with observers (weights: per-channel
MSE search, activations: MSE search, as the BRECQ and QDrop code do; switchable with
``ReconConfig.w_observer`` / ``a_observer``), then run the
:class:`~qcalib.calibrate.reconstruct.BlockReconstructor` over their blocks with their
stages:

=========  =====================  ==========================================================
method     blocks                 stages per block
=========  =====================  ==========================================================
adaround   every quantized layer  rounding (``iters``), activations float inside the layer
brecq      partition_blocks       rounding with activations float (``iters``), then the
                                  activation step sizes with activations quantized and the
                                  weights hard (``act_iters``, L2.4 error as BRECQ's
                                  ``--p 2.4``)
qdrop      partition_blocks       rounding and activation step sizes together
                                  (``iters``), each activation element quantized with
                                  probability ``drop_prob``
=========  =====================  ==========================================================

AdaRound (the paper) learns weights only; its activation ranges stay those of the
observer. BRECQ's code runs two sweeps over the network (all blocks' weights, then all
blocks' activation steps); we run both stages block by block, so each block's cache is
built once. QDrop's code mixes the block *input* between the quantized and the FP model
element-wise (its activation quantizers sit on the outputs of the previous block); here
the input quantizer of a block's first layer lies inside the block, so the same drop is
applied there, and a dropped element keeps the quantized upstream's float value rather
than the FP model's. QDrop's code also re-initializes a block's activation ranges on its
cached inputs just before reconstructing it; we initialize all ranges once, up front (as
BRECQ does). At the end every activation is quantized.

Any method can use the Fisher-weighted error (``ReconConfig.fisher``), published for
BRECQ. ``ReconConfig.contrastive`` adds the CL-Calib term
(:mod:`qcalib.calibrate.contrastive`) to every method; a subclass adds other terms by
overriding :meth:`ReconCalibrator.extra_terms`.

Costs and accuracies belong to the reconstruction benchmark (issue 4, not yet run); the
fast profile is 500 rounding iterations per block, batch 32, 200 activation iterations
for BRECQ (``RECON_PROFILES`` in :mod:`qcalib.config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from qcalib.calibrate.base import CALIBRATORS, ObserverCalibrator
from qcalib.calibrate.contrastive import ContrastiveLoss
from qcalib.calibrate.reconstruct import BlockReconstructor, LossTerm, Stage
from qcalib.config import CalibConfig
from qcalib.errors import QCalibError
from qcalib.model.partition import Block, partition_blocks
from qcalib.model.wrap import QuantModel

__all__ = ["AdaRoundCalibrator", "BRECQCalibrator", "QDropCalibrator", "ReconCalibrator"]


class ReconCalibrator(ObserverCalibrator):
    """Observer initialization followed by block reconstruction.

    ``on_block_end`` / ``on_iteration`` (attributes, default None) are passed to the
    engine; ``engine`` holds the last run's :class:`BlockReconstructor` (its ``history``
    has per-stage losses and per-block times).
    """

    method = ""
    accepts_loss_terms = True
    # The rounding and activation steps are fitted to the set and must generalize to the
    # pool: the selection should reproduce the pool, not its core.
    reads = "fit"
    act_reads = "fit"  # the activation step sizes are learned too (LSQ)
    on_block_end = None
    on_iteration = None
    engine: BlockReconstructor | None = None

    @property
    def weight_observer(self) -> str:  # type: ignore[override]
        return self.cfg.recon.w_observer

    @property
    def act_observer(self) -> str:  # type: ignore[override]
        return self.cfg.recon.a_observer

    @classmethod
    def activation_observer(cls, calib: CalibConfig) -> str | None:
        return None  # the observer only starts the learned step sizes (act_reads)

    def blocks(self, qmodel: QuantModel, calib_data: torch.Tensor) -> list[Block]:
        return partition_blocks(qmodel, example_input=calib_data[:1])

    def stages(self, block: Block) -> Sequence[Stage]:
        raise NotImplementedError

    def extra_terms(self) -> list[LossTerm]:
        """Loss terms added to every stage's loss: CL-Calib's when the config asks for it."""
        cl = self.cfg.recon.contrastive
        return [ContrastiveLoss(cl)] if cl is not None else []

    def report(self) -> dict:
        """Cost of the last run: blocks, iterations, optimization ms per iteration and,
        with CL-Calib, the ms per iteration spent in the contrastive term's forward pass."""
        if self.engine is None:
            return {}
        stages = [h for h in self.engine.history if "stage" in h]
        iters = sum(h["iters"] for h in stages)
        out = {
            "blocks": len(self.engine.blocks),
            "resumed_from_block": self.engine.resumed_from,
            "iterations": iters,
            "ms_per_iter": round(1000 * sum(h["seconds"] for h in stages) / iters, 3)
            if iters
            else None,
        }
        for term in self.engine.extra_terms:
            hist = getattr(term, "history", None)
            calls = sum(h.get("iterations", 0) for h in hist or [])
            if calls:
                secs = sum(h["seconds"] for h in hist)
                out[f"{term.name}_forward_ms_per_iter"] = round(1000 * secs / calls, 3)
        return out

    def calibrate(
        self,
        qmodel: QuantModel,
        calib_data: torch.Tensor,
        seed: int = 0,
        progress: bool = True,
        work_dir: Path | None = None,
    ) -> None:
        for name, m in qmodel.quant_modules():
            # AdaRound's rounding variables and LSQ steps are per channel / per tensor.
            if m.weight_quantizer.spec.group_size is not None:
                raise QCalibError(
                    f"{self.method} learns per-channel rounding; {name} has grouped weights: "
                    "drop --group-size or use --calibrator gptq / minmax"
                )
            if getattr(m.act_quantizer, "dynamic", False):
                raise QCalibError(f"{self.method} learns static activation steps; drop --a-dynamic")
        super().calibrate(qmodel, calib_data, seed=seed, progress=progress)
        c = self.cfg
        self.engine = BlockReconstructor(
            qmodel,
            self.blocks(qmodel, calib_data),
            self.stages,
            calib_data,
            c.recon,
            seed=seed,
            capture_batch_size=c.batch_size,
            extra_terms=self.extra_terms(),
            progress=progress,
            work_dir=work_dir,
            method=self.method,
            on_block_end=self.on_block_end,
            on_iteration=self.on_iteration,
        )
        self.engine.run()


@CALIBRATORS.register("adaround")
class AdaRoundCalibrator(ReconCalibrator):
    """AdaRound, layer by layer: learned rounding; activation ranges from the observer."""

    method = "adaround"

    @classmethod
    def activation_observer(cls, calib: CalibConfig) -> str | None:
        return calib.recon.a_observer  # its ranges stay the observer's (MSE by default)

    def blocks(self, qmodel: QuantModel, calib_data: torch.Tensor) -> list[Block]:
        return [Block(name, m, "layer") for name, m in qmodel.quant_modules()]

    def stages(self, block: Block) -> Sequence[Stage]:
        return [Stage("round", self.cfg.recon.iters, True, False, drop_prob=0.0)]


@CALIBRATORS.register("brecq")
class BRECQCalibrator(ReconCalibrator):
    """BRECQ: rounding per block (activations float), then LSQ activation step sizes."""

    method = "brecq"
    act_rec_p = 2.4  # BRECQ main_imagenet.py: --p 2.4 for the activation stage

    def stages(self, block: Block) -> Sequence[Stage]:
        r = self.cfg.recon
        return [
            Stage("round", r.iters, True, False, drop_prob=0.0),
            Stage("act", r.act_iters, False, True, drop_prob=1.0, rec_p=self.act_rec_p),
        ]


@CALIBRATORS.register("qdrop")
class QDropCalibrator(ReconCalibrator):
    """QDrop: rounding and activation step sizes together, activations dropped to float
    with probability ``1 - drop_prob``."""

    method = "qdrop"

    def stages(self, block: Block) -> Sequence[Stage]:
        r = self.cfg.recon
        return [Stage("joint", r.iters, True, True, drop_prob=r.drop_prob)]
