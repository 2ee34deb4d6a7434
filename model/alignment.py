"""FedEPA's unsupervised modality alignment (arXiv 2504.12025, described there without code; our reading).

Each modality's embedding is split by two projections into an *aligned* part (what the sensors share about the
window: the exercise) and a *context* part (what is specific to the sensor). The training loss

* pulls the aligned parts of two sensors of the same window together and pushes other windows' apart (InfoNCE,
  symmetric, over every pair of modalities both present in the window; the other windows of the batch are the
  negatives), and
* keeps the context part independent of the aligned one (the squared cross-correlation of the two parts over the
  batch, driven to 0),

needs no label, so it also trains on the windows whose label is withheld (label-scarce scenario). The 2·M parts
are then fused by one self-attention layer (absent modalities masked out) and mapped back to one embedding per
modality, added to the encoder's own (residual), which the run's fusion (MAGNET by default) takes as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned views ``a``, ``b`` ``[N, h]``: row i of ``a`` and row i of ``b`` are
    the positive pair, the other rows the negatives."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def cross_correlation(a: torch.Tensor, c: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared cross-correlation between the features of ``a`` and ``c`` ``[N, h]`` over the rows (0 when
    every feature of one is uncorrelated with every feature of the other)."""
    a = (a.float() - a.float().mean(0)) / (a.float().std(0, unbiased=False) + eps)
    c = (c.float() - c.float().mean(0)) / (c.float().std(0, unbiased=False) + eps)
    return ((a.t() @ c) / a.shape[0]).pow(2).mean()


class ModalityAlignment(nn.Module):
    """Aligned/context split of the modality embeddings ``[B, M, d]``, self-attention over the parts, residual
    back to ``[B, M, d]``. A training forward leaves the alignment loss in ``loss``."""

    def __init__(self, n_modalities: int, d: int, heads: int = 2, temperature: float = 0.1,
                 independence_weight: float = 1.0):
        super().__init__()
        self.half = max(heads, (d // 2) // heads * heads)
        self.aligned = nn.ModuleList(nn.Linear(d, self.half) for _ in range(n_modalities))
        self.context = nn.ModuleList(nn.Linear(d, self.half) for _ in range(n_modalities))
        self.part_embedding = nn.Parameter(torch.randn(2 * n_modalities, self.half) * 0.02)
        self.attention = nn.MultiheadAttention(self.half, heads, batch_first=True)
        self.norm = nn.LayerNorm(self.half)
        self.out = nn.Linear(2 * self.half, d)
        nn.init.zeros_(self.out.weight)  # starts as the identity on the embeddings
        nn.init.zeros_(self.out.bias)
        self.temperature, self.independence_weight = temperature, independence_weight
        self.loss = torch.zeros(())

    def parts(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned and context parts ``[B, M, h]`` each."""
        a = torch.stack([p(e[:, j]) for j, p in enumerate(self.aligned)], dim=1)
        c = torch.stack([p(e[:, j]) for j, p in enumerate(self.context)], dim=1)
        return a, c

    def alignment_loss(self, a: torch.Tensor, c: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """InfoNCE over every modality pair on the windows that have both (two or more of them), plus
        ``independence_weight`` × the aligned/context cross-correlation of each modality on its windows."""
        terms = []
        m = a.shape[1]
        for i in range(m):
            for j in range(i + 1, m):
                rows = present[:, i] & present[:, j]
                if int(rows.sum()) >= 2:
                    terms.append(info_nce(a[rows, i], a[rows, j], self.temperature))
        independence = []
        for i in range(m):
            rows = present[:, i]
            if int(rows.sum()) >= 2:
                independence.append(cross_correlation(a[rows, i], c[rows, i]))
        loss = a.new_zeros((), dtype=torch.float32)
        if terms:
            loss = loss + torch.stack(terms).mean()
        if independence:
            loss = loss + self.independence_weight * torch.stack(independence).mean()
        return loss

    def forward(self, e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b, m, _ = e.shape
        a, c = self.parts(e)
        if self.training:
            self.loss = self.alignment_loss(a, c, present)
        tokens = torch.cat([a, c], dim=1) + self.part_embedding.to(a.dtype)  # [B, 2M, h]
        absent = ~torch.cat([present, present], dim=1)
        absent = absent & ~absent.all(dim=1, keepdim=True)  # a window without any sensor attends to everything
        fused, _ = self.attention(tokens, tokens, tokens, key_padding_mask=absent, need_weights=False)
        fused = self.norm(tokens + fused)
        delta = self.out(torch.cat([fused[:, :m], fused[:, m:]], dim=-1))
        return e + delta
