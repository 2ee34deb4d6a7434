"""Helpers shared by the deployment tests (imported as a plain module: tests/deploy is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server_app.deploy import REPO_ROOT, pid_alive

PYPROJECT = REPO_ROOT / "pyproject.toml"


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


def app_config_keys() -> set[str]:
    return set(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def app_ready() -> str | None:
    """None when the ServerApp/ClientApp import, else why not (the e2e tests skip with it)."""
    for mod in ("server_app/server_app.py", "client_app/client_app.py"):
        if not (REPO_ROOT / mod).exists():
            return f"{mod} does not exist yet"
    proc = subprocess.run([sys.executable, "-c", "import server_app.server_app, client_app.client_app"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return "the apps do not import: " + proc.stderr.strip().splitlines()[-1]
    return None


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

