"""Real SuperLink/SuperNode processes on loopback (no training, so no app is needed): TLS and SuperNode
authentication refuse what they must, and registrations survive a SuperLink restart with --database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from deploy_helpers import deploy_cli, needs_flower

from server_app import deploy

pytestmark = [needs_flower, pytest.mark.slow]  # real SuperLink / SuperNode processes


def wait_exit(proc: deploy.Proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not deploy.pid_alive(proc.pid, proc.start_ticks):
            return True
        time.sleep(0.25)
    return False


def node_ids(dep: deploy.Deployment, status: str = "online") -> set[str]:
    return {str(n["node-id"]) for n in dep.list_nodes() if n.get("status") == status}


def test_unregistered_node_and_nodes_without_the_right_ca_are_refused(federation, tmp_path):
    dep = federation("--auth", nodes=1)
    assert dep.tls and dep.auth
    online = node_ids(dep)
    assert len(online) == 1

    rogue_key = deploy.make_keys(tmp_path / "rogue", 1, prefix="rogue-")[0]["private"]
    registered_key = Path(dep.keys_dir) / "supernode-0"
    other_ca = deploy.make_certs(tmp_path / "other-ca", ["127.0.0.1"])["ca_cert"]
    cases = {
        # name: (key, root certificates, what its log must say)
        "unregistered": (rogue_key, True, "Failed to activate SuperNode"),
        "no-ca": (registered_key, False, "CERTIFICATE_VERIFY_FAILED"),
        "wrong-ca": (registered_key, other_ca, "CERTIFICATE_VERIFY_FAILED"),
        # plain HTTP against the TLS port (no key: Flower refuses a key without TLS locally, exit 303)
        "plain-http": (None, None, "Exit Code"),
    }
    procs = {name: dep.start_supernode(5 + i, name=name, private_key=key, root_certificates=ca, record=False,
                                       extra_args=["--insecure", "--max-retries", "3"] if name == "plain-http" else [])
             for i, (name, (key, ca, _)) in enumerate(cases.items())}
    try:
        for name, proc in procs.items():
            assert wait_exit(proc, 60), f"{name} SuperNode kept running: it was not refused"
            log = Path(proc.log).read_text(errors="replace")
            assert cases[name][2] in log, f"{name}: expected {cases[name][2]!r} in\n{log[-2000:]}"
            if name != "plain-http":
                assert "Exit Code: 305" in log, log[-2000:]  # "could not connect to the SuperLink"
        assert node_ids(dep) == online, "a refused node shows up in the federation"
    finally:
        assert deploy.stop_pids(procs.values(), grace=5) == []


def test_superlink_restart_keeps_registrations_and_nodes_rejoin(federation):
    dep = federation("--auth", "--database", "state/superlink.db", nodes=2)
    before = node_ids(dep)
    assert len(before) == 2 and Path(dep.database).exists()

    old = dep.proc("superlink")
    assert deploy.stop_pids([old], grace=10, marker=None) == []
    assert not deploy.port_in_use(dep.port)
    assert all(deploy.pid_alive(p.pid, p.start_ticks) for p in dep.supernodes()), "SuperNodes must keep retrying"

    t0 = time.monotonic()
    dep.start_superlink()  # same port, same --database, same certificates
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and node_ids(dep) != before:
        time.sleep(1)
    rejoin_s = time.monotonic() - t0
    assert node_ids(dep) == before, f"after restart online={node_ids(dep)}, before={before}"
    print(f"SuperNodes rejoined the restarted SuperLink in {rejoin_s:.1f}s with the same node ids")
    # registrations come from the database: nothing was registered again
    listed = {str(n["node-id"]) for n in dep.list_nodes()}
    assert listed == before


@pytest.mark.parametrize("isolation", ["process"])
def test_process_isolation_mirrors_the_compose_topology(federation, isolation):
    """SuperLink + ServerApp executor + SuperNodes (TLS on their Runtime API) + one ClientApp executor each."""
    dep = federation("--auth", "--isolation", isolation, nodes=2)
    names = {p.name for p in dep.processes}
    assert {"superlink", "superexec-serverapp", "supernode-0", "superexec-supernode-0", "supernode-1",
            "superexec-supernode-1"} <= names
    assert all(deploy.pid_alive(p.pid, p.start_ticks) for p in dep.processes)
    node = deploy.Deployment.load(Path(dep.workdir)).proc("supernode-0")
    assert "--ssl-certfile" in node.cmd
    assert len(node_ids(dep)) == 2


def test_up_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = deploy_cli("up", "--workdir", str(tmp_path / "fed"), "--nodes", "1", "--port",
                         str(busy.getsockname()[1]), check=False)
    assert out.returncode == 2 and "already in use" in out.stderr, out.stderr


def test_failed_up_stops_what_it_started(tmp_path):
    """A certificate without the dialled address: the SuperLink starts, the SuperNodes are refused, `up` fails
    with their log in the message and stops the SuperLink and everything else it started."""
    certs = tmp_path / "bad-certs"
    deploy.make_certs(certs, ["fl.example.org"])  # no 127.0.0.1 / localhost SAN
    out = deploy_cli("up", "--workdir", str(tmp_path / "fed"), "--nodes", "2", "--certs", str(certs),
                     "--timeout", "60", check=False)
    assert out.returncode == 2, out.stderr
    assert "exited during start-up" in out.stderr and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out.stderr[-3000:]
    dep = deploy.Deployment.load(tmp_path / "fed")
    assert {p.name for p in dep.processes} >= {"superlink", "supernode-0"}
    assert deploy.marked_pids(dep.marker) == []
    assert not any(deploy.pid_alive(p.pid, p.start_ticks) for p in dep.processes)
