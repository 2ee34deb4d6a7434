"""Run the app under Flower's Ray simulation engine exactly as a user would (`flwr run .`), but isolated and
accountable: its own FLWR_HOME and ports, the run's final status read from the SuperLink (not the CLI's exit
code), its log kept, and every process it started (SuperLink, simulation, Ray) stopped by PID afterwards.

    python -m server_app.simulation --nodes 21 --run-config 'num-server-rounds=10' [--workdir DIR]

Used by the integration tests and the benchmarks; a user can equally type the `flwr run` line from the README.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

import tomli_w

from fedtime.config import RunConfig, flatten_tables, parse_run_config

from server_app.deploy.common import REPO_ROOT, DeployError
from server_app.deploy.flwr_cli import FINISHED_OK, base_env, flwr_bin, flwr_cli, parse_json_output
from server_app.deploy.processes import free_port, stop_pids


POLL_S = 15.0


@dataclass
class SimulationRun:
    run_id: int
    status: str
    wall_s: float
    log_path: Path
    leftover_pids: list[int]

    @property
    def ok(self) -> bool:
        return self.status == FINISHED_OK

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def federation_config(nodes: int, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0) -> str:
    """`--federation-config` for N virtual SuperNodes; 1 CPU per client = two clients at once on 2 cores."""
    cpus = int(cpus_per_client) if float(cpus_per_client).is_integer() else cpus_per_client
    return f"num-supernodes={nodes} client-resources-num-cpus={cpus} client-resources-num-gpus={gpus_per_client}"


PATH_KEYS = ("output-dir", "resume", "data-path")


def absolute_paths(run_config: dict[str, Any], app_dir: Path) -> dict[str, Any]:
    """The run config with its relative paths made absolute from the caller's working directory: the ServerApp
    and ClientApps run in the simulation's own folder, where `outputs` or `resume="outputs/<run>"` would point
    somewhere else. `output-dir` is always set (from the app's default when the run config has none);
    `$FEDTIME_DATA_PATH` is made absolute the same way."""
    out = dict(run_config)
    if "output-dir" not in out:
        defaults = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
        out["output-dir"] = defaults.get("output-dir", "outputs")
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def run_simulation(run_config: dict[str, Any], *, nodes: int, workdir: Path, app_dir: Path = REPO_ROOT,
                   cpus_per_client: float = 1.0, gpus_per_client: float = 0.0, timeout: float = 3600,
                   echo: bool = False, on_progress=None, marker: str | None = None,
                   validate: bool = True) -> SimulationRun:
    """Submit one simulation run, wait for its final status, then stop every process it started.

    `on_progress(run_id)` is called about every second while the run is in progress (tests use it to
    interrupt a run); returning True stops waiting and tears the federation down. Every process started
    carries `marker` in its environment (`deploy.marked_pids(marker)` finds them, e.g. to measure memory).
    """
    if validate:  # name a bad key here; Flower itself only answers "[code: 15] Invalid run configuration"
        from server_app.strategies import check_strategy_options

        defaults = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
        check_strategy_options(RunConfig.from_run_config({**flatten_tables(defaults), **flatten_tables(run_config)}))
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_config = absolute_paths(run_config, Path(app_dir))
    marker = marker or f"sim-{uuid.uuid4().hex[:12]}"
    env = base_env(workdir / "flwr-home", marker)
    if env.get("FEDTIME_DATA_PATH") and not Path(env["FEDTIME_DATA_PATH"]).expanduser().is_absolute():
        env["FEDTIME_DATA_PATH"] = str(Path(env["FEDTIME_DATA_PATH"]).expanduser().resolve())
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    (workdir / "flwr-home").mkdir(exist_ok=True)
    (workdir / "flwr-home" / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "local", "local": {"address": ":local:"}}}))
    rc_path = workdir / "run-config.toml"
    rc_path.write_text(tomli_w.dumps(run_config))
    log_path = workdir / "run.log"
    t0 = time.time()
    run_id, status = -1, "not-submitted"
    try:
        out = flwr_cli(["run", str(app_dir), "local", "--run-config", str(rc_path), "--federation-config",
                        federation_config(nodes, cpus_per_client, gpus_per_client), "--format", "json"],
                       env, timeout=300, cwd=workdir)
        data = parse_json_output(out.stdout)
        if not data.get("success", True) or "run-id" not in data:
            raise DeployError(f"flwr run did not return a run id: {data}")
        run_id = int(data["run-id"])
        with open(log_path, "w") as logf:
            streamer = subprocess.Popen([flwr_bin("flwr"), "log", str(run_id), "local", "--stream"], env=env,
                                        cwd=workdir, stdout=subprocess.PIPE if echo else logf,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
            try:
                status = _wait(run_id, env, workdir, timeout, streamer, logf if echo else None, on_progress)
            finally:
                # an interrupted run is torn down at once: waiting for its stream to end would let it go on
                # training (CI once saw a run interrupted after round 2 finish all 6 rounds during that wait)
                _drain(streamer, logf if echo else None, grace=0.0 if status.startswith("interrupted") else 10.0)
    finally:
        leftover = stop_pids([], grace=10, marker=marker)
    return SimulationRun(run_id, status, time.time() - t0, log_path, leftover)


def _drain(streamer: subprocess.Popen, echo_file, grace: float) -> None:
    """Let the log stream deliver what the run wrote last (its error, the final lines), then stop it."""
    deadline = time.monotonic() + grace
    if echo_file is not None and streamer.stdout is not None:
        while time.monotonic() < deadline:
            if not select.select([streamer.stdout], [], [], 0.2)[0]:
                if streamer.poll() is not None:
                    break
                continue
            line = streamer.stdout.readline()  # the stream writes whole lines
            if not line:
                break  # the stream ended
            sys.stdout.write(line)
            echo_file.write(line)
    else:
        try:
            streamer.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    streamer.terminate()
    try:
        streamer.wait(timeout=10)
    except subprocess.TimeoutExpired:
        streamer.kill()


def failure_reason(log_text: str) -> str | None:
    """The ServerApp's "the run failed: ..." line of a run's log, if it wrote one."""
    lines = [ln for ln in log_text.splitlines() if "the run failed: " in ln]
    return lines[-1].split("the run failed: ", 1)[1].strip() if lines else None


def _status(run_id: int, env: dict, workdir: Path) -> str:
    out = flwr_cli(["list", "local", "--run-id", str(run_id), "--format", "json"], env, check=False, cwd=workdir)
    try:
        runs = parse_json_output(out.stdout).get("runs", [])
    except (DeployError, json.JSONDecodeError, AttributeError):
        return "unknown"
    return next((str(r.get("status", "unknown")) for r in runs if int(r.get("run-id", -1)) == run_id), "unknown")


def _wait(run_id, env, workdir, timeout, streamer, echo_file, on_progress) -> str:
    deadline = time.monotonic() + timeout
    last_poll = 0.0
    status = "unknown"
    while time.monotonic() < deadline:
        if echo_file is not None and streamer.stdout is not None:
            line = streamer.stdout.readline()
            if line:
                sys.stdout.write(line)
                echo_file.write(line)
        else:
            time.sleep(1.0)
        if on_progress is not None and on_progress(run_id):
            return f"interrupted:{status}"
        # `flwr list` is a Python process of its own (~1 CPU-second): poll rarely while the log streams, more
        # often once the stream has ended (it ends with the run)
        if time.monotonic() - last_poll > (3.0 if streamer.poll() is not None else POLL_S):
            last_poll = time.monotonic()
            status = _status(run_id, env, workdir)
            if status.startswith("finished"):
                return status
    flwr_cli(["stop", str(run_id), "local"], env, check=False, cwd=workdir)
    return f"timeout:{status}"


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that `run_simulation`'s clean-up (stop every process by PID) runs."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=21)
    p.add_argument("--run-config", default="", help="TOML key=value pairs, as for `flwr run --run-config`")
    p.add_argument("--workdir", type=Path, default=Path("outputs/.simulation"))
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--marker", default=None,
                   help="value of $FEDTIME_DEPLOY_MARKER in every process the run starts (default: random); "
                        "`server_app.deploy.marked_pids` finds them")
    a = p.parse_args(argv)
    rc = parse_run_config([a.run_config]) if a.run_config else {}
    run = run_simulation(rc, nodes=a.nodes, workdir=a.workdir, cpus_per_client=a.cpus_per_client,
                         gpus_per_client=a.gpus_per_client, timeout=a.timeout, echo=True, marker=a.marker)
    reason = None if run.ok else failure_reason(run.log())
    if reason:
        print(f"the run failed: {reason}", file=sys.stderr)
    print(json.dumps({"run_id": run.run_id, "status": run.status, "wall_s": round(run.wall_s, 1),
                      "log": str(run.log_path), "leftover_pids": run.leftover_pids, "error": reason}))
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
