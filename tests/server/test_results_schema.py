"""results.json: one schema (`fedtime.results`, version 2) for federated runs (RunStore) and centralized ones
(`model.train`), and `read_results` reading the files earlier versions wrote (federated version 1, centralized
"fedtime-magnet/central-v1") in that shape. No data, no Flower processes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedtime.config import RunConfig
from fedtime.results import (COMMON_KEYS, METRICS, MODEL_KEYS, SCHEMA_VERSION, TEST_KEYS, model_entry, new_results,
                             read_results, test_entry, write_results)
from model.train import build_results
from model.training import classification_metrics
from server_app.run_store import RunStore, numpy_to_arrays, save_arrays

TEST_SUBJECTS = [1, 4, 8, 9, 21, 24]
VAL = ("val_loss", "val_accuracy", "val_weighted_f1", "val_macro_f1")


def _metrics(seed: int, loss: float) -> dict:
    """What `evaluate_per_subject` returns, on random predictions."""
    rng = np.random.default_rng(seed)
    labels = np.arange(70) % 7
    out = classification_metrics(labels, rng.dirichlet(np.ones(7), size=70), 7)
    return {**out, "loss": loss, "aux_loss": 0.0}


def _round(rnd: int, val_wf1: float, best_round: int) -> dict:
    """A round's row as `MagnetFedAvg.start` records it."""
    return {"clients": [2, 3, 6], "trained": [2, 3, 6], "failures": [], "num_examples": 300, "train_loss": 1.0 / rnd,
            "train_accuracy": 0.5, "bytes_down": 30, "bytes_up": 30, "client_train_s": 1.0, "val_loss": 1.0 / rnd,
            "val_accuracy": 0.6, "val_weighted_f1": val_wf1, "val_macro_f1": val_wf1 - 0.01, "round": rnd,
            "wall_s": 2.0, "best_round": best_round}


def _epoch(epoch: int, val_wf1: float, best_epoch: int) -> dict:
    """An epoch's row as `model.fit` records it."""
    return {"epoch": epoch, "lr": 1e-3, "train_loss": 1.0 / epoch, "train_ce": 1.0 / epoch, "train_aux": 0.0,
            "train_accuracy": 0.5, "train_samples": 100, "optimizer_steps": 2, "amp_skipped_steps": 0,
            "skipped_batches": 0, "train_time_s": 1.0, "train_windows_per_s": 100.0, "val_loss": 1.0 / epoch,
            "val_accuracy": 0.6, "val_weighted_f1": val_wf1, "val_macro_f1": val_wf1 - 0.01,
            "best_epoch": best_epoch, "epoch_time_s": 1.2}


def _federated(tmp_path) -> dict:
    """A federated run's results.json, written by RunStore as the ServerApp drives it."""
    config = RunConfig(model_preset="tiny").to_run_config()
    store = RunStore(tmp_path / "fed", config)
    w = numpy_to_arrays({"w": np.zeros(3, np.float32)})
    es = {"patience": 2, "best": 0.7, "best_round": 1, "bad_rounds": 0}
    store.save_round(_round(1, 0.7, 1), global_arrays=w, best_arrays=w, sampler=[], early_stopping=es)
    store.save_round(_round(2, 0.6, 1), global_arrays=w, best_arrays=w, sampler=[],
                     early_stopping={**es, "bad_rounds": 1})
    test, other = _metrics(0, 0.9), _metrics(1, 1.1)
    store.finish(status="completed", best_arrays=w,
                 test=test_entry(test, bn_stats="subject", subjects=TEST_SUBJECTS,
                                 by_bn_stats={"subject": test, "global": other}),
                 extra={"final_model": {"model": "best_round", "round": 1}, "scenario": {"active": False},
                        "model": model_entry(preset="tiny", fusion="magnet", modalities=("act", "acw", "dc", "pm"),
                                             trainable_params=3, trainable_bytes=200)})
    return json.loads((tmp_path / "fed" / "results.json").read_text())


def _centralized(tmp_path) -> dict:
    """A centralized run's results.json, built as `python -m model.train` builds it."""
    test, other = _metrics(0, 0.9), _metrics(1, 1.1)
    history = [_epoch(1, 0.5, 1), _epoch(2, 0.8, 2), _epoch(3, 0.7, 2)]
    res = build_results("central", RunConfig(model_preset="tiny"), history, test=test, test_other=other,
                        subjects=TEST_SUBJECTS, epochs=5, wall_time_s=12.0,
                        model=model_entry(preset="tiny", fusion="magnet", modalities=["act", "acw", "dc", "pm"],
                                          trainable_params=3, trainable_bytes=150, params={"total": 3}),
                        command="python -m model.train", train_config={"epochs": 5})
    write_results(tmp_path / "central" / "results.json", res)
    return json.loads((tmp_path / "central" / "results.json").read_text())


