"""FedMobile-style aggregation: contribution weights, exact and clustered Shapley, the strategy on hand-built
replies (scripted Grid from test_strategy), and the scenarios every party derives from the run config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtime.config import ConfigError, RunConfig
from server_app.contribution import clustered_shapley_weights, contribution_weights, kmeans, shapley_values
from server_app.run_store import arrays_to_numpy, numpy_to_arrays
from fedtime.scenario import Scenario
from server_app.strategies import FederationError, MagnetFedMobile
from test_strategy import make_strategy

from test_strategy import PAPER_TRAIN, ScriptedGrid, _task_identity  # noqa: F401  (autouse fixture)


# ------------------------------------------------------------------ contribution weights
def test_contribution_weights_match_a_hand_computation():
    # sample shares .25/.75, F1 shares .5/.5, gain shares 1/0 (client 2 made its own held-out data worse)
    w = contribution_weights([100, 300], [0.5, 0.5], [0.2, -0.1])
    np.testing.assert_allclose(w, [(0.25 + 0.5 + 1.0) / 3, (0.75 + 0.5 + 0.0) / 3])
    # only the sample term: plain FedAvg weights
    np.testing.assert_allclose(contribution_weights([1, 3], [0.9, 0.1], [5, 0], mix=(1, 0, 0)), [0.25, 0.75])
    # no client gained: the gain term is uniform, never a division by zero
    np.testing.assert_allclose(contribution_weights([1, 1], [0.2, 0.6], [-1, 0], mix=(0, 1, 1)),
                               [(0.25 + 0.5) / 2, (0.75 + 0.5) / 2])
    with pytest.raises(ValueError, match="finite"):
        contribution_weights([1, 1], [np.nan, 0.5], [0, 0])


# ------------------------------------------------------------------ Shapley
def test_shapley_is_exact_on_a_three_player_game():
    # additive values 1, 2, 3 plus a synergy of 1 between players 0 and 1 (shared equally between them)
    base = {0: 1.0, 1: 2.0, 2: 3.0}

    def v(s):
        return sum(base[i] for i in s) + (1.0 if {0, 1} <= s else 0.0)

    np.testing.assert_allclose(shapley_values(3, v), [1.5, 2.5, 3.0])
    # majority game: any two players win; symmetric, so 1/3 each (efficiency: they sum to v(N) = 1)
    np.testing.assert_allclose(shapley_values(3, lambda s: float(len(s) >= 2)), [1 / 3] * 3)
    # a dummy player gets 0
    np.testing.assert_allclose(shapley_values(3, lambda s: float(0 in s) * 2 + float(1 in s)), [2, 1, 0])


def test_kmeans_separates_obvious_clusters_and_is_seeded():
    x = np.array([[0, 0], [0.1, 0], [10, 10], [10, 10.2], [0, 0.1]], float)
    labels = kmeans(x, 2, seed=3)
    assert labels[0] == labels[1] == labels[4] != labels[2] == labels[3]
    assert (kmeans(x, 2, seed=3) == labels).all()
    assert kmeans(x[:1], 3).tolist() == [0]
    # huge but finite points (a scaled attacker's outputs) cluster the same; NaN is refused by name
    assert (kmeans(x * 1e200, 2, seed=3) == labels).all()
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.array([[0.0], [np.nan]]), 2)


def test_clustered_shapley_gives_harmful_cluster_no_weight():
    outputs = np.array([[0.0], [0.1], [5.0], [5.1]])  # clients 0,1 agree; 2,3 form another cluster
    quality = np.array([1.0, 1.0, -3.0, -3.0])  # the second cluster's generators make reconstruction worse
    n = [10, 30, 20, 20]

    def coalition_value(members):
        return float(np.mean(quality[members]))

    w, details = clustered_shapley_weights(outputs, n, 2, coalition_value)
    np.testing.assert_allclose(w, [0.25, 0.75, 0.0, 0.0])  # good cluster split by samples
    assert details["clusters"][0] == details["clusters"][1] != details["clusters"][2]
    # nothing positive: fall back to sample shares
    w, _ = clustered_shapley_weights(outputs, n, 2, lambda m: -1.0)
    np.testing.assert_allclose(w, np.array(n) / 80)


# ------------------------------------------------------------------ the strategy
def mobile_reply(value: float, n: int, f1: float, before: float, after: float, gen: float | None = None) -> RecordDict:
    arrays = {"w": np.full((2,), value, np.float32)}
    if gen is not None:
        arrays["generators.nets.0.weight"] = np.full((1,), gen, np.float32)
        arrays["generators.quality"] = np.full((2,), 0.9, np.float32)  # a client's guess, replaced by the proxy's
    return RecordDict({"arrays": numpy_to_arrays(arrays),
                       "metrics": MetricRecord({"train_loss": 1.0, "train_accuracy": 0.5, "num-examples": n,
                                                "local_val_weighted_f1": f1, "local_val_loss_before": before,
                                                "local_val_loss_after": after})})


class ToyProxy:
    """A proxy scorer on scalars: a generator's value is higher the closer its weight is to 1."""

    def prepare(self, state):
        self.prepared = True

    def outputs(self, gen):
        return np.array([float(gen["generators.nets.0.weight"][0])])

    def quality(self, gen):
        return [1.0 - abs(float(gen["generators.nets.0.weight"][0]) - 1.0), 0.25]

    def value(self, gen):
        return float(np.mean(self.quality(gen)))


