"""Training throughput: the paper's forward passes of 8 windows (`micro-batch=8`, accumulated 6 times) against
the default (the whole 48-window optimizer batch in one pass), side by side in one run.

    python bench/throughput.py                   # one client's windows/s + a 3-round federated run of each
    python bench/throughput.py --f1              # + full-protocol test F1 of each over split seeds 42, 1, 2

1. One client's local training (the ClientApp's `train_subject`, one thread, one local epoch) on a few training
   subjects, the two settings alternated, median windows/s of each.
2. The wall time of a 3-round federated run of each (real `flwr run` Ray simulation, 21 SuperNodes, 2 clients
   at a time on 2 cores).
3. With `--f1`: the full protocol (10 rounds x 5 epochs) of each over split seeds 42, 1, 2 (cells stored in
   `--f1-workdir`, by default bench/headline.py's, whose default cells are these; read back when finished;
   `--f1-run-config` adds keys to both), and the difference of their mean
   test weighted F1 (the same optimizer steps: only BatchNorm statistics, the MoE balance term and the
   class-weight normalisation see 48 windows instead of 8).

Prints a table, then one JSON object as its last line: speedup_train, speedup_federated, f1_delta (null
without --f1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the project: bench/model.py must not shadow `model`

from _cells import federated_cell  # noqa: E402

from fedtime.config import parse_run_config  # noqa: E402
from server_app.simulation import exit_on_sigterm  # noqa: E402

VARIANTS = {"micro-batch 8 (paper)": {"micro-batch": 8}, "micro-batch 0 (default)": {}}


def client_throughput(variants: dict[str, dict], subjects: list[int], repeats: int, extra: dict) -> dict[str, float]:
    """Median training windows/s of one client (one local epoch, one thread) per variant, alternated."""
    import torch

    from client_app.client_app import train_subject
    from model import trainable_state
    from fedtime import task
    from fedtime.config import RunConfig

    torch.set_num_threads(1)
    cfgs = {name: RunConfig.from_run_config({**extra, **keys, "local-epochs": 1}) for name, keys in variants.items()}
    model = task.model_for(next(iter(cfgs.values())))
    state = trainable_state(model)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats + 1):  # the first pass warms up (allocator, data cache) and is not counted
        for subject in subjects:
            for name, cfg in cfgs.items():
                t0 = time.perf_counter()
                _, metrics = train_subject(cfg, subject, state, {"server-round": 1}, log=lambda s: None, model=model)
                if rep:
                    rates[name].append(metrics["num-examples"] / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", default="2,3,6", help="training subjects whose local epoch is timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the timed federated runs")
    p.add_argument("--f1", action="store_true", help="also the full protocol's test F1 over --splits")
    p.add_argument("--splits", default="42,1,2")
    p.add_argument("--f1-run-config", default="", help="keys both F1 variants add (TOML file or inline)")
    p.add_argument("--workdir", type=Path, default=Path("outputs/bench-throughput"))
    p.add_argument("--f1-workdir", type=Path, default=Path("outputs/bench-headline"),
                   help="where the full-protocol cells live (bench/headline.py's, so its default cells are reused)")
    p.add_argument("--data-path", default="")
    a = p.parse_args()
    extra = {"data-path": str(Path(a.data_path).resolve())} if a.data_path else {}
    out = a.workdir.resolve()
    out.mkdir(parents=True, exist_ok=True)

    train = client_throughput(VARIANTS, [int(s) for s in a.subjects.split(",")], a.repeats, extra)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fed = {}
    for name, keys in VARIANTS.items():
        tag = "mb8" if keys else "default"
        res = federated_cell(out, f"timing-{tag}-r{a.rounds}-{stamp}", {**extra, **keys, "num-server-rounds": a.rounds,
                                                                        "patience": 0}, timeout=3600)
        fed[name] = {"wall_s": res["sim_wall_s"], "peak_rss_mib": res["peak_rss_mib"]}
    f1: dict[str, list[float]] = {}
    if a.f1:
        # the default's cells are bench/headline.py's own (same names, same folder): one run serves both benches
        shared = {**extra, **parse_run_config([a.f1_run_config] if a.f1_run_config else [])}
        for name, keys in VARIANTS.items():
            tag = "microbatch8" if keys else "default"
            f1[name] = [federated_cell(a.f1_workdir.resolve(), f"{tag}-federated-split{s}",
                                       {**shared, **keys, "split-seed": int(s)}, timeout=7200)["test"]["weighted_f1"]
                        for s in a.splits.split(",")]

    before, after = VARIANTS
    speedup_train = train[after] / train[before]
    speedup_fed = fed[before]["wall_s"] / fed[after]["wall_s"]
    print(f"\n{'setting':<26} {'client windows/s':>17} {f'{a.rounds}-round federated run':>24}"
          f"{'   test wF1 per split (mean)' if f1 else ''}")
    for name in VARIANTS:
        row = f"{name:<26} {train[name]:>17.0f} {fed[name]['wall_s']:>22.0f} s"
        if f1:
            row += "   " + " ".join(f"{x:.3f}" for x in f1[name]) + f" ({statistics.mean(f1[name]):.3f})"
        print(row)
    f1_delta = statistics.mean(f1[after]) - statistics.mean(f1[before]) if f1 else None
    print(f"{'ratio':<26} {speedup_train:>16.2f}x {speedup_fed:>21.2f}x"
          + (f"   {f1_delta:+.3f}" if f1_delta is not None else ""))
    print(json.dumps({"speedup_train": round(speedup_train, 3), "speedup_federated": round(speedup_fed, 3),
                      "f1_delta": None if f1_delta is None else round(f1_delta, 4),
                      "client_windows_per_s": train, "federated": fed, "rounds": a.rounds,
                      "f1": f1 or None, "splits": a.splits if f1 else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
