"""End to end under the real Ray simulation engine: `flwr run` of the real ServerApp and ClientApp on the real
MEx data (tiny preset), final status read from the SuperLink, every process stopped by PID afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import trainable_state
from model.state import model_from_checkpoint, read_checkpoint_header
from fedtime.config import ConfigError
from server_app.deploy import DeployError, marked_pids
from server_app.simulation import run_simulation

TINY = {"model-preset": "tiny", "local-epochs": 2, "batch-size": 16, "grad-accum": 1, "lr": 3e-3}

pytestmark = pytest.mark.slow  # real Ray simulations on the real data


def _config(mex_path: Path, out: Path, **kw) -> dict:
    return {**TINY, "data-path": str(mex_path), "output-dir": str(out), **kw}


def test_simulation_trains_3_rounds_and_writes_results(mex_path, tmp_path):
    run = run_simulation(_config(mex_path, tmp_path / "out", **{"num-server-rounds": 3, "clients-per-round": 3,
                                                                 "run-name": "e2e"}),
                         nodes=3, workdir=tmp_path / "sim", timeout=900)
    assert run.ok, f"run status {run.status}; log tail:\n{run.log()[-4000:]}"
    assert run.leftover_pids == []
    assert not marked_pids(run.log_path.parent.name)  # nothing carrying our marker is left

    run_dir = tmp_path / "out" / "e2e"
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["schema_version"], results["mode"], results["status"]) == (2, "federated", "completed")
    assert [r["round"] for r in results["history"]] == [1, 2, 3]
    for r in results["history"]:
        assert sorted(r["trained"]) == [2, 3, 6]  # partition ids 0..2 = the first three training subjects
        # what travelled: the serialized trainable state, once per client each way
        assert r["bytes_down"] == r["bytes_up"] == 3 * results["model"]["trainable_bytes"] and r["failures"] == []
    best = results["best"]["round"]
    assert best == max(results["history"], key=lambda r: r["val_weighted_f1"])["round"]
    assert results["best"]["val_weighted_f1"] == results["history"][best - 1]["val_weighted_f1"]
    assert results["final_model"] == {"model": "best_round", "round": best}
    assert (results["model"]["preset"], results["model"]["modalities"]) == ("tiny", ["act", "acw", "dc", "pm"])
    assert set(results["test"]["by_bn_stats"]) == {"global", "subject"}
    assert results["test"]["subjects"] == [1, 4, 8, 9, 21, 24]
    # above chance (7 near-balanced classes) by more than 4 binomial standard deviations on the test windows
    n, chance = results["test"]["num_examples"], 1 / 7
    assert results["test"]["accuracy"] > chance + 4 * (chance * (1 - chance) / n) ** 0.5, results["test"]
    assert max(r["val_accuracy"] for r in results["history"]) > 0.25
    for name in ("learning_curves.png", "confusion_matrix.png", "pr_curves.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
    # the best model rebuilds from its own header, with the best round's weights
    best_model = model_from_checkpoint(run_dir / "best_model.safetensors")
    stored = load_file(str(run_dir / "best_model.safetensors"))
    assert sorted(stored) == sorted(trainable_state(best_model))
    raw = sum(v.nbytes for v in stored.values())  # the arrays alone; serialization adds names and headers
    assert raw <= results["model"]["trainable_bytes"] <= raw + 300 * len(stored)
    for k, v in trainable_state(best_model).items():
        torch.testing.assert_close(v, stored[k])
    assert read_checkpoint_header(run_dir / "best_model.safetensors")["meta"]["best_round"] == best
    assert "[round 3/3]" in run.log()
    log = run.log()
    assert "| ETA " in log.split("[round 1/3]")[1].splitlines()[0]  # the round line says how long is left
    # Ray's de-duplication is off: every client's line of every round, none merged into "[repeated Nx ...]"
    assert "across cluster" not in log
    assert all(f"[subject {s:02d} round {r} " in log for s in (2, 3, 6) for r in (1, 2, 3))
    # the TensorBoard events (fedtime.tracking) hold results.json's rounds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for key, tag in (("val_weighted_f1", "val/weighted_f1"), ("train_loss", "train/loss"),
                     ("bytes_up", "comm/bytes_up")):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (r["round"], pytest.approx(r[key], rel=1e-6)) for r in results["history"]], tag
    assert [(e.step, e.value) for e in events.Scalars("test/weighted_f1")] == [
        (3, pytest.approx(results["test"]["weighted_f1"], rel=1e-6))]
    assert len(events.Images("test/confusion_matrix")) == 1


def test_resume_continues_with_the_same_client_sequence(mex_path, tmp_path):
    # six short rounds (~3-5 s each): an interruption tears the run down at once, so it stops by round 4
    common = {"num-server-rounds": 6, "clients-per-round": 2, "local-epochs": 1, "patience": 0}
    full = run_simulation(_config(mex_path, tmp_path / "out", **common, **{"run-name": "full"}), nodes=4,
                          workdir=tmp_path / "sim-full", timeout=900)
    assert full.ok, full.log()[-3000:]

    state = tmp_path / "out" / "killed" / "checkpoint" / "state.json"

    def kill_after_round_2(run_id: int) -> bool:
        return state.exists() and json.loads(state.read_text())["round"] >= 2

    killed = run_simulation(_config(mex_path, tmp_path / "out", **common, **{"run-name": "killed"}), nodes=4,
                            workdir=tmp_path / "sim-killed", timeout=900, on_progress=kill_after_round_2)
    assert killed.status.startswith("interrupted"), killed.status
    assert killed.leftover_pids == []
    done = json.loads(state.read_text())["round"]
    assert 2 <= done <= 4, f"the interruption after round 2 landed only after round {done}"

    resumed = run_simulation(_config(mex_path, tmp_path / "out", **common,
                                     **{"resume": str(tmp_path / "out" / "killed")}), nodes=4,
                             workdir=tmp_path / "sim-resumed", timeout=900)
    assert resumed.ok, resumed.log()[-3000:]
    a = json.loads((tmp_path / "out" / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "out" / "killed" / "results.json").read_text())
    assert [r["round"] for r in b["history"]] == [1, 2, 3, 4, 5, 6]
    assert [r["clients"] for r in b["history"]] == [r["clients"] for r in a["history"]]
    assert b["status"] == "completed" and b["test"] is not None and len(b["resumed"]) == 1


def test_bad_run_config_fails_before_training_naming_the_key(mex_path, tmp_path):
    with pytest.raises(ConfigError, match="unknown run-config key 'no-such-key'"):
        run_simulation(_config(mex_path, tmp_path / "out", **{"no-such-key": 1}), nodes=2,
                       workdir=tmp_path / "sim-unknown", timeout=120)
    with pytest.raises(DeployError, match="Invalid run configuration"):  # what plain `flwr run` answers
        run_simulation(_config(mex_path, tmp_path / "out", **{"no-such-key": 1}), nodes=2,
                       workdir=tmp_path / "sim-unknown2", timeout=120, validate=False)
    # a declared key with a wrong type reaches the ServerApp, which fails the run before any training
    run = run_simulation(_config(mex_path, tmp_path / "out", **{"lr": "fast", "run-name": "bad"}), nodes=2,
                         workdir=tmp_path / "sim-typed", timeout=300, validate=False)
    assert run.status == "finished:failed", run.status
    assert "'lr' must be of type float" in run.log()
    assert not (tmp_path / "out" / "bad").exists()  # nothing trained, nothing written


def test_a_failed_run_says_why_too_few_nodes_fast_and_bad_data(mex_path, tmp_path):
    """Fewer SuperNodes than clients-per-round ended after round-timeout (an hour) without a word, and a failed
    run's reason was missing from `server_app.simulation`'s output (only "Simulation raised an exception")."""
    import time

    from server_app.simulation import failure_reason

    t0 = time.monotonic()
    few = run_simulation(_config(mex_path, tmp_path / "out", **{"clients-per-round": 3, "discovery-timeout": 5.0,
                                                                "run-name": "few"}),
                         nodes=2, workdir=tmp_path / "sim-few", timeout=300)
    assert few.status == "finished:failed" and time.monotonic() - t0 < 120
    assert failure_reason(few.log()).startswith("FederationError: 2 SuperNodes connected, but clients-per-round=3")
    broken = tmp_path / "MEx.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip archive")
    bad = run_simulation(_config(broken, tmp_path / "out", **{"run-name": "bad-data"}), nodes=2,
                         workdir=tmp_path / "sim-bad", timeout=300)
    assert bad.status == "finished:failed"
    reason = failure_reason(bad.log())
    assert reason is not None and str(broken) in reason, bad.log()[-3000:]


def test_sigterm_while_waiting_for_nodes_leaves_no_process(mex_path, tmp_path):
    """`python -m server_app.simulation` stopped by SIGTERM while the ServerApp waits for SuperNodes left two Ray
    agents running; every process the run started must be gone."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    marker = f"sigterm-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "sim"
    rc = (f'model-preset="tiny" clients-per-round=3 discovery-timeout=600.0 data-path="{mex_path}" '
          f'output-dir="{tmp_path / "out"}"')
    proc = subprocess.Popen([sys.executable, "-m", "server_app.simulation", "--nodes", "2", "--marker", marker,
                             "--workdir", str(workdir), "--run-config", rc],
                            cwd=Path(__file__).resolve().parents[2], stdout=(tmp_path / "out.txt").open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        log = tmp_path / "out.txt"  # the run's log as the command echoes it
        while time.monotonic() < deadline and "waiting for SuperNodes" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, "the run ended before it waited for nodes"
            time.sleep(1)
        assert "waiting for SuperNodes" in log.read_text(), log.read_text()[-2000:]
        assert marked_pids(marker), "no process of the run found by its marker"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) != 0
        deadline = time.monotonic() + 30
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marked_pids(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in marked_pids(marker):
            os.kill(pid, signal.SIGKILL)
