"""The one training / evaluation loop, used by the centralized trainer and by the Flower ClientApp."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import MODALITIES
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
    alignment_weight: float = 1.0  # weight of FedEPA's modality alignment loss (models with alignment)
    unimodal_weight: float = 0.0  # weight of the per-modality heads' cross-entropy (models with unimodal heads)
    proximal_mu: float = 0.0  # FedProx: + mu/2 ||w - w_start||^2 over the trainable parameters (w_start: fit's start)
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


UNLABELLED = -1  # the label of a window whose label is withheld (label-scarce scenario): only unsupervised terms


def labelled_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the windows that have a label (``y >= 0``); 0 (with a graph) for a batch of unlabelled
    windows only. A batch whose windows are all labelled is the plain cross-entropy, bit for bit."""
    labelled = y >= 0
    if bool(labelled.all()):
        return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=label_smoothing)
    if not bool(labelled.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits[labelled].float(), y[labelled], weight=weight, label_smoothing=label_smoothing)


def unimodal_loss(logits: torch.Tensor, present: torch.Tensor, y: torch.Tensor,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy of each present modality's own head ``logits [B, M, C]`` against the
    window's label, averaged over the (window, modality) pairs that ``present [B, M]`` marks."""
    present = present & (y >= 0).unsqueeze(1)  # unlabelled windows have no target
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
_VAL_KEYS = ("loss", "accuracy", "weighted_f1", "macro_f1")


def _adamw(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused AdamW (one kernel for all tensors) is markedly faster on CPU for many small tensors
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------
# the loss of one batch, as named terms

#: the order in which the history reports the loss terms and adds them up into ``train_loss``, the order it always
#: had (terms not listed go last). The objective adds them in the order they are computed, FedProx last; a float
#: sum in another order would change the last bits of ``train_loss``.
HISTORY_TERMS = ("ce", "aux", "prox", "generator", "unimodal", "align")


def forward_loss_names(model: nn.Module, cfg: TrainConfig) -> tuple[str, ...]:
    """The names of the losses a training forward of ``model`` yields besides the cross-entropy: ``aux`` (the MoE
    load balance, 0 without MoE) always; ``generator`` when it has latent generators; ``unimodal`` when it has
    unimodal heads and ``cfg.unimodal_weight > 0`` (heads without weight add no term)."""
    names = ["aux"]
    if getattr(model, "generators", None) is not None:
        names.append("generator")
    if getattr(model, "unimodal_heads", None) is not None and cfg.unimodal_weight > 0:
        names.append("unimodal")
    if getattr(model, "alignment", None) is not None and cfg.alignment_weight > 0:
        names.append("align")
    return tuple(names)


def forward_losses(model: nn.Module, aux: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None,
                   names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The losses ``names`` of the training forward that just ran, by name. The one place that knows where each
    lives: ``aux`` is what forward returns; the generators' distillation loss and the unimodal heads' logits are
    left on the model as attributes (``MultimodalHAR.forward``)."""
    readers = {
        "aux": lambda: aux.float(),
        "generator": lambda: model.generator_loss.float(),
        "unimodal": lambda: unimodal_loss(model.unimodal_logits, model.unimodal_present, y, class_weights),
        "align": lambda: model.alignment.loss.float(),
    }
    return {name: readers[name]() for name in names}


class Objective:
    """The training loss of one batch: class-weighted cross-entropy ``ce``, the forward's auxiliary losses
    (:func:`forward_losses`) and the FedProx term ``prox`` (anchor = the trainable parameters at the start of
    ``fit``), each a named term, summed with its ``TrainConfig`` weight (``ce`` and ``prox``: none)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, params: list[torch.Tensor], device: torch.device,
                 amp_dtype: torch.dtype | None, class_weights: torch.Tensor | None):
        self.model, self.params, self.device, self.amp_dtype = model, params, device, amp_dtype
        self.label_smoothing, self.mu = cfg.label_smoothing, cfg.proximal_mu
        self.class_weights = (class_weights.to(device=device, dtype=torch.float32)
                              if class_weights is not None else None)
        self.anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
        self.forward_names = forward_loss_names(model, cfg)
        self.names = ("ce", *self.forward_names) + (("prox",) if self.anchor is not None else ())
        self.weights = {"aux": cfg.aux_weight, "generator": cfg.generator_weight, "unimodal": cfg.unimodal_weight,
                        "align": cfg.alignment_weight}

    def terms(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, {name: loss term}) of a training forward of ``batch``."""
        with _autocast(self.device, self.amp_dtype):
            logits, aux = self.model(batch)
        y = batch["y"]
        terms = {"ce": labelled_cross_entropy(logits, y, self.class_weights, self.label_smoothing)}
        terms.update(forward_losses(self.model, aux, y, self.class_weights, self.forward_names))
        if self.anchor is not None:
            terms["prox"] = proximal_term(self.params, self.anchor, self.mu)
        return logits, terms

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to minimise: every term of ``terms`` by its name, times its weight, in their order."""
        return _weighted_sum(terms, self.weights)

    def history_total(self, sums: dict[str, float]) -> float:
        """The same sum of the terms' epoch sums (``train_loss`` times windows), in ``HISTORY_TERMS`` order."""
        return _weighted_sum({name: sums[name] for name in _history_order(sums)}, self.weights)


def _weighted_sum(values: dict, weights: dict[str, float]):
    total = None
    for name, v in values.items():
        w = weights.get(name)
        v = v if w is None else w * v
        total = v if total is None else total + v
    return total


def _history_order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: HISTORY_TERMS.index(n) if n in HISTORY_TERMS else len(HISTORY_TERMS))


class EpochStats:
    """What one epoch's history row reports: windows, correct predictions, the window-weighted sum of each loss
    term, optimizer steps, fp16 overflows and skipped batches."""

    def __init__(self, names: Sequence[str]):
        self.n = self.labelled = self.correct = self.steps = self.overflow = self.skipped = 0
        self.sums = {name: 0.0 for name in names}

    def add(self, logits: torch.Tensor, y: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        bs = y.shape[0]
        self.n += bs
        self.labelled += int((y >= 0).sum())
        for name, term in terms.items():
            self.sums[name] += float(term.detach()) * bs
        self.correct += int((logits.detach().argmax(-1) == y).sum())  # an unlabelled window (-1) is never right

    def record(self, epoch: int, lr: float, objective: Objective, train_time: float) -> dict:
        n = max(self.n, 1)
        means = {name: self.sums[name] / n for name in _history_order(self.sums)}
        rec = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": objective.history_total(self.sums) / n,
            "train_ce": means["ce"],
            "train_aux": means["aux"],
            "train_accuracy": self.correct / max(self.labelled, 1),
            "train_samples": self.n,
            "optimizer_steps": self.steps,
            "amp_skipped_steps": self.overflow,  # fp16 GradScaler overflows (the weights did not move)
            "skipped_batches": self.skipped,
            "train_time_s": train_time,
            "train_windows_per_s": self.n / train_time if train_time > 0 else float("nan"),
        }
        rec.update({f"train_{k}": v for k, v in means.items() if k not in ("ce", "aux")})
        return rec


# ----------------------------------------------------------------------------------------------
# batches and optimizer steps

def _presence(batch: dict) -> torch.Tensor:
    """``batch["mask"]`` as bool; a batch without one has every modality present (the data contract: one column
    per entry of ``MODALITIES``, whichever of them the model uses)."""
    mask = batch.get("mask")
    if mask is None:
        y = batch["y"]
        return torch.ones(y.shape[0], len(MODALITIES), dtype=torch.bool, device=y.device)
    return mask.bool()


def _training_batches(loader: Iterable[dict], cfg: TrainConfig, device: torch.device, skip_single: bool,
                      stats: EpochStats):
    """The loader's batches as fit trains on them, one at a time: at most ``cfg.max_batches_per_epoch``, on
    ``device``, with modality dropout; batches of one window are skipped (counted) when the model has BatchNorm,
    which cannot train on a single sample."""
    for i, batch in enumerate(loader):
        if cfg.max_batches_per_epoch is not None and i >= cfg.max_batches_per_epoch:
            break
        batch = move_batch(batch, device)
        if cfg.modality_dropout > 0:
            batch = dict(batch, mask=drop_modalities(_presence(batch), cfg.modality_dropout))
        if skip_single and batch["y"].shape[0] < 2:
            stats.skipped += 1
            continue
        yield batch


def _groups(items: Iterable, size: int):
    """Consecutive groups of ``size`` (the last may be shorter), each drawn lazily from ``items``: the next batch
    is only prepared (modality dropout draws from the global RNG) once the previous one has been trained on, so
    the random stream is the one a flat loop over the batches draws. Consume each group before the next."""
    it = iter(items)
    for first in it:
        yield itertools.chain((first,), itertools.islice(it, size - 1))


def _clip_groups(model: nn.Module, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The generators' distillation gradients never reach the model (detached), so they are clipped apart: under
    one global norm a badly reconstructing generator would shrink every step of the classifier it serves."""
    generators = getattr(model, "generators", None)
    ids = {id(p) for p in generators.parameters()} if generators is not None else set()
    return [g for g in ([p for p in params if id(p) not in ids], [p for p in params if id(p) in ids]) if g]


class OptimizerStep:
    """One optimizer step over the micro-batches of an optimizer batch (``cfg.grad_accum`` forward passes): the
    gradient of each micro-batch's loss / ``grad_accum`` accumulates (scaled by the fp16 GradScaler if any), so
    the step is that of the mean loss; a short last group is rescaled to a mean over the micro-batches it holds;
    each clip group's gradient norm is clipped to ``cfg.clip`` on its own."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[torch.Tensor], clip_groups: list[list[torch.Tensor]],
                 cfg: TrainConfig, scaler: "torch.amp.GradScaler | None"):
        self.opt, self.params, self.clip_groups, self.scaler = opt, params, clip_groups, scaler
        self.accum = max(1, int(cfg.grad_accum))
        self.clip = cfg.clip

    def __call__(self, micro_batches: Iterable[dict], loss_of: Callable[[dict], torch.Tensor]) -> bool:
        """Backward through ``loss_of(b)`` for each micro-batch, then step. False when the GradScaler skipped the
        step (fp16 overflow: the weights did not move)."""
        pending = 0
        for batch in micro_batches:
            loss = loss_of(batch) / self.accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            pending += 1
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if pending != self.accum:  # leftover group: rescale to a mean over the batches it holds
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(self.accum / pending)
        if self.clip and self.clip > 0:
            for group in self.clip_groups:
                torch.nn.utils.clip_grad_norm_(group, self.clip)
        stepped = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return stepped


# ----------------------------------------------------------------------------------------------
# per-epoch hooks

class EarlyStopping:
    """Patience on the validation monitor: counts the epochs without strict improvement, keeps the best epoch's
    trainable state (parameters + BatchNorm statistics) and restores it at the end, so that ``fit`` returns the
    best model rather than the last. ``stop=False`` (SWA) still tracks the best epoch but never stops."""

    def __init__(self, monitor: str, patience: int, stop: bool = True):
        self.monitor, self.patience, self.stop = monitor, patience, stop
        self.maximize = monitor not in _MINIMIZE
        self.best_score, self.best_epoch, self.best_state, self.bad = None, None, None, 0

    def on_epoch_end(self, model: nn.Module, epoch: int, score: float) -> bool:
        """Whether ``score`` improves on the best so far (then the model's trainable state is kept)."""
        improved = self.best_score is None or (score > self.best_score if self.maximize else score < self.best_score)
        if improved:
            self.best_score, self.best_epoch, self.bad = score, epoch, 0
            self.best_state = trainable_state(model)
        else:
            self.bad += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.stop and self.bad >= self.patience

    def on_train_end(self, model: nn.Module, history: list[dict], log: Callable[[str], None]) -> None:
        if self.best_state is None:
            return
        load_trainable_state(model, self.best_state)
        if self.best_epoch != history[-1]["epoch"]:
            log(f"restored epoch {self.best_epoch} (best val {self.monitor} {self.best_score:.4f})")


class WeightAveraging:
    """SWA: the running mean of the trainable parameters of epochs ``start``.. (``start`` 0 = off), which
    replaces early stopping: the averaged weights are loaded at the end, BatchNorm statistics re-estimated for
    them, and a history row ``{"epoch": "swa", ...}`` appended."""

    def __init__(self, model: nn.Module, start: int):
        self.start, self.n, self.mean = start, 0, None
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def on_epoch_end(self, epoch: int) -> None:
        if not (self.start and epoch >= self.start):
            return
        self.n += 1
        if self.mean is None:
            self.mean = {name: p.detach().clone() for name, p in self.named}
        else:
            for name, p in self.named:
                self.mean[name] += (p.detach() - self.mean[name]) / self.n

    def on_train_end(self, model: nn.Module, train_loader: Iterable[dict], device: torch.device,
                     validate: Callable[[nn.Module], dict] | None, history: list[dict],
                     log: Callable[[str], None]) -> bool:
        """Load the average (False when no epoch was averaged)."""
        if self.mean is None:
            return False
        with torch.no_grad():
            for name, p in self.named:
                p.copy_(self.mean[name])
        adapt_batchnorm(model, train_loader, device)  # running statistics for the averaged weights
        rec = {"epoch": "swa", "swa_epochs": self.n}
        if validate is not None:
            vm = validate(model)
            rec.update({f"val_{k}": vm[k] for k in _VAL_KEYS})
            log(f"SWA of epochs {self.start}..{history[-1]['epoch']}: val wF1 {vm['weighted_f1']:.3f} "
                f"mF1 {vm['macro_f1']:.3f}")
        history.append(rec)
        return True


def _epoch_line(rec: dict, epochs: int, improved: bool) -> str:
    line = (
        f"epoch {rec['epoch']}/{epochs} train loss {rec['train_loss']:.4f} (ce {rec['train_ce']:.4f} "
        f"aux {rec['train_aux']:.4f}{' unimodal %.4f' % rec['train_unimodal'] if 'train_unimodal' in rec else ''})"
        f" acc {rec['train_accuracy']:.3f}"
    )
    if "val_loss" in rec:
        line += (f" | val loss {rec['val_loss']:.4f} acc {rec['val_accuracy']:.3f} wF1 {rec['val_weighted_f1']:.3f}"
                 f" mF1 {rec['val_macro_f1']:.3f}{' *' if improved else ''}")
    return line + f" | lr {rec['lr']:.1e} | {rec['epoch_time_s']:.1f}s ({rec['train_windows_per_s']:.0f} win/s)"


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
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """Train ``model`` in place; returns one history dict per epoch.

    AdamW (fresh per call) over the trainable parameters, minimising :class:`Objective` (class-weighted CE +
    the forward's auxiliary losses + FedProx ``cfg.proximal_mu/2 ||w - w_global||^2`` when > 0); one
    :class:`OptimizerStep` per ``cfg.grad_accum`` batches (accumulation, clipping, mixed precision on CUDA). With
    ``val_loader``:
    ReduceLROnPlateau and :class:`EarlyStopping` on ``cfg.monitor`` (the best epoch's trainable state is
    restored at the end), or :class:`WeightAveraging` when ``cfg.swa_start``. ``validate(model)`` replaces
    ``evaluate(model, val_loader)`` where validation needs more (per-subject BatchNorm statistics).
    """
    device = torch.device(device)
    log = log or (lambda s: None)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(params, cfg)
    if validate is None and val_loader is not None:
        def validate(m: nn.Module) -> dict:
            return evaluate(m, val_loader, device, amp=cfg.amp)
    early = sched = None
    if validate is not None:
        early = EarlyStopping(cfg.monitor, cfg.patience, stop=not cfg.swa_start)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max" if early.maximize else "min",
                                                           factor=cfg.lr_factor, patience=cfg.lr_patience,
                                                           min_lr=cfg.min_lr)
    amp_dtype, use_scaler = _amp(cfg.amp, device)
    step = OptimizerStep(opt, params, _clip_groups(model, params), cfg, grad_scaler() if use_scaler else None)
    objective = Objective(model, cfg, params, device, amp_dtype, class_weights)
    swa = WeightAveraging(model, cfg.swa_start)
    skip_single = _has_batchnorm(model)

    def batch_loss(batch: dict) -> torch.Tensor:
        logits, terms = objective.terms(batch)
        stats.add(logits, batch["y"], terms)
        return objective.total(terms)

    history: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        stats = EpochStats(objective.names)
        opt.zero_grad(set_to_none=True)
        for micro_batches in _groups(_training_batches(train_loader, cfg, device, skip_single, stats), step.accum):
            stats.overflow += not step(micro_batches, batch_loss)
            stats.steps += 1
        rec = stats.record(epoch, opt.param_groups[0]["lr"], objective, time.perf_counter() - t0)
        improved = False
        if validate is not None:
            vm = validate(model)
            rec.update({f"val_{k}": vm[k] for k in _VAL_KEYS})
            improved = early.on_epoch_end(model, epoch, vm[cfg.monitor])
            sched.step(vm[cfg.monitor])
            rec["best_epoch"] = early.best_epoch
        swa.on_epoch_end(epoch)
        rec["epoch_time_s"] = time.perf_counter() - t0
        history.append(rec)
        log(_epoch_line(rec, cfg.epochs, improved))
        if early is not None and early.should_stop:
            log(f"early stopping after epoch {epoch}: no {cfg.monitor} gain for {cfg.patience} epochs")
            break
    if not swa.on_train_end(model, train_loader, device, validate, history, log) and early is not None:
        early.on_train_end(model, history, log)
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
