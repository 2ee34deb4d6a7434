"""Utility against privacy: test weighted F1 of user-level DP-FedAvg at several noise multipliers, beside the
non-private run (docs/privacy.md, Utility).

    python bench/privacy.py                                     # z = 0 (non-private), 0.01, 0.1, 1, 3; seed 0
    python bench/privacy.py --noise 3 --seeds 0,1,2             # one level on three seeds
    python bench/privacy.py --report-only                       # read the stored cells, train nothing

Each cell is the real `flwr run` Ray simulation with 21 SuperNodes and pyproject.toml's recipe (the paper's budget:
10 rounds x 5 local epochs, 9 of 21 clients per round), with only `dp-noise-multiplier`, `dp-clip` and `seed`
changed; z = 0 is the same run without DP (its sample-weighted mean and seeded sampler). ε is the accountant's
after the rounds that ran (results.json `privacy`). Finished cells are read back; an interrupted one resumes from
its checkpoint. The report covers every cell stored in `--workdir`. Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the project: bench/model.py must not shadow `model`

from _cells import federated_cell, finished, mean_std  # noqa: E402

from fedtime.config import parse_run_config  # noqa: E402
from server_app.simulation import exit_on_sigterm  # noqa: E402


def cell_name(z: float, clip: float, seed: int) -> str:
    return f"nodp-s{seed}" if z == 0 else f"dp-z{z:g}-c{clip:g}-s{seed}"


def summarise(res: dict) -> dict:
    priv = res.get("privacy") or {}
    eps = priv.get("epsilon") or [None]  # ε after each round
    cfg = res.get("config", {})
    return {"z": float(cfg.get("dp-noise-multiplier", 0.0)), "clip": float(cfg.get("dp-clip", 0.0)),
            "seed": int(cfg.get("seed", 0)), "weighted_f1": res["test"]["weighted_f1"],
            "macro_f1": res["test"]["macro_f1"], "epsilon": eps[-1], "stopped": priv.get("stopped"),
            "rounds": len(res.get("history") or []), "best_round": (res.get("best") or {}).get("round"),
            "val_weighted_f1": (res.get("best") or {}).get("val_weighted_f1"),
            "wall_s": res.get("sim_wall_s") or res.get("wall_time_s")}


def plot(path: Path, rows: list[dict]) -> Path | None:
    """Test weighted F1 against ε (log scale; each seed a dot, the level's mean a line), the non-private run as a
    horizontal line, ε = 10 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in rows if r["z"] > 0 and r["epsilon"]]
    if not private:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in rows:
        if r["z"] == 0:
            mean = statistics.mean(c["weighted_f1"] for c in r["cells"])
            ax.axhline(mean, color="k", ls="--", lw=1, label=f"no DP ({mean:.3f})")
    xs = [r["epsilon"] for r in private]
    ax.plot(xs, [statistics.mean(c["weighted_f1"] for c in r["cells"]) for r in private], "o-", color="C0",
            label="DP-FedAvg (mean over seeds)")
    for r in private:
        ax.scatter([r["epsilon"]] * len(r["cells"]), [c["weighted_f1"] for c in r["cells"]], s=12, color="C0",
                   alpha=0.5)
        ax.annotate(f"z={r['z']:g}", (r["epsilon"], statistics.mean(c["weighted_f1"] for c in r["cells"])),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axvline(10, color="C3", lw=1, ls=":", label="ε = 10")
    ax.axhline(1 / 7, color="grey", lw=1, ls=":", label="chance (7 balanced classes)")
    ax.set_xscale("log")
    ax.set_xlabel("ε after the run (δ = 1e-5, user level)")
    ax.set_ylabel("test weighted F1")
    ax.set_ylim(0, 1)
    ax.set_title("user-level DP, 9 of 21 clients per round")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", default="0,0.01,0.1,1,3", help="noise multipliers z (0 = the non-private run)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--clip", type=float, default=None, help="dp-clip (default: pyproject.toml's)")
    p.add_argument("--run-config", default="", help="a TOML file or inline 'key=value ...' over the defaults")
    p.add_argument("--workdir", type=Path, default=Path("outputs/bench-privacy"))
    p.add_argument("--timeout", type=float, default=3600, help="seconds one cell may run")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--figure", type=Path, default=None, help="also draw F1 against ε here (default: <workdir>/utility.png)")
    p.add_argument("--baseline", type=Path, action="append", default=[],
                   help="a finished non-private run stored elsewhere with the same recipe (e.g. the headline's "
                        "outputs/bench-headline/default-federated-split42), reported as a z = 0 cell, not copied")
    a = p.parse_args()
    extra = parse_run_config([a.run_config] if a.run_config else [])
    if {"dp-noise-multiplier", "dp-clip", "seed"} & set(extra):
        raise SystemExit("--run-config: set the noise, the clip and the seed with --noise, --clip and --seeds")
    if a.clip is None:
        from fedtime.config import RunConfig
        a.clip = RunConfig().dp_clip
    out = a.workdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        for seed in [int(s) for s in a.seeds.split(",") if s]:
            for z in [float(s) for s in a.noise.split(",") if s]:
                rc = {**extra, "seed": seed}
                if z > 0:
                    rc.update({"dp-noise-multiplier": z, "dp-clip": a.clip})
                federated_cell(out, cell_name(z, a.clip, seed), rc, timeout=a.timeout)

    dirs = sorted(d for d in out.iterdir() if d.is_dir()) + [b.resolve() for b in a.baseline]
    cells = [summarise(r) | {"dir": str(d)} for d in dirs if (r := finished(d)) is not None]
    missing = [str(b) for b in a.baseline if finished(b.resolve()) is None]
    if missing:
        raise SystemExit(f"--baseline: not a finished run: {missing}")
    levels = sorted({(c["z"], c["clip"] if c["z"] else 0.0) for c in cells})
    print("\nuser-level DP-FedAvg: test weighted F1 against ε (δ = 1e-5), 9 of 21 clients per round\n")
    print("| noise multiplier z | clip | ε after the run | test weighted F1 | test macro F1 | best round's validation wF1 | seeds | rounds run |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for z, clip in levels:
        cs = [c for c in cells if c["z"] == z and (z == 0 or c["clip"] == clip)]
        eps = cs[0]["epsilon"] if z else None
        print(f"| {z:g}{' (no DP)' if z == 0 else ''} | {'—' if z == 0 else f'{clip:g}'} | {'∞' if z == 0 else (f'{eps:,.0f}' if eps >= 100 else f'{eps:.3g}')} | "
              f"{mean_std([c['weighted_f1'] for c in cs])} | {mean_std([c['macro_f1'] for c in cs])} | "
              f"{mean_std([c['val_weighted_f1'] for c in cs])} | "
              f"{','.join(str(c['seed']) for c in cs)} | {'/'.join(str(c['rounds']) for c in cs)} |")
        rows.append({"z": z, "clip": clip, "epsilon": eps, "cells": cs})
    figure = plot(a.figure or out / "utility.png", rows)
    if figure:
        print(f"\nfigure: {figure}")
    print(json.dumps({"run_config": extra, "levels": rows, "figure": str(figure) if figure else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
