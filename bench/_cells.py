"""Benchmark cells: one federated simulation or one centralized run each, stored under a name, read back when
finished and resumed from their checkpoint when an earlier invocation was interrupted. Shared by the benches
that tabulate whole runs (headline.py, throughput.py). A cell's results.json is read through
`fedtime.results.read_results`: cells stored by earlier versions read back in today's shape."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _procmem import PeakMemory

from fedtime.results import read_results, write_results
from server_app.simulation import run_simulation

ROOT = Path(__file__).resolve().parents[1]


def mean_std(xs: list) -> str:
    """"0.904 ± 0.028" over the values that are not None ("0.904" for one, "—" for none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def finished(run_dir: Path, *, need_test: bool = True) -> dict | None:
    """The results of a run that ended (`fedtime.results` schema; with `need_test`, holding test figures — a
    FedMFS run with local heads has none), else None: not there, unreadable, or still running."""
    path = run_dir / "results.json"
    if not path.exists():
        return None
    try:
        res = read_results(path)
    except (ValueError, json.JSONDecodeError):
        return None
    if res.get("status") not in ("completed", "early_stopped") or (need_test and not res.get("test")):
        return None
    return res


def federated_cell(out: Path, name: str, run_config: dict, *, timeout: float, report_only: bool = False,
                   cpus_per_client: float = 1.0, gpus_per_client: float = 0.0) -> dict | None:
    """A `flwr run` Ray simulation (21 SuperNodes) with `run_config`, stored as `out/name`; returns its
    results.json with `peak_rss_mib` of all its processes (None when `report_only` and not finished)."""
    run_dir = out / name
    res = finished(run_dir)
    if res is not None or report_only:
        return res
    rc = {**run_config, "output-dir": str(out), "run-name": name}
    state = run_dir / "checkpoint" / "state.json"
    if state.exists():  # an earlier attempt stopped (timeout, Ctrl-C): continue it from its last round
        rc["resume"] = str(run_dir)
        print(f"    resuming {name} after round {json.loads(state.read_text())['round']}", flush=True)
    marker = f"bench-{uuid.uuid4().hex[:8]}"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: flwr run (21 SuperNodes) {run_config}", flush=True)
    with PeakMemory(marker) as mem:
        run = run_simulation(rc, nodes=21, workdir=out / f"sim-{name}", marker=marker, timeout=timeout,
                             cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client)
    print(f"    {run.status} in {run.wall_s:.0f} s, peak memory {mem.peak_rss_mib:.0f} MiB", flush=True)
    if not run.ok:
        raise RuntimeError(f"cell {name} failed ({run.status}); log: {run.log_path}\n{run.log()[-3000:]}")
    res = finished(run_dir)
    if res is None:
        raise RuntimeError(f"cell {name} finished without test metrics: {run_dir / 'results.json'}")
    res["peak_rss_mib"] = round(mem.peak_rss_mib)
    res["sim_wall_s"] = round(run.wall_s, 1)
    write_results(run_dir / "results.json", res)
    return res


def centralized_cell(out: Path, name: str, run_config: dict, *, args: tuple[str, ...] = (),
                     report_only: bool = False) -> dict | None:
    """`python -m model.train` with `run_config` (as --run-config) and extra CLI `args`, stored as `out/name`."""
    res = finished(out / name)
    if res is not None or report_only:
        return res
    rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    cmd = [sys.executable, "-m", "model.train", "--output-dir", str(out), "--run-name", name,
           "--run-config", rc, *args]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"cell {name} failed (exit {proc.returncode}); log: {out / f'{name}.log'}")
    res = finished(out / name)
    res["wall_s"] = round(time.time() - t0, 1)
    write_results(out / name / "results.json", res)
    print(f"    done in {res['wall_s']:.0f} s", flush=True)
    return res

