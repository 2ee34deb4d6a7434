"""Bad data sources say what is wrong and what to do (a truncated archive was "neither a folder nor a zip
archive"; no network gave a raw URLError with no hint)."""

from __future__ import annotations

import pytest

from data_partition import MExFormatError, resolve_source
from data_partition.reader import scan_source


def test_a_truncated_zip_is_called_damaged(synthetic_zip, tmp_path):
    broken = tmp_path / "MEx.zip"
    broken.write_bytes(synthetic_zip.read_bytes()[: synthetic_zip.stat().st_size // 2])
    with pytest.raises(MExFormatError, match="a damaged zip archive .*download it again"):
        scan_source(broken, tmp_path / "cache")


def test_offline_without_data_names_the_two_ways_to_give_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDTIME_DATA_PATH", raising=False)
    with pytest.raises(ConnectionError, match=r"could not be downloaded .*\$FEDTIME_DATA_PATH or the run-config key "
                                              r"data-path"):
        resolve_source(None, cache_dir=tmp_path, url="http://127.0.0.1:9/MEx.zip", progress=False)


def test_statistics_files_get_the_mode_open_would_give(synthetic_cache, tmp_path):
    """They were written 0600 (mkstemp's mode), unlike the cache arrays beside them."""
    import os
    import stat

    from data_partition import NormStats

    path = tmp_path / "stats.json"
    NormStats.fit(synthetic_cache, [1, 2]).save(path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_cache_array_changed_in_place_is_named_not_loaded(synthetic_zip, tmp_path):
    """Bytes overwritten inside an array (same size, same header) loaded silently as NaN windows."""
    import numpy as np

    from data_partition import PreprocessConfig, WindowDataset, load_cache
    from data_partition.cache import clear_memo

    cfg = PreprocessConfig(acc_hz=10.0, frame_hz=5.0)
    wc = load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    assert set(wc.meta["row_digests"]) == {"act", "acw", "dc", "pm"}
    WindowDataset(wc, [2], None, normalization="per_window")  # intact: loads
    rows = wc.subject_rows(2)
    path = wc.path / "dc.npy"
    arr = np.load(path, mmap_mode="r")
    row_bytes = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
    with open(path, "r+b") as f:
        f.seek(int(arr.offset) + (rows.start + 1) * row_bytes + 10)
        f.write(np.full(8, np.nan, np.float16).tobytes())
    del arr, wc
    clear_memo()
    wc = load_cache(synthetic_zip, cfg, tmp_path, workers=1, progress=False)
    with pytest.raises(MExFormatError, match=r"dc\.npy: the windows of subject 2 are not the bytes that were built"):
        WindowDataset(wc, [2], None, normalization="per_window")
    WindowDataset(wc, [1, 3], None, normalization="per_window")  # the other subjects' rows are intact
