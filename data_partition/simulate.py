"""Seeded fault simulators (missing modalities, label noise, poisoning), in the spirit of FedMultimodal.

They return masks or labels, never ``None``: absent modalities stay in the batch as zero tensors
with ``mask`` False, so batches from every client have the same structure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .constants import MODALITIES, NUM_CLASSES


def _mod_index(modality: str) -> int:
    try:
        return MODALITIES.index(modality)
    except ValueError:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}") from None


def full_masks(n: int) -> np.ndarray:
    """All modalities present: ``bool [n, 4]`` of True."""
    return np.ones((int(n), len(MODALITIES)), dtype=bool)


def sample_missing_masks(n: int, rates: Mapping[str, float], seed: int = 0) -> np.ndarray:
    """Per-sample missing modalities: modality ``m`` is absent from each sample independently with
    probability ``rates[m]`` (modalities not named are always present). A sample that would lose
    every modality keeps one, drawn uniformly among the modalities whose rate is below 1, so the
    realised rates can be slightly lower than asked. Returns ``bool [n, 4]`` (True = present)."""
    p = np.zeros(len(MODALITIES))
    for m, r in rates.items():
        r = float(r)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"missing rate for {m} must be in [0, 1], got {r}")
        p[_mod_index(m)] = r
    keepable = np.flatnonzero(p < 1.0)
    if len(keepable) == 0:
        raise ValueError("every modality has missing rate 1: no sample could keep a modality")
    rng = np.random.default_rng(seed)
    mask = rng.random((int(n), len(MODALITIES))) >= p
    empty = np.flatnonzero(~mask.any(axis=1))
    if len(empty):
        mask[empty, rng.choice(keepable, size=len(empty))] = True
    return mask


def drop_modalities(mask: np.ndarray, modalities: Iterable[str]) -> np.ndarray:
    """Copy of ``mask`` with whole modalities absent (a client without those sensors).
    Raises ``ValueError`` if a sample would be left with no modality."""
    out = np.array(mask, dtype=bool, copy=True)
    if out.ndim != 2 or out.shape[1] != len(MODALITIES):
        raise ValueError(f"mask must be bool [n, {len(MODALITIES)}], got shape {out.shape}")
    for m in modalities:
        out[:, _mod_index(m)] = False
    if len(out) and not out.any(axis=1).all():
        raise ValueError(f"dropping {list(modalities)} leaves samples with no modality")
    return out


def noisy_labels(y: np.ndarray, rate: float, num_classes: int = NUM_CLASSES, seed: int = 0) -> np.ndarray:
    """Symmetric label noise: exactly ``round(rate * n)`` samples, chosen at random, get a different
    class drawn uniformly from the other ``num_classes - 1``."""
    y = np.asarray(y, dtype=np.int64)
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    out = y.copy()
    k = int(round(float(rate) * len(y)))
    idx = rng.choice(len(y), size=k, replace=False)
    shift = rng.integers(1, num_classes, size=k)
    out[idx] = (y[idx] + shift) % num_classes
    return out


def flip_labels(
    y: np.ndarray, num_classes: int = NUM_CLASSES, mapping: Mapping[int, int] | None = None
) -> np.ndarray:
    """Label flipping for a poisoned client: every label ``c`` becomes ``mapping[c]`` (labels not in
    ``mapping`` unchanged), by default ``num_classes - 1 - c``."""
    y = np.asarray(y, dtype=np.int64)
    if mapping is None:
        return (num_classes - 1 - y).astype(np.int64)
    lut = np.arange(num_classes, dtype=np.int64)
    for a, b in mapping.items():
        lut[int(a)] = int(b)
    return lut[y]


def select_clients(clients: Sequence[int], fraction: float, seed: int = 0) -> tuple[int, ...]:
    """Seeded choice of ``round(fraction * len(clients))`` clients (e.g. the ones missing a sensor,
    or the poisoned ones), returned sorted."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(float(fraction) * len(clients)))
    rng = np.random.default_rng(seed)
    return tuple(sorted(int(c) for c in rng.choice(np.asarray(clients), size=k, replace=False)))
