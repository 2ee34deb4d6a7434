"""Strategy unit tests on hand-built replies (a scripted Grid; the real Flower runtime is exercised by
tests/integration)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedtime.config import ConfigError, RunConfig
from server_app.run_store import RunStore, arrays_to_numpy, numpy_to_arrays
from server_app.strategies import (STRATEGIES, ClientSampler, EarlyStopping, FederationError, MagnetFedAvg,
                                   MagnetFedProx, build_strategy, check_strategy_options, weighted_average)

PAPER_TRAIN = [2, 3, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 26, 27, 28, 30]
# the reference script's draws (random.seed(42), shuffle, then random.sample(clients, 9) per round)
PAPER_ROUNDS = [[19, 12, 20, 7, 22, 10, 23, 11, 27], [10, 27, 11, 30, 3, 26, 22, 7, 16],
                [12, 15, 17, 14, 27, 30, 3, 18, 23]]


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def make_strategy(name: str, subjects: list[int], k: int, *, patience: int = 1, store=None, keys=None,
                  **components):
    """Strategy `name` from a run config (its table's keys dotted, e.g. {"fedprox.proximal-mu": 0.1}), as the
    ServerApp builds it, over `subjects`; `components` are injected (FedMobile's proxy set)."""
    cfg = RunConfig.from_run_config({"strategy": name, "clients-per-round": k, "patience": patience, **(keys or {})})
    check_strategy_options(cfg)
    cls = STRATEGIES[name]
    return cls(cfg, cls.read_params(cfg), train_subjects=subjects, store=store, **components)


class ScriptedGrid(Grid):
    """Each node id runs `behaviour(subject, message) -> RecordDict | Error`."""

    def __init__(self, subjects, behaviour):
        self.node_of = {s: 1000 + s for s in subjects}
        self.behaviour = behaviour
        self.sent = []
        self.dead = set()

    def get_node_ids(self):
        return list(self.node_of.values())

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"msg-{len(self.sent)}"  # as the SuperLink does on push
            self.sent.append(m)
            subject = m.metadata.dst_node_id - 1000
            if m.metadata.message_type == "query":
                out = RecordDict({"metrics": MetricRecord({"subject": subject})})
            else:
                out = self.behaviour(subject, m)
            if isinstance(out, Error) and subject in self.dead:
                # the SuperLink answers for a node that stopped: the reply does not come from that node
                r = Message(out, reply_to=m)
                r.metadata.__dict__["_src_node_id"] = 0
                replies.append(r)
            elif out is not None:
                replies.append(Message(out, reply_to=m))
        return replies

    # unused abstract members
    def create_message(self, *a, **k): raise NotImplementedError
    def push_messages(self, messages): raise NotImplementedError
    def pull_messages(self, message_ids): raise NotImplementedError
    def set_run(self, run): raise NotImplementedError
    @property
    def run(self): raise NotImplementedError


def reply(value: float, n: int, loss: float = 1.0) -> RecordDict:
    return RecordDict({"arrays": numpy_to_arrays({"w": np.full((2, 3), value, np.float32),
                                                  "b": np.array([value], np.float32)}),
                       "metrics": MetricRecord({"train_loss": loss, "train_accuracy": 0.5, "num-examples": n})})


def test_weighted_average_is_exact_sample_weighting():
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([4.0, 8.0], np.float32)}
    out = weighted_average([a, b], [100, 300])
    np.testing.assert_allclose(out["w"], [(1 * 100 + 4 * 300) / 400, (2 * 100 + 8 * 300) / 400], rtol=0, atol=1e-6)
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        weighted_average([a, {"w": np.zeros(3, np.float32)}], [1, 1])


def test_sampler_reproduces_the_paper_sequence_and_is_seeded():
    s = ClientSampler(42, PAPER_TRAIN)
    draws = [sorted(s.sample(PAPER_TRAIN, 9)) for _ in range(3)]
    assert draws == [sorted(r) for r in PAPER_ROUNDS]
    s2 = ClientSampler(42, PAPER_TRAIN)
    state0 = s2.get_state()
    first = s2.sample(PAPER_TRAIN, 9)
    s2.set_state(state0)
    assert s2.sample(PAPER_TRAIN, 9) == first
    other = ClientSampler(7, PAPER_TRAIN).sample(PAPER_TRAIN, 9)
    assert len(set(other)) == 9 and set(other) <= set(PAPER_TRAIN)
    with pytest.raises(FederationError, match="only 2"):
        s.sample([2, 3], 9)


def test_early_stopping_keeps_best_and_stops_after_patience():
    es = EarlyStopping(patience=2)
    flags = [es.update(r, v) for r, v in enumerate([0.5, 0.7, 0.7, 0.6], start=1)]
    assert flags == [True, True, False, False]
    assert es.best_round == 2 and es.best == 0.7 and es.should_stop
    assert not EarlyStopping(patience=0, bad_rounds=10).should_stop


def _strategy(tmp_path, subjects, k, **kw):
    store = RunStore(tmp_path / "run", {"num-server-rounds": 3}, resume=False)
    return make_strategy("fedavg", subjects, k, patience=kw.pop("patience", 5), store=store, **kw)


def test_round_aggregates_weighted_and_skips_failed_reply(tmp_path):
    subjects = [2, 3, 6]
    values = {2: (1.0, 100), 3: (3.0, 300), 6: (9.0, 50)}

    def behaviour(subject, msg):
        if subject == 6:
            return Error(code=0, reason="simulated crash")
        v, n = values[subject]
        return reply(v, n, loss=v)

    grid = ScriptedGrid(subjects, behaviour)
    grid.dead = {6}
    strat = _strategy(tmp_path, subjects, 3)
    strat.discover(grid, timeout=5)
    start = numpy_to_arrays({"w": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.float32)})
    arrays, info = strat.train_round(grid, 1, start, _empty_config(), timeout=5)
    out = arrays_to_numpy(arrays)
    np.testing.assert_allclose(out["w"], (1.0 * 100 + 3.0 * 300) / 400)
    assert info["trained"] == [2, 3] and [f["subject"] for f in info["failures"]] == [6]
    assert info["train_loss"] == pytest.approx((1.0 * 100 + 3.0 * 300) / 400)
    # bytes as serialized: the global model to each of the 3 sampled clients, a reply from each of the 2 that
    # answered (28 bytes of float32 arrays each, plus their names and headers)
    one = start.count_bytes()
    assert 28 <= one < 28 + 2 * 200 and info["bytes_down"] == 3 * one
    assert info["bytes_up"] == 2 * reply(1.0, 100)["arrays"].count_bytes() == 2 * one


