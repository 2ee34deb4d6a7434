"""Real-process deployment of FedTime-MAGNET: ``flower-superlink`` and ``flower-supernode`` processes on one
machine (or as a recipe for many), and the process/``flwr`` CLI tools the simulation runner shares with it.

    common       REPO_ROOT, DeployError, the ``[deploy]`` log line
    pki          CA + server certificates, SuperNode key pairs (also runs alone: docker/certs.yml)
    processes    start/stop process groups, find processes by marker, local TCP ports
    flwr_cli     the ``flwr`` CLI: executables, environment, connections, JSON output
    deployment   ``Deployment`` (state in DIR/deploy-state.json), ``up``, ``down``, ``status``
    __main__     ``python -m server_app.deploy certs|keys|up|run|status|connect|down|env``
"""

from server_app.deploy.common import REPO_ROOT, DeployError
from server_app.deploy.deployment import STATE_FILE, Deployment, down, parse_gpus, status, up
from server_app.deploy.flwr_cli import (DEFAULT_CONNECTION, FINISHED_OK, FLWR_ENV, base_env, flwr_bin, flwr_cli,
                                        parse_json_output, write_connection)
from server_app.deploy.pki import DEFAULT_SANS, chown_tree, make_certs, make_keys, split_sans
from server_app.deploy.processes import (MARKER_ENV, Proc, free_port, group_members, marked_pids, pid_alive,
                                         port_in_use, start_process, stop_pids, wait_port)

__all__ = [
    "DEFAULT_CONNECTION", "DEFAULT_SANS", "FINISHED_OK", "FLWR_ENV", "MARKER_ENV", "REPO_ROOT", "STATE_FILE",
    "DeployError", "Deployment", "Proc", "base_env", "chown_tree", "down", "flwr_bin", "flwr_cli", "free_port",
    "group_members", "make_certs", "make_keys", "marked_pids", "parse_gpus", "parse_json_output", "pid_alive",
    "port_in_use", "split_sans", "start_process", "status", "stop_pids", "up", "wait_port", "write_connection",
]
