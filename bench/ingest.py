#!/usr/bin/env python
"""Benchmark MEx ingestion: cold cache build, warm load, peak memory.

    python bench/ingest.py [--data-path PATH] [--settings paper,compact] [--workers 2]

For each setting, in fresh processes and a fresh temporary cache folder:
  * cold: ``load_cache`` from the raw archive (hash, parse, align, window, write), then the train-split
    normalisation stats are fitted and saved;
  * warm: a new process opens the cache (``load_cache``), the saved stats and one client's subject
    (``load_subject_dataset``), i.e. what a Flower client does.
Peak RSS: ``resource.getrusage`` of the building process (self) and of its reaped children, the
workers' own ``getrusage`` peak, and the peak *sum* over the whole process tree sampled every 50 ms
from /proc (the figure compared with the 3 GiB target).
Prints a table, then as the last line one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {
    "paper": {"acc_hz": 100.0, "frame_hz": 15.0, "window_s": 5.0, "step_s": 1.0},
    "compact": {"acc_hz": 20.0, "frame_hz": 5.0, "window_s": 5.0, "step_s": 1.0},
}
TARGETS = {"cold_s": 60.0, "warm_s": 2.0, "peak_rss_gib": 3.0}


def _default_data_path() -> str | None:
    env = os.environ.get("FEDTIME_DATA_PATH", "").strip()
    if env:
        return env
    p = (REPO / ".." / "shared" / "data" / "mex" / "MEx.zip").resolve()
    return str(p) if p.exists() else None


class TreeRSS:
    """Peak of the summed RSS of this process and all its descendants, sampled from /proc."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree_rss(root: int) -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/statm") as f:
                    rss[int(d)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        tree, frontier = {root}, [root]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parents.items() if pp == p and c not in tree]
            tree.update(kids)
            frontier.extend(kids)
        return sum(rss.get(p, 0) for p in tree)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._tree_rss(os.getpid()))
            except OSError:
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        if os.path.isdir("/proc"):
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._t.is_alive():
            self._t.join()
            self.peak = max(self.peak, self._tree_rss(os.getpid()))


def _mib(kib: float) -> float:
    return round(kib / 1024.0, 1)


def _dir_mib(p: Path) -> float:
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 1)


def run_cold(args) -> dict:
    from data_partition import PreprocessConfig, load_cache, load_split_stats, paper_split

    cfg = PreprocessConfig(**SETTINGS[args.setting])
    with TreeRSS() as tree:
        t = time.perf_counter()
        wc = load_cache(args.data_path, cfg, args.cache_dir, workers=args.workers, progress=True)
        cold = time.perf_counter() - t
        ru_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tree_build = tree.peak
        t = time.perf_counter()
        load_split_stats(args.data_path, cfg, paper_split().train, cache_dir=args.cache_dir, progress=False)
        fit = time.perf_counter() - t
    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "windows": len(wc),
        "recordings": len(wc.meta["recordings"]),
        "cold_s": round(cold, 2),
        "stats_fit_s": round(fit, 2),
        "workers": wc.meta["build_workers"],
        "rss_self_mib": _mib(ru_self),
        "rss_self_build_mib": _mib(ru_build),
        "rss_tree_build_mib": round(tree_build / 2**20, 1),
        "rss_children_max_mib": _mib(ru_children),
        "rss_worker_peak_mib": wc.meta["build_worker_peak_rss_mb"],
        "rss_tree_peak_mib": round(tree.peak / 2**20, 1),
        "cache_mib": _dir_mib(wc.path),
        "shapes": wc.meta["shapes"],
    }


