"""Time alignment: cleaning, span, window count, time-based interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import synthetic_mex as sx

from data_partition import PreprocessConfig
from data_partition.align import (
    clean_series,
    interp_linear,
    num_windows,
    resample_windows,
    sample_times,
    window_recording,
    window_starts,
)
from data_partition.reader import parse_csv


def test_interp_linear_matches_numpy():
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 10, 50))
    x = rng.normal(size=(50, 4))
    q = rng.uniform(-1, 11, (7, 9))
    out = interp_linear(t, x, q)
    assert out.shape == (7, 9, 4)
    for c in range(4):
        assert np.allclose(out[..., c], np.interp(q, t, x[:, c]))


@pytest.mark.parametrize("rate, step", [(15.0, 1.0), (5.0, 1.0), (100.0, 1.0), (10.0, 0.25), (4.0, 0.3)])
def test_grid_path_equals_direct_interpolation(rate, step):
    rng = np.random.default_rng(1)
    t = np.cumsum(rng.uniform(0.05, 0.15, 400))
    x = rng.normal(size=(400, 3))
    starts = window_starts(t[0] + 0.3, t[-1], 5.0, step)
    steps = int(round(5.0 * rate))
    a = resample_windows(t, x, starts, steps, rate, step)
    b = interp_linear(t, x, sample_times(starts, steps, rate))
    assert a.shape == (len(starts), steps, 3)
    assert np.allclose(a, b, atol=1e-12)


def test_clean_series_sorts_and_drops_duplicates_keeping_first():
    t = np.array([0, 10, 20, 20, 15, 30, 30, 40])
    x = np.arange(8, dtype=float)[:, None]
    c = clean_series(t, x)
    assert c.backward_steps == 1 and c.duplicates == 2
    assert c.t.tolist() == [0, 10, 15, 20, 30, 40]
    assert c.x[:, 0].tolist() == [0, 1, 4, 2, 5, 7]  # first row of each repeated time, file order


@pytest.mark.parametrize(
    "t0, t1, n", [(0.0, 4.99, 0), (0.0, 5.0, 1), (0.3, 10.29, 5), (0.3, 10.3, 6), (0.0, 64.8, 60)]
)
def test_num_windows(t0, t1, n):
    assert num_windows(t0, t1, 5.0, 1.0) == n
    s = window_starts(t0, t1, 5.0, 1.0)
    assert len(s) == n and (n == 0 or s[-1] + 5.0 <= t1 + 1e-9)


def _series(subject=1, exercise=2, rec=1, duration=12.0):
    out = {}
    for m in sx.MODALITIES:
        out[m] = parse_csv(sx.recording_csv(m, subject, exercise, rec, duration).encode(), f"{m}.csv", m)
    return out


@pytest.mark.parametrize("acc_hz, frame_hz", [(100.0, 15.0), (20.0, 5.0)])
def test_windows_follow_time_not_row_index(acc_hz, frame_hz):
    """Values are linear in time, so time-based interpolation recovers them exactly at
    t_start + k / rate -- including the irregular depth camera with its 0.6 s gap."""
    cfg = PreprocessConfig(acc_hz=acc_hz, frame_hz=frame_hz)
    series = _series()
    rw = window_recording(series, cfg)
    # common span starts at dc's first sample (0.65 s after the base) and ends at dc's last one
    t0_rel = (rw.t0_us - series["act"][0][0]) / 1e6
    assert t0_rel == pytest.approx(sx.START["dc"], abs=1e-6)
    n = len(rw.starts)
    assert n == num_windows(0.0, rw.span_s, 5.0, 1.0) and n >= 6
    assert np.allclose(rw.starts, np.arange(n))
    for m in sx.MODALITIES:
        T = cfg.steps(m)
        arr = rw.arrays[m]
        assert arr.dtype == np.float16 and arr.shape == (n, *cfg.window_shape(m))
        times = t0_rel + rw.starts[:, None] + np.arange(T)[None, :] / cfg.rate(m)
        expect = sx.signal(m, 1, 2, 1, times.ravel()).reshape(n, T, -1)
        got = arr.reshape(n, T, -1).astype(np.float64)
        assert np.allclose(got, expect, rtol=2e-3, atol=2e-3), m
    assert rw.info["pm"]["duplicates"] == 1 and rw.info["pm"]["backward_steps"] == 1


def test_index_based_resampling_would_be_wrong():
    """Sanity check of the test above: interpolating dc by row index misplaces values."""
    t_us, x = _series()["dc"]
    t = (t_us - t_us[0]) / 1e6
    idx_based = np.array([np.interp(np.linspace(0, len(t) - 1, 75), np.arange(len(t)), x[:, 0])])
    time_based = interp_linear(t, x[:, :1], np.linspace(t[0], t[0] + 5, 75))
    assert not np.allclose(idx_based[0][:75], time_based[:, 0], atol=1e-3)


def test_frames_are_reshaped_row_major():
    cfg = PreprocessConfig()
    rw = window_recording(_series(), cfg)
    pm = rw.arrays["pm"]
    assert pm.shape[2:] == (32, 16)
    flat = pm.reshape(pm.shape[0], pm.shape[1], 512).astype(np.float64)
    # channel c of the synthetic pm grows by 0.5 per column index: row-major means pixel (r, k) = c = 16 r + k
    assert np.allclose(pm[0, 0, 1, 0] - pm[0, 0, 0, 0], 0.5 * 16, atol=0.3)
    assert np.allclose(flat[0, 0, 17] - flat[0, 0, 16], 0.5, atol=0.3)
