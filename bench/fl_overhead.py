"""Overhead of Flower's simulation engine: a `flwr run` simulation against a bare torch loop in one process
doing the identical local training steps (same sampled clients, same seeds, same aggregation, same
server-side validation), both on this machine.

    python bench/fl_overhead.py [--data-path MEx.zip] [--rounds 3] [--clients 9] [--epochs 5]

Target: ratio (flwr wall / bare wall) <= 1.15. The bare loop runs the clients one after another with
torch using all cores; the simulation runs two single-threaded clients at once (client-resources-num-cpus=1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from client_app.client_app import train_subject  # noqa: E402
from server_app import task  # noqa: E402
from server_app.config import RunConfig  # noqa: E402
from server_app.run_store import arrays_to_numpy  # noqa: E402
from server_app.server_app import Evaluator  # noqa: E402
from server_app.simulation import exit_on_sigterm, run_simulation  # noqa: E402
from server_app.strategy import ClientSampler, paper_shuffle_order, weighted_average  # noqa: E402
from model import trainable_state  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402


def bare_loop(cfg: RunConfig, threads: int) -> tuple[float, list[list[int]]]:
    """What the federation computes, with no Flower at all."""
    t0 = time.time()
    torch.set_num_threads(threads)
    cfg = cfg.replace(num_threads=threads)
    _, split, _ = task.open_data(cfg)
    torch.manual_seed(cfg.seed)
    model = task.model_for(cfg)
    state = {k: v.clone() for k, v in trainable_state(model).items()}
    sampler = ClientSampler(cfg.split_seed, [s for s in paper_shuffle_order(cfg.split_seed) if s in split.train])
    validate = Evaluator(cfg, split.val)
    sampled = []
    for rnd in range(1, cfg.num_server_rounds + 1):
        subjects = sampler.sample(split.train, cfg.clients_per_round)
        sampled.append(subjects)
        states, weights = [], []
        for s in sorted(subjects):
            new, m = train_subject(cfg, s, state, rnd, log=lambda line: None)
            states.append({k: v.numpy() for k, v in new.items()})
            weights.append(m["num-examples"])
        agg = weighted_average(states, weights)
        state = {k: torch.from_numpy(v) for k, v in agg.items()}
        val = validate(ArrayRecord(state))
        print(f"  bare round {rnd}: val wF1 {val['weighted_f1']:.4f} ({time.time() - t0:.1f} s)", flush=True)
    return time.time() - t0, sampled


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=os.environ.get("FEDTIME_DATA_PATH", ""))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=9)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--preset", default="compact")
    p.add_argument("--workdir", type=Path, default=Path("outputs/bench-fl-overhead"))
    a = p.parse_args()
    rc = {"model-preset": a.preset, "num-server-rounds": a.rounds, "clients-per-round": a.clients,
          "local-epochs": a.epochs, "patience": 0, "data-path": str(Path(a.data_path).resolve()),
          "output-dir": str(a.workdir.resolve()), "run-name": f"flwr-{uuid.uuid4().hex[:6]}"}
    cfg = RunConfig.from_run_config(rc)
    task.open_data(cfg)  # build the window cache outside both timings

    run = run_simulation(rc, nodes=21, workdir=a.workdir / "sim", timeout=3600)
    if not run.ok:
        print(run.log()[-3000:])
        return 1
    fl = json.loads((a.workdir / rc["run-name"] / "results.json").read_text())
    fl_clients = [r["clients"] for r in fl["rounds"]]
    bare_s, bare_clients = bare_loop(cfg, threads=os.cpu_count() or 1)
    assert [sorted(c) for c in bare_clients] == [sorted(c) for c in fl_clients], "the two runs must train alike"
    ratio = run.wall_s / bare_s
    print(f"\nFL overhead: {a.preset} preset, {a.rounds} rounds x {a.clients} clients x {a.epochs} epochs")
    print(f"{'run':40s} {'wall s':>8s}")
    print(f"{'flwr run (Ray simulation, 21 nodes)':40s} {run.wall_s:8.1f}")
    print(f"{'bare torch loop, one process':40s} {bare_s:8.1f}")
    print(f"{'ratio (target <= 1.15)':40s} {ratio:8.2f}")
    print(json.dumps({"flwr_wall_s": round(run.wall_s, 1), "bare_wall_s": round(bare_s, 1), "ratio": round(ratio, 3),
                      "rounds": a.rounds, "clients_per_round": a.clients, "local_epochs": a.epochs,
                      "preset": a.preset, "flwr_test_weighted_f1": fl["test"]["weighted_f1"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
