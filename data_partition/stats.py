"""Normalisation statistics fitted on training subjects only (no leakage), and their application."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import read_rows
from .constants import ACC_MODALITIES, MODALITIES, SAMPLE_SHAPES

#: Smallest standard deviation used when dividing (constant channels become 0, not inf).
STD_EPS = 1e-6
_CHUNK_VALUES = 1 << 23  # float64 values per chunk (~64 MB)


def _channel_shape(modality: str, frame_stats: str) -> tuple[int, ...]:
    if modality in ACC_MODALITIES:
        return SAMPLE_SHAPES[modality]  # per axis
    return SAMPLE_SHAPES[modality] if frame_stats == "pixel" else ()


def _moments(arr: np.ndarray, rows: list[slice], channel_shape: tuple[int, ...]) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and M2 per channel over rows x time (x pixels when channel_shape is ()),
    float64 throughout, chunks merged with Chan et al.'s parallel update."""
    C = int(np.prod(channel_shape)) if channel_shape else 1
    n_tot = 0
    mean = np.zeros(C)
    m2 = np.zeros(C)
    per_row = int(np.prod(arr.shape[1:]))
    step = max(1, _CHUNK_VALUES // per_row)
    for sl in rows:
        for a in range(sl.start, sl.stop, step):
            x = read_rows(arr, a, min(a + step, sl.stop)).astype(np.float64).reshape(-1, C)
            n = x.shape[0]
            if n == 0:
                continue
            mu = x.mean(axis=0)
            x -= mu
            q = np.einsum("ij,ij->j", x, x)
            delta = mu - mean
            tot = n_tot + n
            mean = mean + delta * (n / tot)
            m2 = m2 + q + delta**2 * (n_tot * n / tot)
            n_tot = tot
    return n_tot, mean, m2


@dataclass
class NormStats:
    """Per-modality z-score statistics.

    act/acw: one mean/std per axis (shape ``(3,)``). dc/pm: one scalar per modality
    (``frame_stats="channel"``, the default) or one per pixel (``"pixel"``, shape ``(H, W)``, std
    floored at ``pixel_floor`` x the modality's pooled std so pixels that never move in the
    training subjects do not explode on others). Fitted with float64 accumulation.
    """

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    subjects: tuple[int, ...]
    frame_stats: str = "channel"
    counts: dict[str, int] = field(default_factory=dict)
    cache_key: str | None = None

    @classmethod
    def fit(
        cls, cache, subjects, *, frame_stats: str = "channel", pixel_floor: float = 0.1, eps: float = STD_EPS
    ) -> "NormStats":
        if frame_stats not in ("channel", "pixel"):
            raise ValueError(f"frame_stats must be 'channel' or 'pixel', got {frame_stats!r}")
        subjects = tuple(sorted({int(s) for s in subjects}))
        if not subjects:
            raise ValueError("NormStats.fit needs at least one subject")
        rows = [cache.subject_rows(s) for s in subjects]
        mean, std, counts = {}, {}, {}
        for m in MODALITIES:
            cs = _channel_shape(m, frame_stats)
            n, mu, m2 = _moments(cache.arrays[m], rows, cs)
            sd = np.sqrt(m2 / max(n, 1))
            if cs and m not in ACC_MODALITIES:  # per-pixel: floor relative to the pooled std
                _, _, pm2 = _pooled(n, mu, m2)
                sd = np.maximum(sd, pixel_floor * np.sqrt(pm2))
            sd = np.maximum(sd, eps)
            mean[m] = mu.reshape(cs) if cs else np.asarray(mu[0])
            std[m] = sd.reshape(cs) if cs else np.asarray(sd[0])
            counts[m] = int(n)
        return cls(mean=mean, std=std, subjects=subjects, frame_stats=frame_stats, counts=counts,
                   cache_key=getattr(cache, "key", None))

    def normalize(self, modality: str, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` as float32 (x: ``[..., T, *sample_shape]``)."""
        mu = self.mean[modality].astype(np.float32)
        sd = self.std[modality].astype(np.float32)
        return (np.asarray(x, dtype=np.float32) - mu) / sd

    def to_dict(self) -> dict:
        return {
            "subjects": list(self.subjects),
            "frame_stats": self.frame_stats,
            "counts": self.counts,
            "cache_key": self.cache_key,
            "mean": {m: np.asarray(v).tolist() for m, v in self.mean.items()},
            "std": {m: np.asarray(v).tolist() for m, v in self.std.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NormStats":
        return cls(
            mean={m: np.asarray(v, dtype=np.float64) for m, v in d["mean"].items()},
            std={m: np.asarray(v, dtype=np.float64) for m, v in d["std"].items()},
            subjects=tuple(d["subjects"]),
            frame_stats=d.get("frame_stats", "channel"),
            counts=dict(d.get("counts", {})),
            cache_key=d.get("cache_key"),
        )

    def save(self, path: str | os.PathLike) -> None:
        from .reader import _atomic_write_text

        _atomic_write_text(Path(path), json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NormStats":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _pooled(n: int, mean: np.ndarray, m2: np.ndarray) -> tuple[int, float, float]:
    """Combine per-channel (n each, mean, M2) into one pooled (count, mean, variance)."""
    C = len(mean)
    tot = n * C
    mu = float(mean.mean())
    m2_all = float(m2.sum() + n * ((mean - mu) ** 2).sum())
    return tot, mu, m2_all / max(tot, 1)


def stats_path(cache, subjects, frame_stats: str = "channel") -> Path:
    tag = json.dumps({"subjects": sorted(int(s) for s in subjects), "frame_stats": frame_stats, "v": 1})
    return Path(cache.path) / f"stats-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.json"


def per_window_normalize(x: np.ndarray, eps: float = STD_EPS) -> np.ndarray:
    """The paper's per-window z-score: per channel (axis or pixel) over the window's time axis (axis 0)."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0, keepdims=True)
    sd = x.std(axis=0, keepdims=True)
    return ((x - mu) / np.maximum(sd, eps)).astype(np.float32)
