"""Time-MAGNET model package: encoders, fusions, baselines, presets, the training loop, metrics,
plots and checkpoints. See docs/model.md."""

from .config import MODALITIES, PRESETS, ModelConfig, get_config
from .network import FUSIONS, MultimodalHAR, build_model, count_parameters, parameter_breakdown
from .state import (
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    state_nbytes,
    trainable_state,
    trainable_state_keys,
)
from .training import (
    TrainConfig,
    adapt_batchnorm,
    class_weights_from_labels,
    classification_metrics,
    evaluate,
    evaluate_per_subject,
    fit,
    proximal_term,
)

__all__ = [
    "MODALITIES",
    "PRESETS",
    "FUSIONS",
    "ModelConfig",
    "MultimodalHAR",
    "TrainConfig",
    "adapt_batchnorm",
    "classification_metrics",
    "build_model",
    "class_weights_from_labels",
    "count_parameters",
    "evaluate",
    "evaluate_per_subject",
    "fit",
    "get_config",
    "load_checkpoint",
    "load_trainable_state",
    "parameter_breakdown",
    "proximal_term",
    "save_checkpoint",
    "state_nbytes",
    "trainable_state",
    "trainable_state_keys",
]
