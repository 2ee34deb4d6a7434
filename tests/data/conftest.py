"""Fixtures for the data_partition tests: synthetic MEx (folder / zip) and the real MEx cache.

The real-data cache is built once (paper settings) into ``$FEDTIME_CACHE_DIR`` (tests/conftest.py points it into
pytest's temporary base folder) and reused across sessions (its key covers the archive's sha256 and
every preprocessing parameter, so reuse is safe). Real-data tests skip when the zip is absent.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic_mex  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory) -> Path:
    """Extracted synthetic MEx: 3 subjects x 8 recordings, modality folders under ``MEx/``."""
    root = tmp_path_factory.mktemp("synthetic_tree")
    return synthetic_mex.write_mex_tree(root, subjects=(1, 2, 3), duration_s=12.0, prefix="MEx/")


@pytest.fixture(scope="session")
def synthetic_zip(synthetic_tree, tmp_path_factory) -> Path:
    """The same data as a zip, with the modality folders nested under ``data/MEx/``."""
    return synthetic_mex.zip_tree(synthetic_tree, tmp_path_factory.mktemp("synthetic_zip") / "mex.zip", "data/")


@pytest.fixture
def corrupt_copy(synthetic_tree, tmp_path):
    """Returns a function giving a fresh copy of the synthetic tree to damage."""

    def make() -> Path:
        dst = tmp_path / "corrupt"
        shutil.copytree(synthetic_tree, dst)
        return dst

    return make


@pytest.fixture(scope="session")
def synthetic_cache(synthetic_zip, tmp_path_factory):
    from data_partition import PreprocessConfig, load_cache

    return load_cache(synthetic_zip, PreprocessConfig(), tmp_path_factory.mktemp("syn_cache"), workers=1, progress=False)


@pytest.fixture(scope="session")
def real_zip(mex_path) -> Path:
    """The real MEx zip (tests/conftest.py finds it; skips when absent)."""
    return mex_path


@pytest.fixture(scope="session")
def real_cache(real_zip):
    """Paper-settings window cache of the real data (built once, then reused)."""
    from data_partition import PreprocessConfig, load_cache

    return load_cache(real_zip, PreprocessConfig(), None, progress=False)
