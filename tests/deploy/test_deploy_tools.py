"""Fast checks of the deployment tooling (no Flower processes): certificates, keys, the flwr CLI connection
file, JSON parsing of flwr output, and stopping process groups by PID."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from deploy_helpers import deploy_cli

from server_app import deploy


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(ext.get_values_for_type(x509.DNSName))


def test_certs_cli_makes_ca_and_server_cert_with_sans(tmp_path):
    out = tmp_path / "certs"
    deploy_cli("certs", "--out", str(out), "--san", "127.0.0.1", "--san", "localhost", "--san", "fl.example.org,::1")
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    assert _sans(srv) == {"127.0.0.1", "localhost", "fl.example.org", "::1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.SERVER_AUTH in srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    srv.verify_directly_issued_by(ca)  # raises if not signed by the CA
    for key in ("ca.key", "server.key"):
        assert (out / key).stat().st_mode & 0o077 == 0, f"{key} must be private (0600)"
    if shutil.which("openssl"):
        ok = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
                            capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr


def test_second_certificate_reuses_the_ca_and_nothing_is_overwritten(tmp_path):
    first = deploy.make_certs(tmp_path, ["superlink", "127.0.0.1"])
    ca_before = first["ca_cert"].read_bytes()
    srv_before = first["server_cert"].read_bytes()
    node = deploy.make_certs(tmp_path, ["supernode-1", "supernode-2"], name="supernode")
    assert first["ca_cert"].read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    x509.load_pem_x509_certificate(node["server_cert"].read_bytes()).verify_directly_issued_by(ca)
    assert deploy.make_certs(tmp_path, ["other"])["server_cert"].read_bytes() == srv_before  # kept without force
    srv = x509.load_pem_x509_certificate(deploy.make_certs(tmp_path, ["other"], force=True)["server_cert"].read_bytes())
    assert _sans(srv) == {"other"}


def test_keys_are_p384_openssh_pairs_that_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` uses

    deploy_cli("keys", "--out", str(tmp_path), "--nodes", "2", "--first", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supernode-1", "supernode-1.pub", "supernode-2",
                                                          "supernode-2.pub"]
    priv = serialization.load_ssh_private_key((tmp_path / "supernode-1").read_bytes(), None)  # as flower-supernode
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert (tmp_path / "supernode-1").stat().st_mode & 0o077 == 0
    assert try_load_public_key(tmp_path / "supernode-1.pub")
    if shutil.which("ssh-keygen"):  # same format as `ssh-keygen -t ecdsa -b 384`
        fp = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "supernode-2.pub")], capture_output=True,
                            text=True)
        assert fp.returncode == 0 and "384" in fp.stdout and "ECDSA" in fp.stdout


def test_connection_file_is_written_into_flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    deploy.write_connection(home, "127.0.0.1:9999", tmp_path / "ca.crt", "prod")
    deploy.write_connection(home, "127.0.0.1:9998", None, "dev", make_default=False)
    cfg = tomllib.loads((home / "config.toml").read_text())
    assert cfg["superlink"]["default"] == "prod"
    assert cfg["superlink"]["prod"] == {"address": "127.0.0.1:9999", "root-certificates": str(tmp_path / "ca.crt")}
    assert cfg["superlink"]["dev"] == {"address": "127.0.0.1:9998", "insecure": True}


def test_connect_cli_refuses_a_missing_ca(tmp_path):
    bad = deploy_cli("connect", "--name", "x", "--address", "h:1", "--root-certificates", str(tmp_path / "no.crt"),
                     "--flwr-home", str(tmp_path), check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_parse_json_output_ignores_log_lines():
    assert deploy.parse_json_output('INFO: hello\n{"run-id": 5, "success": true}\n') == {"run-id": 5,
                                                                                           "success": True}
    with pytest.raises(deploy.DeployError):
        deploy.parse_json_output("no json here")


def test_flower_env_is_set_for_every_process(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    env = deploy.base_env(tmp_path, "m1")
    assert env["FLWR_HOME"] == str(tmp_path) and env[deploy.MARKER_ENV] == "m1"
    for key in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        assert key in env
    assert env["RAY_DEDUP_LOGS"] == "0"  # client lines as written, not "[repeated 4x across cluster]"
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    assert deploy.base_env(tmp_path)["RAY_DEDUP_LOGS"] == "1"  # the caller's choice wins


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)           # ignores SIGTERM: needs SIGKILL
IGNORE = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", IGNORE])
grand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)  # leaves the group: found by the marker only
print(child.pid, grand.pid, flush=True)
time.sleep(600)
"""


