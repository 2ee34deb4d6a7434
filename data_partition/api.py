"""Convenience entry points for the ClientApp / ServerApp (fast warm path)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import numpy as np

from .cache import _locked, load_cache
from .config import PreprocessConfig
from .stats import NormStats, stats_path


def load_split_stats(
    source: str | os.PathLike | None,
    cfg: PreprocessConfig | None,
    train_subjects: Iterable[int],
    *,
    cache_dir: str | os.PathLike | None = None,
    frame_stats: str = "channel",
    progress: bool = True,
) -> NormStats:
    """:class:`NormStats` of ``train_subjects``, fitted once and kept as JSON next to the window cache
    (file keyed by the sorted subject list and ``frame_stats``)."""
    wc = load_cache(source, cfg, cache_dir, progress=progress)
    subjects = tuple(sorted({int(s) for s in train_subjects}))
    path = stats_path(wc, subjects, frame_stats)

    def cached() -> NormStats | None:
        try:
            st = NormStats.load(path)
        except (OSError, ValueError, KeyError):
            return None
        if st.subjects == subjects and st.cache_key == wc.key and st.frame_stats == frame_stats:
            return st
        return None

    st = cached()
    if st is not None:
        return st
    with _locked(path.with_name(f".lock-{path.name}")):
        st = cached()
        if st is None:
            st = NormStats.fit(wc, subjects, frame_stats=frame_stats)
            try:
                st.save(path)
            except OSError as err:  # read-only cache: still usable, just not kept
                warnings.warn(f"could not save normalisation stats to {path}: {err}", stacklevel=2)
    return st


def load_subject_dataset(
    source: str | os.PathLike | None,
    cfg: PreprocessConfig | None,
    subject: int | Iterable[int],
    stats: NormStats | None,
    augment_sigma: float = 0.0,
    *,
    cache_dir: str | os.PathLike | None = None,
    normalization: str = "global",
    masks: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
):
    """Open the window cache (building it if needed) and return the :class:`WindowDataset` of one
    subject (or of several, pooled, e.g. the validation subjects). Only those rows are copied
    out of the memory map."""
    from .dataset import WindowDataset

    wc = load_cache(source, cfg, cache_dir, progress=progress)
    return WindowDataset(
        wc,
        subject,
        stats,
        normalization=normalization,
        augment_sigma=augment_sigma,
        masks=masks,
        seed=seed,
        labels=labels,
    )
