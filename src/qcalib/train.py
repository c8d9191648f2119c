"""Seeded training of the reference models (``qcalib train``).

Recipe: SGD with Nesterov momentum, one-cycle learning rate, weight decay on conv/linear
weights only, random-crop (pad 2) + horizontal-flip augmentation done on uint8 tensors.
Each epoch writes a resumable state, so an interrupted run continues where it stopped
and ends with the same weights as an uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qcalib.data.pool import TensorImageDataset
from qcalib.errors import QCalibError
from qcalib.evaluate import accuracy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_pad: int = 2
    hflip: bool = True
    seed: int = 0
    threads: int | None = None
    # NHWC is ~2x faster for depthwise convolutions on CPU; it changes float rounding, so
    # it is part of the recorded config.
    channels_last: bool = False


def augment(images: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, on a uint8 batch."""
    n, _, h, w = images.shape
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        chan = torch.arange(images.shape[1])[None, :, None, None]
        images = padded[batch, chan, rows, cols]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]


def train(
    model: nn.Module,
    train_set: TensorImageDataset,
    test_set: TensorImageDataset,
    cfg: TrainConfig,
    out_dir: Path,
) -> list[dict]:
    """Train in place; returns the per-epoch log (also written to ``out_dir/train_log.json``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    opt = torch.optim.SGD(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    state_path = out_dir / "train_state.pt"
    start_epoch = 0
    if state_path.exists():
        try:
            state = torch.load(state_path, weights_only=True)
        except Exception as e:  # torn or foreign file: UnpicklingError, RuntimeError, EOFError
            raise QCalibError(
                f"{state_path} is not a readable training state ({type(e).__name__}); delete "
                "it to start over, or choose another --work-dir"
            ) from None
        if not isinstance(state, dict) or state.get("config") != asdict(cfg):
            saved = state.get("config", {}) if isinstance(state, dict) else {}
            diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()
                     if saved.get(k) != v]  # fmt: skip
            raise QCalibError(
                f"{state_path} was written with another training config "
                f"({'; '.join(diffs[:3]) or 'unknown'}); rerun with the same options to "
                "resume, delete it to start over, or choose another --work-dir"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        history, start_epoch = state["history"], state["epoch"]
        log.info("resuming at epoch %d from %s", start_epoch + 1, state_path)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(train_set), generator=gen)
        loss_sum = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            imgs = augment(train_set.images[idx], cfg.crop_pad, cfg.hflip, gen)
            x, y = train_set.normalize(imgs).contiguous(memory_format=fmt), train_set.labels[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = accuracy(model, test_set)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(loss_sum / steps_per_epoch, 5),
                "test_top1": round(acc, 2),
                "seconds": round(time.time() - t0, 1),
            }
        )
        log.info(
            "epoch %d: loss %.4f test top-1 %.2f%%", epoch + 1, loss_sum / steps_per_epoch, acc
        )
        # Atomic: an interruption while saving must not destroy the last finished epoch.
        tmp = state_path.with_name(state_path.name + ".tmp")
        torch.save(
            {
                "config": asdict(cfg),
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "gen": gen.get_state(),
                "history": history,
                "epoch": epoch + 1,
            },
            tmp,
        )
        os.replace(tmp, state_path)
        (out_dir / "train_log.json").write_text(json.dumps(history, indent=1))
    return history
