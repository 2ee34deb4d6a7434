"""How large is a client's update? The measurement behind `dp-clip` (docs/privacy.md, Choosing dp-clip).

User-level DP clips each client's update (what it sends minus the round's global state) to L2 norm `dp-clip`;
too small a clip throws away most of every update (bias), too large a one buys noise (std z x clip) for nothing.
The usual choice is near the median update norm (Andrew et al. 2021 adapt the clip to that quantile). This runs
real local training (`client_app.train_subject`, the recipe of pyproject.toml plus `--run-config`) of several
training subjects from one or more global states and prints each update's norm, split into trainable parameters
and BatchNorm running statistics (which DP clips too), with quantiles per start.

    python bench/dp_clip.py                                                     # from the seeded initial model
    python bench/dp_clip.py --start init --start outputs/bench-headline/default-federated-split42
                                                                                # + from a trained global model

A start is `init` (the model at `seed`, as the ServerApp builds it) or a run directory whose best_model.safetensors
is the global state (a trained federation: late rounds' updates are smaller). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client_app import client_app  # noqa: E402
from fedtime import task  # noqa: E402
from fedtime.config import ConfigError, RunConfig, parse_run_config  # noqa: E402
from fedtime.privacy import l2_norm, update  # noqa: E402
from model import trainable_state  # noqa: E402
from server_app.run_store import arrays_to_numpy, load_arrays  # noqa: E402

BN_STATS = ("running_mean", "running_var")


def initial_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The model at `seed`, as the ServerApp builds it. Call before any training: `train_subject` trains the
    process-wide model instance in place."""
    torch.manual_seed(cfg.seed)
    return {k: v.detach().clone() for k, v in trainable_state(task.model_for(cfg)).items()}


def start_state(start: str, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if start == "init":
        return init
    path = Path(start) / "best_model.safetensors"
    if not path.is_file():
        raise SystemExit(f"--start {start}: no best_model.safetensors there (a finished federated run directory?)")
    arrays = arrays_to_numpy(load_arrays(path))
    if set(arrays) != set(init):
        raise SystemExit(f"--start {start}: its arrays do not match this run config's model "
                         f"(missing {sorted(set(init) - set(arrays))[:3]}, extra {sorted(set(arrays) - set(init))[:3]})")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def norms(sent: dict, start: dict) -> dict[str, float]:
    upd = update({k: v.numpy() for k, v in sent.items()}, {k: v.numpy() for k, v in start.items()})
    bn = {k: v for k, v in upd.items() if k.endswith(BN_STATS)}
    params = {k: v for k, v in upd.items() if k not in bn}
    return {"total": l2_norm(upd), "parameters": l2_norm(params), "bn_stats": l2_norm(bn)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", action="append", default=None, help="init | a run directory (repeatable)")
    ap.add_argument("--subjects", type=int, default=6, help="how many of the split's training subjects")
    ap.add_argument("--run-config", action="append", default=[], help="run-config overrides, 'key=value ...'")
    args = ap.parse_args(argv)
    try:
        cfg = RunConfig.from_run_config(parse_run_config(args.run_config))
    except ConfigError as e:
        raise SystemExit(f"--run-config: {e}") from None
    task.set_threads(cfg)
    _, split, _ = task.open_data(cfg)
    subjects = list(split.train)[: args.subjects]
    rows = []
    init = initial_state(cfg)
    for start in args.start or ["init"]:
        state = start_state(start, init)
        for subject in subjects:
            t0 = time.time()
            sent, metrics = client_app.train_subject(cfg, subject, state, {"server-round": 1}, log=lambda s: None)
            rows.append({"start": start, "subject": subject, **norms(sent, state),
                         "windows": metrics["num-examples"], "seconds": round(time.time() - t0, 1)})
            r = rows[-1]
            print(f"  {start}  subject {subject:02d}: update norm {r['total']:.3f} (parameters {r['parameters']:.3f}, "
                  f"BatchNorm statistics {r['bn_stats']:.3f}), {r['windows']} windows, {r['seconds']} s", flush=True)

    print(f"\nupdate L2 norms, {cfg.local_epochs} local epochs, {cfg.model_preset} preset, split {cfg.split_seed}\n")
    print("| start | clients | min | median | max | parameters, median | BatchNorm statistics, median |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for start in args.start or ["init"]:
        tot = np.array([r["total"] for r in rows if r["start"] == start])
        par = np.median([r["parameters"] for r in rows if r["start"] == start])
        bn = np.median([r["bn_stats"] for r in rows if r["start"] == start])
        print(f"| {start} | {len(tot)} | {tot.min():.3f} | {np.median(tot):.3f} | {tot.max():.3f} | {par:.3f} | {bn:.3f} |")
        summary[start] = {"median": float(np.median(tot)), "min": float(tot.min()), "max": float(tot.max())}
    print(json.dumps({"preset": cfg.model_preset, "local_epochs": cfg.local_epochs, "split_seed": cfg.split_seed,
                      "summary": summary, "clients": rows}))


if __name__ == "__main__":
    main()
