"""MEx data pipeline: read (zip/folder/download), align on time, window, cache, split,
train-only normalisation, torch Dataset, fault simulators. See docs/data.md.

Importing the package does not import torch; ``WindowDataset`` (and ``load_subject_dataset``'s
result) does, on first use.
"""

from .api import load_split_stats, load_subject_dataset
from .cache import WindowCache, cache_key, clear_memo, load_cache
from .config import PreprocessConfig
from .constants import (
    DEFAULT_AUGMENT_SIGMA,
    EXERCISE_NAMES,
    FOLDERS,
    MEX_SHA256,
    MEX_URL,
    MODALITIES,
    NUM_CLASSES,
    SAMPLE_SHAPES,
    SUBJECTS,
)
from .reader import (
    ChecksumError,
    MExFormatError,
    default_cache_dir,
    download_mex,
    parse_csv,
    parse_timestamps,
    resolve_source,
    scan_source,
)
from .simulate import drop_modalities, flip_labels, full_masks, noisy_labels, sample_missing_masks, select_clients
from .splits import Split, loso_folds, paper_split, shuffle_order
from .stats import NormStats

__all__ = [
    "ChecksumError",
    "DEFAULT_AUGMENT_SIGMA",
    "EXERCISE_NAMES",
    "FOLDERS",
    "MEX_SHA256",
    "MEX_URL",
    "MExFormatError",
    "MODALITIES",
    "NUM_CLASSES",
    "NormStats",
    "PreprocessConfig",
    "SAMPLE_SHAPES",
    "SUBJECTS",
    "Split",
    "WindowCache",
    "WindowDataset",
    "cache_key",
    "clear_memo",
    "default_cache_dir",
    "download_mex",
    "drop_modalities",
    "flip_labels",
    "full_masks",
    "load_cache",
    "load_split_stats",
    "load_subject_dataset",
    "loso_folds",
    "noisy_labels",
    "paper_split",
    "parse_csv",
    "parse_timestamps",
    "resolve_source",
    "sample_missing_masks",
    "scan_source",
    "select_clients",
    "shuffle_order",
]


def __getattr__(name: str):
    if name == "WindowDataset":
        from .dataset import WindowDataset

        return WindowDataset
    raise AttributeError(f"module 'data_partition' has no attribute {name!r}")
