"""The centralized CLI end to end on the real data (tiny preset, a few batches): artifacts, both BatchNorm
evaluations, and subject-homogeneous batches."""

import json

import numpy as np

from model.train import SubjectBatchSampler, main


def test_subject_batch_sampler_keeps_subjects_apart_and_covers_every_window():
    subjects = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 3])
    sampler = SubjectBatchSampler(subjects, batch_size=2, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) == 2 + 1 + 3
    assert all(len(set(subjects[b])) == 1 for b in first)
    assert sorted(i for b in first for i in b) == list(range(10))
    assert list(sampler) != first  # a new order every epoch


def test_centralized_cli_trains_and_writes_results(mex_path, tmp_path):
    res = main(["--preset", "tiny", "--epochs", "2", "--max-batches", "30", "--batch-size", "16", "--grad-accum", "1",
                "--lr", "3e-3", "--data-path", str(mex_path), "--output-dir", str(tmp_path), "--run-name", "t",
                "--subject-batches", "--bn-stats", "subject", "--threads", "1"])
    out = tmp_path / "t"
    saved = json.loads((out / "results.json").read_text())
    assert saved["bn_stats"] == "subject" and set(saved["test_by_bn_stats"]) == {"global", "subject"}
    assert saved["test"]["n"] == res["windows"]["test"] > 0
    assert len(saved["history"]) == 2 and all(h["train_samples"] > 0 for h in saved["history"])
    for name in ("best_model.safetensors", "learning_curves.png", "confusion_matrix.png", "pr_curves.png"):
        assert (out / name).stat().st_size > 0