def test_round_rejects_a_reply_with_nonfinite_arrays(tmp_path):
    subjects = [2, 3, 6]

    def behaviour(subject, msg):
        r = reply({2: 1.0, 3: 3.0, 6: 1.0}[subject], 100)
        if subject == 6:  # a diverged client: one NaN among finite values
            w = np.ones((2, 3), np.float32)
            w[1, 2] = np.nan
            r = RecordDict({"arrays": numpy_to_arrays({"w": w, "b": np.array([np.inf], np.float32)}),
                            "metrics": r["metrics"]})
        return r

    grid = ScriptedGrid(subjects, behaviour)
    strat = _strategy(tmp_path, subjects, 3)
    strat.discover(grid, timeout=5)
    arrays, info = strat.train_round(grid, 1, numpy_to_arrays({"w": np.zeros((2, 3), np.float32),
                                                               "b": np.zeros(1, np.float32)}),
                                     _empty_config(), timeout=5)
    np.testing.assert_allclose(arrays_to_numpy(arrays)["w"], 2.0)
    assert info["trained"] == [2, 3]
    assert info["failures"] == [{"subject": 6, "reason": "non-finite values in 2 array(s): w, b"}]


def _empty_config():
    from flwr.app import ConfigRecord
    return ConfigRecord({})


