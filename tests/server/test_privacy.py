"""User-level differential privacy (docs/privacy.md) on hand-built inputs: clipping, the noise's scale in both
modes, the accountant against dp-accounting itself, the budget stop and resume of a `ScriptedGrid` run, and the
keys that are refused."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtime.config import FEDERATED_ONLY, ConfigError, RunConfig
from fedtime.privacy import l2_norm, privatize, update
from server_app.privacy import UserLevelDP, epsilon
from server_app.run_store import RunStore, arrays_to_numpy, numpy_to_arrays
from server_app.strategies import ClientSampler, build_strategy
from tests.server.test_strategy import PAPER_TRAIN, ScriptedGrid, make_strategy


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _global(rng: np.random.Generator, d: int = 20_000) -> dict[str, np.ndarray]:
    return {"enc.w": rng.normal(0, 1, (d // 2,)).astype(np.float32),
            "enc.bn.running_var": rng.uniform(0.5, 2.0, (d // 2,)).astype(np.float32),
            "enc.bn.num_batches_tracked": np.array([7], np.int64)}


def _dp(z: float, clip: float, noise: str = "server", m: int = 9, population: int = 21, seed: int = 0) -> UserLevelDP:
    return UserLevelDP(z, clip, noise, 1e-5, 0.0, m, population, rng=np.random.default_rng(seed))


# --------------------------------------------------------------------------- clipping
def test_clipping_bounds_every_update_and_leaves_smaller_ones_unchanged():
    rng = np.random.default_rng(0)
    g = _global(rng)
    big = {k: (v + rng.normal(0, 0.05, v.shape).astype(v.dtype)) if v.dtype == np.float32 else v + 3
           for k, v in g.items()}
    assert l2_norm(update(big, g)) > 5
    for clip in (1.0, 0.1, 1e-3):
        sent = privatize(big, g, clip)
        # measured as the server measures it, on the float32 values as sent
        assert l2_norm(update(sent, g)) <= clip
        # clipped, not shrunk further (float32 rounding of values ~1 limits how close a tiny clip is met)
        assert l2_norm(update(sent, g)) == pytest.approx(clip, rel=1e-3)
        # the direction is kept: a scaled copy of the update
        u, v = update(big, g)["enc.w"], update(sent, g)["enc.w"]
        assert float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-4)
        assert sent["enc.bn.num_batches_tracked"][0] == 7  # an integer counter is not an update: the global value
    small = {k: (v + np.float32(1e-4)) if v.dtype == np.float32 else v for k, v in g.items()}
    assert l2_norm(update(small, g)) < 1.0
    sent = privatize(small, g, 1.0)
    for k in g:
        np.testing.assert_array_equal(sent[k], small[k])
    # a partial upload (FedMFS): the arrays not sent are a zero update, out of the norm
    part = {"enc.w": big["enc.w"]}
    sent = privatize(part, g, 0.5)
    assert list(sent) == ["enc.w"] and l2_norm(update(sent, g)) <= 0.5


def test_the_server_refuses_an_unclipped_reply_when_it_adds_the_noise():
    rng = np.random.default_rng(1)
    g = _global(rng, 2_000)
    trained = {k: v + np.float32(0.1) if v.dtype == np.float32 else v for k, v in g.items()}
    dp = _dp(1.0, 0.5)
    assert dp.refuse(privatize(trained, g, 0.5), g) is None
    assert re.fullmatch(r"update norm [\d.]+ exceeds dp-clip=0.5: not clipped", dp.refuse(trained, g))
    assert "does not have" in dp.refuse({"other": np.zeros(2, np.float32)}, g)
    # with the noise at the clients the norm is theirs to keep: nothing to check
    assert _dp(1.0, 0.5, "client").refuse(trained, g) is None


def test_a_round_under_dp_drops_an_unclipped_reply_and_averages_uniformly(tmp_path):
    """The sample-weighted mean is replaced by the uniform mean over the m sampled clients, failures counting
    as zero updates; z is tiny here so the noise does not hide the arithmetic."""
    subjects = [2, 3, 6, 7]
    steps = {2: 1.0, 3: 3.0, 6: 100.0, 7: -2.0}  # subject 6's update is far outside dp-clip: refused
    sizes = {2: 10, 3: 1000, 6: 10, 7: 10}

    def behaviour(subject, msg):
        g = arrays_to_numpy(msg.content["arrays"])
        return RecordDict({"arrays": numpy_to_arrays({k: v + np.float32(steps[subject]) for k, v in g.items()}),
                           "metrics": MetricRecord({"train_loss": 1.0, "train_accuracy": 0.5,
                                                    "num-examples": sizes[subject]})})

    grid = ScriptedGrid(subjects, behaviour)
    strat = make_strategy("fedavg", subjects, 4, keys={"dp-noise-multiplier": 1e-9, "dp-clip": 10.0})
    strat.discover(grid, timeout=5)
    start = numpy_to_arrays({"w": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.float32)})
    arrays, info = strat.train_round(grid, 1, start, _config(), timeout=5)
    out = arrays_to_numpy(arrays)
    np.testing.assert_allclose(out["w"], (1.0 + 3.0 - 2.0) / 4, atol=1e-6)  # / m = 4: subject 6 adds nothing
    assert info["trained"] == [2, 3, 7] and info["failures"][0]["subject"] == 6
    assert "exceeds dp-clip=10" in info["failures"][0]["reason"]
    sent = [dict(m.content["config"]) for m in grid.sent if m.metadata.message_type == "train"]
    assert sent[0] == {"dp-clip": 10.0, "dp-noise-std": 0.0, "server-round": 1}


def test_fedmfs_under_dp_counts_an_encoder_not_sent_as_a_zero_update():
    g = {"encoders.act.cnn.w": np.zeros(3, np.float32), "encoders.dc.cnn.w": np.zeros(3, np.float32),
         "fusion.w": np.zeros(3, np.float32)}
    sends = {2: ("encoders.act.cnn.w", "fusion.w", 1.0), 3: ("encoders.dc.cnn.w", "fusion.w", 2.0)}

    def behaviour(subject, msg):
        *keys, step = sends[subject]
        return RecordDict({"arrays": numpy_to_arrays({k: g[k] + np.float32(step) for k in keys}),
                           "metrics": MetricRecord({"train_loss": 1.0, "train_accuracy": 0.5, "num-examples": 10})})

    grid = ScriptedGrid([2, 3], behaviour)
    strat = make_strategy("fedmfs", [2, 3], 2, keys={"dp-noise-multiplier": 1e-9, "dp-clip": 100.0})
    strat.discover(grid, timeout=5)
    arrays, info = strat.train_round(grid, 1, numpy_to_arrays(g), _config(), timeout=5)
    out = arrays_to_numpy(arrays)
    np.testing.assert_allclose(out["encoders.act.cnn.w"], 0.5, atol=1e-6)  # (1 + 0) / m
    np.testing.assert_allclose(out["encoders.dc.cnn.w"], 1.0, atol=1e-6)   # (0 + 2) / m
    np.testing.assert_allclose(out["fusion.w"], 1.5, atol=1e-6)
    assert info["aggregation"]["uploaded"] == {"2": ["act"], "3": ["dc"]} and strat.fresh == ["act", "dc"]


def test_fedmobile_under_dp_drops_its_contribution_weights_for_the_uniform_mean():
    g = {"fusion.w": np.zeros(3, np.float32), "generators.net.w": np.zeros(3, np.float32)}
    step = {2: 1.0, 3: 4.0}
    grid = ScriptedGrid([2, 3], lambda s, m: RecordDict({
        "arrays": numpy_to_arrays({k: v + np.float32(step[s]) for k, v in g.items()}),
        "metrics": MetricRecord({"train_loss": 1.0, "train_accuracy": 0.5, "num-examples": 10 if s == 2 else 500})}))
    strat = make_strategy("fedmobile", [2, 3], 2, keys={"dp-noise-multiplier": 1e-9, "dp-clip": 100.0})
    strat.discover(grid, timeout=5)
    arrays, _ = strat.train_round(grid, 1, numpy_to_arrays(g), _config(), timeout=5)
    for v in arrays_to_numpy(arrays).values():  # no local validation figures needed, no sample weighting
        np.testing.assert_allclose(v, 2.5, atol=1e-6)


def _config():
    from flwr.app import ConfigRecord
    return ConfigRecord({})


# --------------------------------------------------------------------------- noise
def test_server_noise_has_the_configured_standard_deviation():
    """N(0, (z·C)²) on the sum, divided by m: the mean moves by z·C/m per value (20k values, within 3 %)."""
    rng = np.random.default_rng(2)
    g = _global(rng)
    z, clip, m = 1.3, 0.7, 9
    dp = _dp(z, clip, "server", m=m, seed=3)
    out = dp.mean([g] * m, g, ["enc.w"])  # zero updates: what moves is the noise
    assert np.std(out["enc.w"].astype(np.float64) - g["enc.w"]) == pytest.approx(z * clip / m, rel=0.03)
    assert dp.round_config() == {"dp-clip": clip, "dp-noise-std": 0.0}


def test_client_noise_shares_sum_to_the_same_noise():
    """Each client adds N(0, (z·C)²/m): the sum over the m clients has standard deviation z·C, and the server
    adds the share of a client that did not answer."""
    rng = np.random.default_rng(4)
    g = _global(rng)
    z, clip, m = 1.3, 0.7, 9
    dp = _dp(z, clip, "client", m=m, seed=5)
    std = dp.round_config()["dp-noise-std"]
    assert std == pytest.approx(z * clip / math.sqrt(m))
    shares = [privatize(g, g, clip, std, rng=np.random.default_rng(100 + i)) for i in range(m)]
    total = sum(update(s, g)["enc.w"] for s in shares)
    assert np.std(total) == pytest.approx(z * clip, rel=0.03)
    # three of the nine did not answer: the server tops the noise up to the same level
    out = dp.mean(shares[:6], g, ["enc.w"])
    assert np.std((out["enc.w"].astype(np.float64) - g["enc.w"]) * m) == pytest.approx(z * clip, rel=0.03)


def test_the_private_mean_treats_missing_arrays_as_zero_updates_and_keeps_variances_and_counters():
    g = {"a": np.zeros(4, np.float32), "b.running_var": np.full(4, 0.01, np.float32),
         "b.num_batches_tracked": np.array([3], np.int64)}
    dp = _dp(1e-9, 1.0, m=4)
    states = [{"a": np.ones(4, np.float32)}, {"a": np.full(4, 3.0, np.float32)},  # FedMFS: "a" only
              {"a": np.zeros(4, np.float32), "b.running_var": np.full(4, -1.0, np.float32),
               "b.num_batches_tracked": np.array([99], np.int64)}]
    out = dp.mean(states, g, list(g))
    np.testing.assert_allclose(out["a"], 1.0, atol=1e-6)  # (1 + 3 + 0) / m
    assert (out["b.running_var"] >= 0).all()  # 0.01 − 1.01/4 < 0: kept at 0
    assert out["b.num_batches_tracked"][0] == 3


# --------------------------------------------------------------------------- accounting
def test_epsilon_is_dp_accounting_s_for_sampling_without_replacement_of_one_user():
    """z = 1.1, 9 of 21 users per round, 10 rounds, δ = 1e-5, built directly with the library. Replacing one
    user moves the sum of clipped updates by up to 2C, so the library's noise multiplier (std / sensitivity) is
    z / 2; with z itself the library would under-report ε."""
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    def library(multiplier: float) -> float:
        acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        acc.compose(dp_event.SelfComposedDpEvent(
            dp_event.SampledWithoutReplacementDpEvent(source_dataset_size=21, sample_size=9,
                                                      event=dp_event.GaussianDpEvent(multiplier)), 10))
        return acc.get_epsilon(1e-5)

    ours = epsilon(1.1, 9, 21, 10, 1e-5)
    assert ours == pytest.approx(library(1.1 / 2), rel=1e-9)
    assert ours > library(1.1)
    assert 30 < ours < 40  # 34.1: user-level DP over 21 users is expensive
    assert _dp(1.1, 1.0).epsilon(10) == ours and epsilon(1.1, 9, 21, 0, 1e-5) == 0.0


def test_epsilon_grows_with_rounds_and_falls_with_the_noise():
    by_round = [epsilon(1.1, 9, 21, r, 1e-5) for r in (1, 2, 5, 10)]
    assert by_round == sorted(by_round) and len(set(by_round)) == 4
    by_noise = [epsilon(z, 9, 21, 10, 1e-5) for z in (0.5, 1.1, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    # sampling helps: 9 of 21 costs less than everyone every round
    assert epsilon(1.1, 9, 21, 10, 1e-5) < epsilon(1.1, 21, 21, 10, 1e-5)


# --------------------------------------------------------------------------- the run
def _echo(subject, msg):
    """A client whose update is 0: what the server aggregates is the noise."""
    return RecordDict({"arrays": msg.content["arrays"],
                       "metrics": MetricRecord({"train_loss": 1.0, "train_accuracy": 0.5, "num-examples": 10})})


def _val(rnd, arrays):
    return MetricRecord({"val_loss": 1.0, "val_accuracy": 0.5, "val_weighted_f1": 0.1 * rnd, "val_macro_f1": 0.5})


DP = {"dp-noise-multiplier": 1.1, "dp-clip": 0.5}


def test_a_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path):
    target = (epsilon(1.1, 9, 21, 2, 1e-5) + epsilon(1.1, 9, 21, 3, 1e-5)) / 2
    keys = {**DP, "dp-target-epsilon": target}
    store = RunStore(tmp_path / "run", {"num-server-rounds": 5, **keys})
    strat = make_strategy("fedavg", PAPER_TRAIN, 9, patience=0, store=store, keys=keys)
    w0 = numpy_to_arrays({"w": np.zeros((2, 3), np.float32)})
    strat.start(ScriptedGrid(PAPER_TRAIN, _echo), w0, num_rounds=5, evaluate_fn=_val)
    res = store.results
    assert [r["round"] for r in res["history"]] == [1, 2]
    p = res["privacy"]
    assert p["epsilon"] == [r["epsilon"] for r in res["history"]] == [epsilon(1.1, 9, 21, r, 1e-5) for r in (1, 2)]
    assert p["stopped"] == strat.stop_reason == (f"budget: round 3 would reach ε={epsilon(1.1, 9, 21, 3, 1e-5):.3g}"
                                                 f" > {target:g}")
    assert p["sampling"] == {"clients_per_round": 9, "num_clients": 21, "method": "without-replacement",
                             "sampler": "os-entropy"}
    assert (p["mechanism"], p["clip"], p["noise_multiplier"], p["delta"], p["target_epsilon"]) == (
        "gaussian, user-level, noise at server", 0.5, 1.1, 1e-5, target)
    assert not strat.early_stopping.should_stop  # the budget, not patience, stopped it
    # a budget below one round's ε is a mistake in the config, not a run without rounds
    low = make_strategy("fedavg", PAPER_TRAIN, 9, keys={**DP, "dp-target-epsilon": 0.1})
    with pytest.raises(ConfigError, match=r"'dp-target-epsilon' = 0.1 allows no round: one round already reaches"):
        low.start(ScriptedGrid(PAPER_TRAIN, _echo), w0, num_rounds=5, evaluate_fn=_val)


def test_a_resumed_dp_run_continues_the_accounting(tmp_path):
    config = {"num-server-rounds": 2, **DP}
    w0 = numpy_to_arrays({"w": np.zeros((2, 3), np.float32)})
    grid = ScriptedGrid(PAPER_TRAIN, _echo)
    first = make_strategy("fedavg", PAPER_TRAIN, 9, patience=0, store=RunStore(tmp_path / "run", config), keys=DP)
    first.start(grid, w0, num_rounds=2, evaluate_fn=_val)
    assert first.sampler.get_state() is None  # the secret sampler keeps nothing to replay
    longer = {**config, "num-server-rounds": 4}
    store = RunStore(tmp_path / "run", longer, resume=True)
    make_strategy("fedavg", PAPER_TRAIN, 9, patience=0, store=store, keys=DP).start(grid, w0, num_rounds=4,
                                                                                     evaluate_fn=_val)
    expected = [epsilon(1.1, 9, 21, r, 1e-5) for r in (1, 2, 3, 4)]
    assert store.results["privacy"]["epsilon"] == expected == [r["epsilon"] for r in store.results["history"]]
    # the DP keys are not among the changes a resumption may make
    for k, v in {"dp-noise-multiplier": 2.0, "dp-clip": 1.0, "dp-noise": "client", "dp-delta": 1e-6,
                 "dp-target-epsilon": 50.0}.items():
        with pytest.raises(ValueError, match=f"cannot resume with a different configuration \\({k}:"):
            RunStore(tmp_path / "run", {**longer, k: v}, resume=True)
    # the accounting assumed one population: resumed with fewer connected subjects it refuses
    fewer = make_strategy("fedavg", PAPER_TRAIN, 9, patience=0, keys=DP,
                          store=RunStore(tmp_path / "run", {**longer, "num-server-rounds": 5}, resume=True))
    with pytest.raises(Exception, match="sampled from 21 training subjects, 20 are connected now"):
        fewer.start(ScriptedGrid(PAPER_TRAIN[:-1], _echo), w0, num_rounds=5, evaluate_fn=_val)


def test_a_run_of_an_earlier_version_without_the_dp_keys_still_resumes(tmp_path):
    old = {k: v for k, v in RunConfig().to_run_config().items() if not k.startswith("dp-")}
    store = RunStore(tmp_path / "run", old)
    es = {"patience": 0, "best": 0.5, "best_round": 1, "bad_rounds": 0}
    w = numpy_to_arrays({"w": np.zeros(2, np.float32)})
    store.save_round({"round": 1}, global_arrays=w, best_arrays=w, sampler=[3, [0], None], early_stopping=es)
    resumed = RunStore(tmp_path / "run", RunConfig().to_run_config(), resume=True)
    assert resumed.results["resumed"][-1]["changed"] == {}
    assert resumed.results["config"]["dp-noise-multiplier"] == 0.0
    with pytest.raises(ValueError, match="dp-noise-multiplier"):  # turning DP on half-way is refused
        RunStore(tmp_path / "run", {**RunConfig().to_run_config(), "dp-noise-multiplier": 1.0}, resume=True)


def test_the_secret_sampler_draws_valid_samples_and_has_no_state():
    s = ClientSampler(42, PAPER_TRAIN, secret=True)
    draws = [s.sample(PAPER_TRAIN, 9) for _ in range(20)]
    assert all(len(set(d)) == 9 and set(d) <= set(PAPER_TRAIN) for d in draws)
    assert len({tuple(sorted(d)) for d in draws}) > 1
    assert s.get_state() is None and s.pool(PAPER_TRAIN[:5]) == [x for x in s.order if x in PAPER_TRAIN[:5]]
    s.set_state(None)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_dp_with_a_robust_strategy_is_refused_naming_the_key(name):
    cfg = RunConfig.from_run_config({"strategy": name, "dp-noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match=f"'dp-noise-multiplier' .* applies to the weighted-mean strategies, "
                                          f"not to '{name}'"):
        build_strategy(cfg, split=SimpleNamespace(train=(2, 3), val=(5,)))


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavg-slr", "fedmfs", "fedepa"])
def test_dp_is_accepted_by_the_weighted_mean_strategies(name):
    cfg = RunConfig.from_run_config({"strategy": name, "dp-noise-multiplier": 1.0, "clients-per-round": 2})
    strat = build_strategy(cfg, split=SimpleNamespace(train=(2, 3), val=(5,)))
    assert strat.dp is not None and strat.sampler.secret


@pytest.mark.parametrize("overrides, message", [
    ({"dp-noise-multiplier": -1.0}, "'dp-noise-multiplier' must be >= 0"),
    ({"dp-noise-multiplier": float("nan")}, "'dp-noise-multiplier' must be a finite number"),
    ({"dp-clip": 0.0}, "'dp-clip' must be > 0"),
    ({"dp-clip": float("inf")}, "'dp-clip' must be a finite number"),
    ({"dp-delta": 1.0}, "'dp-delta' must be < 1"),
    ({"dp-delta": 0.0}, "'dp-delta' must be > 0"),
    ({"dp-target-epsilon": -1.0}, "'dp-target-epsilon' must be >= 0"),
    ({"dp-target-epsilon": float("nan")}, "'dp-target-epsilon' must be a finite number"),
    ({"dp-noise": "local"}, "'dp-noise' must be one of"),
])
def test_bad_dp_keys_are_refused_naming_them(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_run_config(overrides)


def test_dp_with_modality_aware_averaging_is_refused_and_dp_is_federated_only():
    cfg = RunConfig.from_run_config({"dp-noise-multiplier": 1.0, "modality-aware-averaging": True})
    with pytest.raises(ConfigError, match="'dp-noise-multiplier' and 'modality-aware-averaging' exclude each other"):
        build_strategy(cfg, split=SimpleNamespace(train=(2, 3), val=(5,)))
    assert {"dp-noise-multiplier", "dp-clip", "dp-noise", "dp-delta", "dp-target-epsilon"} <= set(FEDERATED_ONLY)
