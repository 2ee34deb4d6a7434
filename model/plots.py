"""PNG plots of a training run: learning curves, confusion matrix, per-class precision-recall."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CLASS_NAMES = tuple(f"E{i}" for i in range(1, 8))  # MEx exercises 01..07


def plot_learning_curves(history: Sequence[dict], path: "str | Path", title: str = "") -> Path:
    """Loss and accuracy / F1 per epoch (train and, when present, validation)."""
    path = Path(path)
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_ce"] for h in history], "o-", label="train CE")
    if history and "val_loss" in history[0]:
        a1.plot(ep, [h["val_loss"] for h in history], "o-", label="val CE")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(ep, [h["train_accuracy"] for h in history], "o-", label="train acc")
    if history and "val_accuracy" in history[0]:
        a2.plot(ep, [h["val_accuracy"] for h in history], "o-", label="val acc")
        a2.plot(ep, [h["val_weighted_f1"] for h in history], "s--", label="val weighted F1")
        best = history[-1].get("best_epoch")
        if best:
            a2.axvline(best, color="grey", ls=":", label=f"best epoch {best}")
    a2.set_xlabel("epoch")
    a2.set_ylim(0, 1.02)
    a2.legend()
    a2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_figure(
    cm: "Sequence[Sequence[int]] | np.ndarray",
    class_names: Sequence[str] = CLASS_NAMES,
    title: str = "",
    normalize: bool = True,
) -> "plt.Figure":
    """The confusion matrix (rows = true class) as an open figure, row-normalised with the counts annotated: for
    `plot_confusion_matrix` and TensorBoard (`fedtime.tracking`, which closes it)."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046)
    k = cm.shape[0]
    names = list(class_names)[:k]
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            txt = f"{shown[i, j]:.2f}\n({int(cm[i, j])})" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(
    cm: "Sequence[Sequence[int]] | np.ndarray",
    path: "str | Path",
    class_names: Sequence[str] = CLASS_NAMES,
    title: str = "",
    normalize: bool = True,
) -> Path:
    """Confusion matrix (rows = true class) as a PNG; row-normalised with the counts annotated."""
    path = Path(path)
    fig = confusion_figure(cm, class_names, title, normalize)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pr_curves(
    labels: np.ndarray,
    probabilities: np.ndarray,
    path: "str | Path",
    class_names: Sequence[str] = CLASS_NAMES,
    title: str = "",
) -> Path:
    """One-vs-rest precision-recall curve per class, with average precision in the legend."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    path = Path(path)
    labels = np.asarray(labels)
    probs = np.asarray(probabilities)
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in range(probs.shape[1]):
        y = labels == c
        if not y.any():
            continue
        p, r, _ = precision_recall_curve(y, probs[:, c])
        ap = average_precision_score(y, probs[:, c])
        name = class_names[c] if c < len(class_names) else str(c)
        ax.plot(r, p, label=f"{name} (AP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