def test_fedmobile_round_uses_contribution_and_shapley_weights(tmp_path):
    subjects = [2, 3, 6]
    spec = {2: (1.0, 100, 0.8, 1.0, 0.5, 1.0), 3: (2.0, 300, 0.4, 1.0, 0.9, 1.1), 6: (4.0, 100, 0.8, 1.0, 1.2, 9.0)}
    grid = ScriptedGrid(subjects, lambda s, m: mobile_reply(*spec[s]))
    strat = make_strategy("fedmobile", subjects, 3, keys={"fedmobile.local-val-fraction": 0.2,
                                                         "fedmobile.shapley-clusters": 2}, generator_proxy=ToyProxy())
    assert isinstance(strat, MagnetFedMobile)
    strat.discover(grid, timeout=5)
    arrays, info = strat.train_round(grid, 1, numpy_to_arrays({"w": np.zeros(2, np.float32),
                                                               "generators.nets.0.weight": np.zeros(1, np.float32),
                                                               "generators.quality": np.zeros(2, np.float32)}),
                                     ConfigRecord(strat.client_config()), timeout=5)
    assert all(m.content["config"]["local-val-fraction"] == 0.2 for m in grid.sent if m.metadata.message_type == "train")
    # samples .2/.6/.2, F1 .4/.2/.4, gains .5/.1/0 -> shares 5/6, 1/6, 0
    expected = (np.array([0.2, 0.6, 0.2]) + np.array([0.4, 0.2, 0.4]) + np.array([5 / 6, 1 / 6, 0])) / 3
    out = arrays_to_numpy(arrays)
    np.testing.assert_allclose(out["w"], [expected @ [1.0, 2.0, 4.0]] * 2, rtol=1e-6)
    weights = info["aggregation"]["weights"]
    np.testing.assert_allclose([weights[str(s)] for s in subjects], expected)
    # generators: subjects 2 and 3 (weights 1.0, 1.1) cluster apart from 6 (9.0), whose generator is harmful
    gen = info["aggregation"]["generators"]
    assert gen["clusters"]["2"] == gen["clusters"]["3"] != gen["clusters"]["6"]
    assert gen["weights"]["6"] == 0.0
    np.testing.assert_allclose(out["generators.nets.0.weight"], [(1.0 * 100 + 1.1 * 300) / 400], rtol=1e-6)
    # the gate of the generated nodes: the aggregated generators' quality (here R²) on the proxy set
    np.testing.assert_allclose(out["generators.quality"], [1.0 - 0.075, 0.25], rtol=1e-6)
    assert info["aggregation"]["generator_quality"] == [0.925, 0.25]


