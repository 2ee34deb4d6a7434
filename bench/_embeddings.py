"""The fused embeddings of a stored run's test windows (what its classifier reads) and their t-SNE picture, as the
MHARFedLLM paper's Figure 3 shows them. Used by bench/paper_tables.py; trains nothing.

The model is rebuilt from the run's `best_model.safetensors` (`model.state.model_from_checkpoint`; the header's meta
holds the run config), the test windows are built as the run built them (`fedtime.task.dataset` on the split of
its `split-seed`), and the run's BatchNorm handling is applied: with `eval-bn-stats = "subject"` every test
subject's BatchNorm statistics are re-estimated on that subject's own windows first (AdaBN,
`model.training.each_subject`), as the run's test figures were. The embeddings are read with a forward hook on
`model.classifier` (its input is the fusion's output), so the model needs no change. The test weighted F1 of the
same forward passes is recomputed and returned beside the one results.json holds: they agree when the picture
shows the model that was tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def run_config_of(run_dir: Path) -> dict:
    """The run config a stored run trained with: the checkpoint header's (meta `run_config`), else results.json's;
    keys this code no longer knows (earlier versions' spellings of strategy keys) are dropped."""
    from fedtime.config import RunConfig
    from fedtime.results import read_results
    from model.state import read_checkpoint_header

    meta = read_checkpoint_header(run_dir / "best_model.safetensors")["meta"]
    stored = meta.get("run_config") or read_results(run_dir)["config"]
    known = RunConfig().to_run_config()
    return {k: v for k, v in stored.items() if k in known}


def fused_embeddings(run_dir: Path, *, data_path: str | None = None, device: str = "cpu",
                     threads: int = 1) -> dict:
    """{"features" [N, d], "labels" [N], "subjects" [N], "predictions" [N] (numpy), "bn_stats",
    "weighted_f1", "macro_f1"} of the run's test windows, subject by subject."""
    import torch
    from torch.utils.data import DataLoader

    from fedtime import task
    from fedtime.config import RunConfig
    from model.state import model_from_checkpoint
    from model.training import classification_metrics, each_subject, move_batch

    run_dir = Path(run_dir)
    values = run_config_of(run_dir)
    if data_path:
        values["data-path"] = str(data_path)
    cfg = RunConfig.from_run_config(values)
    torch.set_num_threads(threads)
    model = model_from_checkpoint(run_dir / "best_model.safetensors").to(device)
    model.eval()
    _, split, _ = task.open_data(cfg)
    loaders = {s: DataLoader(task.dataset(cfg, [s], train=False), batch_size=cfg.eval_batch_size, shuffle=False)
               for s in split.test}
    captured: list = []
    hook = model.classifier.register_forward_hook(lambda m, inputs, output: captured.append(inputs[0]))
    feats, labels, subjects, logits_all = [], [], [], []
    try:
        with torch.no_grad():
            for s in each_subject(model, loaders, device, adapt_bn=cfg.eval_bn_stats == "subject"):
                model.eval()
                for batch in loaders[s]:
                    batch = move_batch(batch, device)
                    captured.clear()  # AdaBN's own forward passes went through the hook too
                    logits, _ = model(batch)
                    feats.append(captured[-1].detach().float().cpu())
                    logits_all.append(logits.float().cpu())
                    labels.append(batch["y"].cpu())
                    subjects.append(torch.full((len(batch["y"]),), int(s)))
    finally:
        hook.remove()
    logits = torch.cat(logits_all)
    y = torch.cat(labels).numpy()
    m = classification_metrics(y, torch.softmax(logits, -1).numpy(), logits.shape[1])
    return {"features": torch.cat(feats).numpy(), "labels": y, "subjects": torch.cat(subjects).numpy(),
            "predictions": m["predictions"], "bn_stats": cfg.eval_bn_stats,
            "weighted_f1": m["weighted_f1"], "macro_f1": m["macro_f1"]}


def plot_tsne(run_dir: Path, out_png: Path | None = None, *, data_path: str | None = None, title: str = "",
              perplexity: float = 30.0, seed: int = 0) -> dict:
    """t-SNE (scikit-learn, 2-D, PCA start, one thread) of the fused test embeddings of `run_dir`, coloured by
    exercise, written to `out_png` (default `<run>/plots/tsne_test.png`) with a JSON summary beside it
    (`tsne_test.json`: windows, feature size, BatchNorm statistics, recomputed test F1, silhouette of the fused
    embeddings by exercise). Returns that summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    from data_partition.constants import EXERCISE_NAMES

    run_dir = Path(run_dir)
    out_png = Path(out_png) if out_png else run_dir / "plots" / "tsne_test.png"
    out_png.parent.mkdir(parents=True, exist_ok=True)
    e = fused_embeddings(run_dir, data_path=data_path)
    x, y = e["features"], e["labels"]
    points = TSNE(n_components=2, perplexity=min(perplexity, (len(x) - 1) / 3), init="pca",
                  learning_rate="auto", random_state=seed, n_jobs=1).fit_transform(x)
    silhouette = float(silhouette_score(x, y)) if len(np.unique(y)) > 1 else None
    fig, ax = plt.subplots(figsize=(7.2, 5.6))
    cmap = plt.get_cmap("tab10")
    for k in np.unique(y):
        sel = y == k
        name = EXERCISE_NAMES[k] if k < len(EXERCISE_NAMES) else str(k)
        ax.scatter(points[sel, 0], points[sel, 1], s=5, alpha=0.7, color=cmap(int(k) % 10),
                   label=f"E{k + 1} {name}")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title((title or run_dir.name) + f"\nfused embeddings of {len(x)} test windows, t-SNE; "
                 f"test weighted F1 {e['weighted_f1']:.3f}", fontsize=9)
    ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    summary = {"run": str(run_dir), "png": str(out_png), "windows": int(len(x)), "feature_dim": int(x.shape[1]),
               "bn_stats": e["bn_stats"], "weighted_f1": e["weighted_f1"], "macro_f1": e["macro_f1"],
               "silhouette": silhouette, "perplexity": perplexity, "seed": seed,
               "subjects": sorted(int(s) for s in np.unique(e["subjects"]))}
    out_png.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary
