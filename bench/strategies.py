"""Strategies x scenarios under the real Ray simulation engine: the table of docs/strategies.md.

Each cell is a `flwr run` simulation (21 SuperNodes, 9 per round) on the compact preset, repeated over seeds
(the seed also draws the scenario: which windows lose modalities, which clients are poisoned). Finished cells
are reused, so the table can be grown run by run:

    python bench/strategies.py --strategies fedavg,fedmobile --scenarios clean,missing50 --seeds 0,1,2

With `--extend`, a cell asked for at more rounds than a finished one of the same strategy, scenario, epochs and
seed continues that run from its checkpoint (a copy, so the shorter cell stays) instead of training from round 1:
a resumed run repeats the same sampled clients and local steps (tests/integration/test_simulation.py), so this
is the longer run, for the cost of its extra rounds. `--patience N` names cells `...-pN` and sets their early
stopping patience (0: never stop); with `--extend` such a cell continues the run of the same cell that an
earlier patience stopped before its last round (`--patience 0 --rounds 30` after a run that stopped at 19:
rounds 20 to 30).

Prints a table of test weighted / macro F1 (mean ± std over seeds) and upload MB per round, writes it as
markdown (table.md) and as a figure (table.png: one panel per scenario, every seed a dot) next to the runs, and
prints one JSON object with every cell as its last line.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the project: bench/model.py must not shadow `model`

from fedtime.results import read_results, write_results  # noqa: E402
from server_app.simulation import exit_on_sigterm, run_simulation  # noqa: E402

import _cells  # noqa: E402

SCENARIOS: dict[str, dict] = {
    "clean": {},
    "missing50": {"missing-rate": 0.5, "missing-at-eval": True},
    "missing50-train": {"missing-rate": 0.5},  # test windows complete
    "missing90": {"missing-rate": 0.9, "missing-at-eval": True},
    "absent-dc-pm": {"absent-modalities": "dc,pm", "absent-fraction": 0.33},
    "label-flip": {"poison": "label-flip", "poison-clients": 2},
    "scaled-update": {"poison": "scale", "poison-clients": 2, "poison-scale": 10.0},
    "label10": {"labeled-fraction": 0.1},  # label-scarce: a tenth of each client's training windows keeps its label
}
# a table row: registered strategy name, or a variant = (strategy, extra run-config keys)
STRATEGY_KEYS: dict[str, dict] = {"fedprox": {"fedprox.proximal-mu": 0.01},
                                  # FedMFS with its own fusion and classifier per client, uploading gamma encoders
                                  **{f"fedmfs-g{g}": {"strategy": "fedmfs", "fedmfs.head": "local",
                                                      "fedmfs.upload-modalities": g} for g in (1, 2, 3, 4)},
                                  "fedmfs-shared-g2": {"strategy": "fedmfs", "fedmfs.head": "shared",
                                                       "fedmfs.upload-modalities": 2},
                                  # FedEPA without its alignment loss: the same windows in the loader (so the
                                  # same optimizer steps), the personalized aggregation alone
                                  "fedepa-noalign": {"strategy": "fedepa", "fedepa.alignment-weight": 0.0},
                                  "fedtrimmedavg": {"fedtrimmedavg.trim-beta": 0.2},
                                  "krum": {"krum.num-malicious": 2},
                                  # FedMobile's generators with plain sample weights: isolates the reconstruction
                                  "fedmobile-samples": {"strategy": "fedmobile", "fedmobile.perf-weight": 0.0,
                                                        "fedmobile.gain-weight": 0.0},
                                  # each modality's encoder averaged over the clients that have that sensor
                                  "fedavg-modality": {"strategy": "fedavg", "modality-aware-averaging": True},
                                  # modality dropout in local training (each present sensor masked with p 0.5)
                                  "fedavg-md50": {"strategy": "fedavg", "modality-dropout": 0.5},
                                  "fedmobile-md50": {"strategy": "fedmobile", "modality-dropout": 0.5},
                                  # stronger single-sensor encoders: a head per modality classifies from that
                                  # modality's embedding alone (weight 1), and the accelerometer encoders read the
                                  # window's per-axis statistics
                                  "fedmobile-uni": {"strategy": "fedmobile", "unimodal-weight": 1.0,
                                                    "acc-window-stats": True},
                                  "fedavg-uni": {"strategy": "fedavg", "unimodal-weight": 1.0,
                                                 "acc-window-stats": True},
                                  "fedmobile-accnorm": {"strategy": "fedmobile", "acc-window-stats": True,
                                                        "acc-window-stats-norm": True},
                                  "fedavg-accnorm": {"strategy": "fedavg", "acc-window-stats": True,
                                                     "acc-window-stats-norm": True},
                                  # generators distilled towards the fused prediction too, gated on the proxy
                                  # set's cross-entropy instead of the embeddings' R²
                                  "fedmobile-accnorm-kd": {"strategy": "fedmobile", "acc-window-stats": True,
                                                           "acc-window-stats-norm": True,
                                                           "fedmobile.generator-objective": "prediction"}}


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _vs_fedavg(xs: list[float], base: list[float]) -> str:
    """Difference of means and Welch's t: with 3 + 3 seeds only |t| >= 2.8 is significant at 5 %."""
    if len(xs) < 2 or len(base) < 2:
        return "—"
    d = statistics.mean(xs) - statistics.mean(base)
    se = (statistics.variance(xs) / len(xs) + statistics.variance(base) / len(base)) ** 0.5
    return f"{d:+.3f} (t {d / se:+.1f})" if se > 0 else f"{d:+.3f}"


def plot_cells(cells: list[dict], scenarios: list[str], strategies: list[str], path: Path) -> Path:
    """Bars of mean test weighted F1 per strategy, one panel per scenario; seeds as dots, FedAvg's mean dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [sc for sc in scenarios if any(c["scenario"] == sc for c in cells)]
    cols = min(3, max(1, len(shown)))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, scenario in zip(axes.flat, shown):
        names = [st for st in strategies if any(c["strategy"] == st and c["scenario"] == scenario for c in cells)]
        for i, st in enumerate(names):
            f1 = [c["test_weighted_f1"] for c in cells if c["strategy"] == st and c["scenario"] == scenario]
            ax.bar(i, statistics.mean(f1), yerr=statistics.stdev(f1) if len(f1) > 1 else 0, capsize=3,
                   color="tab:blue" if st == "fedavg" else "tab:grey", alpha=0.6)
            ax.plot([i] * len(f1), f1, "k.", ms=5)
            if st == "fedavg":
                ax.axhline(statistics.mean(f1), color="tab:blue", ls="--", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(scenario)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test weighted F1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finished(res_path: Path) -> bool:
    """A cell whose run ended (a run without a global model to test, FedMFS with local heads, has test None)."""
    return _cells.finished(res_path.parent, need_test=False) is not None


def cell_record(res: dict) -> dict:
    """The figures of one finished cell: test (None without a global model), personalized evaluation on the
    clients' held-out windows (global model / personalized model), uploads."""
    rounds = res["history"]
    test = res.get("test") or {}
    pers = res.get("personalized") or {}
    return {"test_weighted_f1": test.get("weighted_f1"), "test_macro_f1": test.get("macro_f1"),
            "heldout_global_weighted_f1": (pers.get("global") or {}).get("weighted_f1"),
            "heldout_global_macro_f1": (pers.get("global") or {}).get("macro_f1"),
            "personal_method": pers.get("method"),
            "personal_weighted_f1": (pers.get("personal") or {}).get("weighted_f1"),
            "personal_macro_f1": (pers.get("personal") or {}).get("macro_f1"),
            "best_round": (res["best"] or {}).get("round"), "wall_s": res.get("wall_time_s"),
            "rounds_trained": rounds[-1]["round"], "patience": res["config"].get("patience"),
            "upload_mb_per_round": sum(r["bytes_up"] for r in rounds) / len(rounds) / 1e6,
            "upload_kb_per_client_round": sum(r["bytes_up"] / max(len(r["trained"]), 1) for r in rounds)
            / len(rounds) / 1e3}


def plot_upload_curve(cells: list[dict], path: Path) -> Path | None:
    """FedMFS's accuracy-versus-upload curve: personalized weighted F1 of fedmfs-g1..g4 against the upload per
    client and round, FedAvg's figures (global and fine-tuned, same held-out windows) as reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(strategy: str, key: str) -> tuple[float, float, float] | None:
        cs = [c for c in cells if c["strategy"] == strategy and c["scenario"] == "clean" and c.get(key) is not None]
        if not cs:
            return None
        f1 = [c[key] for c in cs]
        return (statistics.mean(c["upload_kb_per_client_round"] for c in cs), statistics.mean(f1),
                statistics.stdev(f1) if len(f1) > 1 else 0.0)

    curve = [(g, points(f"fedmfs-g{g}", "personal_weighted_f1")) for g in (1, 2, 3, 4)]
    curve = [(g, p) for g, p in curve if p is not None]
    if not curve:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar([p[0] for _, p in curve], [p[1] for _, p in curve], yerr=[p[2] for _, p in curve], fmt="o-",
                capsize=3, label="FedMFS, local head (personal model)")
    for g, p in curve:
        ax.annotate(f"γ={g}", (p[0], p[1]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    for key, label, marker in (("heldout_global_weighted_f1", "FedAvg global model", "s"),
                               ("personal_weighted_f1", "FedAvg + 1 epoch fine-tuning", "^")):
        p = points("fedavg", key)
        if p is not None:
            ax.errorbar([p[0]], [p[1]], yerr=[p[2]], fmt=marker, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("upload per client and round (kB, log scale)")
    ax.set_ylabel("weighted F1, clients' held-out windows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cell_name(strategy: str, scenario: str, preset: str, rounds: int, epochs: int, seed: int,
              patience: int | None = None, personal_eval: float = 0.0) -> str:
    """A cell's run directory name; `-pN` only for cells asked for with their own patience, `-peNN` for cells
    with a personalized evaluation (NN = held-out percent)."""
    return (f"{strategy}-{scenario}-{preset}-r{rounds}e{epochs}-s{seed}" + ("" if patience is None else f"-p{patience}")
            + (f"-pe{round(personal_eval * 100)}" if personal_eval else ""))


def shorter_run(out: Path, strategy: str, scenario: str, preset: str, rounds: int, epochs: int,
                seed: int, patience: int | None = None) -> Path | None:
    """The finished run a cell continues: the same cell at fewer rounds that kept its checkpoint, the one that
    trained most rounds. For a cell with its own `patience`, also one at up to `rounds` rounds that early
    stopping ended before `rounds` under any patience, unless the new patience would stop it again at once, or
    one that trained all `rounds` (then no round is trained again)."""
    prefix = re.escape(f"{strategy}-{scenario}-{preset}-r")
    pattern = re.compile(rf"{prefix}(\d+){re.escape(f'e{epochs}-s{seed}')}(?:-p(\d+))?")
    own = cell_name(strategy, scenario, preset, rounds, epochs, seed, patience)
    found = []
    for d in out.iterdir() if out.exists() else []:
        m = pattern.fullmatch(d.name)
        state_path = d / "checkpoint" / "state.json"
        if not m or d.name == own or not state_path.exists():
            continue
        if not finished(d / "results.json"):
            continue
        named, state = int(m.group(1)), json.loads(state_path.read_text())
        done, stopped_after = state["round"], state.get("early_stopping", {}).get("bad_rounds", 0)
        if patience is None:
            ok = m.group(2) is None and named < rounds
        else:
            # a run that trained all `rounds` is the answer already: resumed, it only re-tests its best round
            ok = named <= rounds and (done == rounds or (done < rounds and not 0 < patience <= stopped_after))
        if ok:
            found.append((done, named, d))
    return max(found)[2] if found else None


def interrupted_round(run_dir: Path) -> int | None:
    """The last checkpointed round of an unfinished attempt at a cell (a timeout or Ctrl-C stopped it), which the
    next invocation resumes instead of losing it; None when there is none (or the run finished)."""
    state, res = run_dir / "checkpoint" / "state.json", run_dir / "results.json"
    if not state.exists() or finished(res):
        return None
    return int(json.loads(state.read_text())["round"])


def extend_copy(src: Path, dst: Path) -> Path:
    """A copy of finished run `src` at `dst` to resume; results.json names where it came from."""
    if dst.exists():  # an earlier attempt that did not finish: start it again from the shorter run
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("plots", "best_model.safetensors"))
    res = read_results(dst / "results.json")
    res.update(run=dst.name, extended_from=src.name, status="running", test=None)
    write_results(dst / "results.json", res)
    return dst


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default="")
    p.add_argument("--strategies", default="fedavg,fedprox,fedmobile,fedmedian,fedtrimmedavg,krum")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--preset", default="compact")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workdir", type=Path, default=Path("outputs/bench-strategies"))
    p.add_argument("--timeout", type=float, default=0,
                   help="seconds one cell may run (default: 600 per round); a cell stopped by it keeps its "
                        "checkpoint and the next invocation resumes it")
    p.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray resources of one ClientApp")
    p.add_argument("--gpus-per-client", type=float, default=0.0, help="e.g. 0.25: four ClientApps share a GPU")
    p.add_argument("--patience", type=int, default=None,
                   help="early-stopping patience of these cells (0: never stop; default: the run config's). "
                        "Names the cells ...-pN; with --extend they continue runs an earlier patience stopped")
    p.add_argument("--personal-eval-fraction", type=float, default=0.0,
                   help="> 0: every client holds out this share of its windows and the run ends with the "
                        "personalized evaluation there (the cells are named ...-peNN)")
    p.add_argument("--extend", action="store_true",
                   help="continue the longest finished shorter run of a cell from its checkpoint")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tabulate the finished cells among those asked for (rows without any: skipped)")
    a = p.parse_args()
    strategies = [s for s in a.strategies.split(",") if s]
    scenarios = [s for s in a.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    seeds = [int(s) for s in a.seeds.split(",") if s]
    out = a.workdir.resolve()
    cells: list[dict] = []
    trained_s: list[float] = []
    todo = sum(not finished(out / cell_name(st, sc, a.preset, a.rounds, a.epochs, seed, a.patience,
                                            a.personal_eval_fraction) / "results.json")
               for sc in scenarios for st in strategies for seed in seeds)
    for scenario in scenarios:
        for strategy in strategies:
            for seed in seeds:
                name = cell_name(strategy, scenario, a.preset, a.rounds, a.epochs, seed, a.patience,
                                 a.personal_eval_fraction)
                res_path = out / name / "results.json"
                done_already = finished(res_path)
                if not done_already and a.report_only:
                    continue
                if not done_already:
                    rc = {"model-preset": a.preset, "num-server-rounds": a.rounds, "local-epochs": a.epochs,
                          "lr": a.lr, "seed": seed, "strategy": strategy, "output-dir": str(out), "run-name": name,
                          **STRATEGY_KEYS.get(strategy, {}), **SCENARIOS[scenario]}
                    if a.patience is not None:
                        rc["patience"] = a.patience
                    if a.personal_eval_fraction:
                        rc["personal-eval-fraction"] = a.personal_eval_fraction
                    if a.data_path:
                        rc["data-path"] = str(Path(a.data_path).resolve())
                    done = interrupted_round(out / name)
                    shorter = shorter_run(out, strategy, scenario, a.preset, a.rounds, a.epochs, seed,
                                          a.patience) if a.extend and done is None else None
                    if done is not None:  # an earlier attempt at this very cell (timeout, Ctrl-C): continue it
                        rc["resume"] = str(out / name)
                        print(f"    resuming {name} after round {done}", flush=True)
                    elif shorter is not None:
                        rc["resume"] = str(extend_copy(shorter, out / name))
                        print(f"    continuing {shorter.name} from its checkpoint", flush=True)
                    t0 = time.time()
                    eta = ""
                    if trained_s:
                        left = todo - len(trained_s)
                        eta = f" ({len(trained_s) + 1}/{todo}; ETA {statistics.mean(trained_s) * left / 60:.0f} min)"
                    print(f"[{time.strftime('%H:%M:%S')}] {name} ...{eta}", flush=True)
                    run = run_simulation(rc, nodes=21, workdir=out / f"sim-{name}",
                                         timeout=a.timeout or 600 * a.rounds, cpus_per_client=a.cpus_per_client,
                                         gpus_per_client=a.gpus_per_client)
                    print(f"    {run.status} in {time.time() - t0:.0f} s", flush=True)
                    trained_s.append(time.time() - t0)
                    if not run.ok:
                        print(run.log()[-3000:])
                        return 1
                cells.append({"strategy": strategy, "scenario": scenario, "seed": seed,
                              **cell_record(read_results(res_path))})

    personal = any(c["personal_method"] for c in cells)
    header = ("| scenario | strategy | test weighted F1 | test macro F1 | weighted F1 vs fedavg (Welch t) "
              + ("| held-out: global wF1 | held-out: personalized wF1 / mF1 (how) " if personal else "")
              + "| upload MB / round | kB / client / round | seeds |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for scenario in scenarios:
        for strategy in strategies:
            cs = [c for c in cells if c["strategy"] == strategy and c["scenario"] == scenario]
            if not cs:
                continue

            def col(key: str, rows: list[dict] = cs) -> list[float]:
                return [c[key] for c in rows if c.get(key) is not None]

            base = col("test_weighted_f1", [c for c in cells if c["strategy"] == "fedavg" and c["scenario"] == scenario])
            wf1 = col("test_weighted_f1")
            row = (f"| {scenario} | {strategy} | {_mean_std(wf1)} | {_mean_std(col('test_macro_f1'))} | "
                   f"{'—' if strategy == 'fedavg' or not wf1 else _vs_fedavg(wf1, base)} | ")
            if personal:
                how = {"finetune": "fine-tuned 1 epoch", "own": "own model"}.get(cs[0]["personal_method"], "—")
                row += (f"{_mean_std(col('heldout_global_weighted_f1'))} | "
                        f"{_mean_std(col('personal_weighted_f1'))} / {_mean_std(col('personal_macro_f1'))} ({how}) | ")
            row += (f"{statistics.mean(c['upload_mb_per_round'] for c in cs):.3f} | "
                    f"{statistics.mean(c['upload_kb_per_client_round'] for c in cs):.0f} | {len(cs)} |")
            lines.append(row)
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{a.preset} preset, {a.rounds} rounds x {a.epochs} local epoch(s), lr {a.lr}, "
                                  f"9 of 21 clients per round\n\n{table}\n")
    if any(c["test_weighted_f1"] is not None for c in cells):
        plot_cells([c for c in cells if c["test_weighted_f1"] is not None], scenarios, strategies, out / "table.png")
    if plot_upload_curve(cells, out / "upload_curve.png"):
        print(f"FedMFS accuracy-versus-upload curve: {out / 'upload_curve.png'}")
    print(f"\nstrategies x scenarios ({a.preset}, {a.rounds} rounds x {a.epochs} epochs, seeds {seeds})\n")
    print(table)
    print(json.dumps({"preset": a.preset, "rounds": a.rounds, "local_epochs": a.epochs, "lr": a.lr, "cells": cells}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
