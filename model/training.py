"""The one training / evaluation loop, used by the centralized trainer and by the Flower ClientApp."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .state import load_trainable_state, trainable_state


@dataclass
class TrainConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 8  # windows per forward pass, for whoever builds the loader; fit uses its batches as given
    grad_accum: int = 6  # optimizer step every N forward passes; a leftover partial group is stepped
    epochs: int = 10
    patience: int = 6  # early stopping on validation (epochs without strict improvement)
    clip: float = 1.0  # max grad norm (0 = off)
    aux_weight: float = 0.01  # lambda for the MoE load-balancing loss returned by forward
    lr_factor: float = 0.5  # ReduceLROnPlateau on the validation monitor
    lr_patience: int = 3
    min_lr: float = 1e-6
    monitor: str = "weighted_f1"  # validation metric for the scheduler and early stopping
    # CUDA mixed precision: "off" (fp32: the fastest at batch 8 on an H100, docs/gpu.md), "auto" (bf16 where the
    # GPU has it, else fp16 + GradScaler), "bf16", "fp16"; always off on CPU
    amp: str = "off"
    label_smoothing: float = 0.0
    modality_dropout: float = 0.0  # training only: drop each present modality of a sample with this
    # probability (at least one stays), so the model learns to use any subset (missing modalities)
    swa_start: int = 0  # > 0: average the trainable weights of epochs swa_start.. (SWA) instead of early stopping
    generator_weight: float = 1.0  # weight of the latent generators' distillation loss (models with generators)
    unimodal_weight: float = 0.0  # weight of the per-modality heads' cross-entropy (models with unimodal heads)
    max_batches_per_epoch: int | None = None  # cap (smoke tests, benchmarks)
    seed: int | None = None  # when set, fit seeds torch before training (dropout, gate noise)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
def class_weights_from_labels(labels: "Sequence[int] | np.ndarray | torch.Tensor", num_classes: int) -> torch.Tensor:
    """Balanced weights ``n / (k * count_c)`` from the LOCAL training labels (k = classes present);
    classes absent locally get weight 0 (they never occur as targets there)."""
    y = torch.as_tensor(np.array(labels, dtype=np.int64)).flatten()
    counts = torch.bincount(y, minlength=num_classes).double()[:num_classes]
    present = counts > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    if present.any():
        w[present] = y.numel() / (present.sum() * counts[present])
    return w.float()


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx term ``mu/2 * sum ||w - w_global||^2``; its gradient is ``mu * (w - w_global)``."""
    total = None
    for p, a in zip(params, anchor, strict=True):
        s = (p - a).pow(2).sum()
        total = s if total is None else total + s
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


