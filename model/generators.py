"""Cross-modal latent generators (FedMobile-style reconstruction of missing modalities).

One small MLP per modality predicts that modality's embedding from the embeddings of the others that are
present. It is distilled towards the real embedding on samples where the modality is present (MSE in the
shared latent space) and, where the modality is absent, its output replaces the learned "missing" token and
joins the fusion graph as a node. Inputs and distillation targets are detached: reconstruction must never
pull the encoders towards embeddings that are easy to predict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LatentGenerators(nn.Module):
    def __init__(self, num_modalities: int, d: int, hidden: int | None = None, input_drop: float = 0.5):
        super().__init__()
        if num_modalities < 2:
            raise ValueError("latent generators need at least two modalities")
        self.m, self.d = num_modalities, d
        self.input_drop = input_drop  # distillation sees random subsets of the other modalities
        hidden = hidden or 2 * d
        k = num_modalities - 1
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(k * (d + 1), hidden), nn.GELU(), nn.Linear(hidden, d)) for _ in range(num_modalities)
        )
        others = [[i for i in range(num_modalities) if i != j] for j in range(num_modalities)]
        self.register_buffer("others", torch.tensor(others, dtype=torch.long), persistent=False)

    def generate(self, e: torch.Tensor, present: torch.Tensor, j: int) -> torch.Tensor:
        """Embedding of modality ``j`` ``[B, d]`` from the present other modalities of ``e`` ``[B, M, d]``."""
        idx = self.others[j]
        p = present.index_select(1, idx).to(e.dtype)
        x = e.index_select(1, idx) * p.unsqueeze(-1)
        return self.nets[j](torch.cat([x.flatten(1), p], dim=1))

    @staticmethod
    def inputs_for(inputs: torch.Tensor, fallback: torch.Tensor, j: int) -> torch.Tensor:
        """Which other modalities feed target ``j``: ``inputs`` without ``j``, or ``fallback`` without ``j`` for the
        rows where that leaves none."""
        avail, spare = inputs.clone(), fallback.clone()
        avail[:, j] = spare[:, j] = False
        return torch.where(avail.any(1, keepdim=True), avail, spare)

    def fill(self, e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``e`` with every absent (sample, modality) replaced by its generated embedding."""
        src = e.detach()
        cols = []
        for j in range(self.m):
            absent = ~present[:, j]
            if bool(absent.any()):
                cols.append(torch.where(absent.unsqueeze(-1), self.generate(src, present, j), e[:, j]))
            else:
                cols.append(e[:, j])
        return torch.stack(cols, dim=1)

    def distill_loss(self, e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Mean over modalities of the MSE between generated and real embeddings, on the samples where the
        modality is present and at least one other (randomly thinned) modality is too."""
        e = e.detach()
        inputs = present
        if self.training and self.input_drop > 0:
            inputs = present & (torch.rand(present.shape, device=present.device) >= self.input_drop)
        losses = []
        for j in range(self.m):
            avail = self.inputs_for(inputs, present, j)  # thinned to nothing: the modalities actually present
            rows = present[:, j] & avail.any(1)
            if bool(rows.any()):
                pred = self.generate(e[rows], avail[rows], j)
                losses.append(F.mse_loss(pred, e[rows, j]))
        if not losses:
            return e.new_zeros(())
        return torch.stack(losses).mean()
