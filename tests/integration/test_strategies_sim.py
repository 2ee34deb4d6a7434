"""Every registered strategy end to end under the real Ray simulation engine (tiny preset, 2 rounds, 4 nodes),
each in one of the messy-federation scenarios it is meant for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server_app.deploy import marked_pids
from server_app.simulation import run_simulation
from server_app.strategies import STRATEGIES

TINY = {"model-preset": "tiny", "local-epochs": 1, "batch-size": 16, "grad-accum": 1, "lr": 3e-3,
        "num-server-rounds": 2, "clients-per-round": 4, "patience": 0}

CASES = {
    # seed 0 draws subjects 2 and 3 (of the nodes' 2, 3, 6, 7) among the third lacking the depth camera
    "fedprox": {"fedprox.proximal-mu": 0.1, "absent-modalities": "dc", "absent-fraction": 0.33,
                "modality-aware-averaging": True},
    # with the stronger single-sensor encoders (unimodal heads, accelerometer window statistics) and generators
    # distilled towards the fused prediction
    "fedmobile": {"missing-rate": 0.5, "missing-at-eval": True, "fedmobile.shapley-clusters": 2,
                  "fedmobile.proxy-windows": 64, "unimodal-weight": 1.0, "acc-window-stats": True,
                  "fedmobile.generator-objective": "prediction"},
    "fedmedian": {"poison": "label-flip", "poison-clients": 1},
    "fedtrimmedavg": {"absent-modalities": "dc", "absent-fraction": 0.25, "fedtrimmedavg.trim-beta": 0.25},
    "krum": {"poison": "scale", "poison-clients": 1, "krum.num-malicious": 1},
    # local fusion and classifier, one encoder up per client: no global test, the personal models are the result
    "fedmfs": {"fedmfs.head": "local", "fedmfs.upload-modalities": 1, "personal-eval-fraction": 0.2},
    # label-scarce: the alignment also trains on the windows without a label
    "fedepa": {"labeled-fraction": 0.1, "personal-eval-fraction": 0.2, "fedepa.ala-first-epochs": 2},
    # the worked example of docs/architecture.md ("Add a strategy"), run as a user would
    "fedavg-slr": {"fedavg-slr.server-lr": 0.5},
}


def test_every_strategy_has_an_end_to_end_case():
    assert set(CASES) | {"fedavg"} == set(STRATEGIES)  # fedavg: tests/integration/test_simulation.py


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(CASES))
def test_strategy_runs_two_rounds_in_simulation(strategy, mex_path, tmp_path):
    rc = {**TINY, **CASES[strategy], "strategy": strategy, "data-path": str(mex_path),
          "output-dir": str(tmp_path / "out"), "run-name": strategy}
    run = run_simulation(rc, nodes=4, workdir=tmp_path / "sim", timeout=900)
    assert run.ok, f"{strategy}: status {run.status}; log tail:\n{run.log()[-4000:]}"
    assert run.leftover_pids == [] and not marked_pids(run.log_path.parent.name)
    res = json.loads((tmp_path / "out" / strategy / "results.json").read_text())
    assert res["status"] == "completed" and res["config"]["strategy"] == strategy
    assert [r["round"] for r in res["history"]] == [1, 2]
    assert all(sorted(r["trained"]) == [2, 3, 6, 7] for r in res["history"])
    sc = res["scenario"]
    if strategy == "fedmfs":
        assert res["test"] is None  # no shared head
        for r in res["history"]:
            up = r["aggregation"]["uploaded"]
            assert sorted(up) == ["2", "3", "6", "7"] and all(len(m) == 1 for m in up.values())
            assert all(len(v) == 4 for v in r["aggregation"]["shapley"].values())
            assert sum(r["bytes_up_by_subject"].values()) == r["bytes_up"]
            assert r["bytes_up"] < 0.5 * res["model"]["trainable_bytes"] * 4  # an encoder each, no head
        p = res["personalized"]
        assert p["method"] == "own" and p["subjects"] == [2, 3, 6, 7] and p["never_trained"] == []
        assert 0 <= p["personal"]["weighted_f1"] <= 1 and "global" not in p
        return
    assert res["test"]["num_examples"] > 0 and 0 <= res["test"]["weighted_f1"] <= 1
    if strategy == "fedepa":
        assert sc["labeled_fraction"] == 0.1
        p = res["personalized"]
        assert p["method"] == "own" and p["subjects"] == [2, 3, 6, 7] and p["num_examples"] > 0
        assert set(p["per_subject"]) == {"2", "3", "6", "7"} and 0 <= p["personal"]["macro_f1"] <= 1
    if strategy == "fedmobile":
        assert sc["missing_rate"] == 0.5
        for r in res["history"]:
            agg = r["aggregation"]
            assert sorted(agg["weights"]) == ["2", "3", "6", "7"]
            assert sum(agg["weights"].values()) == pytest.approx(1.0)
            assert sum(agg["generators"]["weights"].values()) == pytest.approx(1.0)
            assert len(agg["generators"]["shapley"]) in (1, 2)
            # the prediction gate: cross-entropy saved on the proxy set per modality, finite
            assert len(agg["generator_quality"]) == 4 and all(np.isfinite(agg["generator_quality"]))
        # the unimodal heads were trained, aggregated and kept with the best model
        from safetensors.numpy import load_file

        best = load_file(tmp_path / "out" / strategy / "best_model.safetensors")
        heads = sorted(k for k in best if k.startswith("unimodal_heads."))
        assert heads == [f"unimodal_heads.{m}.{p}" for m in ("act", "acw", "dc", "pm") for p in ("bias", "weight")]
    if strategy == "fedprox":
        assert {2, 3} <= set(sc["absent_subjects"])
        # the clients reported which windows had each sensor, and the server saw who lacked the depth camera
        assert all(r["aggregation"]["lacking"] == {"dc": [2, 3]} for r in res["history"])
    if strategy == "krum":
        assert all(r["aggregation"]["krum_selected"] in r["trained"] for r in res["history"])
    if strategy in ("fedmedian", "krum"):
        assert len(sc["poisoned_subjects"]) == 1
    if strategy == "fedtrimmedavg":
        assert len(sc["absent_subjects"]) == 5  # a quarter of the 21 training subjects lack dc


@pytest.mark.slow
def test_fedavg_with_user_level_dp_records_epsilon_every_round(mex_path, tmp_path):
    """docs/privacy.md end to end: clients clip, the server adds the noise and accounts; 4 of 4 nodes sampled
    (no amplification), so ε is large but finite, and grows with the rounds."""
    rc = {**TINY, "strategy": "fedavg", "dp-noise-multiplier": 0.5, "dp-clip": 1.0, "data-path": str(mex_path),
          "output-dir": str(tmp_path / "out"), "run-name": "dp"}
    run = run_simulation(rc, nodes=4, workdir=tmp_path / "sim", timeout=900)
    assert run.ok, f"status {run.status}; log tail:\n{run.log()[-4000:]}"
    res = json.loads((tmp_path / "out" / "dp" / "results.json").read_text())
    assert res["status"] == "completed" and [r["round"] for r in res["history"]] == [1, 2]
    p = res["privacy"]
    assert p["sampling"]["clients_per_round"] == 4 and p["sampling"]["num_clients"] == 4
    assert len(p["epsilon"]) == 2 and all(np.isfinite(p["epsilon"])) and p["epsilon"][0] < p["epsilon"][1]
    assert [r["epsilon"] for r in res["history"]] == p["epsilon"] and p["stopped"] is None
    assert all(r["failures"] == [] for r in res["history"])  # every client's update came clipped
    assert "| ε " in run.log()  # the round line shows it
