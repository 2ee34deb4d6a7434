"""Shared helpers of the model tests (unique module name: tests/ folders are not packages)."""

import torch

from model.config import FRAME_SHAPES, MODALITIES


def make_batch(cfg, b=6, seed=0, mask=None, num_classes=7):
    g = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(b, cfg.acc_steps, 3, generator=g) for m in ("act", "acw")}
    for m in ("dc", "pm"):
        batch[m] = torch.randn(b, cfg.frame_steps, *FRAME_SHAPES[m], generator=g)
    batch["mask"] = torch.ones(b, len(MODALITIES), dtype=torch.bool) if mask is None else mask
    batch["y"] = torch.randint(0, num_classes, (b,), generator=g)
    return batch


def separable_batches(cfg, n_batches, b=8, seed=0, num_classes=3):
    """A task a tiny model must learn: the class sets the accelerometer mean (posture)."""
    out = []
    for i in range(n_batches):
        batch = make_batch(cfg, b=b, seed=seed * 1000 + i, num_classes=num_classes)
        shift = (batch["y"].float() - 1.0) * 2.0
        batch["act"] = batch["act"] * 0.3 + shift[:, None, None]
        out.append(batch)
    return out
