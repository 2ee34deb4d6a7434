"""Helpers of the ClientApp tests."""

from __future__ import annotations

import torch

from fedtime import task
from fedtime.config import RunConfig
from model import trainable_state


def start_state(cfg: RunConfig, options: dict | None = None) -> dict:
    """A seeded global model's trainable state (the same every call)."""
    torch.manual_seed(123)
    return {k: v.clone() for k, v in trainable_state(task.model_for(cfg, options)).items()}
