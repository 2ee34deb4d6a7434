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
import datetime as _dt
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "deploy-state.json"
DEFAULT_CONNECTION = "fedtime"
MARKER_ENV = "FEDTIME_DEPLOY_MARKER"
DEFAULT_SANS = ("127.0.0.1", "localhost", "::1")
# Exported to every Flower process and CLI call we start.
FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
REPO_ROOT = Path(__file__).resolve().parents[1]
FINISHED_OK = "finished:completed"


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


# --------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"[deploy] {msg}", file=sys.stderr, flush=True)


def flwr_bin(name: str) -> str:
    """Path of a Flower executable, preferring the interpreter's own venv."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"`{name}` not found next to {sys.executable} nor on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now on ``host`` (the kernel picks it)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def base_env(flwr_home: Path | None = None, marker: str | None = None) -> dict[str, str]:
    """Environment for Flower processes and CLI calls."""
    env = dict(os.environ)
    env.update(FLWR_ENV)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    # The app is shipped as a FAB; keep the repository importable for the
    # launcher processes all the same (they run from their own workdirs).
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if marker is not None:
        env[MARKER_ENV] = marker
    return env


# --------------------------------------------------------------------------- certs


def make_certs(
    out: Path,
    sans: Sequence[str] = DEFAULT_SANS,
    days: int = 365,
    force: bool = False,
    name: str = "server",
    common_name: str | None = None,
) -> dict[str, Path]:
    """A CA (``ca.crt``/``ca.key``) and a server certificate ``<name>.pem``/``<name>.key`` it signs.

    ``sans`` are the IP addresses / DNS names clients dial (SuperLink address; in
    Docker also the SuperNodes' Runtime API names). An existing CA in ``out`` is
    reused, so several server certificates (``--name superlink``, ``--name
    supernode``) share one CA; existing files are kept unless ``force``. Uses the
    ``cryptography`` package (a Flower dependency), so it also runs inside the
    Flower images, which have no ``openssl`` binary.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "server_cert": out / f"{name}.pem",
        "server_key": out / f"{name}.key",
    }
    if not force and all(p.exists() for p in paths.values()):
        _log(f"certificates exist in {out}; keeping them (use --force to replace)")
        return paths
    if not sans:
        raise DeployError("at least one --san is needed")

    def _write(path: Path, data: bytes, private: bool) -> None:
        path.write_bytes(data)
        os.chmod(path, 0o600 if private else 0o644)

    pem = serialization.Encoding.PEM
    nokey = serialization.NoEncryption()
    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedTime-MAGNET CA")])

    if not force and paths["ca_cert"].exists() and paths["ca_key"].exists():
        ca_key = serialization.load_pem_private_key(paths["ca_key"].read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
        ca_name = ca_cert.subject
        _log(f"reusing the CA in {out}")
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(paths["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nokey), True)
        _write(paths["ca_cert"], ca_cert.public_bytes(pem), False)

    alt: list[x509.GeneralName] = []
    for san in dict.fromkeys(sans):  # de-duplicate, keep order
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            alt.append(x509.DNSName(san))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"fedtime-{name}")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(min(until, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths["server_key"], srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nokey), True)
    _write(paths["server_cert"], srv_cert.public_bytes(pem), False)
    _log(f"wrote {paths['server_cert'].name} (SANs: {', '.join(dict.fromkeys(sans))}) signed by {paths['ca_cert']}")
    return paths


def split_sans(values: Iterable[str]) -> list[str]:
    """``["a,b", "c"]`` → ``["a", "b", "c"]`` (empty entries dropped)."""
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def chown_tree(paths: Iterable[Path], owner: str) -> None:
    """``chown UID[:GID]`` (needs root): Flower's images run as uid 49999 and must read the keys."""
    uid_s, _, gid_s = owner.partition(":")
    uid, gid = int(uid_s), int(gid_s or uid_s)
    for path in paths:
        os.chown(path, uid, gid)


# --------------------------------------------------------------------------- keys


def make_keys(
    out: Path, nodes: int, prefix: str = "supernode-", force: bool = False, first: int = 0
) -> list[dict[str, Path]]:
    """ECDSA P-384 key pairs in OpenSSH format: ``<prefix>i`` and ``<prefix>i.pub``, i = first..first+nodes-1.

    Same format as ``ssh-keygen -t ecdsa -b 384 -N "" -f keys/supernode-i``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(first, first + nodes):
        priv, pub = out / f"{prefix}{i}", out / f"{prefix}{i}.pub"
        if force or not (priv.exists() and pub.exists()):
            key = ec.generate_private_key(ec.SECP384R1())
            priv.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                )
            )
            os.chmod(priv, 0o600)
            pub.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                )
                + f" {prefix}{i}\n".encode()
            )
        pairs.append({"private": priv, "public": pub})
    _log(f"{nodes} SuperNode key pair(s) in {out}")
    return pairs


# --------------------------------------------------------------------------- flwr CLI


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


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """One started process (the leader of its own process group)."""

    name: str
    role: str
    pid: int
    start_ticks: int
    cmd: list[str]
    log: str
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_POPENS: dict[int, subprocess.Popen] = {}


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of ``pid`` from /proc, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0], int(rest[2]), int(rest[19])


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, started at ``start_ticks``."""
    popen = _POPENS.get(pid)
    if popen is not None and popen.poll() is not None:
        return False
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start_ticks is None or st[2] == start_ticks


def marked_pids(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def start_process(
    name: str,
    role: str,
    cmd: list[str],
    log_path: Path,
    env: dict[str, str],
    cwd: Path,
    port: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Proc:
    """Start ``cmd`` in its own session/process group, output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        logf.write(f"\n### {_dt.datetime.now().isoformat()} $ {shlex.join(cmd)}\n".encode())
        logf.flush()
        popen = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )
    _POPENS[popen.pid] = popen
    st = _stat(popen.pid)
    return Proc(
        name=name, role=role, pid=popen.pid, start_ticks=st[2] if st else -1,
        cmd=cmd, log=str(log_path), port=port, extra=extra or {},
    )


def group_members(pgid: int, leader_start_ticks: int) -> list[int]:
    """Live processes of the process group we started as ``pgid`` (its leader started at ``leader_start_ticks``).

    Also works after the leader died: its SuperExec/ClientApp children keep the group id, and Linux does not
    reuse a number as a PID while a group of that id exists. If a *different* process now runs as ``pgid``
    (start time differs) the group is not ours and nothing is returned.
    """
    leader = _stat(pgid)
    if leader is not None and leader[2] != leader_start_ticks and leader[0] not in ("Z", "X"):
        return []  # the PID was recycled: a stranger's group
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st and st[1] == pgid and st[2] >= leader_start_ticks and st[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def stop_pids(procs: Iterable[Proc], grace: float = 10.0, marker: str | None = None) -> list[int]:
    """SIGTERM every recorded process group, wait ``grace`` s, SIGKILL what is left.

    A group is each recorded leader plus every process still carrying its group id that started after it
    (so children survive neither their leader's death nor a recycled PID hits a stranger). With ``marker``
    every live process carrying it in its environment is included too (children that left the group, such
    as the SuperLink's executor). Returns the PIDs still alive at the end (should be []).
    """
    procs = list(procs)
    me = os.getpid()

    def _targets() -> list[int]:
        pids: set[int] = set()
        for p in procs:
            pids.update(group_members(p.pid, p.start_ticks))
        if marker:
            pids.update(marked_pids(marker))
        pids.discard(me)
        return sorted(pids)

    def _signal(sig: int) -> None:
        for pid in _targets():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _reap() -> None:
        for p in procs:
            popen = _POPENS.get(p.pid)
            if popen is not None and popen.poll() is not None:
                _POPENS.pop(p.pid, None)

    _signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _targets() and time.monotonic() < deadline:
        _reap()
        time.sleep(0.2)
    if _targets():
        _signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _targets() and time.monotonic() < deadline:
            _reap()
            time.sleep(0.1)
    _reap()
    return _targets()


def wait_port(port: int, host: str, timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not pid_alive(proc.pid):
            raise DeployError(f"{proc.name} exited during start-up; see {proc.log}:\n{_tail(proc.log)}")
        if port_in_use(port, host):
            return
        time.sleep(0.25)
    raise DeployError(f"port {host}:{port} not open after {timeout:.0f}s" + (f"; see {proc.log}" if proc else ""))


def _tail(path: str | Path, n: int = 2500) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


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


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m server_app.deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("certs", help="create a CA and a server certificate")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--san", action="append", default=[], help="IP or DNS name (repeat, or comma-separated)")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--name", default="server", help="server certificate file stem (<name>.pem, <name>.key)")
    c.add_argument("--force", action="store_true", help="replace an existing CA and certificate")
    c.add_argument("--owner", help="chown the files to UID[:GID] (e.g. 49999 for Flower's images; root only)")

    k = sub.add_parser("keys", help="create SuperNode authentication key pairs")
    k.add_argument("--out", required=True, type=Path)
    k.add_argument("--nodes", type=int, required=True)
    k.add_argument("--prefix", default="supernode-")
    k.add_argument("--first", type=int, default=0, help="index of the first key (Docker services count from 1)")
    k.add_argument("--force", action="store_true")
    k.add_argument("--owner", help="chown the files to UID[:GID] (root only)")

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
        if args.cmd == "certs":
            paths = make_certs(args.out, split_sans(args.san) or list(DEFAULT_SANS), days=args.days, force=args.force,
                               name=args.name)
            if args.owner:
                chown_tree([Path(args.out), *paths.values()], args.owner)
            print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        elif args.cmd == "keys":
            pairs = make_keys(args.out, args.nodes, prefix=args.prefix, force=args.force, first=args.first)
            if args.owner:
                chown_tree([Path(args.out), *(p for pair in pairs for p in pair.values())], args.owner)
            print(json.dumps([{k: str(v) for k, v in p.items()} for p in pairs], indent=2))
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
