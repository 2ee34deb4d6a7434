"""`bench/modality_subsets.py`: the subset mix a missing rate leaves, and the routed ceiling over several models."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_modality_subsets", Path(__file__).resolve().parents[2] / "bench" / "modality_subsets.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9])
def test_subset_probabilities_are_a_distribution(rate):
    probs = {s: bench.subset_probability(s, rate) for s in bench.SUBSETS}
    assert sum(probs.values()) == pytest.approx(1.0)
    # at 50 %: every subset of two or more sensors 1/16, a single sensor 1/16 + (1/16)/4 (the empty window's share)
    if rate == 0.5:
        assert probs[(0, 1, 2, 3)] == probs[(0, 2)] == pytest.approx(1 / 16)
        assert probs[(1,)] == pytest.approx(1 / 16 + 1 / 64)


def test_routed_ceiling_takes_each_subset_from_its_best_model():
    names = ["+".join(bench.MODALITIES[i] for i in s) for s in bench.SUBSETS]
    a = {n: {"accuracy": 0.8, "weighted_f1": 0.7} for n in names}
    b = {n: {"accuracy": 0.6, "weighted_f1": 0.5} for n in names}
    b["acw"] = {"accuracy": 1.0, "weighted_f1": 0.9}                   # b is better only with the wrist alone
    ceiling = bench.routed_ceiling({"a": a, "b": b}, [0.5, 0.0])
    assert ceiling["best_run"]["acw"] == "b" and ceiling["best_run"]["act+acw+dc+pm"] == "a"
    p_acw = 1 / 16 + 1 / 64
    assert ceiling["expected_accuracy"]["0.5"] == pytest.approx((1 - p_acw) * 0.8 + p_acw * 1.0)
    assert ceiling["expected_weighted_f1"]["0.5"] == pytest.approx((1 - p_acw) * 0.7 + p_acw * 0.9)
    assert ceiling["expected_accuracy"]["0.0"] == pytest.approx(0.8)           # complete windows only


def test_head_scores_are_the_lone_head_s_predictions():
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from model_testutils import make_batch

    from model import build_model
    from model.config import get_config

    tiny = get_config("tiny")
    model = build_model(tiny, "magnet", seed=0, unimodal_heads=True).eval()
    mask = torch.zeros(8, 4, dtype=torch.bool)
    mask[:, 2] = True  # the depth camera alone
    loaders = {s: [make_batch(tiny, b=8, seed=s, mask=mask)] for s in (1, 2)}
    expected = []
    with torch.no_grad():
        for s in (1, 2):
            b = loaders[s][0]
            expected.append(model.unimodal_heads["dc"](model.embed(b)[0][:, 2]).argmax(-1) == b["y"])
    got = bench.head_scores(model, loaders, "dc", adapt_bn=False)
    assert got["accuracy"] == pytest.approx(float(torch.cat(expected).float().mean()))
    assert 0 <= got["weighted_f1"] <= 1
    # a fixed rule, not a choice: single-sensor windows answered by their heads replace those subsets' scores
    names = ["+".join(bench.MODALITIES[i] for i in s) for s in bench.SUBSETS]
    fused = {n: {"accuracy": 0.5, "weighted_f1": 0.5} for n in names}
    with_heads = {**fused, "dc": {"accuracy": 1.0, "weighted_f1": 1.0}}
    gain = bench.expected_score(with_heads, 0.5) - bench.expected_score(fused, 0.5)
    assert gain == pytest.approx(0.5 * (1 / 16 + 1 / 64))


def _forest_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_forest_subsets", Path(__file__).resolve().parents[2] / "bench" / "forest_subsets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forest_features_of_known_windows():
    """Accelerometer windows give mean, std, min, max and five percentiles per axis; frames their mean and std
    frame (the pressure mat's 2x2-pooled)."""
    import numpy as np

    forest = _forest_bench()
    acc = np.stack([np.tile(np.arange(5.0)[:, None], (1, 3)), np.zeros((5, 3))])   # axis values 0..4, and zeros
    f = forest.window_features("act", acc)
    assert f.shape == (2, 27)
    np.testing.assert_allclose(f[0, :12], [2] * 3 + [np.sqrt(2)] * 3 + [0] * 3 + [4] * 3)  # mean, std, min, max
    np.testing.assert_allclose(f[0, 12:15], [0.4] * 3)                                 # 10th percentile of 0..4
    assert not f[1].any()
    pm = np.arange(3 * 4 * 4, dtype=float).reshape(1, 3, 4, 4)                        # 3 frames of 4x4
    g = forest.window_features("pm", pm)
    assert g.shape == (1, 2 * 2 * 2)
    np.testing.assert_allclose(g[0, 0], pm[0, :, :2, :2].mean())
    assert forest.window_features("dc", np.ones((4, 3, 2, 2))).shape == (4, 8)


def test_per_subject_standardisation_removes_a_subject_s_offset_and_scale():
    import numpy as np

    forest = _forest_bench()
    f = np.random.default_rng(0).normal(size=(50, 4))
    np.testing.assert_allclose(forest.standardise(3 * f + 7), forest.standardise(f), atol=1e-5)
    z = forest.standardise(f)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
