"""torch ``Dataset`` over cached windows of chosen subjects (normalised on the fly)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .constants import ACC_MODALITIES, MODALITIES, NUM_CLASSES
from .stats import STD_EPS, NormStats, per_window_normalize

#: How a window's values are standardised (``WindowDataset(normalization=...)``).
NORMALIZATIONS = ("global", "per_window", "subject")


class WindowDataset(Dataset):
    """Windows of ``subjects`` as sample dicts::

        {"act": float32 [Ta, 3], "acw": float32 [Ta, 3], "dc": float32 [Tf, 12, 16],
         "pm": float32 [Tf, 32, 16], "mask": bool [4], "y": int64 []}

    ``normalization="global"`` applies ``stats`` (fitted on training subjects only);
    ``"per_window"`` is the paper's per-window z-score (``stats`` unused); ``"subject"`` z-scores each
    subject's windows with that subject's own mean and std (``subject_stats``: per accelerometer axis, one
    scalar per frame modality, over the windows where the modality is present; no labels; ``stats``
    unused). ``augment_sigma > 0`` adds Gaussian noise on the fly to the ``augment_modalities`` of present
    modalities (training only: leave it 0 for evaluation). ``masks`` (``bool [n, 4]``) marks absent
    modalities, which are returned as zeros. ``labels`` overrides the labels (label noise / poisoning simulators).
    ``in_memory=True`` copies the subjects' rows out of the memory map (a client's own slice only);
    ``False`` reads through the map.
    """

    def __init__(
        self,
        cache,
        subjects: int | Iterable[int],
        stats: NormStats | None,
        normalization: str = "global",
        augment_sigma: float = 0.0,
        masks: np.ndarray | None = None,
        seed: int = 0,
        *,
        labels: np.ndarray | None = None,
        augment_modalities: Sequence[str] = ("act", "acw"),
        in_memory: bool = True,
    ):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if normalization == "global" and stats is None:
            raise ValueError("normalization='global' needs NormStats (fit them on the training subjects)")
        if augment_sigma < 0:
            raise ValueError("augment_sigma must be >= 0")
        self.subjects = (int(subjects),) if isinstance(subjects, (int, np.integer)) else tuple(int(s) for s in subjects)
        self.stats = stats
        self.normalization = normalization
        self.augment_sigma = float(augment_sigma)
        self.augment_modalities = tuple(augment_modalities)
        self.seed = int(seed)
        slices = [cache.subject_rows(s) for s in self.subjects]
        self.index = (
            cache.index.iloc[np.r_[tuple(slices)]].reset_index(drop=True)
            if slices
            else cache.index.iloc[:0].reset_index(drop=True)
        )

        def take(m: str) -> np.ndarray:
            a = cache.arrays[m]
            if not slices:
                return np.asarray(a[:0])
            if in_memory:  # copies checked against the cache's build-time checksums
                parts = [cache.subject_array(m, s) for s in self.subjects]
                return parts[0] if len(parts) == 1 else np.concatenate(parts)
            return a[slices[0]] if len(slices) == 1 else _Concat([a[sl] for sl in slices])

        self._x = {m: take(m) for m in MODALITIES}
        n = len(self.index)
        y = self.index["label"].to_numpy(np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {y.shape}")
        self._y = y
        if masks is None:
            self._masks = np.ones((n, len(MODALITIES)), dtype=bool)
        else:
            self._masks = np.asarray(masks, dtype=bool)
            if self._masks.shape != (n, len(MODALITIES)):
                raise ValueError(f"masks must be bool [{n}, {len(MODALITIES)}], got {self._masks.shape}")
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple | None = None
        if self.normalization == "global":
            self._mu = {m: stats.mean[m].astype(np.float32) for m in MODALITIES}
            self._sd = {m: stats.std[m].astype(np.float32) for m in MODALITIES}
        elif self.normalization == "subject":
            # row -> its subject's statistics; each subject's from its own (present) windows only
            subj = self.index["subject"].to_numpy()
            self._row_group = np.searchsorted(np.asarray(self.subjects_sorted), subj)
            per = [subject_stats({m: self._x[m] for m in MODALITIES}, subj == s, self._masks)
                   for s in self.subjects_sorted]
            self._mu = {m: np.stack([p[0][m] for p in per]) for m in MODALITIES}
            self._sd = {m: np.stack([p[1][m] for p in per]) for m in MODALITIES}

    def __len__(self) -> int:
        return len(self._y)

    @property
    def subjects_sorted(self) -> list[int]:
        return sorted(set(self.subjects))

    @property
    def labels(self) -> np.ndarray:
        return self._y

    @property
    def masks(self) -> np.ndarray:
        return self._masks

    def class_counts(self, num_classes: int = NUM_CLASSES) -> np.ndarray:
        return np.bincount(self._y, minlength=num_classes)

    def _noise_rng(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        owner = (None, None) if info is None else (info.id, info.seed)
        if self._rng is None or self._rng_owner != owner:
            entropy = [self.seed] if info is None else [self.seed, info.id, info.seed % (2**63)]
            self._rng = np.random.default_rng(entropy)
            self._rng_owner = owner
        return self._rng

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += len(self)
        mask = self._masks[i]
        out: dict[str, torch.Tensor] = {}
        for j, m in enumerate(MODALITIES):
            raw = self._x[m][i]
            if not mask[j]:
                out[m] = torch.zeros(raw.shape, dtype=torch.float32)
                continue
            if self.normalization == "global":
                x = (np.asarray(raw, dtype=np.float32) - self._mu[m]) / self._sd[m]
            elif self.normalization == "subject":
                g = self._row_group[i]
                x = (np.asarray(raw, dtype=np.float32) - self._mu[m][g]) / self._sd[m][g]
            else:
                x = per_window_normalize(raw)
            if self.augment_sigma > 0 and m in self.augment_modalities:
                x = x + self._noise_rng().normal(0.0, self.augment_sigma, size=x.shape).astype(np.float32)
            out[m] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out["mask"] = torch.from_numpy(mask.copy())
        out["y"] = torch.tensor(self._y[i], dtype=torch.int64)
        return out


class _Concat:
    """Row access across several memory-mapped slices without copying them."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k][i - self.offsets[k]]