def test_stop_pids_kills_the_group_and_marked_escapees(tmp_path):
    env = deploy.base_env(tmp_path / "h", "marker-stop-test")
    proc = deploy.start_process("stubborn", "test", [sys.executable, "-c", STUBBORN], tmp_path / "s.log", env, tmp_path)
    deadline = time.monotonic() + 30
    pids: list[str] = []
    while time.monotonic() < deadline and not pids:
        pids = re.findall(r"^(\d+) (\d+)$", (tmp_path / "s.log").read_text(), flags=re.M)
        time.sleep(0.1)
    child, grand = (int(x) for x in pids[0])
    assert set(deploy.marked_pids("marker-stop-test")) >= {proc.pid, child, grand}
    t0 = time.monotonic()
    left = deploy.stop_pids([proc], grace=1.0, marker="marker-stop-test")
    assert left == [] and time.monotonic() - t0 < 10
    for pid in (proc.pid, child, grand):
        assert not deploy.pid_alive(pid)


def test_stop_pids_never_signals_a_recycled_pid(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        fake = deploy.Proc("x", "test", sleeper.pid, start_ticks=1, cmd=[], log="")  # wrong start time
        assert deploy.stop_pids([fake], grace=0.5) == []
        assert sleeper.poll() is None, "a process that is not ours was signalled"
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


def test_up_refuses_auth_without_tls(tmp_path):
    out = deploy_cli("up", "--workdir", str(tmp_path), "--nodes", "1", "--insecure", "--auth", check=False)
    assert out.returncode == 2 and "needs TLS" in out.stderr


def test_free_port_is_bindable():
    port = deploy.free_port()
    assert 1024 < port < 65536 and not deploy.port_in_use(port)
    ipaddress.ip_address("127.0.0.1")


ORPHANING = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])   # stays in our group
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_pids_kills_group_members_after_their_leader_died(tmp_path):
    """A SIGKILLed SuperNode leaves its executor/ClientApp behind in its group: they are still found by PID."""
    env = deploy.base_env(tmp_path / "h")  # no marker: only the process-group path can find the child
    proc = deploy.start_process("leader", "test", [sys.executable, "-c", ORPHANING], tmp_path / "o.log", env, tmp_path)
    deadline = time.monotonic() + 30
    found: list[str] = []
    while time.monotonic() < deadline and not found:
        found = re.findall(r"^(\d+)$", (tmp_path / "o.log").read_text(), flags=re.M)
        time.sleep(0.1)
    child = int(found[0])
    os.kill(proc.pid, signal.SIGKILL)
    deploy.stop_pids([proc], grace=0.5)  # reaps the dead leader
    assert not deploy.pid_alive(child), "the orphaned group member survived"


def test_supernodes_are_pinned_to_their_gpus_round_robin(tmp_path):
    assert deploy.parse_gpus("0, 1") == [0, 1] and deploy.parse_gpus([2]) == [2]
    assert deploy.parse_gpus(None) is None and deploy.parse_gpus(" ") is None
    for bad in ("0,x", "-1", "0,,1"):
        with pytest.raises(deploy.DeployError, match="GPU indices"):
            deploy.parse_gpus(bad)
    dep = deploy.Deployment(workdir=str(tmp_path), marker="m", connection="c", address="127.0.0.1:1",
                            host="127.0.0.1", port=1, tls=False, auth=False, database=None,
                            flwr_home=str(tmp_path / "h"), gpus=[0, 1])
    assert [dep.node_env(i, tmp_path)["CUDA_VISIBLE_DEVICES"] for i in range(5)] == ["0", "1", "0", "1", "0"]
    dep.save()
    assert deploy.Deployment.load(tmp_path).gpus == [0, 1]  # `run`/`down` see the same pinning
    unpinned = deploy.Deployment.load(tmp_path)
    unpinned.gpus = None
    env = unpinned.node_env(0, tmp_path)
    assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
