"""Subject splits and fault simulators."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_partition import (
    SUBJECTS,
    drop_modalities,
    flip_labels,
    full_masks,
    loso_folds,
    noisy_labels,
    paper_split,
    sample_missing_masks,
    select_clients,
    shuffle_order,
)

PAPER_TRAIN = (2, 3, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 26, 27, 28, 30)
PAPER_VAL = (5, 25, 29)
PAPER_TEST = (1, 4, 8, 9, 21, 24)


def test_paper_split_is_exactly_the_reference():
    sp = paper_split()
    assert sp.train == PAPER_TRAIN and sp.val == PAPER_VAL and sp.test == PAPER_TEST
    assert set(sp.train) | set(sp.val) | set(sp.test) == set(SUBJECTS)
    # same as the reference code's global-RNG recipe
    state = random.getstate()
    try:
        random.seed(42)
        subjects = list(range(1, 31))
        random.shuffle(subjects)
    finally:
        random.setstate(state)
    assert shuffle_order(42) == tuple(subjects)
    assert shuffle_order(42)[:21][:3] == (20, 15, 11)  # reference client dict order


def test_partition_ids_map_to_sorted_train_subjects():
    sp = paper_split()
    assert sp.num_partitions == 21
    assert [sp.partition_subject(i) for i in range(21)] == list(PAPER_TRAIN)
    with pytest.raises(IndexError):
        sp.partition_subject(21)


def test_other_seeds_and_sizes():
    a, b = paper_split(seed=1), paper_split(seed=2)
    assert a != b and a == paper_split(seed=1)
    for sp in (a, b, paper_split(seed=7, n_train=20, n_val=4)):
        assert not (set(sp.train) & set(sp.val) or set(sp.train) & set(sp.test) or set(sp.val) & set(sp.test))
        assert len(sp.train + sp.val + sp.test) == 30


def test_loso_folds():
    folds = loso_folds()
    assert len(folds) == 30
    assert [f.test for f in folds] == [(s,) for s in SUBJECTS]
    for f in folds:
        assert len(f.val) == 3 and len(f.train) == 26 and f.test[0] not in f.train + f.val
    assert loso_folds() == folds and loso_folds(seed=1) != folds


def test_sample_missing_masks():
    m = sample_missing_masks(20000, {"act": 0.3, "dc": 0.5}, seed=3)
    assert m.dtype == bool and m.shape == (20000, 4)
    assert m.any(axis=1).all()
    assert abs(1 - m[:, 0].mean() - 0.3) < 0.02 and abs(1 - m[:, 2].mean() - 0.5) < 0.02
    assert m[:, 1].all() and m[:, 3].all()
    assert np.array_equal(m, sample_missing_masks(20000, {"act": 0.3, "dc": 0.5}, seed=3))
    everything = sample_missing_masks(1000, {"act": 1.0, "acw": 0.9, "dc": 0.9, "pm": 0.9}, seed=0)
    assert everything.any(axis=1).all() and not everything[:, 0].any()
    with pytest.raises(ValueError):
        sample_missing_masks(5, {"act": 1, "acw": 1, "dc": 1, "pm": 1})
    with pytest.raises(ValueError):
        sample_missing_masks(5, {"gyro": 0.1})


def test_drop_modalities():
    m = drop_modalities(full_masks(5), ["pm", "dc"])
    assert m[:, :2].all() and not m[:, 2:].any()
    with pytest.raises(ValueError, match="no modality"):
        drop_modalities(m, ["act", "acw"])


def test_label_noise_and_flipping():
    y = np.repeat(np.arange(7), 100)
    z = noisy_labels(y, 0.2, seed=0)
    assert (z != y).sum() == 140 and z.min() >= 0 and z.max() <= 6
    assert np.array_equal(z, noisy_labels(y, 0.2, seed=0)) and not np.array_equal(z, noisy_labels(y, 0.2, seed=1))
    assert np.array_equal(noisy_labels(y, 0.0), y)
    assert np.array_equal(flip_labels(y), 6 - y)
    assert np.array_equal(flip_labels(np.array([0, 1, 2]), mapping={0: 1, 1: 0}), [1, 0, 2])


def test_select_clients():
    c = select_clients(PAPER_TRAIN, 0.2, seed=0)
    assert len(c) == 4 and set(c) <= set(PAPER_TRAIN) and c == select_clients(PAPER_TRAIN, 0.2, seed=0)
