"""Normalisation statistics: fitted on the given subjects only, exact, cached per subject list."""

from __future__ import annotations

import numpy as np
import pytest

import data_partition.api as api_mod
from data_partition import NormStats, PreprocessConfig, load_split_stats
from data_partition.stats import STD_EPS, per_window_normalize


def _direct(wc, subjects, m, per_pixel):
    rows = np.concatenate([np.asarray(wc.arrays[m][wc.subject_rows(s)], dtype=np.float64) for s in subjects])
    if m in ("act", "acw"):
        flat = rows.reshape(-1, 3)
    elif per_pixel:
        flat = rows.reshape(-1, rows.shape[2] * rows.shape[3])
    else:
        flat = rows.reshape(-1, 1)
    return flat.mean(0), flat.std(0)


@pytest.mark.parametrize("frame_stats", ["channel", "pixel"])
def test_fit_equals_direct_computation_on_those_subjects(synthetic_cache, frame_stats):
    wc = synthetic_cache
    st = NormStats.fit(wc, [2, 1], frame_stats=frame_stats)
    assert st.subjects == (1, 2)
    for m in ("act", "acw", "dc", "pm"):
        mu, sd = _direct(wc, (1, 2), m, frame_stats == "pixel")
        assert np.allclose(np.ravel(st.mean[m]), mu, rtol=1e-10, atol=1e-10), m
        if frame_stats == "pixel" and m in ("dc", "pm"):
            pooled = _direct(wc, (1, 2), m, False)[1]
            sd = np.maximum(sd, 0.1 * pooled)
        assert np.allclose(np.ravel(st.std[m]), np.maximum(sd, STD_EPS), rtol=1e-9), m
    assert st.mean["act"].shape == (3,) and st.mean["pm"].shape == ((32, 16) if frame_stats == "pixel" else ())
    assert st.counts["act"] == 2 * 56 * 500


def test_adding_a_subject_changes_the_stats(synthetic_cache):
    a = NormStats.fit(synthetic_cache, [1, 2])
    b = NormStats.fit(synthetic_cache, [1, 2, 3])
    for m in ("act", "acw", "dc", "pm"):
        assert not np.allclose(a.mean[m], b.mean[m])


def test_chunked_merge_is_exact(synthetic_cache, monkeypatch):
    import data_partition.stats as stats_mod

    whole = NormStats.fit(synthetic_cache, [1, 3])
    monkeypatch.setattr(stats_mod, "_CHUNK_VALUES", 1000)  # force many tiny chunks
    chunked = NormStats.fit(synthetic_cache, [1, 3])
    for m in whole.mean:
        assert np.allclose(whole.mean[m], chunked.mean[m], rtol=1e-12)
        assert np.allclose(whole.std[m], chunked.std[m], rtol=1e-9)


def test_constant_channel_is_guarded():
    class Fake:
        key = "k"

        def __init__(self):
            n = 4
            self.arrays = {
                "act": np.ones((n, 10, 3), np.float16),
                "acw": np.zeros((n, 10, 3), np.float16),
                "dc": np.zeros((n, 5, 12, 16), np.float16),
                "pm": np.full((n, 5, 32, 16), 7, np.float16),
            }

        def subject_rows(self, s):
            return slice(0, 4)

    st = NormStats.fit(Fake(), [1], frame_stats="pixel")
    for m in st.std:
        assert np.all(st.std[m] >= STD_EPS)
        z = st.normalize(m, Fake().arrays[m])
        assert np.isfinite(z).all() and np.allclose(z, 0)


def test_save_load_roundtrip(synthetic_cache, tmp_path):
    st = NormStats.fit(synthetic_cache, [3], frame_stats="pixel")
    st.save(tmp_path / "s.json")
    st2 = NormStats.load(tmp_path / "s.json")
    assert st2.subjects == (3,) and st2.frame_stats == "pixel" and st2.cache_key == synthetic_cache.key
    for m in st.mean:
        assert np.array_equal(st.mean[m], st2.mean[m]) and np.array_equal(st.std[m], st2.std[m])


def test_load_split_stats_fits_once_per_subject_list(synthetic_zip, synthetic_cache, monkeypatch):
    cache_dir = synthetic_cache.path.parent
    a = load_split_stats(synthetic_zip, PreprocessConfig(), [2, 1], cache_dir=cache_dir, progress=False)
    files = sorted(synthetic_cache.path.glob("stats-*.json"))
    assert files

    def boom(*a, **k):
        raise AssertionError("refit")

    monkeypatch.setattr(api_mod.NormStats, "fit", boom)
    b = load_split_stats(synthetic_zip, PreprocessConfig(), (1, 2), cache_dir=cache_dir, progress=False)
    assert b.subjects == (1, 2) and np.array_equal(a.std["pm"], b.std["pm"])
    with pytest.raises(AssertionError, match="refit"):  # another subject list is another file
        load_split_stats(synthetic_zip, PreprocessConfig(), [1, 2, 3], cache_dir=cache_dir, progress=False)


def test_per_window_normalize():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(75, 32, 16))
    x[:, 0, 0] = 5.0  # a static pixel becomes 0, not inf
    z = per_window_normalize(x)
    assert z.dtype == np.float32 and np.isfinite(z).all()
    assert np.allclose(z.mean(0), 0, atol=1e-5) and np.allclose(z[:, 1:, :].std(0), 1, atol=1e-4)
    assert np.all(z[:, 0, 0] == 0)