class NaNProxy(ToyProxy):
    """Like ToyProxy, but a negative weight generates NaN (as a negative variance buffer does)."""

    def outputs(self, gen):
        w = float(gen["generators.nets.0.weight"][0])
        return np.array([w if w >= 0 else np.nan])


def test_fedmobile_gives_generators_that_output_nan_no_weight(tmp_path):
    subjects = [2, 3, 6]
    spec = {2: (1.0, 100, 0.8, 1.0, 0.5, 1.0), 3: (2.0, 300, 0.4, 1.0, 0.9, 1.1), 6: (4.0, 100, 0.8, 1.0, 1.2, -5.0)}
    grid = ScriptedGrid(subjects, lambda s, m: mobile_reply(*spec[s]))
    strat = make_strategy("fedmobile", subjects, 3, keys={"fedmobile.local-val-fraction": 0.2,
                                                         "fedmobile.shapley-clusters": 2}, generator_proxy=NaNProxy())
    strat.discover(grid, timeout=5)
    arrays, info = strat.train_round(grid, 1, numpy_to_arrays({"w": np.zeros(2, np.float32),
                                                               "generators.nets.0.weight": np.zeros(1, np.float32),
                                                               "generators.quality": np.zeros(2, np.float32)}),
                                     ConfigRecord(strat.client_config()), timeout=5)
    gen = info["aggregation"]["generators"]
    assert gen["rejected"] == [6] and gen["weights"]["6"] == 0.0 and "6" not in gen["clusters"]
    out = arrays_to_numpy(arrays)
    assert np.isfinite(out["generators.nets.0.weight"]).all() and out["generators.nets.0.weight"][0] > 0
    # everything else is still averaged with the contribution weights, subject 6 included
    assert info["trained"] == subjects and info["aggregation"]["weights"]["6"] > 0


def test_fedmobile_weighs_an_unmeasurable_contribution_as_zero(tmp_path):
    # subject 6's global-model loss is NaN (what a negative BatchNorm variance does): no F1 or gain share
    subjects = [2, 3, 6]
    spec = {2: (1.0, 100, 0.8, 1.0, 0.5), 3: (2.0, 300, 0.4, 1.0, 0.9), 6: (4.0, 100, np.nan, np.nan, 1.2)}
    grid = ScriptedGrid(subjects, lambda s, m: mobile_reply(*spec[s]))
    strat = make_strategy("fedmobile", subjects, 3, keys={"fedmobile.local-val-fraction": 0.2})
    strat.discover(grid, timeout=5)
    arrays, info = strat.train_round(grid, 1, numpy_to_arrays({"w": np.zeros(2, np.float32)}), ConfigRecord(strat.client_config()),
                                     timeout=5)
    # samples .2/.6/.2, F1 2/3, 1/3, 0, gains .5/.1/0 -> 5/6, 1/6, 0
    expected = (np.array([0.2, 0.6, 0.2]) + np.array([2 / 3, 1 / 3, 0]) + np.array([5 / 6, 1 / 6, 0])) / 3
    np.testing.assert_allclose([info["aggregation"]["weights"][str(s)] for s in subjects], expected)
    assert info["aggregation"]["unmeasured"] == [6]
    np.testing.assert_allclose(arrays_to_numpy(arrays)["w"], expected @ [1.0, 2.0, 4.0], rtol=1e-6)


def test_fedmobile_needs_local_validation_metrics(tmp_path):
    from test_strategy import reply

    grid = ScriptedGrid([2, 3], lambda s, m: reply(1.0, 5))
    strat = make_strategy("fedmobile", [2, 3], 2)
    strat.discover(grid, timeout=5)
    with pytest.raises(FederationError, match="local validation"):
        strat.train_round(grid, 1, numpy_to_arrays({"w": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.float32)}),
                          ConfigRecord(strat.client_config()), timeout=5)


