"""Fixtures for real-process deployment tests: every process a test starts is stopped by PID/process group
in a finalizer, even when the test fails, and the finalizer checks that nothing carrying the deployment's
marker is left."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import deploy_cli

from server_app.deploy import STATE_FILE, Deployment, pid_alive, stop_pids


@pytest.fixture
def federation(tmp_path):
    """Factory: `federation("--auth", nodes=3)` runs `deploy up` and returns the loaded Deployment.

    Teardown: `deploy down` (CLI), then an in-process stop of every recorded PID plus a sweep of every
    process carrying the marker; fails the test if anything survives.
    """
    workdirs: list[Path] = []

    def _up(*args: str, nodes: int = 3, name: str = "fed", timeout: float = 180) -> Deployment:
        wd = tmp_path / name
        workdirs.append(wd)
        deploy_cli("up", "--workdir", str(wd), "--nodes", str(nodes), *args, timeout=timeout)
        return Deployment.load(wd)

    yield _up

    survivors: dict[str, list[int]] = {}
    for wd in workdirs:
        if not (wd / STATE_FILE).exists():
            continue
        dep = Deployment.load(wd)
        try:
            deploy_cli("down", "--workdir", str(wd), "--grace", "10", timeout=90, check=False)
        finally:
            left = stop_pids(dep.processes, grace=5, marker=dep.marker)
        left += [p.pid for p in dep.processes if pid_alive(p.pid, p.start_ticks)]
        if left:
            survivors[str(wd)] = sorted(set(left))
    assert not survivors, f"processes left behind: {survivors}"