def test_federated_and_centralized_results_have_one_schema(tmp_path):
    fed, cen = _federated(tmp_path), _centralized(tmp_path)
    assert (fed["schema_version"], fed["mode"]) == (SCHEMA_VERSION, "federated")
    assert (cen["schema_version"], cen["mode"]) == (SCHEMA_VERSION, "centralized")
    # the common part: the same top-level keys, the same test block, model and best figures
    assert list(fed)[:len(COMMON_KEYS)] == list(cen)[:len(COMMON_KEYS)] == list(COMMON_KEYS)
    assert tuple(fed["test"]) == tuple(cen["test"]) == TEST_KEYS
    assert set(fed["test"]["by_bn_stats"]) == set(cen["test"]["by_bn_stats"]) == {"global", "subject"}
    assert all(tuple(m) == METRICS for t in (fed, cen) for m in t["test"]["by_bn_stats"].values())
    assert set(MODEL_KEYS) <= set(fed["model"]) and set(MODEL_KEYS) <= set(cen["model"])
    assert fed["best"] == {"round": 1, **{k: fed["history"][0][k] for k in VAL}}
    assert cen["best"] == {"epoch": 2, **{k: cen["history"][1][k] for k in VAL}}
    # history: integer round / epoch, the same metric names
    assert [r["round"] for r in fed["history"]] == [1, 2] and [r["epoch"] for r in cen["history"]] == [1, 2, 3]
    for row in fed["history"] + cen["history"]:
        assert {"train_loss", "train_accuracy", *VAL} <= set(row)
    # the test block: the tested model with the run's statistics, and both kinds
    for res in (fed, cen):
        t = res["test"]
        assert (t["bn_stats"], t["subjects"], t["num_examples"]) == ("subject", TEST_SUBJECTS, 70)
        assert t["loss"] == 0.9 and t["by_bn_stats"]["subject"]["weighted_f1"] == t["weighted_f1"]
        assert t["by_bn_stats"]["global"]["loss"] == 1.1 and len(t["confusion_matrix"]) == 7
        assert "weighted avg" in t["per_class"]
    assert fed["status"] == "completed" and cen["status"] == "early_stopped"  # 3 of 5 epochs
    assert cen["final_model"] == {"model": "best_epoch", "epoch": 2} and cen["config"]["model-preset"] == "tiny"
    assert cen["command"] == "python -m model.train" and fed["scenario"] == {"active": False}
    # a version-2 file reads back as written
    assert read_results(tmp_path / "fed" / "results.json") == fed
    assert read_results(tmp_path / "central") == cen


def test_centralized_swa_is_the_final_model_not_a_history_row(tmp_path):
    test = _metrics(0, 0.9)
    history = [_epoch(1, 0.5, 1), _epoch(2, 0.8, 2),
               {"epoch": "swa", "swa_epochs": 2, "val_loss": 0.4, "val_accuracy": 0.9, "val_weighted_f1": 0.85,
                "val_macro_f1": 0.84}]
    res = build_results("swa", RunConfig(eval_bn_stats="global"), history, test=test, test_other=test,
                        subjects=TEST_SUBJECTS, epochs=2, wall_time_s=1.0, model=None)
    assert [r["epoch"] for r in res["history"]] == [1, 2] and res["best"]["epoch"] == 2
    assert res["final_model"] == {"model": "swa", "swa_epochs": 2, "val_loss": 0.4, "val_accuracy": 0.9,
                                  "val_weighted_f1": 0.85, "val_macro_f1": 0.84}
    assert res["status"] == "completed" and res["test"]["bn_stats"] == "global"


# --------------------------------------------------------------------------- earlier versions
def _federated_v1() -> dict:
    """A results.json as RunStore wrote it before version 2 (the shape of outputs/bench-headline's federated cells)."""
    rounds = [_round(1, 0.7, 1), _round(2, 0.9, 2), _round(3, 0.8, 2)]
    test = {"loss": 0.8, "accuracy": 0.88, "weighted_f1": 0.87, "macro_f1": 0.86, "bn_stats": "subject",
            "subjects": TEST_SUBJECTS, "num_examples": 2500, "per_class": {"weighted avg": {"f1-score": 0.87}},
            "confusion_matrix": [[1, 0], [0, 1]],
            "by_bn_stats": {"global": {"loss": 0.9, "accuracy": 0.85, "weighted_f1": 0.84, "macro_f1": 0.83},
                            "subject": {"loss": 0.8, "accuracy": 0.88, "weighted_f1": 0.87, "macro_f1": 0.86}}}
    return {"schema_version": 1, "run": "default-federated-split1", "status": "completed",
            "config": {"model-preset": "compact", "fusion": "magnet", "modalities": "act,acw,dc,pm", "patience": 6},
            "rounds": rounds, "best_round": 2, "test": test, "wall_time_s": 340.5,
            "final_model": {"model": "best_round", "round": 2},
            "model": {"trainable_bytes": 1195802, "trainable_params": 290521},
            "scenario": {"active": False}, "peak_rss_mib": 3447, "sim_wall_s": 367.7}


