"""`bench/paper_tables.py`: the paper's Tables 1 and 2 beside ours. Fast: the report rebuilt from hand-written stored
cells without training (missing cells "—", mean ± std over seeds, failures marked, cells of other settings left
out), row names, settings comparison, commands. Slow: a two-cell grid on the real data (tiny preset) interrupted
after its first cell and run again, and the t-SNE of fused embeddings from a stored checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedtime.config import RunConfig
from fedtime.results import finish_results, new_results, read_results, write_results

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_paper_tables", ROOT / "bench" / "paper_tables.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up there
_spec.loader.exec_module(bench)


def _store(work: Path, row: str, mode: str, split: int, wf1: float, mf1: float, *, preset: str = "compact",
           config: dict | None = None, wall: float = 120.0) -> Path:
    """A minimal finished cell as the runner stores it (`fedtime.results` schema, version 2)."""
    r = bench.ROWS[row]
    name = bench.Cell(r, mode, split, preset).name
    rc = RunConfig.from_run_config(config or bench.cell_run_config(r, mode, split, preset)).to_run_config()
    extra = {"train_config": {"epochs": 25}, "args": {"epochs": 25, "max_batches": None}} \
        if mode == "centralized" else {}
    res = new_results(mode, name, rc, **extra)
    finish_results(res, status="completed", test={"weighted_f1": wf1, "macro_f1": mf1, "accuracy": wf1},
                   wall_time_s=wall)
    (work / name).mkdir(parents=True)
    write_results(work / name / "results.json", res)
    return work / name


def _row(report: str, name: str) -> list[str]:
    line = next(ln for ln in report.splitlines() if ln.startswith("|") and f"(`{name}`)" in ln)
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_only_rebuilds_the_tables_from_stored_cells_without_training(tmp_path, capsys):
    work, report = tmp_path / "cells", tmp_path / "docs" / "results.md"
    for split, (w, m) in {42: (0.90, 0.89), 1: (0.92, 0.91), 2: (0.94, 0.93)}.items():
        _store(work, "magnet", "centralized", split, w, m)
    _store(work, "magnet", "federated", 42, 0.85, 0.84, wall=300)
    _store(work, "concat", "federated", 42, 0.80, 0.79)
    _store(work, "magnet-act-pm-dc", "centralized", 42, 0.91, 0.90)
    # stored with other settings than the cell asks for (another fusion): not shown as that cell
    _store(work, "attention", "centralized", 42, 0.50, 0.50,
           config=bench.cell_run_config(bench.ROWS["concat"], "centralized", 42, "compact"))
    (work / "failures.json").write_text(json.dumps({"lstm-federated-compact-split42": {"error": "boom"}}))
    before = sorted(p.name for p in work.iterdir())

    assert bench.main(["--report-only", "--workdir", str(work), "--report-to", str(report), "--adopt-from", "",
                       "--no-tsne"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trained"] == 0
    assert sorted(p.name for p in work.iterdir()) == before  # nothing trained, nothing added but failures.json
    text = report.read_text()
    assert text.splitlines()[2].startswith("What this page is for:")
    assert "## Table 1" in text and "## Table 2" in text and text.count("Where we differ from the paper and why:") == 2

    magnet = _row(text, "magnet")  # row | paper c | ours c wF1 | c mF1 | n | paper f | ours f wF1 | f mF1 | n | wall
    assert magnet[1] == "0.934" and magnet[5] == "0.881"
    assert magnet[2] == "0.920 ± 0.020" and magnet[3] == "0.910 ± 0.020" and magnet[4] == "3"
    assert magnet[6] == "0.850" and magnet[8] == "1" and magnet[9] == "2.0 / 5.0"
    concat = _row(text, "concat")
    assert concat[2] == "—" and concat[6] == "0.800" and concat[1] == "0.876"
    assert _row(text, "attention")[2] == "— (1 failed)"  # the mismatched cell is not read as attention
    assert _row(text, "lstm")[6].startswith("—") and "failed" in _row(text, "lstm")[6]
    assert _row(text, "dart")[2] == "—" and _row(text, "dart")[6] == "—"
    assert _row(text, "magnet-act-pm-dc")[2] == "0.910" and _row(text, "magnet-act-acw-pm")[2] == "—"
    # the cell list: the command that reproduces each cell
    assert "`python -m model.train --run-config split-seed=1`" in text
    assert """`python -m server_app.simulation --nodes 21 --run-config 'fusion="concat"'`""" in text
    assert "not measured: no GPU was available" in text.split("## GPU")[1]
    assert (report.parent / "figures" / "paper_tables.png").exists()


def test_rows_and_seed_plan():
    assert bench.resolve_row("magnet-dc-pm-act").name == "magnet-act-pm-dc"
    assert [r.name for r in bench.parse_rows("table2", literal=False)] == [
        "magnet-act-acw-pm", "magnet-act-acw-dc", "magnet-act-pm-dc", "magnet-acw-pm-dc"]
    assert bench.parse_rows("magnet", literal=True)[-1].literal
    with pytest.raises(SystemExit):
        bench.resolve_row("transformer")
    lit = bench.cell_run_config(bench.ROWS["magnet-paper-literal"], "centralized", 42, "compact")
    assert (lit["model-preset"], lit["lr"], lit["normalization"], lit["micro-batch"]) == \
        ("compact", 1e-4, "per_window", 8)
    cmd = bench.reproduce_command(bench.Cell(bench.ROWS["magnet-paper-literal"], "centralized", 42, "compact"),
                                  lit, {"epochs": 25, "max_batches": None})
    assert cmd == """python -m model.train --run-config conf/paper.toml --run-config 'model-preset="compact"'"""


def test_settings_comparison_completes_old_configs_with_defaults():
    cell = bench.Cell(bench.ROWS["magnet"], "federated", 1, "compact")
    wanted = bench.cell_run_config(cell.row, cell.mode, 1, "compact")
    stored = RunConfig.from_run_config(wanted).to_run_config()
    for key in ("labeled-fraction", "personal-eval-fraction"):  # keys an older version did not write
        del stored[key]
    stored.update({"proximal-mu": 0.01, "output-dir": "/elsewhere", "run-name": "x"})  # old / irrelevant keys
    res = {"mode": "federated", "config": stored}
    assert bench.settings_differ(res, cell, wanted, {"epochs": 25, "max_batches": None}) == {}
    assert bench.settings_differ({**res, "config": {**stored, "micro-batch": 8}}, cell, wanted,
                                 {"epochs": 25, "max_batches": None}) == {"micro-batch": [8, 0]}
    assert "mode" in bench.settings_differ({**res, "mode": "centralized"}, cell, wanted,
                                           {"epochs": 25, "max_batches": None})
    # DP off in both: its other keys change nothing (cells stored before dp-clip's default moved still count)
    assert bench.settings_differ({**res, "config": {**stored, "dp-clip": 1.0}}, cell, wanted,
                                 {"epochs": 25, "max_batches": None}) == {}
    assert bench.settings_differ({**res, "config": {**stored, "dp-noise-multiplier": 1.0}}, cell, wanted,
                                 {"epochs": 25, "max_batches": None}) == {"dp-noise-multiplier": [1.0, 0.0]}


@pytest.mark.slow  # the real data: two short centralized trainings (tiny preset) and a t-SNE
def test_grid_resumes_after_an_interruption_and_draws_the_fused_embeddings(mex_path, tmp_path):
    work, report = tmp_path / "cells", tmp_path / "results.md"
    cmd = [sys.executable, "bench/paper_tables.py", "--rows", "magnet,concat", "--modes", "centralized",
           "--split-seeds", "42", "--preset", "tiny", "--epochs", "1", "--max-batches", "15",
           "--run-config", "batch-size=16 grad-accum=1 tensorboard=false", "--workdir", str(work),
           "--report-to", str(report), "--adopt-from", "", "--data-path", str(mex_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*extra: str) -> str:
        p = subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    first_cell, second_cell = "magnet-centralized-tiny-split42", "concat-centralized-tiny-split42"
    out1 = run("--max-cells", "1", "--no-tsne")  # stopped after its first cell
    assert (work / first_cell / "results.json").exists() and not (work / second_cell).exists()
    assert re.search(rf"{first_cell}: training centralized", out1) and "--max-cells 1 reached" in out1
    mtime = (work / first_cell / "results.json").stat().st_mtime_ns
    (work / second_cell).mkdir()  # and an attempt at the second one that was killed before it finished
    (work / second_cell / "learning_curves.png").write_bytes(b"partial")

    out2 = run("--no-tsne")
    assert re.search(rf"{first_cell}: reused, finished", out2)
    assert (work / first_cell / "results.json").stat().st_mtime_ns == mtime  # not recomputed
    assert "an earlier attempt was interrupted" in out2
    summary = json.loads(out2.strip().splitlines()[-1])
    assert summary["trained"] == 1 and summary["failures"] == []
    text = report.read_text()
    for name in (first_cell, second_cell):
        wf1 = read_results(work / name)["test"]["weighted_f1"]
        assert f"| `{name}` | {wf1:.3f} |" in text
    assert _row(text, "magnet")[2] != "—" and _row(text, "concat")[2] != "—"

    # the t-SNE: a federated-style copy of the magnet cell (trainable state only in its checkpoint, as the
    # ServerApp writes it) is the best federated MAGNET cell; --report-only draws it without training
    import torch

    from fedtime import task
    from model.state import model_from_checkpoint, read_checkpoint_header, save_checkpoint

    fed = work / "magnet-federated-tiny-split42"
    fed.mkdir()
    src = work / first_cell / "best_model.safetensors"
    model = model_from_checkpoint(src)
    rc = RunConfig.from_run_config(bench.cell_run_config(
        bench.ROWS["magnet"], "federated", 42, "tiny",
        {"batch-size": 16, "grad-accum": 1, "tensorboard": False, "data-path": str(mex_path)}))
    save_checkpoint(fed / "best_model.safetensors", model, task.checkpoint_meta(rc, best_round=1),
                    trainable_only=True)
    assert read_checkpoint_header(fed / "best_model.safetensors")["trainable_only"]
    res = read_results(work / first_cell)
    fres = new_results("federated", fed.name, rc.to_run_config())
    finish_results(fres, status="completed", test=res["test"], wall_time_s=1.0)
    write_results(fed / "results.json", fres)
    before = torch.get_num_threads()
    out3 = run("--report-only")
    assert torch.get_num_threads() == before
    png = fed / "plots" / "tsne_test.png"
    assert png.exists() and (report.parent / "figures" / "tsne_best_federated_magnet.png").exists()
    tsne = json.loads(png.with_suffix(".json").read_text())
    assert tsne["windows"] == res["test"]["num_examples"] and tsne["bn_stats"] == "subject"
    # the same forward passes as the run's test: the same score
    assert tsne["weighted_f1"] == pytest.approx(res["test"]["weighted_f1"], abs=1e-3)
    assert "figures/tsne_best_federated_magnet.png" in report.read_text()
    assert json.loads(out3.strip().splitlines()[-1])["trained"] == 0


def test_the_numbers_paragraph_compares_offsets_order_gap_and_the_literal_row():
    rows = [bench.ROWS[n] for n in ("magnet", "concat", "dart", "magnet-paper-literal")]
    means = {("magnet", "centralized"): 0.914, ("concat", "centralized"): 0.905,
             ("magnet", "federated"): 0.877, ("concat", "federated"): 0.900,
             ("magnet-paper-literal", "centralized"): 0.800}
    said = bench.what_the_numbers_say(rows, means)
    assert said[0].startswith("**Centralized, 2 rows stored:** ours minus the paper -0.020 to +0.029")
    assert said[0].endswith("the paper's order.")
    assert "Concat 0.900 > MAGNET 0.877 — the paper's is MAGNET > Concat." in said[1]
    assert said[2] == "**Centralized minus federated:** MAGNET +0.037 (paper +0.053); Concat +0.005 (paper +0.075)."
    assert "0.914 against 0.800 (+0.114)" in said[3]
    assert bench.what_the_numbers_say(rows, {("magnet", "federated"): 0.9}) == []  # one row: nothing to compare
    subset = bench.what_the_numbers_say([bench.ROWS["magnet-acw-pm-dc"]], {("magnet", "federated"): 0.877,
                                                                         ("magnet-acw-pm-dc", "federated"): 0.709})
    assert subset == ["**Federated, leaving one sensor out** (against all four: ours 0.877, paper 0.881): "
                      "without act -0.168 (paper -0.030)."]
