"""Real-process deployment of FedTime-MAGNET on one machine (or as a recipe for many).

The same ServerApp/ClientApp that run in simulation run here under a real
``flower-superlink`` and ``flower-supernode`` processes; nothing in this module
touches training code.

Sub-commands (``python -m server_app.deploy <cmd> --help`` for all options)::

    certs   --out DIR --san 127.0.0.1 --san localhost   CA + server certificate (SANs)
    keys    --out DIR --nodes N                          ECDSA P-384 SuperNode key pairs
    up      --workdir DIR --nodes 3 [--insecure] [--auth] [--database state.db] [--port P]
    run     --workdir DIR --run-config '...' [--timeout S] submit with `flwr run`, read final status
    status  --workdir DIR                                processes, ports, SuperNodes
    connect --name NAME --address HOST:PORT --root-certificates ca.crt   a flwr CLI connection
    down    --workdir DIR                                SIGTERM then SIGKILL every process group
    env     --workdir DIR                                `export FLWR_HOME=...` for the flwr CLI

``up`` writes ``DIR/deploy-state.json`` (PIDs, process start times, ports, a marker
that every started process carries in its environment) and a per-workdir
``FLWR_HOME`` (``DIR/flwr-home/config.toml``) with one SuperLink connection, so the
``flwr`` CLI never reads or writes ``~/.flwr``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from server_app.deploy.common import REPO_ROOT, DeployError, _log
from server_app.deploy.deployment import Deployment, down, status, up
from server_app.deploy.flwr_cli import DEFAULT_CONNECTION, FINISHED_OK, FLWR_ENV, write_connection
from server_app.deploy.pki import add_commands, run_command, split_sans


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m server_app.deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_commands(sub)

    u = sub.add_parser("up", help="start SuperLink + N SuperNodes on this machine")
    u.add_argument("--workdir", required=True, type=Path)
    u.add_argument("--nodes", type=int, default=3)
    g = u.add_mutually_exclusive_group()
    g.add_argument("--tls", dest="tls", action="store_true", default=True, help="TLS (default)")
    g.add_argument("--insecure", dest="tls", action="store_false", help="plain HTTP (development only)")
    u.add_argument("--auth", action="store_true", help="SuperNode authentication (needs TLS)")
    u.add_argument("--database", help="SuperLink state file (relative to workdir); default in memory")
    u.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    u.add_argument("--host", default="127.0.0.1", help="SuperLink bind address")
    u.add_argument("--data-path", default=os.environ.get("FEDTIME_DATA_PATH"),
                   help="MEx zip/folder given to each SuperNode as node-config data-path")
    u.add_argument("--num-partitions", type=int, default=None)
    u.add_argument("--certs", type=Path, default=None, help="existing certs dir (ca.crt, server.pem, server.key)")
    u.add_argument("--keys", type=Path, default=None, help="existing keys dir (supernode-i[.pub])")
    u.add_argument("--san", action="append", default=[], help="extra SAN for generated certs")
    u.add_argument("--connection", default=DEFAULT_CONNECTION)
    u.add_argument("--timeout", type=float, default=90)
    u.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                   help="process: separate flower-superexec executors, as in the Docker compose setup")
    u.add_argument("--gpus", default=None,
                   help="pin SuperNode i to GPU gpus[i %% n] (CUDA_VISIBLE_DEVICES), e.g. 0,1; default: not pinned")

    r = sub.add_parser("run", help="submit the app with `flwr run` and wait for its final status")
    r.add_argument("--workdir", required=True, type=Path)
    r.add_argument("--app", type=Path, default=REPO_ROOT)
    r.add_argument("--run-config", action="append", default=[])
    r.add_argument("--timeout", type=float, default=3600)

    s = sub.add_parser("status", help="show processes and SuperNodes")
    s.add_argument("--workdir", required=True, type=Path)

    d = sub.add_parser("down", help="stop every process of the deployment")
    d.add_argument("--workdir", required=True, type=Path)
    d.add_argument("--grace", type=float, default=10.0)

    cn = sub.add_parser("connect", help="write a SuperLink connection into $FLWR_HOME/config.toml")
    cn.add_argument("--name", required=True, help="connection name used as `flwr run . NAME`")
    cn.add_argument("--address", required=True, help="host:port of the SuperLink")
    cg = cn.add_mutually_exclusive_group(required=True)
    cg.add_argument("--root-certificates", type=Path, help="CA certificate (ca.crt) that signed the SuperLink's")
    cg.add_argument("--insecure", action="store_true")
    cn.add_argument("--flwr-home", type=Path, default=None,
                    help="default: $FLWR_HOME or ~/.flwr")
    cn.add_argument("--no-default", action="store_true", help="do not make it the default connection")

    e = sub.add_parser("env", help="print `export FLWR_HOME=...` for the flwr CLI")
    e.add_argument("--workdir", required=True, type=Path)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd in ("certs", "keys"):
            run_command(args)
        elif args.cmd == "up":
            dep = up(args.workdir, nodes=args.nodes, tls=args.tls, auth=args.auth, database=args.database,
                     port=args.port or None, host=args.host, data_path=args.data_path,
                     num_partitions=args.num_partitions, certs_dir=args.certs, keys_dir=args.keys,
                     sans=split_sans(args.san), connection=args.connection, timeout=args.timeout,
                     isolation=args.isolation, gpus=args.gpus)
            print(json.dumps({"address": dep.address, "connection": dep.connection,
                              "flwr_home": dep.flwr_home, "state": str(dep.state_path),
                              "pids": {p.name: p.pid for p in dep.processes}}, indent=2))
        elif args.cmd == "run":
            dep = Deployment.load(args.workdir)
            t0 = time.monotonic()
            run_id = dep.submit(args.app, args.run_config)
            _log(f"submitted run {run_id}; follow with: FLWR_HOME={dep.flwr_home} flwr log {run_id} "
                 f"{dep.connection} --stream")
            info = dep.wait_run(run_id, timeout=args.timeout)
            info["wall-s"] = round(time.monotonic() - t0, 1)
            print(json.dumps(info, indent=2))
            return 0 if info.get("status") == FINISHED_OK else 1
        elif args.cmd == "status":
            print(json.dumps(status(args.workdir), indent=2))
        elif args.cmd == "down":
            left = down(args.workdir, grace=args.grace)
            if left:
                _log(f"still alive: {left}")
                return 1
            _log("all processes stopped")
        elif args.cmd == "connect":
            home = args.flwr_home or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
            if args.root_certificates and not args.root_certificates.exists():
                raise DeployError(f"{args.root_certificates} does not exist")
            path = write_connection(home, args.address, None if args.insecure else args.root_certificates,
                                    args.name, make_default=not args.no_default)
            print(path.read_text())
        elif args.cmd == "env":
            dep = Deployment.load(args.workdir)
            print(f"export FLWR_HOME={shlex.quote(dep.flwr_home)}")
            for k, v in FLWR_ENV.items():
                print(f"export {k}={v}")
    except DeployError as err:
        _log(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