def _central_v1(history: list[dict] | None = None, best_epoch: int | None = 2) -> dict:
    """A results.json as `python -m model.train` wrote it before version 2 (outputs/bench-headline's centralized
    cells)."""
    history = history or [_epoch(1, 0.5, 1), _epoch(2, 0.9, 2), _epoch(3, 0.8, 2)]
    figures = {"accuracy": 0.91, "weighted_f1": 0.9, "macro_f1": 0.89}
    test = {"n": 2380, **figures, "weighted_precision": 0.92, "weighted_recall": 0.91,
            "per_class": {"weighted avg": {"f1-score": 0.9}}, "confusion_matrix": [[2, 0], [1, 3]], "loss": 0.3,
            "aux_loss": 0.01}
    return {"schema": "fedtime-magnet/central-v1", "run": "default-centralized-split1", "mode": "centralized",
            "command": "python -m model.train --run-name x", "args": {"epochs": 25},
            "run_config": {"model-preset": "compact", "split-seed": 1}, "subject_batches": True,
            "model": {"preset": "compact", "fusion": "magnet", "modalities": ["act", "acw", "dc", "pm"],
                      "config": {"d_model": 64}, "params": {"total": 454681, "trainable": 289689, "frozen": 164992},
                      "bytes_trainable_state": 1182788},
            "train_config": {"epochs": 25, "lr": 1e-3}, "preprocess": {"acc_hz": 25.0},
            "split": {"train": [2, 3], "val": [5, 25, 29], "test": TEST_SUBJECTS},
            "windows": {"train": 10, "val": 3, "test": 2380}, "class_weights": [1.0] * 7, "history": history,
            "best_epoch": best_epoch, "val": {"n": 300, "accuracy": 0.9, "weighted_f1": 0.9, "loss": 0.2},
            "test": test, "bn_stats": "subject",
            "test_by_bn_stats": {"subject": figures, "global": {"accuracy": 0.85, "weighted_f1": 0.84, "macro_f1": 0.83}},
            "timing_s": {"data": 1.0, "train": 400.0, "total": 402.0},
            "env": {"torch": "2.13.0"}, "artifacts": ["results.json"], "wall_s": 404.0}


def test_read_results_upgrades_a_federated_v1_file(tmp_path):
    v1 = _federated_v1()
    (tmp_path / "results.json").write_text(json.dumps(v1))
    res = read_results(tmp_path / "results.json")
    assert (res["schema_version"], res["mode"], res["run"], res["status"]) == (2, "federated", v1["run"], "completed")
    assert set(COMMON_KEYS) <= set(res) and "rounds" not in res and "best_round" not in res
    assert res["history"] == v1["rounds"] and res["config"] == v1["config"]
    assert res["best"] == {"round": 2, "val_loss": 0.5, "val_accuracy": 0.6, "val_weighted_f1": 0.9,
                           "val_macro_f1": pytest.approx(0.89)}
    assert tuple(res["test"]) == TEST_KEYS and res["test"] == v1["test"]
    assert res["model"] == {"preset": "compact", "fusion": "magnet", "modalities": ["act", "acw", "dc", "pm"],
                            "trainable_params": 290521, "trainable_bytes": 1195802}
    assert res["final_model"] == v1["final_model"] and res["wall_time_s"] == 340.5
    assert (res["scenario"], res["peak_rss_mib"], res["sim_wall_s"]) == ({"active": False}, 3447, 367.7)