def unimodal_loss(logits: torch.Tensor, present: torch.Tensor, y: torch.Tensor,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy of each present modality's own head ``logits [B, M, C]`` against the
    window's label, averaged over the (window, modality) pairs that ``present [B, M]`` marks."""
    if not bool(present.any()):
        return logits.sum() * 0.0
    targets = y.unsqueeze(1).expand(present.shape)
    return F.cross_entropy(logits[present].float(), targets[present], weight=weight)


def drop_modalities(mask: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly mark present modalities absent with probability ``p`` per (sample, modality),
    keeping at least one present modality per sample (one of those it had, chosen at random)."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= p
    new = mask & keep
    empty = ~new.any(dim=1) & mask.any(dim=1)
    if empty.any():
        scores = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~mask, -1.0)
        pick = scores.argmax(dim=1)
        rows = empty.nonzero(as_tuple=True)[0]
        new[rows, pick[rows]] = True
    return new


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


#: fp16 GradScaler: torch's default first scale (2**16) overflowed on the first ~7 steps of every fit() call on
#: an H100 (measured, docs/gpu.md), and a client's fit() is a few dozen steps per round; start low, grow fast.
FP16_INIT_SCALE = 2.0**10
FP16_GROWTH_INTERVAL = 50


def _amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler). bf16 needs no scaler (fp32's exponent range), so "auto" takes
    it wherever the GPU has it."""
    mode = mode.lower()
    if mode == "off":
        return None, False
    if mode == "auto":
        if device.type != "cuda":
            return None, False
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if mode == "bf16":
        return torch.bfloat16, False
    if mode == "fp16":
        return torch.float16, device.type == "cuda"
    raise ValueError(f"amp must be auto|bf16|fp16|off, got {mode!r}")


def grad_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", init_scale=FP16_INIT_SCALE, growth_interval=FP16_GROWTH_INTERVAL)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


_MINIMIZE = {"loss"}


def _adamw(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused AdamW (one kernel for all tensors) is markedly faster on CPU for many small tensors
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------
def fit(
    model: nn.Module,
    train_loader: Iterable[dict],
    cfg: TrainConfig,
    *,
    device: "torch.device | str",
    class_weights: torch.Tensor | None = None,
    val_loader: Iterable[dict] | None = None,
    validate: Callable[[nn.Module], dict] | None = None,
    proximal_mu: float = 0.0,
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """Train ``model`` in place; returns one history dict per epoch.

    AdamW (fresh per call) over the trainable parameters; loss = class-weighted CE +
    ``cfg.aux_weight`` * aux (+ ``cfg.generator_weight`` * the latent generators' distillation loss when the
    model has them) (+ ``cfg.unimodal_weight`` * ``unimodal_loss`` when the model has unimodal heads)
    + optional FedProx ``mu/2 ||w - w_global||^2`` (anchor = the trainable parameters at the start of this call);
    gradient accumulation with clipping (the generators' gradients clipped apart from the model's); mixed
    precision on CUDA. With ``val_loader``: ReduceLROnPlateau and early stopping on ``cfg.monitor``, and the
    best epoch's trainable state (parameters + BatchNorm statistics) is restored at the end. ``validate(model)``
    replaces ``evaluate(model, val_loader)`` where validation needs more (per-subject BatchNorm statistics).
    """
    device = torch.device(device)
    log = log or (lambda s: None)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(params, cfg)
    maximize = cfg.monitor not in _MINIMIZE
    sched = None
    if validate is None and val_loader is not None:
        def validate(m: nn.Module) -> dict:
            return evaluate(m, val_loader, device, amp=cfg.amp)
    if validate is not None:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max" if maximize else "min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr
        )
    amp_dtype, use_scaler = _amp(cfg.amp, device)
    scaler = grad_scaler() if use_scaler else None
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    weight = class_weights.to(device=device, dtype=torch.float32) if class_weights is not None else None
    skip_single = _has_batchnorm(model)
    has_generators = getattr(model, "generators", None) is not None
    has_unimodal = getattr(model, "unimodal_heads", None) is not None and cfg.unimodal_weight > 0
    accum = max(1, int(cfg.grad_accum))
    # the generators' distillation gradients never reach the model (detached), so they are clipped apart: under
    # one global norm a badly reconstructing generator would shrink every step of the classifier it serves
    generator_ids = {id(p) for p in model.generators.parameters()} if has_generators else set()
    clip_groups = [g for g in ([p for p in params if id(p) not in generator_ids],
                               [p for p in params if id(p) in generator_ids]) if g]

    def optimizer_step(pending: int) -> bool:
        """False when the GradScaler skipped the step (fp16 overflow)."""
        if scaler is not None:
            scaler.unscale_(opt)
        if pending != accum:  # leftover group: rescale to a mean over the batches it holds
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(accum / pending)
        if cfg.clip and cfg.clip > 0:
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, cfg.clip)
        stepped = True
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            stepped = scaler.get_scale() >= scale
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return stepped

    history: list[dict] = []
    best_score, best_epoch, best_state, bad = None, None, None, 0
    swa: dict[str, torch.Tensor] | None = None
    swa_n = 0
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        n = correct = 0
        sum_ce = sum_aux = sum_prox = sum_gen = sum_uni = 0.0
        steps = pending = skipped = overflow = 0
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(train_loader):
            if cfg.max_batches_per_epoch is not None and i >= cfg.max_batches_per_epoch:
                break
            batch = move_batch(batch, device)
            y = batch["y"]
            if cfg.modality_dropout > 0:
                mask = batch.get("mask")
                if mask is None:
                    mask = torch.ones(y.shape[0], 4, dtype=torch.bool, device=y.device)
                batch = dict(batch, mask=drop_modalities(mask.bool(), cfg.modality_dropout))
            if skip_single and y.shape[0] < 2:
                skipped += 1  # BatchNorm cannot train on a single sample
                continue
            with _autocast(device, amp_dtype):
                logits, aux = model(batch)
            ce = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=cfg.label_smoothing)
            loss = ce + cfg.aux_weight * aux.float()
            if has_generators:
                gen = model.generator_loss.float()
                loss = loss + cfg.generator_weight * gen
                sum_gen += float(gen.detach()) * y.shape[0]
            if has_unimodal:
                uni = unimodal_loss(model.unimodal_logits, model.unimodal_present, y, weight)
                loss = loss + cfg.unimodal_weight * uni
                sum_uni += float(uni.detach()) * y.shape[0]
            if anchor is not None:
                prox = proximal_term(params, anchor, proximal_mu)
                loss = loss + prox
                sum_prox += float(prox.detach()) * y.shape[0]
            loss = loss / accum
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            pending += 1
            if pending == accum:
                overflow += not optimizer_step(pending)
                pending = 0
                steps += 1
            bs = y.shape[0]
            n += bs
            sum_ce += float(ce.detach()) * bs
            sum_aux += float(aux.detach()) * bs
            correct += int((logits.detach().argmax(-1) == y).sum())
        if pending:
            overflow += not optimizer_step(pending)
            steps += 1
        train_time = time.perf_counter() - t0
        rec = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": (sum_ce + cfg.aux_weight * sum_aux + sum_prox + cfg.generator_weight * sum_gen
                           + cfg.unimodal_weight * sum_uni) / max(n, 1),
            "train_ce": sum_ce / max(n, 1),
            "train_aux": sum_aux / max(n, 1),
            "train_accuracy": correct / max(n, 1),
            "train_samples": n,
            "optimizer_steps": steps,
            "amp_skipped_steps": overflow,  # fp16 GradScaler overflows (the weights did not move)
            "skipped_batches": skipped,
            "train_time_s": train_time,
            "train_windows_per_s": n / train_time if train_time > 0 else float("nan"),
        }
        if proximal_mu > 0:
            rec["train_prox"] = sum_prox / max(n, 1)
        if has_generators:
            rec["train_generator"] = sum_gen / max(n, 1)
        if has_unimodal:
            rec["train_unimodal"] = sum_uni / max(n, 1)
        line = (
            f"epoch {epoch}/{cfg.epochs} train loss {rec['train_loss']:.4f} (ce {rec['train_ce']:.4f} "
            f"aux {rec['train_aux']:.4f}{' unimodal %.4f' % rec['train_unimodal'] if has_unimodal else ''})"
            f" acc {rec['train_accuracy']:.3f}"
        )
        stop = False
        if validate is not None:
            vm = validate(model)
            for k in ("loss", "accuracy", "weighted_f1", "macro_f1"):
                rec[f"val_{k}"] = vm[k]
            score = vm[cfg.monitor]
            improved = best_score is None or (score > best_score if maximize else score < best_score)
            if improved:
                best_score, best_epoch, bad = score, epoch, 0
                best_state = trainable_state(model)
            else:
                bad += 1
            sched.step(score)
            rec["best_epoch"] = best_epoch
            line += (
                f" | val loss {vm['loss']:.4f} acc {vm['accuracy']:.3f} wF1 {vm['weighted_f1']:.3f}"
                f" mF1 {vm['macro_f1']:.3f}{' *' if improved else ''}"
            )
            stop = bad >= cfg.patience and not cfg.swa_start
        if cfg.swa_start and epoch >= cfg.swa_start:
            swa_n += 1
            if swa is None:
                swa = {n: p.detach().clone() for n, p in named}
            else:
                for n, p in named:
                    swa[n] += (p.detach() - swa[n]) / swa_n
        rec["epoch_time_s"] = time.perf_counter() - t0
        line += f" | lr {rec['lr']:.1e} | {rec['epoch_time_s']:.1f}s ({rec['train_windows_per_s']:.0f} win/s)"
        history.append(rec)
        log(line)
        if stop:
            log(f"early stopping after epoch {epoch}: no {cfg.monitor} gain for {cfg.patience} epochs")
            break
    if swa is not None:
        with torch.no_grad():
            for n, p in named:
                p.copy_(swa[n])
        adapt_batchnorm(model, train_loader, device)  # running statistics for the averaged weights
        rec = {"epoch": "swa", "swa_epochs": swa_n}
        if validate is not None:
            vm = validate(model)
            rec.update({f"val_{k}": vm[k] for k in ("loss", "accuracy", "weighted_f1", "macro_f1")})
            log(f"SWA of epochs {cfg.swa_start}..{history[-1]['epoch']}: val wF1 {vm['weighted_f1']:.3f} "
                f"mF1 {vm['macro_f1']:.3f}")
        history.append(rec)
    elif best_state is not None:
        load_trainable_state(model, best_state)
        if best_epoch != history[-1]["epoch"]:
            log(f"restored epoch {best_epoch} (best val {cfg.monitor} {best_score:.4f})")
    return history


# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[dict], device: "torch.device | str", *, amp: str = "off"):
    """(logits float32 [N, C], labels int64 [N], mean aux) over a loader, in eval mode."""
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    amp_dtype, _ = _amp(amp, device)
    logits_all, labels_all, aux_sum, n = [], [], 0.0, 0
    for batch in loader:
        batch = move_batch(batch, device)
        with _autocast(device, amp_dtype):
            logits, aux = model(batch)
        logits_all.append(logits.float().cpu())
        labels_all.append(batch["y"].cpu())
        aux_sum += float(aux) * batch["y"].shape[0]
        n += batch["y"].shape[0]
    model.train(was_training)
    if not logits_all:
        raise ValueError("empty loader")
    return torch.cat(logits_all), torch.cat(labels_all), aux_sum / max(n, 1)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, num_classes: int | None = None) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
    )

    labels = np.asarray(labels)
    probs = np.asarray(probs)
    k = num_classes or probs.shape[1]
    pred = probs.argmax(1)
    cls = list(range(k))
    return {
        "n": int(labels.shape[0]),
        "accuracy": float(accuracy_score(labels, pred)),
        "weighted_f1": float(f1_score(labels, pred, labels=cls, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(labels, pred, labels=cls, average="macro", zero_division=0)),
        "weighted_precision": float(precision_score(labels, pred, labels=cls, average="weighted", zero_division=0)),
        "weighted_recall": float(recall_score(labels, pred, labels=cls, average="weighted", zero_division=0)),
        "per_class": classification_report(labels, pred, labels=cls, output_dict=True, zero_division=0),
        "confusion_matrix": confusion_matrix(labels, pred, labels=cls).tolist(),
        "predictions": pred,
        "probabilities": probs,
        "labels": labels,
    }


def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    device: "torch.device | str",
    class_weights: torch.Tensor | None = None,
    *,
    amp: str = "off",
) -> dict:
    """Loss (CE, class-weighted if given), accuracy, weighted/macro F1, weighted precision/recall,
    per-class report, confusion matrix, and the probabilities / labels / predictions (numpy)."""
    logits, labels, aux = predict(model, loader, device, amp=amp)
    w = class_weights.float() if class_weights is not None else None
    loss = float(F.cross_entropy(logits, labels, weight=w))
    out = classification_metrics(labels.numpy(), torch.softmax(logits, -1).numpy(), logits.shape[1])
    out["loss"] = loss
    out["aux_loss"] = aux
    return out


def jsonable_metrics(metrics: dict, *, arrays: bool = False) -> dict:
    """A JSON-ready copy of :func:`evaluate`'s output (numpy arrays dropped unless ``arrays``)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, np.ndarray):
            if arrays:
                out[k] = v.tolist()
        elif isinstance(v, (np.floating, np.integer)):
            out[k] = v.item()
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


def evaluate_per_subject(model: nn.Module, loaders: "dict[int, Iterable[dict]]", device: "torch.device | str", *,
                         adapt_bn: bool, class_weights: torch.Tensor | None = None, amp: str = "off") -> dict:
    """Evaluate each subject's loader — after re-estimating BatchNorm statistics on that subject's own windows
    when ``adapt_bn`` (AdaBN) — and pool the predictions into one set of metrics. The model's trainable state is
    left as it was."""
    parts = [evaluate(model, loaders[s], device, class_weights, amp=amp)
             for s in each_subject(model, loaders, device, adapt_bn=adapt_bn)]
    if not parts:
        raise ValueError("evaluate_per_subject: no loaders")
    labels = np.concatenate([p["labels"] for p in parts])
    out = classification_metrics(labels, np.concatenate([p["probabilities"] for p in parts]),
                                 parts[0]["probabilities"].shape[1])
    out["loss"] = float(sum(p["loss"] * len(p["labels"]) for p in parts) / len(labels))
    out["aux_loss"] = float(sum(p["aux_loss"] * len(p["labels"]) for p in parts) / len(labels))
    return out


def each_subject(model: nn.Module, loaders: "dict[int, Iterable[dict]]", device: "torch.device | str", *,
                 adapt_bn: bool):
    """Yield the keys of ``loaders`` (subjects); before each, the model's BatchNorm statistics are re-estimated
    on that loader's windows when ``adapt_bn`` (AdaBN). The trainable state is restored afterwards."""
    state = trainable_state(model) if adapt_bn else None
    try:
        for key, loader in loaders.items():
            if adapt_bn:
                load_trainable_state(model, state)
                adapt_batchnorm(model, loader, device)
            yield key
    finally:
        if adapt_bn:
            load_trainable_state(model, state)


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, loader: Iterable[dict], device: "torch.device | str") -> int:
    """AdaBN: replace every BatchNorm's running statistics by those of ``loader``'s (unlabeled) windows —
    one subject's — leaving all weights untouched. Returns the number of windows seen (0 = no BatchNorm).

    Federated clients hold one subject each, so in training BatchNorm normalises each subject by its own
    statistics; evaluating an unseen subject with its own statistics matches that (docs/federated.md)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole loader
        m.train()
    n = 0
    for batch in loader:
        if batch["y"].shape[0] < 2:  # BatchNorm needs two values per channel in training mode
            continue
        model(move_batch(batch, device))
        n += batch["y"].shape[0]
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    if n == 0:
        raise ValueError("adapt_batchnorm: the loader holds fewer than 2 windows per batch")
    return n
