"""The centralized CLI end to end on the real data (tiny preset, a few batches): artifacts, both BatchNorm
evaluations, and subject-homogeneous batches."""

import json

import numpy as np
import pytest

from fedtime.results import COMMON_KEYS, SCHEMA_VERSION, TEST_KEYS, read_results
from model.train import SubjectBatchSampler, main


def test_subject_batch_sampler_keeps_subjects_apart_and_covers_every_window():
    subjects = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 3])
    sampler = SubjectBatchSampler(subjects, batch_size=2, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) == 2 + 1 + 3
    assert all(len(set(subjects[b])) == 1 for b in first)
    assert sorted(i for b in first for i in b) == list(range(10))
    assert list(sampler) != first  # a new order every epoch


@pytest.mark.slow  # the real data
def test_centralized_cli_trains_and_writes_results(mex_path, tmp_path):
    res = main(["--preset", "tiny", "--epochs", "2", "--max-batches", "30", "--batch-size", "16", "--grad-accum", "1",
                "--lr", "3e-3", "--data-path", str(mex_path), "--output-dir", str(tmp_path), "--run-name", "t",
                "--bn-stats", "subject", "--threads", "1", "--run-config", "augment-sigma=0.0 normalization='global'"])
    out = tmp_path / "t"
    saved = json.loads((out / "results.json").read_text())
    # the schema of federated runs (fedtime.results), mode "centralized"
    assert (saved["schema_version"], saved["mode"], saved["run"]) == (SCHEMA_VERSION, "centralized", "t")
    assert set(COMMON_KEYS) <= set(saved) and tuple(saved["test"]) == TEST_KEYS
    assert saved["test"]["bn_stats"] == "subject" and set(saved["test"]["by_bn_stats"]) == {"global", "subject"}
    assert saved["test"]["by_bn_stats"]["subject"]["weighted_f1"] == saved["test"]["weighted_f1"]
    assert saved["subject_batches"] is True  # follows eval-bn-stats="subject" unless told otherwise
    assert saved["config"]["model-preset"] == "tiny" and saved["config"]["augment-sigma"] == 0.0
    assert saved["train_config"]["lr"] == 3e-3 and saved["train_config"]["epochs"] == 2
    assert saved["test"]["num_examples"] == res["windows"]["test"] > 0
    assert saved["test"]["subjects"] == saved["split"]["test"]
    assert [h["epoch"] for h in saved["history"]] == [1, 2] and all(h["train_samples"] > 0 for h in saved["history"])
    best = saved["best"]["epoch"]
    assert saved["best"]["val_weighted_f1"] == saved["history"][best - 1]["val_weighted_f1"]
    assert saved["final_model"] == {"model": "best_epoch", "epoch": best} and saved["status"] == "completed"
    assert saved["model"]["preset"] == "tiny" and saved["model"]["trainable_params"] > 0
    assert read_results(out / "results.json") == saved
    for name in ("best_model.safetensors", "learning_curves.png", "confusion_matrix.png", "pr_curves.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow  # the real data
def test_centralized_cli_refuses_to_keep_a_diverged_model(mex_path, tmp_path, monkeypatch):
    """A model whose weights went NaN was tested, picked as "best" and then crashed with no results.json."""
    import torch

    import model.train as train

    def diverging_fit(model, loader, cfg, **kwargs):
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return [{"epoch": 1, "train_loss": float("nan")}]

    monkeypatch.setattr(train, "fit", diverging_fit)
    with pytest.raises(SystemExit, match="training diverged: .* NaN or inf .*lower lr"):
        train.main(["--preset", "tiny", "--epochs", "1", "--data-path", str(mex_path), "--output-dir", str(tmp_path),
                    "--run-name", "d", "--threads", "1"])
    assert not (tmp_path / "d" / "results.json").exists() and not (tmp_path / "d" / "best_model.safetensors").exists()


def test_centralized_cli_shares_the_run_config_checks():
    import pytest

    from model.train import parse_args, run_config

    cfg = run_config(parse_args(["--preset", "tiny", "--lr", "1e-3", "--run-config", "seed=3 fusion='concat'"]))
    assert (cfg.model_preset, cfg.lr, cfg.seed, cfg.fusion) == ("tiny", 1e-3, 3, "concat")
    with pytest.raises(SystemExit, match="'lr' must be of type float"):
        run_config(parse_args(["--lr", "fast"]))
    with pytest.raises(SystemExit, match="unknown run-config key 'nokey'"):
        run_config(parse_args(["--run-config", "nokey=1"]))
    with pytest.raises(SystemExit, match="'lr' must be a finite number"):
        run_config(parse_args(["--lr", "inf"]))


@pytest.mark.parametrize("keys", ["missing-rate=0.5", "poison='label-flip' poison-clients=1", "strategy='fedprox'",
                                  "fedprox.proximal-mu=0.5", "num-server-rounds=3", "clients-per-round=4"])
def test_centralized_cli_refuses_keys_only_a_federation_has(keys):
    """It trained as if they were not there before (a missing-rate run without missing modalities)."""
    from model.train import parse_args, run_config

    with pytest.raises(SystemExit, match="cannot honour federated keys: " + keys.split("=")[0]):
        run_config(parse_args(["--run-config", keys]))


def test_centralized_cli_honours_its_own_keys():
    """Early stopping's patience, seeds and the training keys are the centralized trainer's too."""
    from model.train import parse_args, run_config

    rc = run_config(parse_args(["--patience", "3", "--split-seed", "1", "--run-config", "seed=2 modality-dropout=0.2"]))
    assert (rc.patience, rc.split_seed, rc.seed, rc.modality_dropout) == (3, 1, 2, 0.2)


def test_cli_reads_run_config_files_and_keys_without_overriding_them():
    """`--run-config conf/paper.toml` then inline keys (later wins); no flag default overwrites a run-config key
    (modality-dropout reached training as 0 before)."""
    from pathlib import Path

    from model.train import parse_args, run_config

    paper = str(Path(__file__).resolve().parents[2] / "conf" / "paper.toml")
    rc = run_config(parse_args(["--run-config", paper, "--run-config", "model-preset='tiny' modality-dropout=0.5"]))
    assert (rc.model_preset, rc.lr, rc.micro_batch, rc.normalization) == ("tiny", 1e-4, 8, "per_window")
    from fedtime import task

    assert task.train_config(rc).modality_dropout == 0.5
    assert task.train_config(run_config(parse_args([]))).lr == 1e-3  # the compact preset's own
    # one source of defaults: the CLI without flags is pyproject.toml's run config (only its output folder differs)
    from fedtime.config import RunConfig

    assert run_config(parse_args([])).replace(output_dir=RunConfig().output_dir) == RunConfig()
    with pytest.raises(SystemExit, match="no such file"):
        run_config(parse_args(["--run-config", "conf/missing.toml"]))


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_centralized_cli_refuses_fewer_than_one_epoch(epochs, capsys):
    """--epochs 0 trained 5 epochs (the federated local epochs) and --epochs -1 failed after 51 s with IndexError."""
    from model.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--epochs", epochs])
    assert "--epochs: must be >= 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def synthetic_zip(tmp_path_factory):
    """All 30 subjects of a small synthetic MEx archive (tests/data/synthetic_mex.py): the paper split, in seconds."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    import synthetic_mex

    return synthetic_mex.write_mex_zip(tmp_path_factory.mktemp("mex") / "mex.zip", subjects=range(1, 31),
                                       duration_s=10.0)


@pytest.mark.slow  # synthetic data, but a window cache of 30 subjects and two trainings: about a minute
def test_centralized_cli_writes_tensorboard_events_of_its_epochs(synthetic_zip, tmp_path):
    """The event files hold results.json's epochs and test figures (`fedtime.tracking`); tensorboard=false: none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["--preset", "tiny", "--epochs", "2", "--batch-size", "16", "--grad-accum", "1", "--data-path",
              str(synthetic_zip), "--output-dir", str(tmp_path), "--threads", "1", "--max-batches", "5"]
    res = main([*common, "--run-name", "tb"])
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for key, tag in (("val_weighted_f1", "val/weighted_f1"), ("train_loss", "train/loss"), ("lr", "train/lr")):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [
            (h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in res["history"]]
    assert [(e.step, e.value) for e in acc.Scalars("test/weighted_f1")] == [
        (2, pytest.approx(res["test"]["weighted_f1"], rel=1e-6))]
    assert len(acc.Images("test/confusion_matrix")) == 1 and "tensorboard" in res["artifacts"]
    main([*common, "--run-name", "off", "--epochs", "1", "--run-config", "tensorboard=false"])
    assert (tmp_path / "off" / "results.json").exists() and not (tmp_path / "off" / "tensorboard").exists()
