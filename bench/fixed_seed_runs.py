"""Fixed-seed federated runs whose figures must not move when the code is refactored: the tiny FedProx and
FedMobile-style Ray simulations of the integration tests and three rounds of the compact default recipe. Run it on
two checkouts and compare the printed figures (docs/experiments/2026-12-02-config-redesign.md).

    python bench/fixed_seed_runs.py --workdir /tmp/fixed-after        # ~10 min on 2 cores
    python bench/fixed_seed_runs.py --runs tiny-fedprox,tiny-fedmobile

Prints a table (per run: each round's train loss and validation weighted F1, the test figures), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtime.results import read_results  # noqa: E402
from server_app.simulation import exit_on_sigterm, run_simulation  # noqa: E402

TINY = {"model-preset": "tiny", "local-epochs": 1, "batch-size": 16, "grad-accum": 1, "lr": 3e-3,
        "num-server-rounds": 2, "clients-per-round": 4, "patience": 0}
RUNS = {  # name: (SuperNodes, run config over the defaults)
    "tiny-fedprox": (4, {**TINY, "strategy": "fedprox", "fedprox.proximal-mu": 0.1, "absent-modalities": "dc",
                         "absent-fraction": 0.33, "modality-aware-averaging": True}),
    "tiny-fedmobile": (4, {**TINY, "strategy": "fedmobile", "missing-rate": 0.5, "missing-at-eval": True,
                           "fedmobile.shapley-clusters": 2, "fedmobile.proxy-windows": 64, "unimodal-weight": 1.0,
                           "acc-window-stats": True, "fedmobile.generator-objective": "prediction"}),
    "compact-3-rounds": (21, {"num-server-rounds": 3}),
}


def main(argv=None) -> dict:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("outputs/fixed-seed-runs"))
    ap.add_argument("--runs", default=",".join(RUNS))
    args = ap.parse_args(argv)
    out = {}
    for name in args.runs.split(","):
        nodes, rc = RUNS[name]
        run_dir = args.workdir / "runs" / name
        if not (run_dir / "results.json").exists():
            rc = {**rc, "output-dir": str((args.workdir / "runs").resolve()), "run-name": name,
                  **({"data-path": os.environ["FEDTIME_DATA_PATH"]} if os.environ.get("FEDTIME_DATA_PATH") else {})}
            run = run_simulation(rc, nodes=nodes, workdir=args.workdir / f"sim-{name}", timeout=3600)
            if not run.ok:
                raise SystemExit(f"{name}: {run.status} (log {run.log_path})")
        res = read_results(run_dir / "results.json")
        out[name] = {"rounds": [[r["round"], r["train_loss"], r["val_weighted_f1"]] for r in res["history"]],
                     "test": {k: res["test"][k] for k in ("accuracy", "weighted_f1", "macro_f1")},
                     "confusion_matrix": res["test"]["confusion_matrix"]}
        print(f"{name}:")
        for rnd, loss, f1 in out[name]["rounds"]:
            print(f"  round {rnd}: train loss {loss!r}  val weighted F1 {f1!r}")
        print(f"  test: {out[name]['test']}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
