"""Data, model and training settings built the same way from a RunConfig, by the ServerApp, the ClientApp, the
centralized trainer and the benches."""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import numpy as np
import torch

from data_partition import (PreprocessConfig, WindowDataset, load_cache, load_split_stats, paper_split,
                            resolve_source)
from model import PRESETS, build_model
from fedtime.config import RunConfig
from fedtime.scenario import Scenario


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """For log lines: "cpu", or "cuda:0 (<GPU name>, CUDA_VISIBLE_DEVICES=<what this process was pinned to>)"."""
    if not torch.cuda.is_available():
        return "cpu"
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()}, CUDA_VISIBLE_DEVICES={pinned})"


def preprocess_config(cfg: RunConfig) -> PreprocessConfig:
    preset = PRESETS[cfg.model_preset]
    return PreprocessConfig(acc_hz=preset.acc_hz, frame_hz=preset.frame_hz, window_s=preset.window_s)


@functools.lru_cache(maxsize=4)
def _data(source: str | None, pcfg: PreprocessConfig, split_seed: int):
    src = resolve_source(source)
    cache = load_cache(src, pcfg)
    split = paper_split(split_seed)
    stats = load_split_stats(src, pcfg, split.train)
    return cache, split, stats


def open_data(cfg: RunConfig):
    """(window cache, split, train-only statistics) — built once per process, memory-mapped after."""
    return _data(cfg.data_source(), preprocess_config(cfg), cfg.split_seed)


def checkpoint_meta(cfg: RunConfig, **extra: Any) -> dict[str, Any]:
    """The ``meta`` of a run's ``best_model.safetensors`` header (`model.state.checkpoint_header`): ``extra``, the
    run config and, with ``normalization = "global"``, the training subjects' statistics (`NormStats.to_dict`: a
    mean and std per accelerometer axis and one per frame modality, well under 1 kB), so that ``python -m
    model.predict`` normalises new recordings as the run did from the checkpoint alone."""
    meta = {**extra, "run_config": cfg.to_run_config()}
    if cfg.normalization == "global":
        meta["norm_stats"] = open_data(cfg)[2].to_dict()
    return meta


def subject_of_partition(cfg: RunConfig, node_config: dict) -> int:
    """Partition id i ↦ the i-th training subject of the split (a node may also name its subject directly)."""
    split = paper_split(cfg.split_seed)
    if "subject" in node_config:
        subject = int(node_config["subject"])
        if subject not in split.train:
            raise ValueError(f"node-config subject {subject} is not a training subject of split-seed "
                             f"{cfg.split_seed}: {list(split.train)}")
        return subject
    if "partition-id" not in node_config:
        raise ValueError("node-config needs 'partition-id' (or 'subject')")
    pid = int(node_config["partition-id"])
    try:
        return split.partition_subject(pid)
    except IndexError:
        raise ValueError(f"partition-id {pid} out of range: the split has {len(split.train)} training "
                         "subjects") from None


def scenario(cfg: RunConfig) -> Scenario:
    return Scenario.from_config(cfg, paper_split(cfg.split_seed).train)


def dataset(cfg: RunConfig, subjects, *, train: bool) -> WindowDataset:
    """Windows of `subjects`, normalised with the train-subject statistics; noise only when `train`. The run's
    scenario decides which modalities are absent (and, for a poisoned client's training data, the labels)."""
    cache, _, stats = open_data(cfg)
    subjects = [int(s) for s in subjects]
    sc = scenario(cfg)
    masks = labels = None
    if sc.active:
        sizes = [cache.subject_rows(s).stop - cache.subject_rows(s).start for s in subjects]
        masks = np.concatenate([sc.masks(s, n, train=train) for s, n in zip(subjects, sizes)])
        if train and sc.poisoned_subjects:
            y = cache.index["label"].to_numpy(np.int64)
            labels = np.concatenate([sc.labels(s, y[cache.subject_rows(s)]) for s in subjects])
    return WindowDataset(cache, subjects, stats, normalization=cfg.normalization,
                         augment_sigma=cfg.augment_sigma if train else 0.0, seed=cfg.seed, masks=masks, labels=labels)


@functools.lru_cache(maxsize=2)
def _model(preset: str, fusion: str, modalities: tuple[str, ...], options: tuple[tuple[str, bool], ...]):
    return build_model(preset, fusion=fusion, modalities=modalities, **dict(options))


def model_for(cfg: RunConfig, options: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """A process-wide model instance; callers load the trainable state they need into it. Everything that
    changes during training travels in that state, so reuse across rounds is safe. `options`: the strategy's model
    options (`Strategy.model_options`; a client reads them from its message, `options_from_message`)."""
    merged = {**cfg.model_options, **(options or {})}
    return _model(cfg.model_preset, cfg.fusion, cfg.modality_list, tuple(sorted(merged.items())))


MODEL_PREFIX = "model."  # strategy model options travel in the round's config as `model.<option>`


def options_to_message(options: Mapping[str, Any]) -> dict[str, Any]:
    return {MODEL_PREFIX + k: v for k, v in options.items()}


def options_from_message(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len(MODEL_PREFIX):]: v for k, v in config.items() if k.startswith(MODEL_PREFIX)}


def train_config(cfg: RunConfig, round_config: Mapping[str, Any] | None = None, epochs: int | None = None):
    """The model's TrainConfig for this run: the one route by which training settings reach the loop, for a
    client (the run config plus what its strategy sends in the round's config: `proximal-mu`, `generator-weight`,
    `alignment-weight`),
    the centralized trainer and the benches. Its `batch_size` is the forward pass's (build the training loader
    with it) and `grad_accum` the forward passes per optimizer step, so every micro-batch setting takes the same
    optimizer steps of `optimizer_batch` windows."""
    from model import TrainConfig

    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    sent = dict(round_config or {})
    return TrainConfig(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, batch_size=cfg.forward_batch,
                       grad_accum=cfg.optimizer_batch // cfg.forward_batch,
                       epochs=cfg.local_epochs if epochs is None else epochs,
                       patience=cfg.patience, amp=cfg.amp, modality_dropout=cfg.modality_dropout,
                       unimodal_weight=cfg.unimodal_weight,
                       generator_weight=float(sent.get("generator-weight", 1.0)),
                       alignment_weight=float(sent.get("alignment-weight", 1.0)),
                       proximal_mu=float(sent.get("proximal-mu", 0.0)))


def set_threads(cfg: RunConfig) -> None:
    if device().type == "cpu":
        torch.set_num_threads(cfg.num_threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.num_threads))
