"""`bench/privacy.py`: the utility-against-ε table rebuilt from hand-written stored cells without training (ε is
the last round's, seeds of one level pooled as mean ± std, a baseline run elsewhere reported as z = 0), and the
keys it owns refused in --run-config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedtime.config import RunConfig
from fedtime.results import finish_results, new_results, write_results

ROOT = Path(__file__).resolve().parents[2]


def _store(where: Path, name: str, wf1: float, *, z: float = 0.0, seed: int = 0, eps: list | None = None) -> Path:
    rc = RunConfig.from_run_config({"seed": seed, **({"dp-noise-multiplier": z} if z else {})}).to_run_config()
    res = new_results("federated", name, rc)
    res["history"] = [{"round": r + 1} for r in range(len(eps or [0] * 10))]
    res["best"] = {"round": 3, "val_weighted_f1": wf1 + 0.01}
    if z:
        res["privacy"] = {"clip": rc["dp-clip"], "noise_multiplier": z, "epsilon": eps, "stopped": None}
    finish_results(res, status="completed", test={"weighted_f1": wf1, "macro_f1": wf1 - 0.01, "accuracy": wf1},
                   wall_time_s=100.0)
    (where / name).mkdir(parents=True)
    write_results(where / name / "results.json", res)
    return where / name


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/privacy.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_report_only_tabulates_stored_cells_and_a_baseline(tmp_path):
    work = tmp_path / "cells"
    _store(work, "dp-z1-c4-s0", 0.40, z=1.0, seed=0, eps=[9.9, 15.0, 19.3])
    _store(work, "dp-z1-c4-s1", 0.50, z=1.0, seed=1, eps=[9.9, 15.0, 19.3])
    _store(work, "dp-z3-c4-s0", 0.20, z=3.0, seed=0, eps=[2.3, 3.5])
    base = _store(tmp_path / "elsewhere", "default-federated-split42", 0.88)
    run = _bench("--report-only", "--workdir", str(work), "--baseline", str(base))
    assert run.returncode == 0, run.stderr
    rows = [ln for ln in run.stdout.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["0 (no DP)", "1", "3"]
    z1 = [c.strip() for c in rows[1].strip("|").split("|")]
    assert z1[2] == "19.3" and z1[3] == "0.450 ± 0.071" and z1[6] == "0,1" and z1[7] == "3/3"
    assert rows[0].split("|")[4].strip() == "0.880"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert [lv["z"] for lv in out["levels"]] == [0.0, 1.0, 3.0]
    assert out["levels"][2]["epsilon"] == 3.5
    assert out["figure"] == str(work / "utility.png") and (work / "utility.png").stat().st_size > 1000


def test_keys_the_bench_sets_itself_are_refused_in_run_config(tmp_path):
    run = _bench("--report-only", "--workdir", str(tmp_path), "--run-config", "dp-noise-multiplier=2.0")
    assert run.returncode != 0 and "--noise" in run.stderr
    run = _bench("--report-only", "--workdir", str(tmp_path), "--baseline", str(tmp_path / "nothing"))
    assert run.returncode != 0 and "not a finished run" in run.stderr
