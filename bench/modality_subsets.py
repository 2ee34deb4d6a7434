"""What a trained federated model scores with each subset of modalities present: the ceiling that missing
modalities at test time put on any strategy.

    python bench/modality_subsets.py outputs/bench-strategies/fedavg-clean-compact-r5e3-s0 [more run dirs]

For every run directory (results.json + best_model.safetensors of a `flwr run`), evaluates the best model on
the test subjects with each of the 15 non-empty modality subsets present in every window (per-subject
BatchNorm statistics, as the run's own test), then the accuracy expected when each modality is missing with
probability r independently (the `missing-rate` scenario: a window that would lose all keeps one at random).
With several run directories, also the routed ceiling: each subset scored by whichever model is best at it,
in expectation over the subsets a missing rate leaves. With `--reconstruction`, also how well each modality's
embedding can be reconstructed from the other three across subjects: the best linear map (ridge), fit on
training subjects' embeddings and scored (R²) on the validation subjects' — a ceiling for linear latent
generators on these encoders. For a model trained with unimodal heads (`unimodal-weight` > 0), each single-sensor
subset is also scored by that sensor's own head (`head:<sensor>` rows), and the expectation over subsets with every
single-sensor window answered by its head instead of the fused path (a fixed rule, not a choice made on test).
Prints a table and, as its last line, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from data_partition import WindowDataset  # noqa: E402
from data_partition.constants import MODALITIES  # noqa: E402
from model import load_trainable_state  # noqa: E402
from model.training import classification_metrics, each_subject, evaluate_per_subject, move_batch  # noqa: E402
from fedtime import task  # noqa: E402
from fedtime.config import RunConfig  # noqa: E402
from fedtime.results import read_results  # noqa: E402

SUBSETS = [c for r in range(len(MODALITIES), 0, -1) for c in itertools.combinations(range(len(MODALITIES)), r)]


def subset_probability(subset: tuple[int, ...], rate: float) -> float:
    """P(exactly these modalities present) under independent drops with probability `rate`, where a window
    left empty keeps one modality drawn uniformly (data_partition.simulate.sample_missing_masks)."""
    m = len(MODALITIES)
    p = (1 - rate) ** len(subset) * rate ** (m - len(subset))
    if len(subset) == 1:
        p += rate ** m / m
    return p


def subset_name(subset: tuple[int, ...]) -> str:
    return "+".join(MODALITIES[i] for i in subset)


def expected_score(scores: dict[str, dict], rate: float, key: str = "accuracy") -> float:
    """`scores[subset name][key]` in expectation over the subsets that missing rate `rate` leaves."""
    probs = np.array([subset_probability(s, rate) for s in SUBSETS])
    return float(probs @ np.array([scores[subset_name(s)][key] for s in SUBSETS]) / probs.sum())


def routed_ceiling(scores: dict[str, dict], rates: list[float]) -> dict:
    """What a model that sends each window to whichever of these models is best for its sensor subset would
    score, in expectation over the subsets that missing rate r leaves: an upper bound for any one of them, and
    a realisable model (the mask says which subset a window has). `scores` maps a run to its `subsets` dict
    (subset name -> accuracy, weighted_f1)."""
    names = [subset_name(s) for s in SUBSETS]
    best = {n: {k: max(run[n][k] for run in scores.values()) for k in ("accuracy", "weighted_f1")} for n in names}
    best_run = {n: max(scores, key=lambda r: scores[r][n]["accuracy"]) for n in names}
    out = {"per_subset": best, "best_run": best_run}
    for k in ("accuracy", "weighted_f1"):
        out[f"expected_{k}"] = {str(r): expected_score(best, r, k) for r in rates}
    return out


def subject_embeddings(model, cfg: RunConfig, subjects) -> np.ndarray:
    """Real embeddings ``[N, M, d]`` of the subjects' complete windows, each subject with its own BatchNorm
    statistics when the run evaluates that way."""
    loaders = {s: DataLoader(task.dataset(cfg, [s], train=False), batch_size=cfg.eval_batch_size) for s in subjects}
    model.eval()
    out = []
    for s in each_subject(model, loaders, task.device(), adapt_bn=cfg.eval_bn_stats == "subject"):
        with torch.no_grad():
            out += [model.embed(move_batch(b, task.device()))[0].float().cpu().numpy() for b in loaders[s]]
    return np.concatenate(out)


def head_scores(model, loaders: dict, modality: str, adapt_bn: bool) -> dict:
    """Accuracy / weighted F1 of `modality`'s unimodal head alone on the loaders' windows (per-subject BatchNorm
    statistics when `adapt_bn`, as the fused model is scored)."""
    j = model.modalities.index(modality)
    model.eval()
    probs, labels = [], []
    for s in each_subject(model, loaders, task.device(), adapt_bn=adapt_bn):
        with torch.no_grad():
            for b in loaders[s]:
                e, _ = model.embed(move_batch(b, task.device()))
                probs.append(torch.softmax(model.unimodal_heads[modality](e[:, j]).float(), -1).cpu().numpy())
                labels.append(b["y"].numpy())
    m = classification_metrics(np.concatenate(labels), np.concatenate(probs), model.num_classes)
    return {"accuracy": float(m["accuracy"]), "weighted_f1": float(m["weighted_f1"])}


def linear_reconstruction_r2(train: np.ndarray, val: np.ndarray, ridge: float = 1e-3) -> list[float]:
    """Per modality j: R² on ``val`` of the ridge map (others -> j) fit on ``train`` (both ``[N, M, d]``)."""
    r2 = []
    for j in range(train.shape[1]):
        others = [i for i in range(train.shape[1]) if i != j]
        x, y = train[:, others].reshape(len(train), -1), train[:, j]
        xv, yv = val[:, others].reshape(len(val), -1), val[:, j]
        mx, my = x.mean(0), y.mean(0)
        a = (x - mx).T @ (x - mx) + ridge * len(x) * np.eye(x.shape[1])
        w = np.linalg.solve(a, (x - mx).T @ (y - my))
        r2.append(float(1.0 - (((xv - mx) @ w + my - yv) ** 2).mean() / yv.var(0).mean()))
    return r2


def evaluate_run(run_dir: Path, data_path: str, rates: list[float], reconstruction: bool = False) -> dict:
    results = read_results(run_dir / "results.json")
    values = {k: v for k, v in results["config"].items()
              if k not in ("missing-rate", "missing-at-eval", "absent-modalities", "absent-fraction")}
    if data_path:
        values["data-path"] = data_path
    cfg = RunConfig.from_run_config(values)
    task.set_threads(cfg)
    model = task.model_for(cfg)
    load_trainable_state(model, load_file(str(run_dir / "best_model.safetensors")))
    cache, split, stats = task.open_data(cfg)
    scores, heads = {}, {}
    for subset in SUBSETS:
        loaders = {}
        for s in split.test:
            rows = cache.subject_rows(s)
            mask = np.zeros((rows.stop - rows.start, len(MODALITIES)), bool)
            mask[:, list(subset)] = True
            ds = WindowDataset(cache, [s], stats, normalization=cfg.normalization, augment_sigma=0.0, seed=cfg.seed,
                               masks=mask)
            loaders[s] = DataLoader(ds, batch_size=cfg.eval_batch_size)
        m = evaluate_per_subject(model, loaders, task.device(), adapt_bn=cfg.eval_bn_stats == "subject")
        name = subset_name(subset)
        scores[name] = {"accuracy": float(m["accuracy"]), "weighted_f1": float(m["weighted_f1"])}
        print(f"  {run_dir.name:<44} {name:<16} acc {m['accuracy']:.3f}  wF1 {m['weighted_f1']:.3f}", flush=True)
        if len(subset) == 1 and model.unimodal_heads is not None:
            heads[name] = head_scores(model, loaders, name, cfg.eval_bn_stats == "subject")
            print(f"  {run_dir.name:<44} {'head:' + name:<16} acc {heads[name]['accuracy']:.3f}  "
                  f"wF1 {heads[name]['weighted_f1']:.3f}", flush=True)
    expected, realised = {}, {}
    for r in rates:
        expected[str(r)] = expected_score(scores, r)
        # the scenario's own test windows (mixed subsets in one subject, as `missing-rate=r missing-at-eval=true`
        # runs are tested): BatchNorm statistics then come from that mix, not from one subset at a time
        missing = cfg.replace(missing_rate=r, missing_at_eval=True)
        loaders = {s: DataLoader(task.dataset(missing, [s], train=False), batch_size=cfg.eval_batch_size)
                   for s in split.test}
        m = evaluate_per_subject(model, loaders, task.device(), adapt_bn=cfg.eval_bn_stats == "subject")
        realised[str(r)] = {"accuracy": float(m["accuracy"]), "weighted_f1": float(m["weighted_f1"]),
                            "macro_f1": float(m["macro_f1"])}
        print(f"  {run_dir.name:<44} test windows missing {r:.0%}  acc {m['accuracy']:.3f}  "
              f"wF1 {m['weighted_f1']:.3f}", flush=True)
    out = {"subsets": scores, "expected_accuracy": expected, "missing_test": realised,
           "heads": heads, "expected_with_heads": {str(r): {k: expected_score({**scores, **heads}, r, k)
                                                            for k in ("accuracy", "weighted_f1")}
                                                   for r in rates} if heads else {},
           "scenario": results.get("scenario"),
           "strategy": cfg.strategy, "test": (results.get("test") or {}).get("weighted_f1")}
    if reconstruction:
        complete = cfg.replace(missing_rate=0.0, missing_at_eval=False)
        out["linear_reconstruction_r2"] = linear_reconstruction_r2(subject_embeddings(model, complete, split.train),
                                                                   subject_embeddings(model, complete, split.val))
        print(f"  {run_dir.name:<44} linear reconstruction R² (val) "
              + " ".join(f"{m} {v:.3f}" for m, v in zip(MODALITIES, out["linear_reconstruction_r2"])), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--data-path", default="")
    p.add_argument("--rates", default="0.5,0.9", help="missing rates for the expected accuracy")
    p.add_argument("--reconstruction", action="store_true",
                   help="also the linear reconstruction R² of each modality's embedding from the others")
    a = p.parse_args()
    rates = [float(r) for r in a.rates.split(",") if r]
    out = {}
    for d in a.run_dirs:
        for f in ("results.json", "best_model.safetensors"):
            if not (d / f).exists():
                p.error(f"{d} has no {f}: pass the directory of a finished run")
        out[d.name] = evaluate_run(d, a.data_path, rates, a.reconstruction)
    names = list(out)
    print("\nweighted F1 on the test subjects with only these modalities present")
    print(f"{'present':<16} " + " ".join(f"{n[:28]:>28}" for n in names))
    for subset in SUBSETS:
        key = subset_name(subset)
        print(f"{key:<16} " + " ".join(f"{out[n]['subsets'][key]['weighted_f1']:>28.3f}" for n in names))
    for mod in MODALITIES:
        if any(mod in out[n]["heads"] for n in names):
            print(f"{'head:' + mod:<16} " + " ".join(
                f"{out[n]['heads'][mod]['weighted_f1']:>28.3f}" if mod in out[n]["heads"] else f"{'-':>28}"
                for n in names))
    for r in rates:
        print(f"{'E[acc] r=' + str(r):<16} " + " ".join(f"{out[n]['expected_accuracy'][str(r)]:>28.3f}" for n in names))
        print(f"{'wF1 test r=' + str(r):<16} " + " ".join(f"{out[n]['missing_test'][str(r)]['weighted_f1']:>28.3f}"
                                                      for n in names))
        if any(out[n]["heads"] for n in names):
            print(f"{'E[acc] heads ' + str(r):<16} " + " ".join(
                f"{out[n]['expected_with_heads'][str(r)]['accuracy']:>28.3f}" if out[n]["heads"] else f"{'-':>28}"
                for n in names))
    if a.reconstruction:
        for m_i, mod in enumerate(MODALITIES):
            print(f"{'R² lin ' + mod:<16} " + " ".join(f"{out[n]['linear_reconstruction_r2'][m_i]:>28.3f}" for n in names))
    if len(names) > 1:
        ceiling = routed_ceiling({n: out[n]["subsets"] for n in names}, rates)
        out["_routed_ceiling"] = ceiling
        print("\nbest of these models for each subset (a window routed by its sensors to the best model):")
        for r in rates:
            print(f"  missing rate {r}: expected accuracy {ceiling['expected_accuracy'][str(r)]:.3f}, "
                  f"weighted F1 ~ {ceiling['expected_weighted_f1'][str(r)]:.3f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