def subject_stats(arrays: dict[str, np.ndarray], rows: np.ndarray, masks: np.ndarray,
                  eps: float = STD_EPS) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One subject's own z-score statistics (float32 mean, std per modality) over its windows ``rows`` (bool)
    where the modality is present: per axis for the accelerometers, one scalar for a frame modality (as
    ``NormStats``' default). A modality the subject never has gets mean 0, std 1 (its windows are zeros anyway).

    Why: sensor placement, body size and the mat's calibration differ between people; with each subject
    standardised by its own statistics (no labels needed) the classifier reads each posture relative to that
    person's own range — a random forest on window statistics goes from 0.886 to 0.953 test weighted F1 with it
    (bench/forest_subsets.py)."""
    mean, std = {}, {}
    for j, m in enumerate(MODALITIES):
        a = arrays[m]
        sel = np.flatnonzero(rows & masks[:, j])
        channels = a.shape[-1] if m in ACC_MODALITIES else 1
        if len(sel) == 0:
            mu, sd = np.zeros(channels), np.ones(channels)
        else:
            x = np.asarray(a[sel] if isinstance(a, np.ndarray) else np.stack([a[k] for k in sel]),
                           dtype=np.float64).reshape(-1, channels)
            mu, sd = x.mean(axis=0), np.maximum(x.std(axis=0), eps)
        shape = (channels,) if m in ACC_MODALITIES else ()
        mean[m] = mu.reshape(shape).astype(np.float32)
        std[m] = sd.reshape(shape).astype(np.float32)
    return mean, std
