"""`python -m model.predict` on synthetic recordings with a tiny model: the evaluation path's predictions on the
same windows, one output row per window, the run's normalisation and BatchNorm handling read from the checkpoint,
missing sensors, and errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))

import synthetic_mex  # noqa: E402
from data_partition import NormStats, WindowDataset, load_cache  # noqa: E402
from fedtime import task  # noqa: E402
from fedtime.config import RunConfig  # noqa: E402
from model import build_model, evaluate_per_subject  # noqa: E402
from model.predict import main, read_recordings  # noqa: E402
from model.state import checkpoint_header, save_checkpoint, trainable_state  # noqa: E402
from model_testutils import make_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = (1, 2)
WINDOWS_PER_SUBJECT = len(synthetic_mex.RECORDINGS) * 7  # tiny preset: 5 s windows every 1 s of a 12 s recording


def run_config(**values) -> RunConfig:
    return RunConfig.from_run_config({"model-preset": "tiny", "eval-batch-size": 16, **values})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Two subjects' recordings in the MEx layout (modality folders at the top)."""
    return synthetic_mex.write_mex_tree(tmp_path_factory.mktemp("recordings"), subjects=SUBJECTS, prefix="")


@pytest.fixture(scope="module")
def cache(tree, tmp_path_factory):
    """The window cache the evaluation path reads (at the tiny preset's rates)."""
    return load_cache(tree, task.preprocess_config(run_config()), tmp_path_factory.mktemp("cache"), workers=1,
                      progress=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny", "magnet", seed=0)
    m.train()
    with torch.no_grad():  # stored BatchNorm statistics that are not the defaults
        m(make_batch(m.cfg, b=6))
    return m.eval()


def federated_checkpoint(path: Path, model, rc: RunConfig, meta: dict | None = None) -> Path:
    """What server_app writes as best_model.safetensors: the trainable state, checkpoint_header(trainable_only)."""
    meta = {"best_round": 3, "run_config": rc.to_run_config()} if meta is None else meta
    save_file(trainable_state(model), str(path), metadata=checkpoint_header(model, meta, trainable_only=True))
    return path


def evaluation_path(model, cache, rc: RunConfig, stats=None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) as server_app's Evaluator computes them on held-out subjects: a WindowDataset per
    subject (fedtime.task.dataset without a scenario), batches of eval-batch-size, evaluate_per_subject."""
    loaders = {s: DataLoader(WindowDataset(cache, [s], stats, normalization=rc.normalization),
                             batch_size=rc.eval_batch_size) for s in cache.subjects}
    m = evaluate_per_subject(model, loaders, "cpu", adapt_bn=rc.eval_bn_stats == "subject")
    return m["probabilities"], m["labels"]


def predict(checkpoint, source, out, *extra) -> dict:
    return main(["--checkpoint", str(checkpoint), str(source), "--out", str(out), "--device", "cpu",
                 "--no-progress", *map(str, extra)])


def probabilities(rows: list[dict]) -> np.ndarray:
    return np.array([[r[f"p_E{c}"] for c in range(1, 8)] for r in rows])


def test_checkpoint_meta_carries_the_global_statistics_only_when_the_run_used_them(cache, monkeypatch):
    stats = NormStats.fit(cache, SUBJECTS)
    monkeypatch.setattr(task, "open_data", lambda cfg: (cache, None, stats))
    meta = task.checkpoint_meta(run_config(normalization="global"), best_round=4)
    assert meta["best_round"] == 4 and meta["run_config"]["normalization"] == "global"
    assert NormStats.from_dict(meta["norm_stats"]).to_dict() == stats.to_dict()
    assert len(json.dumps(meta["norm_stats"])) < 1000  # small enough for a header
    assert "norm_stats" not in task.checkpoint_meta(run_config(normalization="subject"), best_round=4)


@pytest.mark.parametrize("normalization,bn_stats", [("subject", "subject"), ("global", "global"),
                                                    ("per_window", "subject")])
def test_predictions_are_the_evaluation_paths(tree, cache, model, tmp_path, normalization, bn_stats):
    rc = run_config(normalization=normalization, **{"eval-bn-stats": bn_stats})
    stats = NormStats.fit(cache, SUBJECTS) if normalization == "global" else None
    meta = {"best_round": 3, "run_config": rc.to_run_config(), **({"norm_stats": stats.to_dict()} if stats else {})}
    ckpt = federated_checkpoint(tmp_path / "best_model.safetensors", model, rc, meta)
    out = predict(ckpt, tree, tmp_path / "out")
    want, labels = evaluation_path(model, cache, rc, stats)

    # (a) the evaluation path's predictions on the same windows, in the cache's order
    got = probabilities(out["windows"])
    assert got.shape == want.shape == (len(SUBJECTS) * WINDOWS_PER_SUBJECT, 7)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert [w["predicted"] for w in out["windows"]] == want.argmax(1).tolist()
    assert [w["label"] for w in out["windows"]] == labels.tolist()
    idx = cache.index
    assert [(w["subject"], w["exercise"], w["recording"]) for w in out["windows"]] == \
        list(idx[["subject", "exercise", "recording"]].itertuples(index=False, name=None))
    np.testing.assert_allclose([w["window_start_s"] for w in out["windows"]], idx["start_s"], atol=1e-6)
    assert out["normalization"] == normalization and out["bn_stats"] == bn_stats
    assert out["accuracy"]["windows"]["accuracy"] == pytest.approx(float((want.argmax(1) == labels).mean()))

    # per recording: the class of highest mean probability over its windows
    for rec in out["recordings"]:
        rows = ((idx["subject"] == rec["subject"]) & (idx["exercise"] == rec["exercise"])
                & (idx["recording"] == rec["recording"])).to_numpy()
        mean = want[rows].mean(0)
        assert rec["windows"] == rows.sum() == 7
        assert rec["predicted"] == mean.argmax() and rec["probability"] == pytest.approx(mean.max(), abs=1e-6)
        assert rec["label"] == rec["exercise"] - 1 and rec["correct"] == (rec["predicted"] == rec["label"])
        assert rec["modalities"] == "act, acw, dc, pm"

    # (b) the files: one row per window / recording
    windows = pd.read_csv(tmp_path / "out" / "windows.csv")
    recordings = pd.read_csv(tmp_path / "out" / "recordings.csv")
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(windows) == len(saved["windows"]) == len(idx)
    assert len(recordings) == len(saved["recordings"]) == len(SUBJECTS) * len(synthetic_mex.RECORDINGS)
    for col in ("subject", "exercise", "recording", "window_start_s", "predicted", "predicted_name", "probability",
                "label", "label_name", "correct"):
        assert col in windows, col
    assert windows["predicted"].tolist() == want.argmax(1).tolist()
    assert set(windows["predicted_name"]) <= set(saved["classes"]) and len(saved["classes"]) == 7
    assert saved["aggregation"].startswith("mean probability")


def test_a_centralized_checkpoint_reads_its_run_config_from_results_json(tree, model, tmp_path):
    rc = run_config()
    fed = predict(federated_checkpoint(tmp_path / "fed.safetensors", model, rc), tree, tmp_path / "fed", "--subject", 2)
    run = tmp_path / "central"
    ckpt = save_checkpoint(run / "best_model.safetensors", model, {"run": "c", "best_epoch": 2})  # as model.train
    with pytest.raises(SystemExit, match="no run config in its header nor a results.json"):
        predict(ckpt, tree, tmp_path / "x")
    (run / "results.json").write_text(json.dumps({"mode": "centralized", "config": rc.to_run_config()}))
    central = predict(ckpt, tree, tmp_path / "c", "--subject", 2)
    assert {w["subject"] for w in central["windows"]} == {2} and len(central["windows"]) == WINDOWS_PER_SUBJECT
    np.testing.assert_allclose(probabilities(central["windows"]), probabilities(fed["windows"]), atol=1e-6)


def test_a_zip_and_one_subject_of_it(tree, model, tmp_path):
    """The MEx zip (folders nested in it), restricted to one subject: that subject's predictions are those of the
    folder holding both (its normalisation and BatchNorm statistics are its own)."""
    rc = run_config()
    ckpt = federated_checkpoint(tmp_path / "best_model.safetensors", model, rc)
    both = predict(ckpt, tree, tmp_path / "both")
    zipped = synthetic_mex.zip_tree(tree, tmp_path / "MEx.zip", arc_prefix="data/MEx/")
    one = predict(ckpt, zipped, tmp_path / "one", "--subject", 1)
    first = [w for w in both["windows"] if w["subject"] == 1]
    assert len(one["windows"]) == len(first) == WINDOWS_PER_SUBJECT
    np.testing.assert_allclose(probabilities(one["windows"]), probabilities(first), atol=1e-6)
    with pytest.raises(SystemExit, match=r"no recording of subject 7 \(subjects: \[1, 2\]\)"):
        predict(ckpt, zipped, tmp_path / "none", "--subject", 7)


def test_missing_sensors_and_unlabelled_recordings(tree, model, tmp_path):
    src = tmp_path / "new"
    shutil.copytree(tree / "act" / "01", src / "act" / "05")
    shutil.copytree(tree / "pm_1.0_1.0" / "01", src / "pm_1.0_1.0" / "05")
    shutil.copytree(tree / "acw" / "01", src / "acw" / "05")
    (src / "acw" / "05" / "02_acw_1.csv").unlink()  # one recording without its wrist accelerometer; no depth camera
    for m, folder in (("act", "act"), ("pm", "pm_1.0_1.0")):  # exercise 00: not known
        (src / folder / "05" / f"00_{m}_1.csv").write_text(synthetic_mex.recording_csv(m, 5, 1, 1))
    rc = run_config()
    ckpt = federated_checkpoint(tmp_path / "best_model.safetensors", model, rc)
    out = predict(ckpt, src, tmp_path / "out")
    recs = {(r["exercise"], r["recording"]): r for r in out["recordings"]}
    assert len(recs) == len(synthetic_mex.RECORDINGS) + 1
    assert recs[(1, 1)]["modalities"] == "act, acw, pm" and recs[(2, 1)]["modalities"] == "act, pm"
    assert recs[(0, 1)]["label"] is None and recs[(0, 1)]["correct"] is None and recs[(0, 1)]["windows"] > 0
    assert out["accuracy"]["recordings"]["n"] == len(synthetic_mex.RECORDINGS)
    # absent modalities are zeros with mask False
    windows = read_recordings(src, task.preprocess_config(rc), progress=False)
    assert not windows.masks[:, 2].any() and not windows.cache.arrays["dc"].any()
    idx = windows.cache.index
    without_acw = idx["exercise"].isin([0, 2]).to_numpy()  # the unlabelled one has act and pm only
    assert not windows.masks[without_acw, 1].any() and windows.masks[~without_acw, 1].all()
    assert not windows.cache.arrays["acw"][without_acw].any()


def _copy_subject(tree: Path, dst: Path, subject: int = 1) -> Path:
    for folder in synthetic_mex.FOLDERS.values():
        shutil.copytree(tree / folder / f"{subject:02d}", dst / folder / f"{subject:02d}")
    return dst


def test_bad_input_is_named(tree, model, tmp_path):
    rc = run_config()
    ckpt = federated_checkpoint(tmp_path / "best_model.safetensors", model, rc)
    with pytest.raises(SystemExit, match="checkpoint not found: .*nope.safetensors"):
        predict(tmp_path / "nope.safetensors", tree, tmp_path / "o")
    with pytest.raises(SystemExit, match="input not found: .*missing-folder"):
        predict(ckpt, tmp_path / "missing-folder", tmp_path / "o")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="junk.safetensors: not a readable safetensors checkpoint"):
        predict(tmp_path / "junk.safetensors", tree, tmp_path / "o")

    bad = _copy_subject(tree, tmp_path / "columns")
    f = bad / "act" / "01" / "03_act_1.csv"
    f.write_text("".join(line + ",0.5\n" for line in f.read_text().splitlines()))  # a fifth column
    with pytest.raises(SystemExit, match=rf"{f}: line 1: expected 4 columns \(act\), found 5"):
        predict(ckpt, bad, tmp_path / "o")

    slow = _copy_subject(tree, tmp_path / "rate")
    f = slow / "acw" / "01" / "04_acw_2.csv"
    lines = f.read_text().splitlines()
    t = pd.to_datetime([ln.split(",", 1)[0] for ln in lines], format="ISO8601")
    stretched = t[0] + (t - t[0]) * 4  # ~24 Hz instead of ~97 Hz
    f.write_text("".join(ts.isoformat(sep=" ") + "," + ln.split(",", 1)[1] + "\n" for ts, ln in zip(stretched, lines)))
    with pytest.raises(SystemExit, match=rf"{f}: sampled at 24.\d Hz .*expected 50-200 Hz"):
        predict(ckpt, slow, tmp_path / "o")

    no_stats = federated_checkpoint(tmp_path / "global.safetensors", model, run_config(normalization="global"))
    with pytest.raises(SystemExit, match="normalization = \"global\".*does not carry those statistics"):
        predict(no_stats, tree, tmp_path / "o")


def test_python_dash_m(tree, model, tmp_path):
    ckpt = federated_checkpoint(tmp_path / "best_model.safetensors", model, run_config())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "model.predict", "--checkpoint", str(ckpt), str(tree), "--subject",
                           "2", "--out", str(out), "--device", "cpu", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean probability over the recording's windows" in proc.stdout and "accuracy: windows" in proc.stdout
    assert "predict" in proc.stderr  # the progress bar
    windows = pd.read_csv(out / "windows.csv")
    assert len(windows) == WINDOWS_PER_SUBJECT and set(windows["subject"]) == {2}
    assert len(pd.read_csv(out / "recordings.csv")) == len(synthetic_mex.RECORDINGS)
