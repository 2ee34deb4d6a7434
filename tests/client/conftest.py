"""The ClientApp tests' federation: a small synthetic MEx archive (all 30 subjects, a few windows each) and a tiny
run config over it, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))

import synthetic_mex  # noqa: E402

from fedtime.config import RunConfig  # noqa: E402


@pytest.fixture(scope="session")
def cfg(tmp_path_factory) -> RunConfig:
    zip_path = synthetic_mex.write_mex_zip(tmp_path_factory.mktemp("mex") / "mex.zip", subjects=range(1, 31),
                                           duration_s=10.0)
    return RunConfig.from_run_config({"model-preset": "tiny", "data-path": str(zip_path), "local-epochs": 1,
                                      "batch-size": 8, "grad-accum": 1, "lr": 3e-3, "augment-sigma": 0.0})

