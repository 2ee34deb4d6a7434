"""The Ray simulation on an existing Ray cluster: a head started with `ray start --head` on loopback, a tiny
`flwr run` whose SuperLink finds it through RAY_ADDRESS, the clients' training lines in the cluster's own logs,
and every Ray process of that cluster stopped by PID afterwards (docs/deployment.md, multi-machine Ray)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from server_app.deploy import MARKER_ENV, free_port, marked_pids
from server_app.simulation import run_simulation

pytestmark = pytest.mark.slow


def _stop(marker: str, grace: float = 10.0) -> list[int]:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while marked_pids(marker) and time.time() < deadline:
            time.sleep(0.2)
    return marked_pids(marker)


def test_simulation_runs_on_an_existing_ray_cluster(mex_path, tmp_path, monkeypatch):
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray, "the ray CLI comes with flwr[simulation]"
    marker = f"raycluster-{uuid.uuid4().hex[:8]}"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, MARKER_ENV: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                        "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        assert marked_pids(marker), "ray start left no process running"
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        out = tmp_path / "out"
        run = run_simulation({"model-preset": "tiny", "local-epochs": 1, "num-server-rounds": 2,
                              "clients-per-round": 3, "data-path": str(mex_path), "output-dir": str(out),
                              "run-name": "on-cluster"}, nodes=3, workdir=tmp_path / "sim", timeout=900)
        assert run.ok, f"run status {run.status}; log tail:\n{run.log()[-4000:]}"
        results = json.loads((out / "on-cluster" / "results.json").read_text())
        assert [r["round"] for r in results["history"]] == [1, 2] and results["test"]["weighted_f1"] > 0
        # the ClientApps ran as workers of *this* cluster: their training lines are in its session logs
        logs = Path(temp_dir) / "session_latest" / "logs"
        text = "".join(p.read_text(errors="replace") for p in logs.rglob("worker-*.out"))
        assert "round 2" in text and "[subject" in text, sorted(p.name for p in logs.iterdir())[:20]
    finally:
        left = _stop(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert left == [], f"Ray processes still running: {left}"