# ------------------------------------------------------------------ scenarios
def _scenario(**kw) -> Scenario:
    return Scenario.from_config(RunConfig.from_run_config(kw), PAPER_TRAIN)


def test_missing_rate_masks_training_windows_only_unless_asked():
    sc = _scenario(**{"missing-rate": 0.5, "seed": 1})
    m = sc.masks(2, 4000, train=True)
    assert m.shape == (4000, 4) and m.any(1).all()
    assert 0.40 < 1 - m.mean() < 0.50  # ~50 % missing (slightly less: every window keeps one modality)
    assert (sc.masks(2, 4000, train=True) == m).all()  # seeded
    assert sc.masks(2, 100, train=False).all()
    assert not _scenario(**{"missing-rate": 0.5, "missing-at-eval": True}).masks(2, 100, train=False).all()


def test_absent_modality_clients_and_poisoned_clients():
    sc = _scenario(**{"absent-modalities": "dc,pm", "absent-fraction": 0.34, "seed": 2})
    assert len(sc.absent_subjects) == 7 and set(sc.absent_subjects) <= set(PAPER_TRAIN)
    s_abs = sc.absent_subjects[0]
    s_ok = next(s for s in PAPER_TRAIN if s not in sc.absent_subjects)
    assert not sc.masks(s_abs, 50, train=True)[:, 2:].any() and sc.masks(s_abs, 50, train=True)[:, :2].all()
    assert sc.masks(s_ok, 50, train=True).all()
    assert sc.masks(s_abs, 50, train=False).all()  # the subject's evaluation windows are untouched

    flip = _scenario(**{"poison": "label-flip", "poison-clients": 2, "seed": 3})
    bad, good = flip.poisoned_subjects[0], next(s for s in PAPER_TRAIN if s not in flip.poisoned_subjects)
    y = np.array([0, 1, 6])
    assert flip.labels(bad, y).tolist() == [6, 5, 0] and flip.labels(good, y).tolist() == [0, 1, 6]

    scale = _scenario(**{"poison": "scale", "poison-clients": 1, "poison-scale": 10.0})
    bad = scale.poisoned_subjects[0]
    old, new = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.5, 0.0])}
    assert scale.poison_update(bad, new, old)["w"].tolist() == [6.0, -9.0]
    assert scale.poison_update(bad + 100, new, old)["w"].tolist() == [1.5, 0.0]


