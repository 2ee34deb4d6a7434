"""Window cache: layout, keying, no rebuild when warm, atomic builds, parallel == serial."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import synthetic_mex as sx

import data_partition.cache as cache_mod
import data_partition.reader as reader_mod
from data_partition import PreprocessConfig, clear_memo, load_cache

N_REC = 3 * len(sx.RECORDINGS)


def test_layout_shapes_dtypes_and_index(synthetic_cache):
    wc = synthetic_cache
    cfg = wc.cfg
    n = len(wc)
    assert n == N_REC * 7 == N_REC * sx.expected_window_count()  # common span 11.05 s -> 7 windows each
    expect = {"act": (n, 500, 3), "acw": (n, 500, 3), "dc": (n, 75, 12, 16), "pm": (n, 75, 32, 16)}
    for m, a in wc.arrays.items():
        assert isinstance(a, np.memmap) and a.dtype == np.float16 and a.shape == expect[m]
        assert a.shape[1:] == cfg.window_shape(m)
    idx = wc.index
    assert list(idx.columns) == ["subject", "exercise", "recording", "start_s", "label"]
    assert (np.diff(idx.subject.to_numpy()) >= 0).all()
    assert (idx.label == idx.exercise - 1).all() and set(idx.label) == set(range(7))
    for s in (1, 2, 3):
        sl = wc.subject_rows(s)
        assert (idx.subject.iloc[sl] == s).all() and (idx.subject != s).sum() == n - (sl.stop - sl.start)
    with pytest.raises(KeyError):
        wc.subject_rows(4)
    assert wc.windows_per_subject() == {1: 56, 2: 56, 3: 56}


def test_zip_and_folder_give_the_same_windows(synthetic_cache, synthetic_tree, tmp_path):
    wc2 = load_cache(synthetic_tree, PreprocessConfig(), tmp_path, workers=1, progress=False)
    assert wc2.key != synthetic_cache.key  # folder fingerprint vs zip sha256
    assert wc2.index.equals(synthetic_cache.index)
    for m in wc2.arrays:
        assert np.array_equal(wc2.arrays[m], synthetic_cache.arrays[m])


def test_warm_load_never_rebuilds_nor_rehashes(synthetic_zip, tmp_path, monkeypatch):
    cfg = PreprocessConfig(acc_hz=20.0, frame_hz=5.0)
    wc = load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    assert wc.arrays["act"].shape[1:] == (100, 3) and wc.arrays["pm"].shape[1:] == (25, 32, 16)

    def boom(*a, **k):
        raise AssertionError("must not run on a warm load")

    monkeypatch.setattr(cache_mod, "_build", boom)
    monkeypatch.setattr(reader_mod, "sha256_file", boom)
    clear_memo()
    wc2 = load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    assert wc2.path == wc.path and wc2 is not wc
    # a changed parameter is a different key, so it would build
    with pytest.raises(AssertionError, match="warm load"):
        load_cache(synthetic_zip, PreprocessConfig(acc_hz=20.0, frame_hz=5.0, step_s=2.0), tmp_path, workers=1, progress=False)


def test_every_parameter_and_the_source_are_in_the_key(synthetic_zip, tmp_path):
    base = PreprocessConfig()
    fp = "x" * 64
    keys = {
        cache_mod.cache_key(fp, c)
        for c in (
            base,
            PreprocessConfig(acc_hz=50.0),
            PreprocessConfig(frame_hz=5.0),
            PreprocessConfig(window_s=4.0),
            PreprocessConfig(step_s=2.0),
            PreprocessConfig(on_bad="skip"),
        )
    }
    assert len(keys) == 6
    assert cache_mod.cache_key(fp, base) != cache_mod.cache_key("y" * 64, base)
    assert cache_mod.cache_key(fp, base) == cache_mod.cache_key(fp, PreprocessConfig())


def test_touched_source_is_rehashed_but_same_content_same_cache(synthetic_zip, tmp_path):
    src = tmp_path / "copy.zip"
    shutil.copy(synthetic_zip, src)
    cfg = PreprocessConfig(acc_hz=10.0, frame_hz=5.0)
    wc = load_cache(src, cfg, tmp_path / "c", workers=1, progress=False)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    clear_memo()
    assert load_cache(src, cfg, tmp_path / "c", workers=1, progress=False).path == wc.path


def test_killed_build_leaves_no_cache_and_next_build_works(synthetic_zip, tmp_path, monkeypatch):
    cfg = PreprocessConfig(acc_hz=10.0, frame_hz=5.0)
    calls = {"n": 0}
    real = cache_mod.window_recording

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # like a Ctrl-C in the middle of the build
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "window_recording", dies)
    with pytest.raises(KeyboardInterrupt):
        load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    assert not list(tmp_path.glob("windows-*")) and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.setattr(cache_mod, "window_recording", real)
    # a stale temp dir from a SIGKILLed build is removed by the next build
    key_dirs = []
    wc = load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    key_dirs.append(wc.path.name)
    stale = tmp_path / f".tmp-{wc.path.name}-{cache_mod._host()}-999999-deadbeef"
    stale.mkdir()
    (stale / "act.npy").write_bytes(b"partial")
    clear_memo()
    load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    assert not stale.exists()


def test_corrupt_cache_is_rebuilt(synthetic_zip, tmp_path):
    cfg = PreprocessConfig(acc_hz=10.0, frame_hz=5.0)
    wc = load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    ref = np.array(wc.arrays["pm"])
    del wc
    clear_memo()
    p = next(tmp_path.glob("windows-*")) / "pm.npy"
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        wc2 = load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    assert any("rebuilding" in str(x.message) for x in w)
    assert np.array_equal(wc2.arrays["pm"], ref)


def test_parallel_build_equals_serial(synthetic_zip, tmp_path):
    cfg = PreprocessConfig(acc_hz=20.0, frame_hz=5.0, step_s=2.0)
    a = load_cache(synthetic_zip, cfg, tmp_path / "serial", workers=1, progress=False)
    b = load_cache(synthetic_zip, cfg, tmp_path / "pool", workers=2, progress=False)
    assert a.meta["build_workers"] == 0 and b.meta["build_workers"] == 2
    assert a.index.equals(b.index)
    for m in a.arrays:
        assert np.array_equal(a.arrays[m], b.arrays[m])


def test_meta_records_timestamp_quirks(synthetic_cache):
    recs = synthetic_cache.meta["recordings"]
    assert len(recs) == N_REC
    assert all(r["modalities"]["pm"]["duplicates"] == 1 and r["modalities"]["pm"]["backward_steps"] == 1 for r in recs)
    assert all(9.0 < r["modalities"]["dc"]["rate_hz"] < 12.0 for r in recs)


def test_read_rows_equals_memmap_slices(synthetic_cache):
    from data_partition.cache import read_rows

    for m, a in synthetic_cache.arrays.items():
        for start, stop in ((0, 1), (3, 60), (160, 168), (5, 5), (167, 500)):
            got = read_rows(a, start, stop)
            assert type(got) is np.ndarray and np.array_equal(got, np.asarray(a[start:stop]))


def test_a_prebuilt_cache_folder_opens_without_the_archive(synthetic_cache, tmp_path, monkeypatch):
    """GPU nodes get a copied cache instead of the raw zip: the same windows, nothing built, and a
    configuration it does not hold, an edited meta.json or a truncated array is named, never rebuilt."""
    ship = tmp_path / "ship"
    shutil.copytree(synthetic_cache.path, ship / synthetic_cache.path.name)
    cfg = synthetic_cache.cfg
    monkeypatch.setattr(cache_mod, "_build", lambda *a, **k: pytest.fail("a prebuilt cache must not be rebuilt"))
    for source in (ship, ship / synthetic_cache.path.name):
        clear_memo()
        wc = load_cache(source, cfg, tmp_path / "user-cache", progress=False)
        assert wc.key == synthetic_cache.key and wc.path.parent == ship
        np.testing.assert_array_equal(wc.arrays["pm"][-3:], synthetic_cache.arrays["pm"][-3:])
        assert wc.windows_per_subject() == synthetic_cache.windows_per_subject()
    clear_memo()
    monkeypatch.setenv("FEDTIME_DATA_PATH", str(ship))  # the run config's data-path = "" falls back to it
    assert load_cache(None, cfg, tmp_path / "user-cache", progress=False).key == synthetic_cache.key

    clear_memo()
    with pytest.raises(FileNotFoundError, match=r"no window cache at .*'acc_hz': 50\.0.*found: windows-"):
        load_cache(ship, PreprocessConfig(acc_hz=50.0), tmp_path / "user-cache", progress=False)

    meta_path = ship / synthetic_cache.path.name / "meta.json"
    meta = meta_path.read_text()
    meta_path.write_text(meta.replace(synthetic_cache.key, "0" * 20))
    clear_memo()
    with pytest.raises(ValueError, match="does not match its source and parameters"):
        load_cache(ship, cfg, progress=False)
    meta_path.write_text(meta)
    pm = ship / synthetic_cache.path.name / "pm.npy"
    pm.write_bytes(pm.read_bytes()[: pm.stat().st_size // 2])
    clear_memo()
    with pytest.raises(ValueError, match=r"prebuilt window cache .* is unreadable"):
        load_cache(ship, cfg, progress=False)
