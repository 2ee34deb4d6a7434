"""Helpers shared by the deployment tests (imported as a plain module: tests/deploy is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_app.deploy import REPO_ROOT, pid_alive


def deploy_cli(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m server_app.deploy ...` from the repository root, as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "server_app.deploy", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"deploy {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def flower_available() -> bool:
    bindir = Path(sys.executable).parent
    return all((bindir / b).exists() for b in ("flower-superlink", "flower-supernode", "flwr"))


needs_flower = pytest.mark.skipif(not flower_available(), reason="flower-superlink/supernode not installed")


def flower_processes_under(path: Path) -> list[tuple[int, str]]:
    """Live flower-*/flwr-* processes whose command line or cwd is under `path` (stray scan)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if ("flower-" in cmd or "flwr" in cmd) and (str(path) in cmd or cwd.startswith(str(path))):
            if pid_alive(int(entry.name)):
                found.append((int(entry.name), cmd[:200]))
    return found

