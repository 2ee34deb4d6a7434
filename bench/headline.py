"""The headline figures: the default federated run and the default centralized run on three subject splits,
beside the MHARFedLLM paper's (0.881 federated, 0.934 centralized weighted F1).

    python bench/headline.py                       # split seeds 42, 1, 2 (42 = the paper's split)
    python bench/headline.py --report-only         # read the stored cells, train nothing
    python bench/headline.py --run-config conf/paper.toml --name paper   # another recipe, its own cells

Each federated cell is the real `flwr run` Ray simulation with 21 SuperNodes and pyproject.toml's defaults (the
paper's budget: 10 rounds x 5 local epochs, 9 of 21 clients per round); each centralized cell is
`python -m model.train` with its defaults. Only `split-seed` (and `--run-config`) differs from what a user types.
Finished cells are read back; an interrupted federated cell resumes from its checkpoint.

`--val-only` prints validation figures only (best round / epoch): how a recipe is chosen without looking at
the test subjects. Prints a table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the project: bench/model.py must not shadow `model`

from _cells import centralized_cell, federated_cell, mean_std  # noqa: E402

from fedtime.config import parse_run_config  # noqa: E402
from server_app.simulation import exit_on_sigterm  # noqa: E402

PAPER = {"federated": 0.881, "centralized": 0.934}  # MHARFedLLM, Table 1, MAGNET (weighted F1)


def summarise(res: dict) -> dict:
    """A cell's figures from its results (`fedtime.results`; either mode): test, the best round's / epoch's
    validation weighted F1, the bench's wall time of the cell."""
    test, best = res["test"], res["best"] or {}
    federated = res["mode"] == "federated"
    wall = (res.get("sim_wall_s") if federated else res.get("wall_s")) or res.get("wall_time_s")
    return {"weighted_f1": test["weighted_f1"], "macro_f1": test["macro_f1"], "accuracy": test["accuracy"],
            "val_weighted_f1": best.get("val_weighted_f1"), "best": best.get("round" if federated else "epoch"),
            "wall_s": wall, "peak_rss_mib": res.get("peak_rss_mib")}


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", default="42,1,2", help="split seeds (42 = the paper's subject split)")
    p.add_argument("--modes", default="federated,centralized")
    p.add_argument("--run-config", default="", help="a TOML file or inline 'key=value ...' over the defaults")
    p.add_argument("--name", default="default", help="cell name prefix (one per recipe)")
    p.add_argument("--workdir", type=Path, default=Path("outputs/bench-headline"))
    p.add_argument("--data-path", default="")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one federated cell may run")
    p.add_argument("--report-only", action="store_true", help="read the stored cells, train nothing")
    p.add_argument("--val-only", action="store_true", help="print validation figures only (recipe selection)")
    a = p.parse_args()
    splits = [int(s) for s in a.splits.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    extra = parse_run_config([a.run_config] if a.run_config else [])
    if a.data_path:
        extra["data-path"] = str(Path(a.data_path).resolve())
    out = a.workdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells: dict[str, dict[int, dict]] = {m: {} for m in modes}
    for split in splits:
        for mode in modes:
            name = f"{a.name}-{mode}-split{split}"
            rc = {**extra, "split-seed": split}
            if mode == "federated":
                res = federated_cell(out, name, rc, timeout=a.timeout, report_only=a.report_only)
            else:
                res = centralized_cell(out, name, rc, report_only=a.report_only)
            if res is not None:
                cells[mode][split] = summarise(res)

    fields = ["val_weighted_f1", "best", "wall_s"] if a.val_only else \
        ["weighted_f1", "macro_f1", "accuracy", "val_weighted_f1", "best", "wall_s"]
    print(f"\nheadline ({a.name}{': ' + json.dumps(extra) if extra else ''}); test subjects "
          f"{'hidden (--val-only)' if a.val_only else 'scored once per run'}")
    print(f"{'mode':<12} {'split':>6} " + " ".join(f"{f:>16}" for f in fields) + f" {'paper wF1':>10}")
    summary: dict = {"name": a.name, "run_config": extra, "splits": splits}
    for mode in modes:
        rows = cells[mode]
        for split, c in rows.items():
            vals = [f"{c[f]:.3f}" if isinstance(c[f], float) and f != "wall_s" else
                    (f"{c[f]:.0f}" if f == "wall_s" and c[f] is not None else str(c[f])) for f in fields]
            print(f"{mode:<12} {split:>6} " + " ".join(f"{v:>16}" for v in vals) + f" {PAPER[mode]:>10.3f}")
        if rows:
            means = [mean_std([c[f] for c in rows.values()]) if f not in ("best", "wall_s") else "" for f in fields]
            print(f"{mode:<12} {'mean':>6} " + " ".join(f"{v:>16}" for v in means) + f" {PAPER[mode]:>10.3f}")
        vals = list(rows.values())
        summary[f"{mode}_val_weighted_f1_mean"] = statistics.mean(c["val_weighted_f1"] for c in vals) if vals else None
        if not a.val_only and vals:
            summary.update({
                f"{mode}_weighted_f1_mean": statistics.mean(c["weighted_f1"] for c in vals),
                f"{mode}_weighted_f1_min": min(c["weighted_f1"] for c in vals),
                f"{mode}_weighted_f1_std": statistics.stdev(c["weighted_f1"] for c in vals) if len(vals) > 1 else 0.0,
                f"{mode}_macro_f1_mean": statistics.mean(c["macro_f1"] for c in vals),
                f"{mode}_accuracy_mean": statistics.mean(c["accuracy"] for c in vals),
                f"{mode}_wall_s_max": max(c["wall_s"] or 0 for c in vals),
                f"{mode}_per_split": {str(s): {k: c[k] for k in ("weighted_f1", "macro_f1", "accuracy", "best",
                                                                  "wall_s")} for s, c in rows.items()},
            })
            if mode == "federated":
                summary["federated_peak_rss_mib_max"] = max((c["peak_rss_mib"] or 0) for c in vals)
    summary["paper"] = PAPER
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
