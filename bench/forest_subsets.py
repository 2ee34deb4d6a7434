"""What the MEx sensors themselves carry when modalities go missing: a random forest per sensor subset on window
features, no federated model involved.

    python bench/forest_subsets.py [--data-path MEx.zip] [--trees 200] [--jobs 2]

One forest per non-empty subset of the four sensors (15; i.e. a *routed* forest: the mask names the subset, so
every window goes to the forest of its own sensors), trained on the 21 training subjects of the paper split and
scored on its 6 test subjects. Features per window (as `../shared/reference/mex-baselines.md`): per-axis mean,
std, min, max and 10/25/50/75/90th percentiles of each accelerometer; mean and std frame of the depth camera
and of the pressure mat (2x2-pooled). Two normalisations: `global` (standardised with the training windows'
statistics) and `subject` (every subject's features standardised by that subject's own mean and std over all its
windows first, as AdaBN does for BatchNorm features at evaluation). Then each forest set's expected score when
each sensor is missing with probability r (the `missing-rate` scenario, `bench/modality_subsets.py`), beside its
score with all four: how many points missing sensors cost even a model that is specialised to every subset.
Prints a table and, as its last line, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent))  # after the project: bench/model.py must not shadow `model`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modality_subsets import SUBSETS, expected_score, subset_name  # noqa: E402

from data_partition import PreprocessConfig, load_cache, paper_split  # noqa: E402
from data_partition.constants import MODALITIES  # noqa: E402
from model.config import COMPACT  # noqa: E402

PERCENTILES = (10, 25, 50, 75, 90)


def window_features(modality: str, x: np.ndarray) -> np.ndarray:
    """Per-window features ``[N, F]`` of one sensor's windows ``[N, T, ...]``."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if modality in ("act", "acw"):
        q = np.percentile(x, PERCENTILES, axis=1).transpose(1, 0, 2).reshape(n, -1)
        return np.concatenate([x.mean(1), x.std(1), x.min(1), x.max(1), q], axis=1)
    if modality == "pm":
        t, h, w = x.shape[1:]
        x = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, t, h // 2, 2, w // 2, 2).mean((3, 5))
    return np.concatenate([x.mean(1).reshape(n, -1), x.std(1).reshape(n, -1)], axis=1)


def standardise(f: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Each feature to zero mean and unit std over the rows given (one subject's windows)."""
    return (f - f.mean(0)) / (f.std(0) + eps)


def subject_features(wc, subjects, per_subject: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    feats: dict[str, list] = {m: [] for m in MODALITIES}
    labels = []
    for s in subjects:
        rows = wc.subject_rows(s)
        for m in MODALITIES:
            f = window_features(m, wc.arrays[m][rows])
            feats[m].append(standardise(f) if per_subject else f)
        labels.append(wc.labels[rows])
    return {m: np.concatenate(v) for m, v in feats.items()}, np.concatenate(labels)


def score_subsets(wc, split, per_subject: bool, trees: int, jobs: int, seed: int) -> dict[str, dict]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = subject_features(wc, split.train, per_subject)
    xte, yte = subject_features(wc, split.test, per_subject)
    out = {}
    for sub in SUBSETS:
        name, t0 = subset_name(sub), time.perf_counter()
        a = np.concatenate([xtr[MODALITIES[i]] for i in sub], axis=1)
        b = np.concatenate([xte[MODALITIES[i]] for i in sub], axis=1)
        scaler = StandardScaler().fit(a)
        forest = RandomForestClassifier(trees, min_samples_leaf=2, n_jobs=jobs, random_state=seed)
        pred = forest.fit(scaler.transform(a), ytr).predict(scaler.transform(b))
        out[name] = {"accuracy": float(accuracy_score(yte, pred)),
                     "weighted_f1": float(f1_score(yte, pred, average="weighted")),
                     "macro_f1": float(f1_score(yte, pred, average="macro"))}
        print(f"  [{'subject' if per_subject else 'global'}] {name:<14} weighted F1 {out[name]['weighted_f1']:.3f}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=os.environ.get("FEDTIME_DATA_PATH", ""))
    p.add_argument("--rates", default="0.5,0.9", help="missing rates for the expected score")
    p.add_argument("--trees", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    pre = PreprocessConfig(acc_hz=COMPACT.acc_hz, frame_hz=COMPACT.frame_hz, window_s=COMPACT.window_s)
    wc = load_cache(args.data_path or None, pre)
    split = paper_split(42)
    result = {"trees": args.trees, "seed": args.seed, "preprocess": {"acc_hz": pre.acc_hz, "frame_hz": pre.frame_hz}}
    for norm in ("global", "subject"):
        scores = score_subsets(wc, split, norm == "subject", args.trees, args.jobs, args.seed)
        expected = {str(r): {k: expected_score(scores, r, k) for k in ("accuracy", "weighted_f1")} for r in rates}
        result[norm] = {"subsets": scores, "expected": expected}

    print(f"\n{'test weighted F1':<22}{'global':>10}{'subject':>10}")
    for sub in SUBSETS:
        n = subset_name(sub)
        print(f"{n:<22}{result['global']['subsets'][n]['weighted_f1']:>10.3f}"
              f"{result['subject']['subsets'][n]['weighted_f1']:>10.3f}")
    full = subset_name(SUBSETS[0])
    for r in rates:
        row = [result[k]["expected"][str(r)]["weighted_f1"] for k in ("global", "subject")]
        print(f"{f'E[missing {r:g}]':<22}{row[0]:>10.3f}{row[1]:>10.3f}")
        gaps = [100 * (result[k]["subsets"][full]["weighted_f1"] - v) for k, v in zip(("global", "subject"), row)]
        print(f"{f'  gap to all four, pts':<22}{gaps[0]:>10.1f}{gaps[1]:>10.1f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