def run_warm(args) -> dict:
    t_proc = time.perf_counter()
    from data_partition import PreprocessConfig, load_cache, load_split_stats, load_subject_dataset, paper_split

    import_s = time.perf_counter() - t_proc
    t = time.perf_counter()
    import torch  # noqa: F401  (any client process has it loaded already; timed apart)

    torch_s = time.perf_counter() - t
    cfg = PreprocessConfig(**SETTINGS[args.setting])
    split = paper_split()
    t = time.perf_counter()
    load_cache(args.data_path, cfg, args.cache_dir, progress=False)
    warm_load = time.perf_counter() - t
    t = time.perf_counter()
    stats = load_split_stats(args.data_path, cfg, split.train, cache_dir=args.cache_dir, progress=False)
    ds = load_subject_dataset(args.data_path, cfg, split.partition_subject(0), stats, augment_sigma=0.01,
                              cache_dir=args.cache_dir, progress=False)
    ds[0]
    subject_s = time.perf_counter() - t
    return {
        "warm_load_s": round(warm_load, 3),
        "warm_stats_subject_s": round(subject_s, 3),
        "warm_total_s": round(warm_load + subject_s, 3),
        "warm_import_s": round(import_s, 3),
        "warm_torch_import_s": round(torch_s, 3),
        "warm_subject_windows": len(ds),
        "warm_rss_self_mib": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
    }


def _child(mode: str, setting: str, data_path: str | None, cache_dir: str, workers: int) -> dict:
    cmd = [sys.executable, __file__, f"--_{mode}", "--setting", setting, "--cache-dir", cache_dir,
           "--workers", str(workers)]
    if data_path:
        cmd += ["--data-path", data_path]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-path", default=None, help="MEx zip or folder (default: $FEDTIME_DATA_PATH, "
                    "../shared/data/mex/MEx.zip, else the cached/downloaded copy)")
    ap.add_argument("--settings", default="paper,compact", help="comma list of: " + ", ".join(SETTINGS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache folders")
    ap.add_argument("--_cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="paper", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._cold or args._warm:
        print(json.dumps(run_cold(args) if args._cold else run_warm(args)))
        return

    data_path = args.data_path or _default_data_path()
    rows = []
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        if name not in SETTINGS:
            ap.error(f"unknown setting {name!r}")
        tmp = tempfile.mkdtemp(prefix=f"fedtime-bench-{name}-")
        try:
            print(f"[{name}] cold build into fresh {tmp} ...", file=sys.stderr, flush=True)
            row = {"setting": name, **SETTINGS[name]}
            row.update(_child("cold", name, data_path, tmp, args.workers))
            row.update(_child("warm", name, data_path, tmp, args.workers))
            rows.append(row)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)

    hdr = ("setting", "acc/frame Hz", "windows", "cold s", "stats s", "warm load s", "warm+subject s",
           "peak RSS tree MiB", "self/worker MiB", "cache MiB")
    lines = [hdr]
    for r in rows:
        lines.append((r["setting"], f"{r['acc_hz']:g}/{r['frame_hz']:g}", str(r["windows"]), f"{r['cold_s']:.1f}",
                      f"{r['stats_fit_s']:.1f}", f"{r['warm_load_s']:.3f}", f"{r['warm_total_s']:.3f}",
                      f"{r['rss_tree_peak_mib']:.0f}", f"{r['rss_self_mib']:.0f}/{r['rss_worker_peak_mib'] or 0:.0f}",
                      f"{r['cache_mib']:.0f}"))
    widths = [max(len(x[i]) for x in lines) for i in range(len(hdr))]
    for k, ln in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(ln, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    ok = all(
        r["cold_s"] <= TARGETS["cold_s"]
        and r["warm_total_s"] <= TARGETS["warm_s"]
        and r["rss_tree_peak_mib"] / 1024 <= TARGETS["peak_rss_gib"]
        for r in rows
    )
    print(f"targets: cold <= {TARGETS['cold_s']:g} s, warm <= {TARGETS['warm_s']:g} s, "
          f"peak RSS <= {TARGETS['peak_rss_gib']:g} GiB -> {'PASS' if ok else 'FAIL'}")
    summary = {
        "data_path": data_path,
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "targets": TARGETS,
        "pass": ok,
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
