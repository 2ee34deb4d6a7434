"""Shared fixtures: where the real MEx data is, and a window cache that lives in pytest's temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mex_zip() -> Path | None:
    env = os.environ.get("FEDTIME_DATA_PATH", "").strip()
    for cand in ([Path(env).expanduser()] if env else []) + [ROOT.parent / "shared" / "data" / "mex" / "MEx.zip"]:
        if cand.exists():
            return cand.resolve()
    return None


@pytest.fixture(scope="session")
def mex_path() -> Path:
    path = mex_zip()
    if path is None:
        pytest.skip("the real MEx zip is not available (set FEDTIME_DATA_PATH)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _window_cache_in_a_temporary_folder(tmp_path_factory):
    """Tests never write into the user's ~/.cache: the real-data window caches go to pytest's temporary base
    folder (kept across sessions there, so a second run reuses them); every process a test starts inherits it.
    An explicit $FEDTIME_CACHE_DIR wins."""
    from data_partition.constants import ENV_CACHE_DIR

    if os.environ.get(ENV_CACHE_DIR):
        yield
        return
    os.environ[ENV_CACHE_DIR] = str(tmp_path_factory.getbasetemp().parent / "fedtime-window-cache")
    yield
    os.environ.pop(ENV_CACHE_DIR, None)
