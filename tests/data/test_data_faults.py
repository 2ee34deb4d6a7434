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
