"""Cross-modal latent generators (FedMobile-style reconstruction of missing modalities).

One small MLP per modality predicts that modality's embedding from the embeddings of the others that are
present. It is distilled towards the real embedding on samples where the modality is present (MSE in the
shared latent space) and, where the modality is absent, its output replaces the learned "missing" token and
joins the fusion graph as a node.

Three choices keep reconstruction from hurting the classifier (measured in
docs/experiments/2026-11-22-strategies-log.md):
* It works on standardised embeddings (running mean/variance of each modality's real embeddings, tracked in
  training like BatchNorm statistics): the last layer starts at zero, so a fresh generator predicts the mean
  and its distillation loss is 1 − R², whatever scale the encoders drift to.
* Generated embeddings are detached: only distillation trains a generator (the classification loss must not
  turn it into a side classifier on detached features), and reconstruction never pulls on the encoders.
* A modality's generated node joins the fusion only once its generator is good enough: ``quality`` above
  ``gate``; until then the absent modality is left out of the fusion, as without generators. ``quality`` is
  the reconstruction R² measured on held-out subjects — set by the FedMobile server from its proxy set after
  each aggregation (`server_app/proxy.py`): R² on a client's own training batches overrates a generator that
  has to work across subjects.
The statistics and the quality travel with the trainable state (``federated_buffers``).

What a generator is distilled towards (``ModelConfig.generator_objective``): ``"embedding"``, the real embedding
alone; or ``"prediction"``, also the model's own prediction with the real embedding, through the frozen fusion
and classifier (KL, `MultimodalHAR.prediction_distill_loss`). Cross-subject R² of these embeddings stays low
(most of their variance is subject-specific, docs/experiments/2026-11-22-strategies-log.md), so an embedding-only
generator never opens its gate; what the fusion needs from a filled node is the prediction it leads to. The gate follows the objective:
R² above 0.3, or a generated node that lowers the held-out cross-entropy (``GATES``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
OBJECTIVES = ("embedding", "prediction")
#: the quality a generator must exceed to join the fusion, per objective: the proxy set's reconstruction R², or
#: its cross-entropy (nats) with the modality left out minus with it generated (server_app/proxy.py)
GATES = {"embedding": 0.3, "prediction": 0.0}


class LatentGenerators(nn.Module):
    federated_buffers = ("mean", "var", "quality")

    def __init__(self, num_modalities: int, d: int, hidden: int | None = None, input_drop: float = 0.5,
                 gate: float = 0.3, momentum: float = 0.05):
        super().__init__()
        if num_modalities < 2:
            raise ValueError("latent generators need at least two modalities")
        self.m, self.d = num_modalities, d
        self.input_drop = input_drop  # distillation sees random subsets of the other modalities
        self.gate, self.momentum = gate, momentum
        hidden = hidden or 2 * d
        k = num_modalities - 1
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(k * (d + 1), hidden), nn.GELU(), nn.Linear(hidden, d)) for _ in range(num_modalities)
        )
        for net in self.nets:  # a fresh generator predicts the running mean
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
        others = [[i for i in range(num_modalities) if i != j] for j in range(num_modalities)]
        self.register_buffer("others", torch.tensor(others, dtype=torch.long), persistent=False)
        self.register_buffer("mean", torch.zeros(num_modalities, d))
        self.register_buffer("var", torch.ones(num_modalities, d))
        self.register_buffer("quality", torch.zeros(num_modalities))  # R² on held-out data; set from outside

    def _standardise(self, e: torch.Tensor) -> torch.Tensor:
        return (e - self.mean) * torch.rsqrt(self.var.clamp_min(0) + EPS)  # averaged updates can be < 0

    def _predict(self, z: torch.Tensor, present: torch.Tensor, j: int) -> torch.Tensor:
        """Standardised embedding of modality ``j`` from the present others of ``z`` ``[B, M, d]``."""
        idx = self.others[j]
        p = present.index_select(1, idx).to(z.dtype)
        x = z.index_select(1, idx) * p.unsqueeze(-1)
        return self.nets[j](torch.cat([x.flatten(1), p], dim=1))

    def generate(self, e: torch.Tensor, present: torch.Tensor, j: int) -> torch.Tensor:
        """Embedding of modality ``j`` ``[B, d]`` from the present other modalities of ``e`` ``[B, M, d]``."""
        z = self._predict(self._standardise(e), present, j)
        return self.mean[j] + z * torch.sqrt(self.var[j].clamp_min(0) + EPS)

    @staticmethod
    def inputs_for(inputs: torch.Tensor, fallback: torch.Tensor, j: int) -> torch.Tensor:
        """Which other modalities feed target ``j``: ``inputs`` without ``j``, or ``fallback`` without ``j`` for the
        rows where that leaves none."""
        avail, spare = inputs.clone(), fallback.clone()
        avail[:, j] = spare[:, j] = False
        return torch.where(avail.any(1, keepdim=True), avail, spare)

    def usable(self) -> torch.Tensor:
        """``bool [M]``: whose generated embeddings join the fusion."""
        return self.quality > self.gate

    def fill(self, e: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e, present)`` with every absent (sample, modality) whose generator is usable replaced by its
        (detached) generated embedding and marked present."""
        src = e.detach()
        usable = self.usable()
        cols, now = [], present.clone()
        for j in range(self.m):
            absent = ~present[:, j]
            if bool(usable[j]) and bool(absent.any()):
                with torch.no_grad():
                    g = self.generate(src, present, j)
                cols.append(torch.where(absent.unsqueeze(-1), g.to(e.dtype), e[:, j]))
                now[:, j] = True
            else:
                cols.append(e[:, j])
        return torch.stack(cols, dim=1), now

    @torch.no_grad()
    def _track(self, e: torch.Tensor, present: torch.Tensor) -> None:
        for j in range(self.m):
            x = e[present[:, j], j]
            if len(x) > 1:
                self.mean[j].lerp_(x.mean(0), self.momentum)
                self.var[j].lerp_(x.var(0), self.momentum)

    def distill_inputs(self, present: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per target modality j, ``(inputs [B, M], rows [B])`` of a distillation step: the other present
        modalities, randomly thinned in training (thinned to nothing: the ones actually present), and the samples
        that have j and at least one input."""
        inputs = present
        if self.training and self.input_drop > 0:
            inputs = present & (torch.rand(present.shape, device=present.device) >= self.input_drop)
        out = []
        for j in range(self.m):
            avail = self.inputs_for(inputs, present, j)
            out.append((avail, present[:, j] & avail.any(1)))
        return out

    def distill_loss(self, e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Mean over modalities of the MSE between generated and real standardised embeddings (about 1 − R²), on
        the samples where the modality is present and at least one other (randomly thinned) modality is too. In
        training it also updates the running statistics."""
        e = e.detach().float()
        if self.training:
            self._track(e, present)
        z = self._standardise(e)
        losses = []
        for j, (avail, rows) in enumerate(self.distill_inputs(present)):
            if bool(rows.any()):
                losses.append(F.mse_loss(self._predict(z[rows], avail[rows], j), z[rows, j]))
        if not losses:
            return e.new_zeros(())
        return torch.stack(losses).mean()
