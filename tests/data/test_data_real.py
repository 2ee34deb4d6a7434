"""Checks on the real MEx archive at paper settings (skipped, with the reason, if the zip is absent).

The cache is built once (``real_cache`` session fixture) and reused across sessions.
"""

from __future__ import annotations

import pytest

import time

import numpy as np
import torch

from data_partition import (
    NormStats,
    PreprocessConfig,
    WindowDataset,
    clear_memo,
    load_split_stats,
    load_subject_dataset,
    paper_split,
)

#: Windows per subject at 5 s / 1 s over the exact (float) common span of the four modalities.
WINDOWS_PER_SUBJECT = {
    1: 449, 2: 420, 3: 355, 4: 372, 5: 477, 6: 408, 7: 463, 8: 392, 9: 402, 10: 388,
    11: 457, 12: 447, 13: 408, 14: 418, 15: 413, 16: 405, 17: 403, 18: 404, 19: 424, 20: 419,
    21: 364, 22: 410, 23: 413, 24: 402, 25: 415, 26: 415, 27: 424, 28: 417, 29: 432, 30: 390,
}  # fmt: skip
TOTAL = 12406
REFERENCE_TOTAL = 12505  # Time-MAGNET reference code (integer-second truncation)

pytestmark = pytest.mark.slow  # the real MEx archive: builds its window cache


def test_window_counts(real_cache):
    wc = real_cache
    assert len(wc) == TOTAL == sum(WINDOWS_PER_SUBJECT.values())
    assert wc.windows_per_subject() == WINDOWS_PER_SUBJECT
    recs = wc.meta["recordings"]
    assert len(recs) == 239 and wc.skipped == []
    assert sum(r["subject"] == 22 for r in recs) == 7
    assert np.bincount(wc.labels).tolist() == [1739, 1865, 1886, 1719, 1776, 1630, 1791]


def test_difference_to_reference_count_is_integer_second_truncation(real_cache):
    """The reference takes t0 = max of each modality's first *whole* second, t1 = min of the last
    whole seconds and makes t1 - t0 - 4 windows; we use exact times. Recomputing its rule from the
    first/last timestamps recorded in meta.json gives its 12,505, and we have 0 or 1 fewer per recording."""
    ref_total, fewer = 0, []
    for r in real_cache.meta["recordings"]:
        mods = r["modalities"].values()
        t0 = max(m["first_us"] // 1_000_000 for m in mods)
        t1 = min(m["last_us"] // 1_000_000 for m in mods)
        ref = t1 - t0 - 4
        ref_total += ref
        fewer.append(ref - r["windows"])
    assert ref_total == REFERENCE_TOTAL
    assert set(fewer) <= {0, 1} and sum(fewer) == REFERENCE_TOTAL - TOTAL


def test_shapes_dtypes_finite_and_ranges(real_cache):
    wc = real_cache
    n = len(wc)
    expect = {"act": (n, 500, 3), "acw": (n, 500, 3), "dc": (n, 75, 12, 16), "pm": (n, 75, 32, 16)}
    for m, a in wc.arrays.items():
        assert a.dtype == np.float16 and a.shape == expect[m]
        lo, hi = np.inf, -np.inf
        for i in range(0, n, 2048):
            c = np.asarray(a[i : i + 2048])
            assert np.isfinite(c).all(), m
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
        assert {"act": (-6, 5), "acw": (-8.01, 8.01), "dc": (0, 1), "pm": (0, 3768)}[m][0] <= lo, (m, lo)
        assert hi <= {"act": (-6, 5), "acw": (-8.01, 8.01), "dc": (0, 1), "pm": (0, 3768)}[m][1], (m, hi)


def test_splits_on_real_data(real_cache):
    sp = paper_split()
    assert set(real_cache.subjects) == set(range(1, 31))
    counts = real_cache.windows_per_subject()
    n = [sum(counts[s] for s in part) for part in (sp.train, sp.val, sp.test)]
    assert n == [8701, 1324, 2381]
    idx = real_cache.index
    for a, b in ((sp.train, sp.val), (sp.train, sp.test), (sp.val, sp.test)):
        assert not set(idx.subject[idx.subject.isin(a)]) & set(idx.subject[idx.subject.isin(b)])


def test_stats_come_from_training_subjects_only(real_cache, real_zip):
    wc = real_cache
    sp = paper_split()
    st = load_split_stats(real_zip, PreprocessConfig(), sp.train, progress=False)
    assert st.subjects == sp.train and st.cache_key == wc.key
    for m in ("act", "acw"):
        x = np.concatenate([np.asarray(wc.arrays[m][wc.subject_rows(s)], np.float64) for s in sp.train]).reshape(-1, 3)
        assert np.allclose(st.mean[m], x.mean(0), rtol=1e-9) and np.allclose(st.std[m], x.std(0), rtol=1e-9)
    for m in ("dc", "pm"):  # a full float64 copy of train pm would be 2.7 GB: check on one subject
        one = NormStats.fit(wc, [2])
        x = np.asarray(wc.arrays[m][wc.subject_rows(2)], np.float64)
        assert np.isclose(one.mean[m], x.mean(), rtol=1e-9) and np.isclose(one.std[m], x.std(), rtol=1e-9)
    with_val = NormStats.fit(wc, sp.train + (5,))
    for m in ("act", "acw", "dc", "pm"):
        assert not np.allclose(st.mean[m], with_val.mean[m], rtol=1e-6, atol=0)


def test_augmentation_train_only_and_fast_warm_subject_load(real_cache, real_zip):
    sp = paper_split()
    st = load_split_stats(real_zip, PreprocessConfig(), sp.train, progress=False)
    clear_memo()
    t = time.perf_counter()
    tr = load_subject_dataset(real_zip, PreprocessConfig(), sp.partition_subject(0), st, augment_sigma=0.01,
                              progress=False)
    warm = time.perf_counter() - t
    assert warm < 2.0, f"warm cache + one subject took {warm:.2f} s"
    assert len(tr) == WINDOWS_PER_SUBJECT[2]
    a, b = tr[10], tr[10]
    assert not torch.equal(a["act"], b["act"]) and not torch.equal(a["acw"], b["acw"])
    ev = WindowDataset(real_cache, sp.val, st)
    assert len(ev) == 1324
    c, d = ev[100], ev[100]
    for m in ("act", "acw", "dc", "pm"):
        assert torch.equal(c[m], d[m]) and torch.isfinite(c[m]).all()
    clean = WindowDataset(real_cache, [2], st)[10]
    assert 0.005 < float((a["act"] - clean["act"]).std()) < 0.015
