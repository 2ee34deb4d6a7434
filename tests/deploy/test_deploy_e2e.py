"""The real ServerApp and ClientApp under real processes on loopback: SuperLink + 3 SuperNodes with TLS and
SuperNode authentication run 2 rounds of the tiny preset; the run's final status is read from the SuperLink
(`flwr run` exits 0 even for failed runs) and results.json is checked. A second test kills one SuperNode in
the middle of a round: the round completes with the other two (min-train-replies = 2), nothing hangs past the
configured timeouts and no process is left behind."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import tomli_w
from deploy_helpers import deploy_cli, flower_processes_under, needs_flower

from server_app import deploy
from server_app.deploy import REPO_ROOT, marked_pids

pytestmark = [needs_flower, pytest.mark.slow]  # real SuperLink / SuperNode processes


def tiny_config(mex_path: Path, out: Path, **overrides) -> dict:
    return {"model-preset": "tiny", "num-server-rounds": 2, "clients-per-round": 3, "local-epochs": 1,
            "batch-size": 16, "grad-accum": 1, "lr": 3e-3, "data-path": str(mex_path), "output-dir": str(out),
            **overrides}


def first_training_subjects(n: int) -> list[int]:
    from data_partition import paper_split

    return sorted(paper_split(42).train[:n])


def results_of(out: Path) -> dict:
    found = sorted(out.rglob("results.json"))
    assert found, f"no results.json under {out}"
    return json.loads(found[0].read_text())


def run_log(dep: deploy.Deployment, run_id: int) -> str:
    out = dep.cli(["log", str(run_id), dep.connection, "--show"], check=False, timeout=60)
    return out.stdout + out.stderr


def home_flwr_snapshot() -> set[str]:
    home = Path.home() / ".flwr"
    return {str(p) for p in home.rglob("*")} if home.exists() else set()


def test_tls_auth_federation_runs_two_tiny_rounds(federation, mex_path, tmp_path):
    before_home = home_flwr_snapshot()
    t0 = time.monotonic()
    # in-memory SuperLink state: the SQLite state (--database) is covered by the restart test in
    # test_deploy_security.py; on an overloaded 2-core machine its 5 s busy_timeout can be exceeded mid-run
    # (Flower 1.41 then fails the ServerApp with HTTP 500 "database is locked"), see docs/deployment.md
    dep = federation("--auth", "--data-path", str(mex_path), nodes=3)
    t_up = time.monotonic() - t0
    assert dep.tls and dep.auth and len(dep.list_nodes()) == 3

    out = tmp_path / "outputs"
    rc = tiny_config(mex_path, out, **{"run-name": "deploy-e2e"})
    rc_path = tmp_path / "run-config.toml"
    rc_path.write_text(tomli_w.dumps(rc))
    t1 = time.monotonic()
    # the documented CLI: `flwr run` + polling `flwr list --run-id` for the final status (exit 0 only if completed)
    cli = deploy_cli("run", "--workdir", dep.workdir, "--run-config", str(rc_path), "--timeout", "900",
                     timeout=960, check=False)
    t_run = time.monotonic() - t1
    info = json.loads(cli.stdout) if cli.stdout.strip() else {}
    run_id = int(info.get("run-id", -1))
    log = run_log(dep, run_id) if run_id > 0 else cli.stderr
    assert cli.returncode == 0 and info["status"] == deploy.FINISHED_OK, f"{info}\n{cli.stderr[-2000:]}\n{log[-4000:]}"
    assert dep.run_info(run_id)["status"] == deploy.FINISHED_OK

    results = results_of(out)
    assert results.get("status", "completed") == "completed"
    rounds = results["history"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        if "trained" in r:  # partition ids 0..2 = the first three training subjects
            assert sorted(r["trained"]) == first_training_subjects(3)
            assert r.get("failures", []) == []
    assert home_flwr_snapshot() == before_home, "the deployment touched ~/.flwr"
    print(f"\nup (TLS+auth, 3 nodes): {t_up:.1f}s; 2 tiny rounds via flwr run: {t_run:.1f}s; "
          f"SuperLink elapsed {info.get('elapsed')}")


def test_killed_supernode_mid_round_does_not_hang_or_leak(federation, mex_path, tmp_path):
    dep = federation("--data-path", str(mex_path), nodes=3, name="fault")
    victim = dep.proc("supernode-1")
    out = tmp_path / "outputs"
    round_timeout = 120
    rc = tiny_config(mex_path, out, **{"num-server-rounds": 1, "min-train-replies": 2,
                                       "round-timeout": float(round_timeout),
                                       "run-name": "fault"})
    t0 = time.monotonic()
    run_id = dep.submit(REPO_ROOT, rc)

    # kill supernode-1 (its whole process group: SuperNode + executor + ClientApp) while it trains
    deadline = time.monotonic() + 300
    victim_log = Path(victim.log)
    while "Receiving: train message" not in victim_log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            pytest.fail(f"supernode-1 never received a train message:\n{victim_log.read_text()[-3000:]}")
        time.sleep(0.5)
    time.sleep(2.0)  # inside local training
    os.killpg(victim.pid, signal.SIGKILL)
    t_kill = time.monotonic() - t0

    # bounded: heartbeat expiry (~60 s) or the round timeout, whichever first, plus the remaining round
    info = dep.wait_run(run_id, timeout=round_timeout * 2 + 240)
    t_end = time.monotonic() - t0
    log = run_log(dep, run_id)
    print(f"\nkilled supernode-1 at {t_kill:.1f}s; run {info['status']} at {t_end:.1f}s")
    # two replies are enough (min-train-replies = 2): the round completes without the killed node, named
    assert info["status"] == deploy.FINISHED_OK, f"{info}\n{log[-3000:]}"
    results = results_of(out)
    r1 = results["history"][0]
    killed_subject = first_training_subjects(3)[1]
    assert killed_subject not in r1["trained"] and len(r1["trained"]) == 2, r1
    assert any(f["subject"] == killed_subject for f in r1["failures"]), r1

    # tear down by the CLI, then nothing we started may survive
    assert deploy_cli("down", "--workdir", dep.workdir, timeout=90).returncode == 0
    assert marked_pids(dep.marker) == []
    assert flower_processes_under(tmp_path) == []
    for p in dep.processes:
        assert not deploy.pid_alive(p.pid, p.start_ticks), p.name
        if p.port:
            assert not deploy.port_in_use(p.port), f"{p.name} port {p.port} still open"
