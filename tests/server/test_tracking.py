"""TensorBoard tracking (`fedtime.tracking`), read back with TensorBoard's own reader: the event files hold the
results.json rows they were written from, round by round, with the strategies' aggregation records, the test
figures and confusion matrix at the end; a resumed run writes each committed round once; `tensorboard = false`
writes nothing. Fast: hand-built rows, no training."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, TENSORS, EventAccumulator

from fedtime.config import RunConfig
from fedtime.results import new_results
from fedtime.tracking import ROW_TAGS, Tracker, event_dir, write_run
from server_app import run_store
from server_app.run_store import RunStore, numpy_to_arrays

CONFIG = RunConfig().to_run_config()
CM = [[5, 1, 0, 0, 0, 0, 0], [0, 6, 0, 0, 0, 0, 0], [0, 0, 4, 2, 0, 0, 0], [0, 0, 0, 6, 0, 0, 0],
      [0, 0, 0, 0, 6, 0, 0], [1, 0, 0, 0, 0, 5, 0], [0, 0, 0, 0, 0, 0, 6]]


def _row(rnd: int) -> dict:
    row = {"round": rnd, "train_loss": 2.0 / rnd, "train_accuracy": 0.3 + 0.1 * rnd, "val_loss": 1.5 / rnd,
           "val_accuracy": 0.4 + 0.05 * rnd, "val_weighted_f1": 0.35 + 0.1 * rnd, "val_macro_f1": 0.3 + 0.1 * rnd,
           "bytes_up": 3_000_000 + rnd, "bytes_down": 3_100_000 + rnd, "wall_s": 40.0 + rnd, "best_round": rnd,
           "clients": [2, 3, 6], "trained": [2, 3, 6]}
    row["aggregation"] = {  # FedMobile's and FedMFS's records (one row holds both here, to test each once)
        "weights": {"2": 0.5, "3": 0.3 / rnd, "6": 0.2},
        "generator_quality": [0.1 * rnd, 0.2, 0.3, 0.4],
        "shapley": {"2": {"act": 0.2, "pm": 0.1 * rnd}, "3": {"act": 0.4, "pm": 0.3}},
        "uploaded": {"2": ["act", "pm"], "3": ["act"]},
        "krum_selected": 3,  # not a tracked record: left out
    }
    return row


def _test_block() -> dict:
    return {"loss": 0.8, "accuracy": 0.85, "weighted_f1": 0.84, "macro_f1": 0.83, "confusion_matrix": CM}


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={SCALARS: 0, IMAGES: 0, TENSORS: 0})
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_federated_rows_test_block_and_config_read_back_equal(tmp_path):
    results = new_results("federated", "run", CONFIG)
    results["history"] = [_row(r) for r in (1, 2, 3)]
    results["test"] = _test_block()
    write_run(tmp_path, results)
    acc = _events(tmp_path)
    for key, tag in ROW_TAGS.items():
        if key in results["history"][0]:
            assert _series(acc, tag) == [(r["round"], pytest.approx(r[key], rel=1e-6)) for r in results["history"]]
    assert not any(t in acc.Tags()["scalars"] for t in ("train/lr", "time/epoch_s"))  # centralized only
    for r in results["history"]:
        step = r["round"]
        at = {tag: dict(_series(acc, tag))[step] for tag in acc.Tags()["scalars"] if tag.startswith("aggregation/")}
        assert at == pytest.approx({
            "aggregation/weight/subject_02": 0.5, "aggregation/weight/subject_03": 0.3 / step,
            "aggregation/weight/subject_06": 0.2,
            "aggregation/generator_quality/act": 0.1 * step, "aggregation/generator_quality/acw": 0.2,
            "aggregation/generator_quality/dc": 0.3, "aggregation/generator_quality/pm": 0.4,
            "aggregation/shapley/act": 0.3, "aggregation/shapley/pm": (0.1 * step + 0.3) / 2,
            "aggregation/uploaded/act": 2.0, "aggregation/uploaded/pm": 1.0}, rel=1e-6)
    for m in ("loss", "accuracy", "weighted_f1", "macro_f1"):
        assert _series(acc, f"test/{m}") == [(3, pytest.approx(results["test"][m], rel=1e-6))]
    image = acc.Images("test/confusion_matrix")
    assert len(image) == 1 and image[0].step == 3 and image[0].width > 100
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")  # the HParams tab's session
    assert not any(t.startswith("personalized/") for t in acc.Tags()["scalars"])


def test_centralized_epochs_use_the_same_tags(tmp_path):
    results = new_results("centralized", "c", CONFIG)
    results["history"] = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5, "val_loss": 0.9,
                           "val_accuracy": 0.6, "val_weighted_f1": 0.55 + e / 100, "val_macro_f1": 0.5,
                           "lr": 1e-3 / e, "epoch_time_s": 3.0} for e in (1, 2)]
    results["test"] = _test_block()
    write_run(tmp_path, results)
    acc = _events(tmp_path)
    assert _series(acc, "val/weighted_f1") == [(1, pytest.approx(0.56)), (2, pytest.approx(0.57))]
    assert _series(acc, "train/lr") == [(1, pytest.approx(1e-3)), (2, pytest.approx(5e-4))]
    assert _series(acc, "time/epoch_s") == [(1, 3.0), (2, 3.0)]
    assert _series(acc, "test/macro_f1") == [(2, pytest.approx(0.83))]


def test_no_test_but_personalized_figures(tmp_path):
    """FedMFS with a local head: no global model to test, the personalized evaluation is the result."""
    results = new_results("federated", "mfs", CONFIG)
    results["history"] = [_row(1)]
    results["personalized"] = {"global": {"accuracy": 0.5, "weighted_f1": 0.45, "macro_f1": 0.4},
                               "personal": {"accuracy": 0.8, "weighted_f1": 0.78, "macro_f1": 0.75}}
    write_run(tmp_path, results)
    acc = _events(tmp_path)
    assert not any(t.startswith("test/") for t in acc.Tags()["scalars"]) and acc.Tags()["images"] == []
    got = {t: _series(acc, t) for t in acc.Tags()["scalars"] if t.startswith("personalized/")}
    assert got == {"personalized/global_weighted_f1": [(1, pytest.approx(0.45))],
                   "personalized/global_macro_f1": [(1, pytest.approx(0.4))],
                   "personalized/personal_weighted_f1": [(1, pytest.approx(0.78))],
                   "personalized/personal_macro_f1": [(1, pytest.approx(0.75))]}


def test_tensorboard_false_writes_nothing(tmp_path):
    results = new_results("federated", "off", CONFIG)
    results["history"] = [_row(1)]
    results["test"] = _test_block()
    write_run(tmp_path, results, enabled=False)
    tracker = Tracker(tmp_path, CONFIG, enabled=False)
    tracker.row(_row(2))
    tracker.finish(results)
    store = RunStore(tmp_path / "run", CONFIG)  # the default: no tracking (the ServerApp passes cfg.tensorboard)
    _save(store, 1)
    assert not event_dir(tmp_path).exists() and not event_dir(tmp_path / "run").exists()


def _save(store: RunStore, rnd: int) -> None:
    arrays = numpy_to_arrays({"w": np.full(3, float(rnd), np.float32)})
    store.save_round(_row(rnd), global_arrays=arrays, best_arrays=arrays, sampler=[3, [rnd], None],
                     early_stopping={"patience": 5, "best": 0.5, "best_round": rnd, "bad_rounds": 0})


def test_a_resumed_run_writes_each_committed_round_once(tmp_path, monkeypatch):
    """Round 3 dies before its commit: the resumed run trains it again, and the events hold it once (and rounds
    1-2 once, though the resumed run appends a second event file)."""
    store = RunStore(tmp_path / "run", CONFIG, tensorboard=True)
    _save(store, 1)
    _save(store, 2)
    monkeypatch.setattr(run_store, "write_json", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed between results.json and the state.json commit
        _save(store, 3)
    monkeypatch.undo()
    store.tracker.close()
    resumed = RunStore(tmp_path / "run", {**CONFIG, "resume": str(tmp_path / "run")}, resume=True, tensorboard=True)
    assert resumed.load_checkpoint()["round"] == 2
    _save(resumed, 3)
    resumed.finish(status="completed", test=_test_block(), best_arrays=None)
    acc = _events(tmp_path / "run")
    assert len(list(event_dir(tmp_path / "run").glob("events.out.tfevents.*"))) >= 2
    assert _series(acc, "val/weighted_f1") == [(r, pytest.approx(_row(r)["val_weighted_f1"])) for r in (1, 2, 3)]
    assert _series(acc, "comm/bytes_up") == [(r, _row(r)["bytes_up"]) for r in (1, 2, 3)]
    assert _series(acc, "test/accuracy") == [(3, pytest.approx(0.85))]
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0, 2]  # resumed after round 2