def test_read_results_upgrades_a_central_v1_file(tmp_path):
    v1 = _central_v1()
    (tmp_path / "results.json").write_text(json.dumps(v1))
    res = read_results(tmp_path / "results.json")
    assert (res["schema_version"], res["mode"], res["run"]) == (2, "centralized", v1["run"])
    assert set(COMMON_KEYS) <= set(res)
    assert not {"schema", "run_config", "best_epoch", "val", "bn_stats", "test_by_bn_stats"} & set(res)
    assert res["config"] == v1["run_config"] and res["history"] == v1["history"]
    assert res["best"] == {"epoch": 2, "val_loss": 0.5, "val_accuracy": 0.6, "val_weighted_f1": 0.9,
                           "val_macro_f1": pytest.approx(0.89)}
    assert res["final_model"] == {"model": "best_epoch", "epoch": 2}
    assert res["status"] == "early_stopped"  # 3 of 25 epochs
    assert res["test"] == {"loss": 0.3, "accuracy": 0.91, "weighted_f1": 0.9, "macro_f1": 0.89,
                           "per_class": {"weighted avg": {"f1-score": 0.9}}, "confusion_matrix": [[2, 0], [1, 3]],
                           "bn_stats": "subject", "subjects": TEST_SUBJECTS, "num_examples": 2380,
                           "by_bn_stats": {"global": {"loss": None, "accuracy": 0.85, "weighted_f1": 0.84,
                                                      "macro_f1": 0.83},
                                           "subject": {"loss": 0.3, "accuracy": 0.91, "weighted_f1": 0.9,
                                                       "macro_f1": 0.89}}}
    assert tuple(res["test"]) == TEST_KEYS
    assert res["model"] == {"preset": "compact", "fusion": "magnet", "modalities": ["act", "acw", "dc", "pm"],
                            "trainable_params": 289689, "trainable_bytes": 1182788, "config": {"d_model": 64},
                            "params": v1["model"]["params"]}
    assert res["wall_time_s"] == 402.0
    for key in ("command", "args", "subject_batches", "train_config", "preprocess", "split", "windows",
                "class_weights", "timing_s", "env", "artifacts", "wall_s"):
        assert res[key] == v1[key], key


def test_read_results_upgrades_a_central_v1_swa_run():
    """An SWA run's last history row was {"epoch": "swa"} and its best_epoch None."""
    rows = [_epoch(1, 0.5, 1), _epoch(2, 0.9, 2),
            {"epoch": "swa", "swa_epochs": 2, "val_loss": 0.2, "val_accuracy": 0.95, "val_weighted_f1": 0.94,
             "val_macro_f1": 0.93}]
    from fedtime.results import upgrade

    res = upgrade(_central_v1(rows, best_epoch=None))
    assert [r["epoch"] for r in res["history"]] == [1, 2] and res["best"]["epoch"] == 2
    assert res["final_model"] == {"model": "swa", "swa_epochs": 2, "val_loss": 0.2, "val_accuracy": 0.95,
                                  "val_weighted_f1": 0.94, "val_macro_f1": 0.93}


def test_a_run_started_before_version_2_resumes(tmp_path):
    run = tmp_path / "run"
    v1 = _federated_v1()
    v1.update(status="running", test=None, final_model=None, model=None)
    (run / "checkpoint").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(v1))
    w = {"w": np.ones(3, np.float32)}
    save_arrays(run / "checkpoint" / "global.safetensors", w)
    save_arrays(run / "checkpoint" / "best.safetensors", w)
    # round 3 was written to results.json but not committed: the checkpoint is round 2's
    es = {"patience": 6, "best": 0.9, "best_round": 2, "bad_rounds": 0}
    (run / "checkpoint" / "state.json").write_text(json.dumps({"round": 2, "sampler": [], "early_stopping": es}))
    store = RunStore(run, {**v1["config"], "patience": 8}, resume=True)
    state = store.load_checkpoint()
    assert state["round"] == 2 and [r["round"] for r in store.results["history"]] == [1, 2]
    store.save_round(_round(3, 0.95, 3), global_arrays=numpy_to_arrays(w), best_arrays=numpy_to_arrays(w),
                     sampler=[], early_stopping={**es, "best": 0.95, "best_round": 3})
    res = json.loads((run / "results.json").read_text())
    assert (res["schema_version"], res["mode"]) == (2, "federated") and "rounds" not in res
    assert [r["round"] for r in res["history"]] == [1, 2, 3] and res["best"]["round"] == 3
    assert res["config"]["patience"] == 8 and res["resumed"][-1]["changed"] == {"patience": [6, 8]}
    assert sorted(p.name for p in (run / "checkpoint").glob("*.safetensors")) == ["best-003.safetensors",
                                                                                  "global-003.safetensors"]


def test_read_results_refuses_what_it_does_not_know(tmp_path):
    from fedtime.results import upgrade

    with pytest.raises(ValueError, match="not a results.json"):
        upgrade({"run": "x"})
    with pytest.raises(ValueError, match="newer"):
        upgrade({"schema_version": 3})
    with pytest.raises(ValueError, match="version-2"):
        write_results(tmp_path / "results.json", {"run": "x"})
    assert new_results("centralized", "x", {})["status"] == "running"
    with pytest.raises(ValueError, match="mode"):
        new_results("local", "x", {})


def test_the_schema_module_imports_no_flower_torch_or_numpy():
    code = ("import sys, fedtime.results; "
            "print([m for m in sys.modules if m.split('.')[0] in ('flwr', 'torch', 'numpy')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
