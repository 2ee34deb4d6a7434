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
