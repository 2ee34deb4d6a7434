"""Peak memory of a group of processes (all that carry a marker in their environment), sampled in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from server_app.deploy.processes import marked_pids


def _mem_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from /proc/<pid>/smaps_rollup (0, 0 if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    vals = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
            vals[parts[0]] = int(parts[1])
    return vals.get("Rss:", 0), vals.get("Pss:", 0)


class PeakMemory:
    def __init__(self, marker: str, interval: float = 0.5, include_self: bool = False) -> None:
        self.marker, self.interval, self.include_self = marker, interval, include_self
        self.peak_rss_mib = self.peak_pss_mib = 0.0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import os

        while not self._stop.is_set():
            pids = marked_pids(self.marker) + ([os.getpid()] if self.include_self else [])
            rss = pss = 0
            for pid in pids:
                r, p = _mem_kib(pid)
                rss, pss = rss + r, pss + p
            self.peak_rss_mib = max(self.peak_rss_mib, rss / 1024)
            self.peak_pss_mib = max(self.peak_pss_mib, pss / 1024)
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
