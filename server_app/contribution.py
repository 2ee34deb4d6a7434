"""Contribution estimates for FedMobile-style aggregation (arXiv 2502.15839), in plain numpy.

* `contribution_weights`: a client's weight mixes its share of samples, of local validation F1 and of loss
  reduction (global model's local validation loss minus its trained model's).
* `shapley_values` (`fedtime.shapley`, shared with FedMFS's clients): exact Shapley values of a small game.
* `clustered_shapley_weights`: clients' generators are clustered by their outputs on a proxy set; the clusters
  play the Shapley game; a cluster's value is shared among its members by sample count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fedtime.shapley import shapley_values


def _shares(x: np.ndarray) -> np.ndarray:
    """x / sum(x) for non-negative x; uniform when every entry is 0."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, None)
    total = x.sum()
    return x / total if total > 0 else np.full(len(x), 1.0 / len(x))


def contribution_weights(num_examples: Sequence[float], val_scores: Sequence[float], loss_gains: Sequence[float],
                         mix: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Normalised aggregation weights ``(a·n_i/Σn + b·f1_i/Σf1 + c·g⁺_i/Σg⁺) / (a+b+c)`` with ``g⁺ = max(gain, 0)``:
    a client whose update made its own held-out data worse contributes no gain share."""
    n = len(num_examples)
    if not (n == len(val_scores) == len(loss_gains)) or n == 0:
        raise ValueError("contribution_weights needs one sample count, score and gain per client")
    for name, v in (("val_scores", val_scores), ("loss_gains", loss_gains)):
        if not np.all(np.isfinite(np.asarray(v, dtype=np.float64))):
            raise ValueError(f"{name} must be finite, got {list(v)}")
    a, b, c = (float(m) for m in mix)
    if min(a, b, c) < 0 or a + b + c <= 0:
        raise ValueError(f"mix must be non-negative and not all 0, got {mix}")
    w = a * _shares(num_examples) + b * _shares(val_scores) + c * _shares(loss_gains)
    return w / (a + b + c)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> np.ndarray:
    """Seeded k-means (k-means++ initialisation); returns a cluster label per row (empty clusters dropped and
    labels renumbered 0..k'-1)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("kmeans: the points contain NaN or inf")
    scale = np.abs(x).max(initial=0.0)
    if scale > 0:
        x = x / scale  # squared distances of huge (finite) points would overflow; clustering is scale-free
    n = len(x)
    k = max(1, min(int(k), n))
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centers], axis=0)
        if d2.sum() <= 0:
            break
        centers.append(x[rng.choice(n, p=d2 / d2.sum())])
    c = np.array(centers)
    labels = np.zeros(n, dtype=int)
    for _ in range(iters):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if _ > 0 and np.array_equal(new, labels):
            break
        labels = new
        c = np.array([x[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(len(c))])
    _, labels = np.unique(labels, return_inverse=True)
    return labels


def clustered_shapley_weights(outputs: np.ndarray, num_examples: Sequence[float], k: int,
                              coalition_value: Callable[[list[int]], float], seed: int = 0) -> tuple[np.ndarray, dict]:
    """Aggregation weights for the clients' generators.

    `outputs` ``[clients, D]``: each generator's outputs on the proxy set (what is clustered);
    `coalition_value(members)`: the proxy-set value of the generator averaged over those clients (0 for none).
    Returns (weights summing to 1, details). Clusters with a non-positive Shapley value get weight 0; if none is
    positive, the weights fall back to sample shares."""
    n = np.asarray(num_examples, dtype=np.float64)
    labels = kmeans(outputs, k, seed=seed)
    clusters = [np.flatnonzero(labels == j).tolist() for j in range(labels.max() + 1)]

    def value(coalition: frozenset[int]) -> float:
        members = [i for j in sorted(coalition) for i in clusters[j]]
        return coalition_value(members) if members else 0.0

    phi = shapley_values(len(clusters), value)
    pos = np.clip(phi, 0.0, None)
    w = np.zeros(len(n))
    if pos.sum() > 0:
        for j, members in enumerate(clusters):
            w[members] = pos[j] / pos.sum() * n[members] / n[members].sum()
    else:
        w = n / n.sum()
    return w, {"clusters": labels.tolist(), "shapley": phi.tolist(), "weights": w.tolist()}