def test_too_few_nodes_fail_fast_naming_both_numbers():
    """It polled for round-timeout (an hour) without a word before."""
    import time

    strat = make_strategy("fedavg", [2, 3, 6], 3, keys={"discovery-timeout": 1.0})
    t0 = time.time()
    with pytest.raises(FederationError, match=r"2 SuperNodes connected, but clients-per-round=3 needs at least 3"):
        strat.discover(ScriptedGrid([2, 3], lambda s, m: reply(1.0, 5)), timeout=3600)
    assert time.time() - t0 < 5


def test_too_few_replies_is_a_clear_error(tmp_path):
    grid = ScriptedGrid([2, 3], lambda s, m: Error(code=0, reason="boom"))
    strat = _strategy(tmp_path, [2, 3], 2)
    strat.discover(grid, timeout=5)
    with pytest.raises(FederationError, match="min-train-replies"):
        strat.train_round(grid, 1, numpy_to_arrays({"w": np.zeros(1, np.float32)}), _empty_config(), timeout=5)


def test_start_stops_early_keeps_best_round_and_checkpoints(tmp_path):
    subjects = PAPER_TRAIN
    grid = ScriptedGrid(subjects, lambda s, m: reply(float(m.content["config"]["server-round"]), 10))
    strat = _strategy(tmp_path, subjects, 9, patience=2)
    val_by_round = {1: 0.4, 2: 0.8, 3: 0.6, 4: 0.7, 5: 0.9}

    def evaluate_fn(rnd, arrays):
        return MetricRecord({"val_loss": 1.0, "val_accuracy": 0.5, "val_weighted_f1": val_by_round[rnd],
                             "val_macro_f1": 0.5})

    result = strat.start(grid, numpy_to_arrays({"w": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.float32)}),
                         num_rounds=5, evaluate_fn=evaluate_fn)
    rounds = strat.store.results["history"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]  # stopped after 2 rounds without gain
    assert strat.early_stopping.best_round == 2
    assert strat.store.results["best"] == {"round": 2, "val_loss": 1.0, "val_accuracy": 0.5, "val_weighted_f1": 0.8,
                                           "val_macro_f1": 0.5}
    assert arrays_to_numpy(result.arrays)["w"][0, 0] == 2.0  # the best round's model, not the last
    assert [sorted(r["clients"]) for r in rounds[:3]] == [sorted(r) for r in PAPER_ROUNDS]
    assert (tmp_path / "run" / "checkpoint" / "state.json").exists()


