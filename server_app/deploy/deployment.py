"""One deployment on this machine: a SuperLink and N SuperNodes as real processes, their state in
``DIR/deploy-state.json``, and the ``up``/``down``/``status`` steps the command line runs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server_app.deploy.common import REPO_ROOT, DeployError, _log
from server_app.deploy.flwr_cli import (DEFAULT_CONNECTION, base_env, flwr_bin, flwr_cli, parse_json_output,
                                        write_connection)
from server_app.deploy.pki import DEFAULT_SANS, make_certs, make_keys
from server_app.deploy.processes import (Proc, _tail, free_port, marked_pids, pid_alive, port_in_use, start_process,
                                         stop_pids, wait_port)

STATE_FILE = "deploy-state.json"


# --------------------------------------------------------------------------- state


@dataclass
class Deployment:
    workdir: str
    marker: str
    connection: str
    address: str
    host: str
    port: int
    tls: bool
    auth: bool
    database: str | None
    flwr_home: str
    ca_cert: str | None = None
    server_cert: str | None = None
    server_key: str | None = None
    keys_dir: str | None = None
    data_path: str | None = None
    num_partitions: int = 0
    isolation: str = "subprocess"
    gpus: list[int] | None = None  # SuperNode i sees only GPU gpus[i % len(gpus)]
    processes: list[Proc] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return Path(self.workdir) / STATE_FILE

    def save(self) -> None:
        d = asdict(self)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=2))
        tmp.replace(self.state_path)

    @classmethod
    def load(cls, workdir: Path) -> Deployment:
        path = Path(workdir) / STATE_FILE
        if not path.exists():
            raise DeployError(f"no {STATE_FILE} in {workdir}: nothing was brought up there")
        d = json.loads(path.read_text())
        d["processes"] = [Proc(**p) for p in d.get("processes", [])]
        return cls(**d)

    def env(self, flwr_home: str | Path | None = None) -> dict[str, str]:
        return base_env(Path(flwr_home or self.flwr_home), self.marker)

    def node_env(self, index: int, flwr_home: str | Path) -> dict[str, str]:
        """A SuperNode's environment: pinned to its GPU (inside, that GPU is ``cuda:0``) when ``gpus`` is set."""
        env = self.env(flwr_home)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpus[index % len(self.gpus)])
        return env

    def proc(self, name: str) -> Proc:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    def supernodes(self) -> list[Proc]:
        return [p for p in self.processes if p.role == "supernode"]

    # -- processes -----------------------------------------------------------

    def start_superlink(self, timeout: float = 60) -> Proc:
        wd = Path(self.workdir)
        cmd = [flwr_bin("flower-superlink")]
        if self.tls:
            cmd += ["--ssl-ca-certfile", self.ca_cert, "--ssl-certfile", self.server_cert,
                    "--ssl-keyfile", self.server_key]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        if self.database:
            cmd += ["--database", self.database]
        cmd += ["--host", self.host, "--port", str(self.port), "--isolation", self.isolation,
                "--disable-runtime-dependency-installation"]
        sl_home = wd / "superlink" / "flwr-home"
        env = self.env(sl_home)
        if self.data_path:  # the ServerApp (validation/test subjects) reads MEx too
            env["FEDTIME_DATA_PATH"] = self.data_path
        proc = start_process("superlink", "superlink", cmd, wd / "logs" / "superlink.log",
                             env, wd / "superlink", port=self.port)
        self._record(proc)
        wait_port(self.port, self.address.rsplit(":", 1)[0].strip("[]"), timeout, proc)
        if self.isolation == "process":
            # The ServerApp executor: what the `superexec-serverapp` container runs.
            self.start_superexec("superexec-serverapp", self.address, sl_home, wd / "superlink")
        return proc

    def _record(self, proc: Proc) -> None:
        self.processes = [p for p in self.processes if p.name != proc.name] + [proc]
        self.save()

    def start_superexec(self, name: str, runtime_address: str, flwr_home: Path, cwd: Path,
                        env: dict[str, str] | None = None) -> Proc:
        """``flower-superexec`` for ``--isolation process`` (one per SuperLink/SuperNode)."""
        cmd = [flwr_bin("flower-superexec"), "--runtime-api-address", runtime_address]
        cmd += ["--root-certificates", self.ca_cert] if self.tls else ["--insecure"]
        env = dict(env) if env else self.env(flwr_home)
        if self.data_path:
            env["FEDTIME_DATA_PATH"] = self.data_path
        proc = start_process(name, "superexec", cmd, Path(self.workdir) / "logs" / f"{name}.log", env, cwd)
        self._record(proc)
        return proc

    def supernode_cmd(
        self,
        index: int,
        port: int,
        private_key: str | Path | None = None,
        root_certificates: str | Path | None | bool = True,
        extra_args: Sequence[str] = (),
        node_config: str | None = None,
    ) -> list[str]:
        cmd = [flwr_bin("flower-supernode"), "--superlink", self.address]
        if self.tls:
            if root_certificates is True:
                cmd += ["--root-certificates", self.ca_cert]
            elif root_certificates:
                cmd += ["--root-certificates", str(root_certificates)]
            # root_certificates False/None on a TLS link: trust the system store only
        else:
            cmd += ["--insecure"]
        if private_key:
            cmd += ["--auth-supernode-private-key", str(private_key)]
        if node_config is None:
            node_config = f"partition-id={index} num-partitions={self.num_partitions}"
            if self.data_path:
                node_config += f' data-path="{self.data_path}"'
        cmd += ["--node-config", node_config, "--host", "127.0.0.1", "--port", str(port),
                "--isolation", self.isolation]
        if self.isolation == "process" and self.tls:
            # TLS on the SuperNode's own Runtime API too (the ClientApp executor dials it).
            cmd += ["--ssl-certfile", self.server_cert, "--ssl-keyfile", self.server_key,
                    "--ssl-ca-certfile", self.ca_cert]
        return [*cmd, *extra_args]

    def start_supernode(
        self,
        index: int,
        name: str | None = None,
        private_key: str | Path | None | bool = True,
        root_certificates: str | Path | None | bool = True,
        extra_args: Sequence[str] = (),
        node_config: str | None = None,
        record: bool = True,
    ) -> Proc:
        """Start SuperNode ``index`` (partition-id ``index``) on a fresh runtime port."""
        name = name or f"supernode-{index}"
        wd = Path(self.workdir)
        if private_key is True:
            private_key = (Path(self.keys_dir) / f"supernode-{index}") if self.auth else None
        port = free_port()
        cmd = self.supernode_cmd(index, port, private_key or None, root_certificates, extra_args, node_config)
        node_dir = wd / "nodes" / name
        env = self.node_env(index, node_dir / "flwr-home")
        proc = start_process(name, "supernode", cmd, wd / "logs" / f"{name}.log", env, node_dir, port=port,
                             extra={"partition-id": index, "gpu": env.get("CUDA_VISIBLE_DEVICES")})
        if record:
            self._record(proc)
        if self.isolation == "process":
            wait_port(port, "127.0.0.1", 60, proc)
            ex = self.start_superexec(f"superexec-{name}", f"127.0.0.1:{port}", node_dir / "flwr-home", node_dir,
                                      env=env)
            if not record:
                self.processes = [p for p in self.processes if p.name != ex.name]
                self.save()
                proc.extra["superexec"] = asdict(ex)
        return proc

    # -- flwr CLI ------------------------------------------------------------

    def cli(self, args: Sequence[str], timeout: float = 120, check: bool = True, cwd: Path | None = None):
        return flwr_cli(args, self.env(), timeout=timeout, check=check, cwd=cwd or Path(self.workdir))

    def register(self, public_key: Path, name: str | None = None, retries: int = 20) -> int:
        """``flwr supernode register <pub> <connection>`` → node id."""
        args = ["supernode", "register", str(public_key), self.connection, "--format", "json"]
        if name:
            args += ["--name", name]
        last = ""
        for _ in range(retries):
            proc = self.cli(args, check=False)
            if proc.returncode == 0:
                return int(parse_json_output(proc.stdout)["node-id"])
            last = proc.stdout + proc.stderr
            time.sleep(1)
        raise DeployError(f"registering {public_key} failed:\n{last[-2000:]}")

    def list_nodes(self) -> list[dict[str, Any]]:
        out = self.cli(["supernode", "list", self.connection, "--format", "json"], check=False)
        if out.returncode != 0:
            return []
        try:
            data = parse_json_output(out.stdout)
        except (DeployError, json.JSONDecodeError):
            return []
        return list(data.get("nodes", [])) if isinstance(data, dict) else []

    def wait_nodes_online(self, n: int, timeout: float = 90) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        online: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            for p in self.supernodes():
                if not pid_alive(p.pid, p.start_ticks):
                    raise DeployError(f"{p.name} exited during start-up; see {p.log}:\n{_tail(p.log)}")
            online = [x for x in self.list_nodes() if str(x.get("status", "")).lower() == "online"]
            if len(online) >= n:
                return online
            time.sleep(1.0)
        raise DeployError(f"only {len(online)}/{n} SuperNodes online after {timeout:.0f}s")

    def submit(
        self, app_dir: Path = REPO_ROOT, run_config: Sequence[str] | dict[str, Any] = (), timeout: float = 300
    ) -> int:
        """``flwr run <app> <connection> --run-config ... --format json`` → run id.

        ``run_config``: ``--run-config`` strings (``'k=v k2="s"'`` or a .toml path), or a dict that is
        written to a TOML file first (no shell quoting to get wrong).
        """
        import tomli_w

        if isinstance(run_config, dict):
            path = Path(self.workdir) / f"run-config-{uuid.uuid4().hex[:8]}.toml"
            path.write_text(tomli_w.dumps(run_config))
            run_config = [str(path)]
        args = ["run", str(app_dir), self.connection, "--format", "json"]
        for rc in run_config:
            args += ["--run-config", rc]
        out = self.cli(args, timeout=timeout)
        data = parse_json_output(out.stdout)
        if not data.get("success", True) or "run-id" not in data:
            raise DeployError(f"flwr run did not return a run id: {data}")
        return int(data["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        out = self.cli(["list", self.connection, "--run-id", str(run_id), "--format", "json"])
        data = parse_json_output(out.stdout)
        runs = data.get("runs", []) if isinstance(data, dict) else []
        for r in runs:
            if int(r.get("run-id", -1)) == run_id:
                return r
        raise DeployError(f"run {run_id} not listed: {data}")

    def wait_run(self, run_id: int, timeout: float, poll: float = 5.0) -> dict[str, Any]:
        """Poll until the run is ``finished:*``; on timeout stop it and raise."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            sl = self.proc("superlink")
            if not pid_alive(sl.pid, sl.start_ticks):
                raise DeployError(f"SuperLink died while run {run_id} was in progress; see {sl.log}")
            try:
                info = self.run_info(run_id)
            except DeployError:
                info = {}
            if str(info.get("status", "")).startswith("finished"):
                return info
            time.sleep(poll)
        self.cli(["stop", str(run_id), self.connection], check=False)
        raise DeployError(f"run {run_id} not finished after {timeout:.0f}s (last: {info}); stop requested")


# --------------------------------------------------------------------------- commands


def parse_gpus(gpus: str | Sequence[int] | None) -> list[int] | None:
    """``"0,1"`` or ``[0, 1]`` -> ``[0, 1]``; empty/None -> None (the nodes see every GPU, or none)."""
    if gpus is None or (isinstance(gpus, str) and not gpus.strip()):
        return None
    items = gpus.split(",") if isinstance(gpus, str) else list(gpus)
    try:
        out = [int(str(g).strip()) for g in items]
    except ValueError:
        out = []
    if not out or min(out) < 0:
        raise DeployError(f"--gpus wants comma-separated GPU indices such as 0,1; got {gpus!r}")
    return out


def up(
    workdir: Path,
    nodes: int = 3,
    tls: bool = True,
    auth: bool = False,
    database: str | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    data_path: str | None = None,
    num_partitions: int | None = None,
    certs_dir: Path | None = None,
    keys_dir: Path | None = None,
    sans: Sequence[str] = (),
    connection: str = DEFAULT_CONNECTION,
    timeout: float = 90,
    isolation: str = "subprocess",
    gpus: str | Sequence[int] | None = None,
) -> Deployment:
    """Bring SuperLink + ``nodes`` SuperNodes up; write state; wait until online. ``gpus`` ("0,1"): pin the
    SuperNodes round-robin to these GPU indices."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / STATE_FILE).exists():
        old = Deployment.load(workdir)
        if any(pid_alive(p.pid, p.start_ticks) for p in old.processes):
            raise DeployError(f"{workdir} already has a running deployment; run `down` first")
    if auth and not tls:
        raise DeployError("--auth needs TLS (Flower refuses SuperNode auth on --insecure)")
    dial_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if port and port_in_use(port, dial_host):
        raise DeployError(f"port {port} is already in use on {dial_host}; pick another --port (or none: a free one)")
    port = port or free_port(dial_host)
    address = f"[{dial_host}]:{port}" if ":" in dial_host else f"{dial_host}:{port}"
    if database and database != ":flwr-in-memory-state:":
        db = Path(database)
        database = str(db if db.is_absolute() else workdir / db)
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    dep = Deployment(
        workdir=str(workdir), marker=uuid.uuid4().hex, connection=connection, address=address,
        host=host, port=port, tls=tls, auth=auth, database=database,
        flwr_home=str(workdir / "flwr-home"),
        data_path=str(Path(data_path).resolve()) if data_path else None,
        num_partitions=num_partitions or nodes, isolation=isolation, gpus=parse_gpus(gpus),
    )
    if tls:
        certs = make_certs(Path(certs_dir or workdir / "certs"), [*DEFAULT_SANS, *sans])
        dep.ca_cert, dep.server_cert, dep.server_key = (
            str(certs["ca_cert"].resolve()), str(certs["server_cert"].resolve()), str(certs["server_key"].resolve()))
    write_connection(Path(dep.flwr_home), address, Path(dep.ca_cert) if tls else None, connection)
    dep.save()
    try:
        t0 = time.monotonic()
        dep.start_superlink(timeout=timeout)
        _log(f"SuperLink up on {address} (pid {dep.proc('superlink').pid}) in {time.monotonic() - t0:.1f}s")
        if auth:
            kdir = Path(keys_dir or workdir / "keys").resolve()
            dep.keys_dir = str(kdir)
            pairs = make_keys(kdir, nodes)
            for i, pair in enumerate(pairs):
                node_id = dep.register(pair["public"], name=f"supernode-{i}")
                _log(f"registered {pair['public'].name} as node {node_id}")
            dep.save()
        for i in range(nodes):
            p = dep.start_supernode(i)
            _log(f"started {p.name} (pid {p.pid}, runtime port {p.port})")
        dep.wait_nodes_online(nodes, timeout=timeout)
        _log(f"{nodes} SuperNode(s) online after {time.monotonic() - t0:.1f}s")
    except BaseException:
        _log("start-up failed; stopping what was started")
        stop_pids(dep.processes, grace=5, marker=dep.marker)
        raise
    return dep


def down(workdir: Path, grace: float = 10.0) -> list[int]:
    dep = Deployment.load(Path(workdir))
    left = stop_pids(dep.processes, grace=grace, marker=dep.marker)
    for p in dep.processes:
        if p.port and port_in_use(p.port):
            _log(f"warning: port {p.port} of {p.name} still accepts connections")
    return left


def status(workdir: Path) -> dict[str, Any]:
    dep = Deployment.load(Path(workdir))
    procs = [
        {"name": p.name, "pid": p.pid, "alive": pid_alive(p.pid, p.start_ticks), "port": p.port, "log": p.log}
        for p in dep.processes
    ]
    out: dict[str, Any] = {"address": dep.address, "connection": dep.connection, "tls": dep.tls,
                           "auth": dep.auth, "database": dep.database, "flwr_home": dep.flwr_home,
                           "processes": procs, "children": [p for p in marked_pids(dep.marker)
                                                         if p not in {x.pid for x in dep.processes}]}
    sl = [p for p in dep.processes if p.name == "superlink"]
    if sl and pid_alive(sl[0].pid, sl[0].start_ticks):
        out["supernodes"] = dep.list_nodes()
    return out
