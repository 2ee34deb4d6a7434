"""FedEPA's personalized local aggregation, in the style of FedALA (arXiv 2212.01197): before local training, the
client does not take the global model as it is but mixes it element-wise into its own previous model on the top
layers,

    θ = θ_local + (θ_global − θ_local) ⊙ W,   W ∈ [0, 1] (one weight per element),

the lower layers taking the global values. W is learnt by gradient descent on the cross-entropy of a random slice
of the client's labelled windows (the gradient of the loss with respect to W is its gradient with respect to θ
times (θ_global − θ_local)), clipped to [0, 1] after every step, and kept in the node's state between rounds.
The top layers must lie after the encoders (`ALA_LAYERS`): the slice's embeddings are then computed once with the
global encoders and only the head runs per step.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from model.network import HEAD_MODULES as ALA_LAYERS
from model.state import load_trainable_state
from model.training import move_batch


def layer_keys(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """Names of the trainable parameters of the named top-level modules (``ALA_LAYERS``)."""
    unknown = [layer for layer in layers if layer not in ALA_LAYERS]
    if unknown:
        raise ValueError(f"ALA layers must be among {ALA_LAYERS}, got {unknown}")
    return [n for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] in set(layers)]


@torch.no_grad()
def _embeddings(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 64):
    model.eval()
    es, ps, ys = [], [], []
    for batch in DataLoader(data, batch_size=batch_size):
        batch = move_batch(batch, device)
        e, present = model.embed(batch)
        es.append(e), ps.append(present), ys.append(batch["y"])
    return torch.cat(es), torch.cat(ps), torch.cat(ys)


def adaptive_local_aggregation(model: nn.Module, global_state: Mapping[str, torch.Tensor],
                               local_state: Mapping[str, torch.Tensor] | None,
                               weights: Mapping[str, torch.Tensor] | None, data: Dataset, *, layers: Sequence[str],
                               slice_fraction: float, lr: float, epochs: int, seed: int, device: torch.device,
                               batch_size: int = 16, class_weights: torch.Tensor | None = None
                               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """(the personalized starting state, the learnt W, the slice loss of each step). Without a local model yet
    (the client's first round) the start is the global model and W stays unset, as in FedALA. ``data``: the
    client's labelled training windows; a seeded ``slice_fraction`` of them trains W."""
    start = {k: torch.as_tensor(v).clone() for k, v in global_state.items()}
    if local_state is None:
        return start, dict(weights or {}), []
    keys = layer_keys(model, layers)
    g = {k: torch.as_tensor(global_state[k]).float() for k in keys}
    loc = {k: torch.as_tensor(local_state[k]).float() for k in keys}
    w = {k: (torch.as_tensor(weights[k]).float().clone() if weights and k in weights else torch.ones_like(g[k]))
         for k in keys}
    rng = np.random.default_rng(seed)
    n = len(data)
    k_slice = max(1, int(round(slice_fraction * n)))
    part = Subset(data, np.sort(rng.permutation(n)[:k_slice]).tolist())
    load_trainable_state(model, start)
    model.to(device)
    e, present, y = _embeddings(model, part, device)
    labelled = y >= 0
    e, present, y = e[labelled], present[labelled], y[labelled]
    params = dict(model.named_parameters())
    losses: list[float] = []
    was = model.training
    model.eval()  # dropout off, BatchNorm with the global statistics: W is fitted to the model as it will predict
    try:
        for _ in range(max(1, int(epochs))):
            for idx in np.array_split(rng.permutation(len(y)), max(1, int(np.ceil(len(y) / batch_size)))):
                if len(idx) == 0:
                    continue
                idx_t = torch.as_tensor(idx, device=e.device)
                with torch.no_grad():
                    for k in keys:
                        params[k].copy_(loc[k] + (g[k] - loc[k]) * w[k])
                model.zero_grad(set_to_none=True)
                logits, _ = model.head(e[idx_t], present[idx_t])
                loss = F.cross_entropy(logits.float(), y[idx_t],
                                       weight=class_weights.to(e.device) if class_weights is not None else None)
                loss.backward()
                with torch.no_grad():
                    for k in keys:
                        grad = params[k].grad
                        if grad is not None:
                            w[k] = (w[k] - lr * grad.float().cpu() * (g[k] - loc[k])).clamp_(0.0, 1.0)
                losses.append(float(loss.detach()))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    for k in keys:
        start[k] = (loc[k] + (g[k] - loc[k]) * w[k]).to(start[k].dtype)
    return start, w, losses
