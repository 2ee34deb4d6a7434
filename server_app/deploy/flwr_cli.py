"""The ``flwr`` CLI and the other Flower executables: where they are, the environment they run in, their
SuperLink connections (``$FLWR_HOME/config.toml``) and their JSON output."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server_app.deploy.common import DeployError
from server_app.deploy.processes import MARKER_ENV

DEFAULT_CONNECTION = "fedtime"
# Exported to every Flower process and CLI call we start.
FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
FINISHED_OK = "finished:completed"


def flwr_bin(name: str) -> str:
    """Path of a Flower executable, preferring the interpreter's own venv."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"`{name}` not found next to {sys.executable} nor on PATH")
    return found


def base_env(flwr_home: Path | None = None, marker: str | None = None) -> dict[str, str]:
    """Environment for Flower processes and CLI calls."""
    env = dict(os.environ)
    env.update(FLWR_ENV)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    # The app is shipped as a FAB; keep the repository importable for the
    # launcher processes all the same (they run from their own workdirs).
    env["PYTHONUNBUFFERED"] = "1"
    # Ray's driver (the simulation engine) merges similar worker lines into "... [repeated 4x across cluster]",
    # hiding which subject and round a client line belongs to: print each as written (unless the caller chose)
    env.setdefault("RAY_DEDUP_LOGS", "0")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if marker is not None:
        env[MARKER_ENV] = marker
    return env


def write_connection(
    flwr_home: Path,
    address: str,
    root_certificates: Path | None,
    name: str = DEFAULT_CONNECTION,
    make_default: bool = True,
) -> Path:
    """Add/replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``."""
    import tomli
    import tomli_w

    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    cfg_path = flwr_home / "config.toml"
    cfg: dict[str, Any] = {}
    if cfg_path.exists():
        cfg = tomli.loads(cfg_path.read_text())
    sl = cfg.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        entry["insecure"] = True
    sl[name] = entry
    if make_default or "default" not in sl:
        sl["default"] = name
    cfg_path.write_text(tomli_w.dumps(cfg))
    return cfg_path


def flwr_cli(
    args: Sequence[str],
    env: dict[str, str],
    timeout: float = 120,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``flwr <args>`` and return the completed process (text)."""
    cmd = [flwr_bin("flwr"), *args]
    proc = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise DeployError(
            f"`{shlex.join(cmd)}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def parse_json_output(text: str) -> Any:
    """The JSON document in a ``flwr ... --format json`` output (ignores log lines)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise DeployError(f"no JSON in flwr output:\n{text[-2000:]}")
    return json.JSONDecoder().raw_decode(text[start:])[0]