def test_a_stopped_run_resumed_with_a_longer_patience_continues(tmp_path):
    subjects = PAPER_TRAIN
    grid = ScriptedGrid(subjects, lambda s, m: reply(float(m.content["config"]["server-round"]), 10))
    val_by_round = {1: 0.4, 2: 0.8, 3: 0.6, 4: 0.7, 5: 0.5, 6: 0.9}

    def evaluate_fn(rnd, arrays):
        return MetricRecord({"val_loss": 1.0, "val_accuracy": 0.5, "val_weighted_f1": val_by_round[rnd],
                             "val_macro_f1": 0.5})

    w0 = numpy_to_arrays({"w": np.zeros((2, 3), np.float32)})
    _strategy(tmp_path, subjects, 9, patience=2).start(grid, w0, num_rounds=6, evaluate_fn=evaluate_fn)
    # same patience: the resumed run is already stopped and trains nothing
    same = make_strategy("fedavg", subjects, 9, patience=2,
                         store=RunStore(tmp_path / "run", {"num-server-rounds": 6, "patience": 2}, resume=True))
    same.start(grid, w0, num_rounds=6, evaluate_fn=evaluate_fn)
    assert [r["round"] for r in same.store.results["history"]] == [1, 2, 3, 4]
    # longer patience: rounds 5 and 6 run, the best-round count carries over (round 5 is the 3rd without gain)
    longer = make_strategy("fedavg", subjects, 9, patience=4,
                           store=RunStore(tmp_path / "run", {"num-server-rounds": 6, "patience": 4}, resume=True))
    result = longer.start(grid, w0, num_rounds=6, evaluate_fn=evaluate_fn)
    rounds = longer.store.results["history"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert [r["best_round"] for r in rounds[3:]] == [2, 2, 6]
    assert longer.early_stopping.best_round == 6 and arrays_to_numpy(result.arrays)["w"][0, 0] == 6.0
    assert longer.store.results["config"]["patience"] == 4


def test_fedprox_sends_mu_in_flowers_train_config_and_registry_builds_by_name(tmp_path):
    from types import SimpleNamespace

    from flwr.app import ConfigRecord

    grid = ScriptedGrid([2, 3], lambda s, m: reply(1.0, 5))
    cfg = RunConfig.from_run_config({"strategy": "fedprox", "clients-per-round": 2, "patience": 1,
                                     "fedprox.proximal-mu": 0.1})
    strat = build_strategy(cfg, split=SimpleNamespace(train=(2, 3), val=(5,)))
    assert isinstance(strat, MagnetFedProx) and strat.params.proximal_mu == 0.1
    assert strat.client_config() == {"proximal-mu": 0.1}
    strat.discover(grid, timeout=5)
    strat.train_round(grid, 4, numpy_to_arrays({"w": np.zeros(1, np.float32)}), ConfigRecord(strat.client_config()),
                      timeout=5)
    sent = [dict(m.content["config"]) for m in grid.sent if m.metadata.message_type == "train"]
    assert sent == [{"proximal-mu": 0.1, "server-round": 4}] * 2
    with pytest.raises(ConfigError, match="'strategy' must be one of"):
        build_strategy(cfg.replace(strategy="nope"), split=SimpleNamespace(train=(2, 3)))


@pytest.mark.parametrize("keys, message", [
    ({"fedprox.mu": 0.1}, "unknown run-config key 'fedprox.mu' (known keys: fedprox.proximal-mu)"),
    ({"fedproxx.proximal-mu": 0.1}, "run-config table 'fedproxx' names no strategy"),
    ({"fedprox.proximal-mu": "big"}, "'fedprox.proximal-mu' must be of type float"),
    ({"fedprox.proximal-mu": float("nan")}, "'fedprox.proximal-mu' must be a finite number"),
    ({"fedprox.proximal-mu": -1.0}, "'fedprox.proximal-mu' must be >= 0"),
    ({"fedtrimmedavg.trim-beta": 0.5}, "'fedtrimmedavg.trim-beta' must be < 0.5"),
    ({"fedavg.proximal-mu": 0.1}, "unknown run-config key 'fedavg.proximal-mu' (known keys: none)"),
    ({"fedmobile.samples-weight": 0.0, "fedmobile.perf-weight": 0.0, "fedmobile.gain-weight": 0.0}, "cannot all be 0"),
    ({"fedmobile.generator-objective": "logits"}, "'fedmobile.generator-objective' must be one of"),
    ({"strategy": "krum", "modality-aware-averaging": True}, "'modality-aware-averaging' applies to the weighted-mean"),
])
def test_a_strategy_refuses_bad_keys_of_its_own_table_naming_them(keys, message):
    """Misspelled or out-of-range strategy keys fail loudly, for the chosen strategy and the others alike."""
    import re

    from types import SimpleNamespace

    from tests.server.test_config import pyproject_run_config

    cfg = RunConfig.from_run_config({**pyproject_run_config(), **keys})
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_strategy(cfg, split=SimpleNamespace(train=(2, 3), val=(5,)))


def test_every_strategy_declares_its_keys_and_pyproject_holds_their_defaults():
    """One source: a strategy's `Params` defaults are its pyproject table, and every table names a strategy."""
    import dataclasses

    from tests.server.test_config import pyproject_run_config

    cfg = RunConfig.from_run_config(pyproject_run_config())
    assert set(cfg.strategy_options) <= set(STRATEGIES)
    for name, cls in STRATEGIES.items():
        assert cls.read_params(cfg) == cls.Params(), name
        declared = {f.name.replace("_", "-") for f in dataclasses.fields(cls.Params)}
        assert set(cfg.options_of(name)) == declared, name


@pytest.mark.parametrize("name, expected", [
    ("fedmedian", 2.5),        # median of 1, 2, 3, 100
    ("fedtrimmedavg", 2.5),    # beta 0.25 of 4 cuts one at each end: mean of 2, 3
    ("krum", None),            # the reply closest to its neighbours; never the outlier
])
def test_robust_aggregation_resists_an_outlier(name, expected):
    subjects = [2, 3, 6, 7]
    value = {2: 1.0, 3: 2.0, 6: 3.0, 7: 100.0}
    grid = ScriptedGrid(subjects, lambda s, m: reply(value[s], 10))
    strat = make_strategy(name, subjects, 4, keys={"fedtrimmedavg.trim-beta": 0.25, "krum.num-malicious": 1})
    strat.discover(grid, timeout=5)
    arrays, info = strat.train_round(grid, 1, numpy_to_arrays({"w": np.zeros((2, 3), np.float32),
                                                               "b": np.zeros(1, np.float32)}),
                                     _empty_config(), timeout=5)
    out = arrays_to_numpy(arrays)
    if name == "krum":
        assert out["w"][0, 0] in (1.0, 2.0, 3.0)  # one honest reply, as is (ties between them are fine)
    else:
        np.testing.assert_allclose(out["w"], expected)
    assert info["trained"] == subjects


def test_krum_records_the_subject_it_selected(tmp_path):
    # f = 1 of 5: each reply's score is its squared distance to its n - f - 2 = 2 nearest others;
    # 2.0 scores (0.25 + 1) x 7 coordinates, the lowest (2.5: 2.5, 1.0: 3.25, 4.0: 6.25, 100: huge)
    subjects = [2, 3, 6, 7, 8]
    value = {2: 1.0, 3: 2.0, 6: 2.5, 7: 4.0, 8: 100.0}
    grid = ScriptedGrid(subjects, lambda s, m: reply(value[s], 10))
    strat = make_strategy("krum", subjects, 5, keys={"krum.num-malicious": 1})
    strat.discover(grid, timeout=5)
    arrays, info = strat.train_round(grid, 1, numpy_to_arrays({"w": np.zeros((2, 3), np.float32),
                                                               "b": np.zeros(1, np.float32)}),
                                     _empty_config(), timeout=5)
    np.testing.assert_array_equal(arrays_to_numpy(arrays)["w"], np.full((2, 3), 2.0))
    assert info["aggregation"] == {"krum_selected": 3}


def _modality_reply(value: float, n: int, present_dc: int) -> RecordDict:
    return RecordDict({"arrays": numpy_to_arrays({"encoders.dc.cnn.w": np.full(2, value, np.float32),
                                                  "encoders.act.head.w": np.full(2, value, np.float32),
                                                  "fusion.w": np.full(2, value, np.float32)}),
                       "metrics": MetricRecord({"train_loss": 1.0, "train_accuracy": 0.5, "num-examples": n,
                                                "present-act": n, "present-dc": present_dc})})


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_modality_aware_averaging_weighs_each_encoder_by_the_windows_that_have_its_modality(name):
    # subject 2: 100 windows, all with dc; 3: 300 windows, none with dc (its dc encoder came back untrained);
    # 6: 100 windows, half with dc
    subjects = [2, 3, 6]
    spec = {2: (1.0, 100, 100), 3: (5.0, 300, 0), 6: (9.0, 100, 50)}
    grid = ScriptedGrid(subjects, lambda s, m: _modality_reply(*spec[s]))
    init = numpy_to_arrays({k: np.zeros(2, np.float32) for k in ("encoders.dc.cnn.w", "encoders.act.head.w",
                                                                   "fusion.w")})
    outs = {}
    for aware in (False, True):
        strat = make_strategy(name, subjects, 3, keys={"modality-aware-averaging": aware,
                                                       "fedprox.proximal-mu": 0.1})
        strat.discover(grid, timeout=5)
        arrays, info = strat.train_round(grid, 1, init, _empty_config(), timeout=5)
        outs[aware] = (arrays_to_numpy(arrays), info)
    plain = (1 * 100 + 5 * 300 + 9 * 100) / 500
    for aware in (False, True):
        np.testing.assert_allclose(outs[aware][0]["fusion.w"], plain, rtol=1e-6)  # shared: every client trained it
        np.testing.assert_allclose(outs[aware][0]["encoders.act.head.w"], plain, rtol=1e-6)  # everyone had act
    np.testing.assert_allclose(outs[False][0]["encoders.dc.cnn.w"], plain, rtol=1e-6)
    # weights 100·1, 300·0, 100·0.5: the client without the depth camera does not dilute its encoder
    np.testing.assert_allclose(outs[True][0]["encoders.dc.cnn.w"], (1 * 100 + 9 * 50) / 150, rtol=1e-6)
    assert outs[True][1]["aggregation"] == {"lacking": {"dc": [3]}}
    assert "aggregation" not in outs[False][1]


def test_modality_aware_averaging_names_a_client_without_presence_counts():
    grid = ScriptedGrid([2, 3], lambda s, m: reply(1.0, 10))
    strat = make_strategy("fedavg", [2, 3], 2, keys={"modality-aware-averaging": True})
    strat.discover(grid, timeout=5)
    init = numpy_to_arrays({"encoders.dc.cnn.w": np.zeros(2, np.float32)})
    grid.behaviour = lambda s, m: RecordDict({"arrays": numpy_to_arrays({"encoders.dc.cnn.w": np.ones(2, np.float32)}),
                                              "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 10})})
    with pytest.raises(FederationError, match="sent no 'present-dc' count"):
        strat.train_round(grid, 1, init, _empty_config(), timeout=5)


def test_store_keeps_the_last_rounds_and_averages_them(tmp_path):
    """average-last-rounds: each round's global model is kept (the last N only), and the final model is their
    plain mean; a round written after the last commit (state.json) is not part of it."""
    store = RunStore(tmp_path / "run", {"lr": 1e-3}, keep_rounds=3)
    es = {"patience": 0, "best": 0.5, "best_round": 1, "bad_rounds": 0}
    for rnd in range(1, 6):
        arrays = numpy_to_arrays({"w": np.full((2, 2), float(rnd), np.float32)})
        store.save_round({"round": rnd}, global_arrays=arrays, best_arrays=arrays, sampler=[3, [0], None],
                         early_stopping=es)
    assert store.stored_rounds() == [3, 4, 5]
    rounds, mean = store.last_rounds_average(3)
    assert rounds == [3, 4, 5] and mean["w"].dtype == np.float32
    np.testing.assert_allclose(mean["w"], np.full((2, 2), 4.0))
    assert store.last_rounds_average(2)[0] == [4, 5]
    # a round 6 file without its commit (killed between the two writes) is ignored
    from server_app.run_store import save_arrays
    save_arrays(store.round_path(6), {"w": np.full((2, 2), 60.0, np.float32)})
    np.testing.assert_allclose(store.last_rounds_average(3)[1]["w"], np.full((2, 2), 4.0))


def test_fedavg_slr_steps_the_server_lr_of_the_way_to_the_mean():
    """server-lr 0.5 from global 2: mean (1·100 + 3·300)/400 = 2.5 -> 2.25; counters are FedAvg's mean."""
    from flwr.app import ConfigRecord

    subjects = [2, 3]
    values = {2: (1.0, 100), 3: (3.0, 300)}
    grid = ScriptedGrid(subjects, lambda s, m: reply(*values[s]))
    strat = make_strategy("fedavg-slr", subjects, 2, keys={"fedavg-slr.server-lr": 0.5})
    strat.discover(grid, timeout=5)
    start = numpy_to_arrays({"w": np.full((2, 3), 2.0, np.float32), "b": np.full(1, 2.0, np.float32)})
    arrays, _ = strat.train_round(grid, 1, start, ConfigRecord({}), timeout=5)
    np.testing.assert_allclose(arrays_to_numpy(arrays)["w"], 2.0 + 0.5 * (2.5 - 2.0))
    fedavg = make_strategy("fedavg-slr", subjects, 2, keys={"fedavg-slr.server-lr": 1.0})
    fedavg.discover(grid, timeout=5)
    np.testing.assert_allclose(arrays_to_numpy(fedavg.train_round(grid, 1, start, ConfigRecord({}), timeout=5)[0])["w"],
                               2.5)


def test_the_add_a_strategy_example_in_the_docs_is_the_registered_file():
    """docs/architecture.md shows the whole of server_app/strategies/fedavg_slr.py; registered in one line."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (root / "server_app" / "strategies" / "fedavg_slr.py").read_text()
    assert f"```python\n{code}```" in (root / "docs" / "architecture.md").read_text()
    assert len(code.splitlines()) <= 40
    registry = (root / "server_app" / "strategies" / "__init__.py").read_text()
    assert registry.count("MagnetFedAvgSLR") == 3  # import, register line, __all__
    assert STRATEGIES["fedavg-slr"].__name__ == "MagnetFedAvgSLR"


def _encoder_state(act: float, dc: float, head: float) -> dict:
    return {"encoders.act.w": np.full(2, act, np.float32), "encoders.dc.w": np.full(3, dc, np.float32),
            "classifier.w": np.full(2, head, np.float32)}


def _fedmfs_reply(subject: int, n: int, state: dict, metrics: dict | None = None):
    from server_app.strategies import ClientReply

    return ClientReply(subject, n, state, {"num-examples": n, **(metrics or {})}, 0)


def test_fedmfs_averages_each_array_over_the_clients_that_sent_it():
    strat = make_strategy("fedmfs", [2, 3, 6], 3)
    strat.global_state = _encoder_state(0.0, 5.0, -1.0)
    a, b = _encoder_state(1.0, 7.0, 0.0), _encoder_state(4.0, 9.0, 0.0)
    replies = [_fedmfs_reply(2, 100, {"encoders.act.w": a["encoders.act.w"], "encoders.dc.w": a["encoders.dc.w"]},
                             {"shapley-act": 0.2, "shapley-dc": 0.1}),
               _fedmfs_reply(3, 300, {"encoders.act.w": b["encoders.act.w"]}),
               _fedmfs_reply(6, 50, {})]  # sent nothing (no modality)
    out = strat.aggregate(1, replies, [])
    np.testing.assert_allclose(out["encoders.act.w"], (1.0 * 100 + 4.0 * 300) / 400)  # 2 and 3 sent act
    np.testing.assert_allclose(out["encoders.dc.w"], 7.0)                              # only 2 sent dc
    np.testing.assert_allclose(out["classifier.w"], -1.0)                              # nobody: unchanged
    assert strat.aggregation_info["uploaded"] == {"2": ["act", "dc"], "3": ["act"], "6": []}
    assert strat.aggregation_info["shapley"]["2"] == {"act": 0.2, "dc": 0.1}
    # the next round's clients take the global encoders of act and dc only
    assert strat.round_config(2) == {"fedmfs-fresh": "act,dc"}
    with pytest.raises(FederationError, match="does not have"):
        strat.aggregate(1, [_fedmfs_reply(2, 1, {"encoders.pm.w": np.zeros(1, np.float32)})], [])


def test_fedmfs_with_a_local_head_validates_on_the_clients_personal_models():
    strat = make_strategy("fedmfs", [2, 3], 2, keys={"fedmfs.head": "local"})
    assert not strat.global_head and strat.personal_eval == "own"
    assert make_strategy("fedmfs", [2, 3], 2).personal_eval == "finetune"
    strat.round_replies = [
        _fedmfs_reply(2, 10, {}, {"local_val_windows": 30, "local_val_weighted_f1": 0.9, "local_val_macro_f1": 0.8,
                                  "local_val_accuracy": 0.9, "local_val_loss_after": 0.3}),
        _fedmfs_reply(3, 10, {}, {"local_val_windows": 10, "local_val_weighted_f1": 0.5, "local_val_macro_f1": 0.4,
                                  "local_val_accuracy": 0.5, "local_val_loss_after": 1.1})]
    val = strat.round_validation(1, None, evaluate_fn=lambda r, a: pytest.fail("no global head to validate"))
    assert val["val_weighted_f1"] == pytest.approx((0.9 * 30 + 0.5 * 10) / 40)
    assert val["val_loss"] == pytest.approx((0.3 * 30 + 1.1 * 10) / 40)


def test_personalized_evaluation_pools_every_client_s_held_out_predictions(tmp_path):
    from sklearn.metrics import f1_score

    labels = {2: np.array([0, 1, 1, 2]), 3: np.array([3, 3, 4])}
    rng = np.random.default_rng(0)
    probs = {s: {n: rng.random((len(y), 7)).astype(np.float32) for n in ("global", "personal")}
             for s, y in labels.items()}

    def behaviour(subject, msg):
        assert msg.metadata.message_type == "evaluate" and msg.content["config"]["personal-eval"] == "finetune"
        arrays = {"labels": labels[subject], **{f"probs-{n}": p for n, p in probs[subject].items()}}
        return RecordDict({"arrays": numpy_to_arrays(arrays),
                           "metrics": MetricRecord({"subject": subject, "personal_weighted_f1": 0.5})})

    grid = ScriptedGrid([2, 3], behaviour)
    strat = _strategy(tmp_path, [2, 3], 2)
    out = strat.personalized_evaluation(grid, numpy_to_arrays({"w": np.zeros(1, np.float32)}), _empty_config(), 5)
    y = np.concatenate([labels[2], labels[3]])
    for name in ("global", "personal"):
        pred = np.concatenate([probs[2][name], probs[3][name]]).argmax(1)
        assert out[name]["weighted_f1"] == pytest.approx(f1_score(y, pred, labels=range(7), average="weighted",
                                                                  zero_division=0))
    assert out["subjects"] == [2, 3] and out["num_examples"] == 7 and out["method"] == "finetune"
    assert out["per_subject"] == {"2": {"personal_weighted_f1": 0.5}, "3": {"personal_weighted_f1": 0.5}}


def test_the_round_line_ends_with_an_eta_until_the_last_round(tmp_path, monkeypatch):
    """ETA = mean wall time of this process's rounds x rounds left; none after the last round."""
    from server_app.strategies import fedavg

    lines = []
    monkeypatch.setattr(fedavg, "log", lambda level, fmt, *args: lines.append(fmt % args))
    clock, seconds = [0.0], {1: 100.0, 2: 180.0, 3: 60.0}  # each round's training takes this long

    def train_round(self, grid, rnd, arrays, cfg, timeout):
        clock[0] += seconds[rnd]
        return arrays, {"trained": [2], "train_loss": 1.0, "num_examples": 1, "bytes_up": 0, "bytes_down": 0}

    monkeypatch.setattr(fedavg.time, "time", lambda: clock[0])
    monkeypatch.setattr(MagnetFedAvg, "discover", lambda self, grid, timeout: None)
    monkeypatch.setattr(MagnetFedAvg, "train_round", train_round)
    strat = make_strategy("fedavg", PAPER_TRAIN, 1, patience=0)
    strat.start(None, numpy_to_arrays({"w": np.zeros(1, np.float32)}), num_rounds=3, evaluate_fn=lambda r, a: (
        MetricRecord({"val_loss": 1.0, "val_accuracy": 0.5, "val_weighted_f1": 0.5, "val_macro_f1": 0.5})))
    rounds = [line for line in lines if line.startswith("[round")]
    assert [line.rpartition("|")[2].strip() for line in rounds] == ["ETA 3m20s", "ETA 2m20s", "60.0 s"]
    assert fedavg.duration(45) == "45s" and fedavg.duration(3600 + 5 * 60 + 59) == "1h05m"
