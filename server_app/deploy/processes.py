"""Starting and stopping local processes: each in its own process group, found again by PID + start time
or by a marker in its environment; checks of local TCP ports."""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server_app.deploy.common import DeployError

MARKER_ENV = "FEDTIME_DEPLOY_MARKER"


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


# --------------------------------------------------------------------------- ports


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
