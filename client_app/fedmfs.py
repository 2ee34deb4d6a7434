"""FedMFS's client side (arXiv 2310.07048; recency from MFedMC, arXiv 2401.16685): how much each modality is
worth to this client (exact Shapley values over the sensors, a coalition being a presence mask), which encoders
it uploads (top-γ by priority), and the personal fusion + classifier kept between rounds (local head)."""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from data_partition.constants import MODALITIES
from model.state import modality_encoder_keys
from model.training import move_batch
from fedtime.shapley import shapley_values

VALUES = ("weighted_f1", "accuracy")


@torch.no_grad()
def coalition_predictions(model: nn.Module, loader: Iterable[dict],
                          device: torch.device) -> dict[frozenset | None, np.ndarray]:
    """Predictions of ``model`` (eval mode) on the loader's windows with only the modalities of each non-empty
    coalition of ``model.modalities`` (intersected with what each window has), and the labels under key ``None``."""
    mods = list(model.modalities)
    index = [MODALITIES.index(m) for m in mods]
    coalitions = [frozenset(c) for r in range(1, len(mods) + 1) for c in itertools.combinations(range(len(mods)), r)]
    preds: dict = {c: [] for c in coalitions}
    labels = []
    was = model.training
    model.eval()
    try:
        for batch in loader:
            batch = move_batch(batch, device)
            own = batch["mask"].bool()
            for c in coalitions:
                keep = torch.zeros_like(own)
                keep[:, [index[j] for j in c]] = True
                logits, _ = model(dict(batch, mask=own & keep))
                preds[c].append(logits.argmax(-1).cpu().numpy())
            labels.append(batch["y"].cpu().numpy())
    finally:
        model.train(was)
    out = {c: np.concatenate(p) for c, p in preds.items()}
    out[None] = np.concatenate(labels)
    return out


def score(labels: np.ndarray, pred: np.ndarray, value: str) -> float:
    if value == "accuracy":
        return float(accuracy_score(labels, pred))
    return float(f1_score(labels, pred, labels=list(range(7)), average="weighted", zero_division=0))


def modality_shapley(model: nn.Module, loader: Iterable[dict], device: torch.device,
                     value: str = "weighted_f1") -> dict[str, float]:
    """Exact Shapley value of each of the model's modalities: v(S) = ``value`` of the fused prediction with the
    sensors S only (v(∅) = 0), on the loader's windows (the client's held-out ones)."""
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, got {value!r}")
    preds = coalition_predictions(model, loader, device)
    labels = preds[None]

    def v(s: frozenset[int]) -> float:
        return score(labels, preds[s], value) if s else 0.0

    phi = shapley_values(len(model.modalities), v)
    return {m: float(p) for m, p in zip(model.modalities, phi)}


def priorities(shapley: Mapping[str, float], sizes: Mapping[str, int], recency: Mapping[str, float],
               weights: Sequence[float]) -> dict[str, float]:
    """``αs · shapley_norm + αc · (1 − size_norm) + αr · recency_norm`` per modality: Shapley values min-max
    scaled to [0, 1] (all equal: 1), sizes and recency (rounds since this client last uploaded the modality)
    divided by their maximum."""
    a_s, a_c, a_r = (float(w) for w in weights)
    mods = list(shapley)
    phi = np.array([shapley[m] for m in mods], dtype=np.float64)
    span = phi.max() - phi.min()
    phi_n = (phi - phi.min()) / span if span > 0 else np.ones_like(phi)
    size = np.array([sizes[m] for m in mods], dtype=np.float64)
    size_n = size / size.max() if size.max() > 0 else np.zeros_like(size)
    rec = np.array([recency.get(m, 0.0) for m in mods], dtype=np.float64)
    rec_n = rec / rec.max() if rec.max() > 0 else np.zeros_like(rec)
    return {m: float(a_s * p + a_c * (1 - s) + a_r * r) for m, p, s, r in zip(mods, phi_n, size_n, rec_n)}


def select(priority: Mapping[str, float], gamma: int, candidates: Iterable[str]) -> list[str]:
    """The ``gamma`` candidates of highest priority (ties: modality order), in the model's order."""
    cands = [m for m in priority if m in set(candidates)]
    ranked = sorted(cands, key=lambda m: (-priority[m], list(priority).index(m)))
    chosen = set(ranked[:max(0, int(gamma))])
    return [m for m in priority if m in chosen]


def encoder_sizes(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of each modality's encoder in a trainable state."""
    return {m: int(sum(state[k].numel() * state[k].element_size() for k in keys))
            for m, keys in modality_encoder_keys(list(state)).items()}


def head_keys(keys: Iterable[str]) -> list[str]:
    """The trainable-state keys that belong to no modality encoder: fusion, classifier, missing-modality tokens
    (FedMFS's shared or personal part)."""
    keys = list(keys)
    enc = {k for ks in modality_encoder_keys(keys).values() for k in ks}
    return [k for k in keys if k not in enc]


def upload(state: Mapping[str, torch.Tensor], modalities: Sequence[str], with_head: bool) -> dict[str, torch.Tensor]:
    """The part of ``state`` a FedMFS client sends: the encoders of ``modalities`` (and the head if shared)."""
    groups = modality_encoder_keys(list(state))
    keep = {k for m in modalities for k in groups.get(m, [])}
    if with_head:
        keep.update(head_keys(state))
    return {k: v for k, v in state.items() if k in keep}


def recency(last_upload: Mapping[str, int], modalities: Sequence[str], server_round: int) -> dict[str, float]:
    """Rounds since this client last uploaded each modality (never: the round number itself)."""
    return {m: float(server_round - int(last_upload.get(m, 0))) for m in modalities}

