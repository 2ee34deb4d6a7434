"""Shared fixtures: where the real MEx data is."""

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
