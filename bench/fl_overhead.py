"""Overhead of Flower's simulation engine: a `flwr run` simulation against a bare torch loop in one process
doing the identical local training steps (same sampled clients, same seeds, same aggregation, same
server-side validation), both on this machine.

    python bench/fl_overhead.py [--data-path MEx.zip] [--rounds 3] [--clients 9] [--epochs 5]

Target: ratio (flwr wall / bare wall) <= 1.15. The simulation runs two single-threaded clients at once
(client-resources-num-cpus=1); the bare loop gets the same parallelism in its one process: two worker
threads, each training its clients with its own model instance and one torch thread (torch releases the GIL
inside its ops; the two threads share torch's global RNG, so dropout draws interleave and the result is not
bit-identical, the work is). It also reports the sum of the clients' training times, halved: the ideal two-way wall time of
the training alone, with no start-up, messaging or aggregation at all. Both runs validate after every round
and test the best round (with both BatchNorm modes); only Flower's run writes plots and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from client_app.client_app import train_subject  # noqa: E402
from fedtime import task  # noqa: E402
from fedtime.config import RunConfig  # noqa: E402
from fedtime.results import read_results  # noqa: E402
from server_app.server_app import Evaluator  # noqa: E402
from server_app.simulation import exit_on_sigterm, run_simulation  # noqa: E402
from server_app.strategies import ClientSampler, weighted_average  # noqa: E402
from model import build_model, trainable_state  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402


def bare_loop(cfg: RunConfig, workers: int) -> tuple[float, float, list[list[int]]]:
    """What the federation computes, with no Flower at all: (wall s, sum of client train s, sampled clients)."""
    t0 = time.time()
    torch.set_num_threads(1)
    cfg = cfg.replace(num_threads=1)
    _, split, _ = task.open_data(cfg)
    torch.manual_seed(cfg.seed)
    model = task.model_for(cfg)
    state = {k: v.clone() for k, v in trainable_state(model).items()}
    models = [model] + [build_model(cfg.model_preset, fusion=cfg.fusion, modalities=cfg.modality_list,
                                        **cfg.model_options)
                        for _ in range(workers - 1)]
    sampler = ClientSampler(cfg.split_seed, split.train)
    validate = Evaluator(cfg, split.val)
    sampled, client_s, best = [], 0.0, (float("-inf"), None)
    pool = ThreadPoolExecutor(workers)
    for rnd in range(1, cfg.num_server_rounds + 1):
        subjects = sorted(sampler.sample(split.train, cfg.clients_per_round))
        sampled.append(subjects)

        def work(k: int) -> list:  # worker k trains every workers-th client, like two actors taking turns
            out = []
            for s in subjects[k::workers]:
                t = time.time()
                new, m = train_subject(cfg, s, state, {"server-round": rnd}, log=lambda line: None, model=models[k])
                out.append((s, {k2: v.numpy() for k2, v in new.items()}, m["num-examples"], time.time() - t))
            return out

        results = sorted((r for part in pool.map(work, range(workers)) for r in part), key=lambda r: r[0])
        client_s += sum(r[3] for r in results)
        agg = weighted_average([r[1] for r in results], [r[2] for r in results])
        state = {k: torch.from_numpy(v) for k, v in agg.items()}
        val = validate(ArrayRecord(state))
        if val["weighted_f1"] > best[0]:
            best = (val["weighted_f1"], state)
        print(f"  bare round {rnd}: val wF1 {val['weighted_f1']:.4f} ({time.time() - t0:.1f} s)", flush=True)
    pool.shutdown()
    test = Evaluator(cfg, split.test)  # as the ServerApp: the best round, tested both BatchNorm ways
    for mode in ("subject", "global"):
        m = test(ArrayRecord(best[1]), bn_stats=mode)
        print(f"  bare test ({mode} BatchNorm statistics): wF1 {m['weighted_f1']:.4f}", flush=True)
    return time.time() - t0, client_s, sampled


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
    fl = read_results(a.workdir / rc["run-name"] / "results.json")
    fl_clients = [r["clients"] for r in fl["history"]]
    bare_s, client_s, bare_clients = bare_loop(cfg, workers=2)
    assert [sorted(c) for c in bare_clients] == [sorted(c) for c in fl_clients], "the two runs must train alike"
    ratio = run.wall_s / bare_s
    ideal_s = client_s / 2
    print(f"\nFL overhead: {a.preset} preset, {a.rounds} rounds x {a.clients} clients x {a.epochs} epochs")
    print(f"{'run':40s} {'wall s':>8s}")
    print(f"{'flwr run (Ray simulation, 21 nodes)':40s} {run.wall_s:8.1f}")
    print(f"{'bare torch loop, one process, 2 workers':40s} {bare_s:8.1f}")
    print(f"{'ratio (target <= 1.15)':40s} {ratio:8.2f}")
    print(f"{'ideal: client training time / 2':40s} {ideal_s:8.1f}")
    print(f"{'flwr wall / ideal':40s} {run.wall_s / ideal_s:8.2f}")
    print(json.dumps({"flwr_wall_s": round(run.wall_s, 1), "bare_wall_s": round(bare_s, 1), "ratio": round(ratio, 3),
                      "ideal_training_s": round(ideal_s, 1), "ratio_to_ideal": round(run.wall_s / ideal_s, 3),
                      "rounds": a.rounds, "clients_per_round": a.clients, "local_epochs": a.epochs,
                      "preset": a.preset, "flwr_test_weighted_f1": fl["test"]["weighted_f1"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
