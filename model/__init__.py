"""Time-MAGNET model package: encoders, fusions, baselines, presets, the training loop, metrics,
plots and checkpoints. See docs/model.md.

Names are imported on first use, so that `model.config` (presets, no torch) is cheap to import."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "config": ("MODALITIES", "PRESETS", "ModelConfig", "get_config"),
    "network": ("FUSIONS", "MultimodalHAR", "build_model", "count_parameters", "parameter_breakdown"),
    "state": ("load_checkpoint", "load_trainable_state", "save_checkpoint", "state_nbytes", "trainable_state",
              "trainable_state_keys"),
    "training": ("TrainConfig", "adapt_batchnorm", "class_weights_from_labels", "classification_metrics",
                 "evaluate", "evaluate_per_subject", "fit", "proximal_term"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
