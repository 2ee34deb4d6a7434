"""What travels between parties (``trainable_state``) and safetensors checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_STATS = ("running_mean", "running_var")


def trainable_state_keys(model: nn.Module) -> list[str]:
    """Names (``state_dict`` order) of what a client sends: every parameter with
    ``requires_grad`` (LoRA, CNNs, fusion, classifier, missing tokens) plus the BatchNorm running
    mean/var and the buffers a module lists in ``federated_buffers`` (the generators' statistics).
    Excluded: the frozen T5 base weights (rebuilt from the seed everywhere) and
    ``num_batches_tracked`` (an integer counter only used when ``momentum=None``; we never do)."""
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    for mname, mod in model.named_modules():
        if isinstance(mod, _BatchNorm) and mod.track_running_stats:
            wanted.update(f"{mname}.{b}" if mname else b for b in BN_STATS)
        for b in getattr(mod, "federated_buffers", ()):  # running statistics a module learns (generators)
            wanted.add(f"{mname}.{b}" if mname else b)
    return [k for k in model.state_dict(keep_vars=True) if k in wanted]


def modality_encoder_keys(keys: "list[str]") -> dict[str, list[str]]:
    """Trainable-state keys grouped by the modality whose encoder owns them (``encoders.<m>.…``): what a
    client whose windows all lack ``m`` never changes (the encoder runs only on windows that have it). The
    fusion, the classifier and the missing tokens are shared: a client without ``m`` trains them too."""
    out: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        if len(parts) > 2 and parts[0] == "encoders":
            out.setdefault(parts[1], []).append(k)
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the tensors named by :func:`trainable_state_keys`."""
    sd = model.state_dict(keep_vars=True)
    return {k: sd[k].detach().to("cpu", copy=True).contiguous() for k in trainable_state_keys(model)}


def load_trainable_state(model: nn.Module, state: Mapping[str, "torch.Tensor | np.ndarray"]) -> None:
    """Load a trainable state in place; strict: exactly the keys of :func:`trainable_state_keys`
    with matching shapes, or ``KeyError``/``ValueError`` and nothing is changed."""
    keys = trainable_state_keys(model)
    missing = [k for k in keys if k not in state]
    unexpected = [k for k in state if k not in set(keys)]
    if missing or unexpected:
        raise KeyError(f"trainable state mismatch: missing={missing[:5]}{'...' if len(missing) > 5 else ''} "
                       f"unexpected={unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    sd = model.state_dict(keep_vars=True)
    new = {}
    for k in keys:
        v = state[k]
        t = torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v
        if tuple(t.shape) != tuple(sd[k].shape):
            raise ValueError(f"{k}: shape {tuple(t.shape)} != expected {tuple(sd[k].shape)}")
        new[k] = t
    with torch.no_grad():
        for k, t in new.items():
            sd[k].copy_(t.to(device=sd[k].device, dtype=sd[k].dtype))


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of ``state`` as actually serialized (safetensors)."""
    return len(save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def _model_meta(model: nn.Module) -> dict:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return {}
    return {
        "config": cfg.to_dict(),
        "fusion": getattr(model, "fusion_name", None),
        "modalities": list(getattr(model, "modalities", ())),
        "num_classes": getattr(model, "num_classes", None),
        "latent_generators": getattr(model, "generators", None) is not None,
        "unimodal_heads": getattr(model, "unimodal_heads", None) is not None,
        "modality_alignment": getattr(model, "alignment", None) is not None,
    }


def save_checkpoint(path: "str | Path", model: nn.Module, meta: dict | None = None, *, trainable_only: bool = False) -> Path:
    """Write the model's weights as safetensors; ``meta`` (JSON-serialisable) and the model's
    config go into the safetensors header. ``trainable_only`` stores only :func:`trainable_state`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if trainable_only:
        state = trainable_state(model)
    else:
        # clone: tied tensors (T5's shared/embed_tokens) become separate, as safetensors requires
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=checkpoint_header(model, meta, trainable_only=trainable_only))
    return path


def checkpoint_header(model: nn.Module, meta: dict | None = None, *, trainable_only: bool = False) -> dict[str, str]:
    """The safetensors header of a checkpoint of ``model`` (what :func:`model_from_checkpoint` rebuilds from);
    also used by the federated run's ``best_model.safetensors``."""
    return {
        "meta": json.dumps(meta or {}, default=str),
        "model": json.dumps(_model_meta(model)),
        "trainable_only": str(bool(trainable_only)),
    }


def read_checkpoint_header(path: "str | Path") -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    return {
        "meta": json.loads(md.get("meta", "{}")),
        "model": json.loads(md.get("model", "{}")),
        "trainable_only": md.get("trainable_only", "False") == "True",
    }


def load_checkpoint(path: "str | Path", model: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint; returns ``(state, meta)``. With ``model``, loads it strictly in place."""
    state = load_file(str(path))
    header = read_checkpoint_header(path)
    if model is not None:
        if header["trainable_only"]:
            load_trainable_state(model, state)
        else:
            model.load_state_dict(state, strict=True)
    return state, header["meta"]


def model_from_checkpoint(path: "str | Path") -> nn.Module:
    """Rebuild the model described in a checkpoint's header and load its weights."""
    from .config import ModelConfig
    from .network import build_model

    header = read_checkpoint_header(path)
    mm = header["model"]
    if "config" not in mm:
        raise ValueError(f"{path}: the checkpoint's header does not describe its model (written by an older version?)")
    model = build_model(ModelConfig.from_dict(mm["config"]), mm["fusion"], mm["modalities"], mm["num_classes"],
                        latent_generators=bool(mm.get("latent_generators", False)),
                        unimodal_heads=bool(mm.get("unimodal_heads", False)),
                        modality_alignment=bool(mm.get("modality_alignment", False)))
    load_checkpoint(path, model)
    return model
