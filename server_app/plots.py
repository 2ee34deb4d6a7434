"""Plots of a federated run, drawn from its results (`fedtime.results`: per-round history, best round) and the final
test evaluation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from model.plots import plot_confusion_matrix, plot_pr_curves  # noqa: E402


def plot_rounds(results: dict, path: Path) -> Path:
    rounds = results["history"]
    best = (results.get("best") or {}).get("round")
    r = [x["round"] for x in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(r, [x["train_loss"] for x in rounds], "o-", label="train loss (clients, weighted)")
    ax1.plot(r, [x["val_loss"] for x in rounds], "s-", label="validation loss")
    ax1.set_xlabel("round"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    for key, label in (("val_accuracy", "val accuracy"), ("val_weighted_f1", "val weighted F1"),
                       ("val_macro_f1", "val macro F1")):
        ax2.plot(r, [x[key] for x in rounds], "o-", label=label)
    if best:
        ax2.axvline(best, color="grey", ls="--", label=f"best round {best}")
    ax2.set_xlabel("round"), ax2.set_ylim(0, 1.02), ax2.legend(), ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{results['run']}: learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(run_dir: Path, results: dict, test: dict | None) -> list[Path]:
    """Learning curves, and with a test evaluation (None: the strategy has no global model to test) its
    confusion matrix and precision-recall curves."""
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    best = (results.get("best") or {}).get("round")
    if test is None:
        return [plot_rounds(results, out / "learning_curves.png")]
    return [plot_rounds(results, out / "learning_curves.png"),
            plot_confusion_matrix(test["confusion_matrix"], out / "confusion_matrix.png",
                                  title=f"test confusion matrix (best round {best})"),
            plot_pr_curves(test["labels"], test["probabilities"], out / "pr_curves.png")]