@pytest.mark.parametrize("kw, key", [
    ({"missing-rate": 1.0}, "missing-rate"),
    ({"absent-modalities": "dc,xx"}, "absent-modalities"),
    ({"absent-modalities": "act,acw,dc,pm"}, "absent-modalities"),
    ({"poison": "label-flip"}, "poison"),
    ({"poison": "backdoor", "poison-clients": 1}, "poison"),
])
def test_scenario_and_fedmobile_keys_are_validated(kw, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_run_config(kw)


# ------------------------------------------------------------------ the proxy set (real data, tiny model)
@pytest.mark.slow  # the real data
def test_generator_proxy_embeds_each_subject_with_its_own_batchnorm_statistics(mex_path):
    import torch

    from model import trainable_state
    from fedtime import task
    from fedtime.config import RunConfig
    from server_app.proxy import GeneratorProxy

    cfg = RunConfig.from_run_config({"model-preset": "tiny", "strategy": "fedmobile", "data-path": str(mex_path)})
    options = {"latent_generators": True, "generator_objective": "embedding"}
    proxy = GeneratorProxy(cfg, options, [5, 25], size=20, seed=0)
    model = task.model_for(cfg, options)
    state = {k: v.numpy() for k, v in trainable_state(model).items()}
    proxy.prepare(state)
    assert proxy.embeddings.shape == (20, 4, model.cfg.d_emb)
    for k, v in trainable_state(model).items():  # the shared model is left with the state it was given
        np.testing.assert_array_equal(v.numpy(), state[k])
    adapted = proxy.embeddings
    proxy.adapt_bn = False
    proxy.prepare(state)
    assert not torch.allclose(adapted[:, 2:], proxy.embeddings[:, 2:])  # frame encoders: per-subject statistics
    torch.testing.assert_close(adapted[:, :2], proxy.embeddings[:, :2])  # T5 encoders have no BatchNorm
    # a fresh generator predicts its running mean (zeros): R² = 1 − E[e²]/Var ≤ 0, one value per modality
    r2 = proxy.modality_r2({k: state[k] for k in state if k.startswith("generators.")})
    assert len(r2) == 4 and all(v <= 1e-6 for v in r2)


@pytest.mark.slow  # the real data
def test_generator_proxy_scores_prediction_generators_by_the_cross_entropy_they_save(mex_path):
    """generator-objective="prediction": the proxy's quality is the fused cross-entropy with a modality left out
    minus with it generated, through each subject's own BatchNorm statistics (as the model evaluates them)."""
    import torch.nn.functional as F

    from model import trainable_state
    from model.training import each_subject
    from fedtime import task
    from server_app.proxy import GeneratorProxy

    cfg = RunConfig.from_run_config({"model-preset": "tiny", "strategy": "fedmobile", "data-path": str(mex_path),
                                     "fedmobile.generator-objective": "prediction"})
    options = MagnetFedMobile.options_for(MagnetFedMobile.read_params(cfg))
    model = task.model_for(cfg, options)
    assert model.cfg.generator_objective == "prediction" and model.generators.gate == 0.0
    proxy = GeneratorProxy(cfg, options, [5, 25], size=20, seed=0)
    state = {k: v.numpy() for k, v in trainable_state(model).items()}
    proxy.prepare(state)
    # the head's loss on all four real embeddings is the model's own loss on those windows, subject by subject
    expected = []
    model.eval()
    with torch.no_grad():
        for s in each_subject(model, proxy.subject_loaders, "cpu", adapt_bn=True):
            for batch in proxy.proxy_loaders[s]:
                expected.append(F.cross_entropy(model(batch)[0], batch["y"].long(), reduction="none"))
    everything = torch.ones_like(proxy.inputs)
    torch.testing.assert_close(proxy._head_loss(proxy.embeddings, everything), torch.cat(expected))
    gens = {k: state[k] for k in state if k.startswith("generators.")}
    gain = proxy.quality(gens)
    assert gain == proxy.modality_gain(gens) and len(gain) == 4 and np.isfinite(gain).all()
    assert proxy.value(gens) == pytest.approx(float(np.mean(gain)))
    # a "generator" that returns the real embedding saves exactly what the real sensor adds to the others
    proxy._generate = lambda g, rows=slice(None): [proxy.embeddings[:, j] for j in range(4)]
    avail = proxy.generators.inputs_for(proxy.inputs, everything, 1)
    with_real = avail.clone()
    with_real[:, 1] = True
    assert proxy.modality_gain(gens)[1] == pytest.approx(
        float((proxy._head_loss(proxy.embeddings, avail) - proxy._head_loss(proxy.embeddings, with_real)).mean()))


def test_fedmobile_owns_its_model_options_and_client_settings():
    """Its generator objective reaches every party's model through its model options, which travel with its
    client settings in every round's train config (test_strategy.py checks refused values)."""
    cfg = RunConfig.from_run_config({"strategy": "fedmobile", "fedmobile.generator-objective": "prediction",
                                     "fedmobile.local-val-fraction": 0.2, "fedmobile.generator-weight": 2.0})
    strat = MagnetFedMobile(cfg, MagnetFedMobile.read_params(cfg), train_subjects=[2, 3])
    assert strat.model_options() == {"latent_generators": True, "generator_objective": "prediction"}
    assert strat.client_config() == {"model.latent_generators": True, "model.generator_objective": "prediction",
                                     "local-val-fraction": 0.2, "generator-weight": 2.0}
    from fedtime import task

    assert task.train_config(cfg, strat.client_config()).generator_weight == 2.0
    assert task.options_from_message(strat.client_config()) == strat.model_options()
