"""WindowDataset: batch contract, normalisation, on-the-fly training-only noise, masks, labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_partition import (
    NormStats,
    PreprocessConfig,
    WindowDataset,
    drop_modalities,
    load_subject_dataset,
    sample_missing_masks,
)


@pytest.fixture(scope="module")
def stats(synthetic_cache):
    return NormStats.fit(synthetic_cache, [1, 2])


def test_sample_and_batch_follow_the_contract(synthetic_cache, stats):
    ds = WindowDataset(synthetic_cache, [3], stats)
    assert len(ds) == 56
    s = ds[0]
    assert set(s) == {"act", "acw", "dc", "pm", "mask", "y"}
    assert s["act"].shape == (500, 3) and s["dc"].shape == (75, 12, 16) and s["pm"].shape == (75, 32, 16)
    assert all(s[m].dtype == torch.float32 for m in ("act", "acw", "dc", "pm"))
    assert s["mask"].dtype == torch.bool and s["mask"].shape == (4,) and s["mask"].all()
    assert s["y"].dtype == torch.int64 and s["y"].shape == ()
    b = next(iter(DataLoader(ds, batch_size=8, shuffle=True)))
    assert b["act"].shape == (8, 500, 3) and b["acw"].shape == (8, 500, 3)
    assert b["dc"].shape == (8, 75, 12, 16) and b["pm"].shape == (8, 75, 32, 16)
    assert b["mask"].shape == (8, 4) and b["mask"].dtype == torch.bool
    assert b["y"].shape == (8,) and b["y"].dtype == torch.int64


def test_global_normalisation_uses_the_stats(synthetic_cache, stats):
    ds = WindowDataset(synthetic_cache, 3, stats)
    row = synthetic_cache.subject_rows(3).start + 5
    for m in ("act", "pm"):
        raw = np.asarray(synthetic_cache.arrays[m][row], dtype=np.float32)
        expect = (raw - stats.mean[m].astype(np.float32)) / stats.std[m].astype(np.float32)
        assert np.allclose(ds[5][m].numpy(), expect, atol=1e-6)


def test_per_window_mode_needs_no_stats(synthetic_cache):
    ds = WindowDataset(synthetic_cache, [1], None, normalization="per_window")
    a = ds[0]["act"].numpy()
    assert np.allclose(a.mean(0), 0, atol=1e-5)
    with pytest.raises(ValueError, match="NormStats"):
        WindowDataset(synthetic_cache, [1], None)


def test_noise_only_on_training_samples_and_on_the_fly(synthetic_cache, stats):
    ev = WindowDataset(synthetic_cache, [3], stats)
    tr = WindowDataset(synthetic_cache, [3], stats, augment_sigma=0.01, seed=1)
    e1, e2, t1, t2 = ev[4], ev[4], tr[4], tr[4]
    for m in ("act", "acw", "dc", "pm"):
        assert torch.equal(e1[m], e2[m])
    for m in ("act", "acw"):
        assert not torch.equal(t1[m], t2[m])  # fresh noise on every read
        d = (t1[m] - e1[m]).numpy()
        assert abs(d.std() - 0.01) < 0.002 and abs(d.mean()) < 0.002
    for m in ("dc", "pm"):  # paper: noise on the accelerometers only (configurable)
        assert torch.equal(t1[m], e1[m])
    # the stored cache is untouched
    assert torch.equal(WindowDataset(synthetic_cache, [3], stats)[4]["act"], e1["act"])
    # seeded: same seed, same sequence
    tr2 = WindowDataset(synthetic_cache, [3], stats, augment_sigma=0.01, seed=1)
    assert torch.equal(tr2[4]["act"], t1["act"])


def test_masks_zero_absent_modalities(synthetic_cache, stats):
    n = len(synthetic_cache.index.iloc[synthetic_cache.subject_rows(2)])
    masks = drop_modalities(sample_missing_masks(n, {"act": 0.5, "pm": 0.3}, seed=0), ["dc"])
    ds = WindowDataset(synthetic_cache, [2], stats, augment_sigma=0.01, masks=masks)
    for i in range(n):
        s = ds[i]
        assert torch.equal(s["mask"], torch.from_numpy(masks[i]))
        for j, m in enumerate(("act", "acw", "dc", "pm")):
            if not masks[i, j]:
                assert s[m].abs().sum() == 0 and s[m].shape == ds[0][m].shape
    with pytest.raises(ValueError, match="masks"):
        WindowDataset(synthetic_cache, [2], stats, masks=masks[:-1])


def test_labels_override_and_counts(synthetic_cache, stats):
    ds = WindowDataset(synthetic_cache, [1, 3], stats)
    assert len(ds) == 112 and ds.class_counts().tolist() == [14, 14, 14, 28, 14, 14, 14]
    assert (ds.labels == ds.index.exercise.to_numpy() - 1).all()
    flipped = 6 - ds.labels
    ds2 = WindowDataset(synthetic_cache, [1, 3], stats, labels=flipped)
    assert int(ds2[0]["y"]) == 6 - int(ds[0]["y"])


def test_memmap_mode_equals_copy(synthetic_cache, stats):
    a = WindowDataset(synthetic_cache, [1, 3], stats)
    b = WindowDataset(synthetic_cache, [1, 3], stats, in_memory=False)
    for i in (0, 55, 56, 111):
        for m in ("act", "pm"):
            assert torch.equal(a[i][m], b[i][m])


def test_load_subject_dataset(synthetic_zip, synthetic_cache, stats):
    ds = load_subject_dataset(
        synthetic_zip, PreprocessConfig(), 2, stats, cache_dir=synthetic_cache.path.parent, progress=False
    )
    assert ds.subjects == (2,) and len(ds) == 56 and (ds.index.subject == 2).all()
    assert isinstance(ds._x["pm"], np.ndarray) and not isinstance(ds._x["pm"], np.memmap)  # own copy


def test_subject_normalisation_uses_each_subjects_own_statistics(synthetic_cache, stats):
    """Hand-built check: each subject's rows are z-scored by that subject's own mean and std (per accelerometer
    axis, one scalar per frame modality), whatever other subjects share the dataset."""
    both = WindowDataset(synthetic_cache, [3, 1], stats, normalization="subject")
    alone = WindowDataset(synthetic_cache, [3], None, normalization="subject")
    rows = synthetic_cache.subject_rows(3)
    raw = {m: np.asarray(synthetic_cache.arrays[m][rows], dtype=np.float64) for m in ("act", "pm")}
    mu_act, sd_act = raw["act"].reshape(-1, 3).mean(0), raw["act"].reshape(-1, 3).std(0)
    mu_pm, sd_pm = raw["pm"].mean(), raw["pm"].std()
    i3 = int(np.flatnonzero(both.index["subject"].to_numpy() == 3)[4])
    for ds, i in ((alone, 4), (both, i3)):
        assert np.allclose(ds[i]["act"].numpy(), (raw["act"][4] - mu_act) / sd_act, atol=1e-4)
        assert np.allclose(ds[i]["pm"].numpy(), (raw["pm"][4] - mu_pm) / sd_pm, atol=1e-4)
    # over a subject's own windows every accelerometer axis has mean 0 and std 1
    act = np.stack([alone[k]["act"].numpy() for k in range(len(alone))]).reshape(-1, 3)
    assert np.allclose(act.mean(0), 0, atol=1e-3) and np.allclose(act.std(0), 1, atol=1e-3)


def test_subject_normalisation_ignores_absent_windows(synthetic_cache):
    """Statistics come only from windows that have the modality: an absent window's data is not the client's."""
    n = len(WindowDataset(synthetic_cache, [3], None, normalization="per_window"))
    masks = np.ones((n, 4), dtype=bool)
    masks[: n // 2, 0] = False
    ds = WindowDataset(synthetic_cache, [3], None, normalization="subject", masks=masks)
    raw = np.asarray(synthetic_cache.arrays["act"][synthetic_cache.subject_rows(3)], dtype=np.float64)[n // 2:]
    flat = raw.reshape(-1, 3)
    assert np.allclose(ds[n - 1]["act"].numpy(), (raw[-1] - flat.mean(0)) / flat.std(0), atol=1e-4)
    assert not ds[0]["act"].any()  # absent: zeros


def test_unknown_normalisation_is_refused(synthetic_cache):
    with pytest.raises(ValueError, match="normalization"):
        WindowDataset(synthetic_cache, [3], None, normalization="per_subject")
