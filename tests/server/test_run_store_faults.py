"""Faults around a run's directory (fast: RunStore on hand-built arrays, no Flower processes): a kill between the
checkpoint writes, resuming with a changed configuration, a corrupt checkpoint file. Each failed on the code before
the fix (a resumed run trained round N+1 on top of round N+1's weights; changed keys were ignored; a corrupt file
gave a raw SafetensorError)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtime.config import RunConfig
from server_app import run_store
from server_app.run_store import RunStore, arrays_to_numpy, numpy_to_arrays

CONFIG = RunConfig().to_run_config()


def _arrays(value: float):
    return numpy_to_arrays({"w": np.full((2, 3), value, np.float32)})


def _save(store: RunStore, rnd: int, value: float, best_round: int) -> None:
    store.save_round({"round": rnd, "val_weighted_f1": value, "train_loss": 1.0},
                     global_arrays=_arrays(value), best_arrays=_arrays(float(best_round)),
                     sampler=[3, [rnd], None], early_stopping={"patience": 5, "best": 0.5, "best_round": best_round,
                                                               "bad_rounds": rnd - best_round})


def test_a_kill_between_the_checkpoint_writes_resumes_from_the_last_committed_round(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "run", CONFIG)
    _save(store, 1, 1.0, best_round=1)

    def killed(*args, **kwargs):  # the process dies after the weights, before results.json and state.json
        raise KeyboardInterrupt

    monkeypatch.setattr(run_store, "write_results", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(store, 2, 2.0, best_round=2)
    monkeypatch.undo()
    resumed = RunStore(tmp_path / "run", {**CONFIG, "resume": str(tmp_path / "run")}, resume=True)
    state = resumed.load_checkpoint()
    assert state["round"] == 1
    np.testing.assert_array_equal(arrays_to_numpy(state["global"])["w"], 1.0)  # round 1's weights, not round 2's
    np.testing.assert_array_equal(arrays_to_numpy(state["best"])["w"], 1.0)
    assert [r["round"] for r in resumed.results["history"]] == [1]
    # the resumed run commits round 2 and leaves only the committed files
    _save(resumed, 2, 2.0, best_round=2)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoint").glob("*.safetensors"))
    assert names == ["best-002.safetensors", "global-002.safetensors"]


def test_the_best_round_s_file_is_kept_while_later_rounds_are_worse(tmp_path):
    store = RunStore(tmp_path / "run", CONFIG)
    for rnd in (1, 2, 3):
        _save(store, rnd, float(rnd), best_round=1)
    state = RunStore(tmp_path / "run", CONFIG, resume=True).load_checkpoint()
    assert state["round"] == 3 and state["best"].to_numpy_ndarrays()[0].flat[0] == 1.0


@pytest.mark.parametrize("key, value", [("weight-decay", 1e-3), ("normalization", "global"),
                                        ("eval-bn-stats", "global"), ("augment-sigma", 0.0),
                                        ("acc-window-stats", False), ("data-path", "/elsewhere/MEx.zip"),
                                        ("fedprox.proximal-mu", 0.5)])
def test_resume_refuses_a_key_that_changes_training_naming_it(tmp_path, key, value):
    store = RunStore(tmp_path / "run", CONFIG)
    _save(store, 1, 1.0, best_round=1)
    with pytest.raises(ValueError, match=f"{key}: "):
        RunStore(tmp_path / "run", {**CONFIG, key: value}, resume=True)


def test_resume_accepts_the_listed_changes_and_records_them(tmp_path):
    store = RunStore(tmp_path / "run", CONFIG)
    _save(store, 1, 1.0, best_round=1)
    changed = {"num-server-rounds": 20, "patience": 0, "resume": str(tmp_path / "run")}
    resumed = RunStore(tmp_path / "run", {**CONFIG, **changed}, resume=True)
    assert {k: resumed.results["config"][k] for k in changed} == changed  # results.json shows what now applies
    record = resumed.results["resumed"][-1]["changed"]
    assert record == {"num-server-rounds": [10, 20], "patience": [6, 0], "resume": ["", str(tmp_path / "run")]}


def test_a_corrupt_checkpoint_is_named_in_the_error(tmp_path):
    store = RunStore(tmp_path / "run", CONFIG)
    _save(store, 1, 1.0, best_round=1)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    path = tmp_path / "run" / "checkpoint" / state["global"]
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=f"checkpoint file {path} is unreadable"):
        RunStore(tmp_path / "run", CONFIG, resume=True).load_checkpoint()


def test_results_and_checkpoints_are_readable_by_the_group(tmp_path):
    """They were written 0600 (mkstemp's mode) while the cache arrays were 0644: now what the umask allows."""
    import os
    import stat

    store = RunStore(tmp_path / "run", CONFIG)
    _save(store, 1, 1.0, best_round=1)
    mask = os.umask(0o022)
    os.umask(mask)
    for p in [tmp_path / "run" / "results.json", *(tmp_path / "run" / "checkpoint").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
