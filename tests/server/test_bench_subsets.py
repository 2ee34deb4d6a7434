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
