"""Time alignment: clean timestamps, common span, windows, time-based linear resampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import PreprocessConfig
from .constants import MODALITIES, SAMPLE_SHAPES

_EPS = 1e-9


@dataclass
class CleanSeries:
    t: np.ndarray  # float64 seconds (relative to some reference), strictly increasing
    x: np.ndarray  # [n, C]
    backward_steps: int  # places where the file's time went backwards
    duplicates: int  # rows dropped because their timestamp repeated an earlier one


def clean_series(t: np.ndarray, x: np.ndarray) -> CleanSeries:
    """Sort rows by time (stable) and drop exact duplicate timestamps, keeping the first row in file
    order. ``t`` may be int64 microseconds or float seconds; the output keeps its unit."""
    t = np.asarray(t)
    backward = int(np.count_nonzero(np.diff(t) < 0))
    if backward:
        order = np.argsort(t, kind="stable")
        t, x = t[order], x[order]
    keep = np.empty(len(t), dtype=bool)
    if len(t):
        keep[0] = True
        np.greater(t[1:], t[:-1], out=keep[1:])
    dup = int(len(t) - np.count_nonzero(keep))
    if dup:
        t, x = t[keep], x[keep]
    return CleanSeries(t=t, x=x, backward_steps=backward, duplicates=dup)


def common_span(times: dict[str, np.ndarray]) -> tuple[float, float]:
    """The interval every modality covers: (latest first sample, earliest last sample)."""
    return max(float(t[0]) for t in times.values()), min(float(t[-1]) for t in times.values())


def num_windows(t0: float, t1: float, window_s: float, step_s: float) -> int:
    """Windows ``[s, s + window_s]`` with ``s = t0 + k * step_s`` that fit in ``[t0, t1]``."""
    span = t1 - t0
    if span + _EPS < window_s:
        return 0
    return int(math.floor((span - window_s) / step_s + _EPS)) + 1


def window_starts(t0: float, t1: float, window_s: float, step_s: float) -> np.ndarray:
    return t0 + step_s * np.arange(num_windows(t0, t1, window_s, step_s), dtype=np.float64)


def sample_times(starts: np.ndarray, steps: int, rate: float) -> np.ndarray:
    """``[n, steps]`` sample times ``start + k / rate``, ``k = 0 .. steps-1``."""
    return starts[:, None] + np.arange(steps, dtype=np.float64)[None, :] / rate


def interp_linear(t: np.ndarray, x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear interpolation of every column of ``x`` ``[n, C]`` sampled at strictly increasing
    times ``t`` onto query times ``q`` (any shape), clamped at the ends like :func:`numpy.interp`.
    Returns ``q.shape + (C,)`` float64."""
    t = np.asarray(t, dtype=np.float64)
    x = np.asarray(x)
    if len(t) < 2:
        raise ValueError("need at least two samples to interpolate")
    qf = np.asarray(q, dtype=np.float64).ravel()
    i = np.searchsorted(t, qf, side="right") - 1
    np.clip(i, 0, len(t) - 2, out=i)
    t_lo = t[i]
    w = (qf - t_lo) / (t[i + 1] - t_lo)
    np.clip(w, 0.0, 1.0, out=w)
    lo = x[i].astype(np.float64, copy=False)
    out = lo + (x[i + 1] - lo) * w[:, None]
    return out.reshape(*np.shape(q), x.shape[1])


def resample_windows(
    t: np.ndarray,
    x: np.ndarray,
    starts: np.ndarray,
    steps: int,
    rate: float,
    step_s: float,
    dtype=np.float64,
) -> np.ndarray:
    """Values of ``x`` at the sample times of every window: ``[n, steps, C]`` (computed in float64,
    returned as ``dtype``).

    When ``step_s * rate`` is an integer the windows share one time grid, which is interpolated
    once and sliced (same values as interpolating every window's times directly)."""
    n = len(starts)
    C = x.shape[1]
    if n == 0:
        return np.zeros((0, steps, C), dtype=dtype)
    hop = step_s * rate
    k = int(round(hop))
    if abs(hop - k) < 1e-9 and k >= 1:
        grid = starts[0] + np.arange((n - 1) * k + steps, dtype=np.float64) / rate
        g = interp_linear(t, x, grid).astype(dtype, copy=False)
        idx = np.arange(n)[:, None] * k + np.arange(steps)[None, :]
        return g[idx]
    return interp_linear(t, x, sample_times(starts, steps, rate)).astype(dtype, copy=False)


@dataclass
class RecordingWindows:
    arrays: dict[str, np.ndarray]  # modality -> float16 [n, T, *sample_shape]
    starts: np.ndarray  # window start, seconds from the start of the common span (0, step, 2*step...)
    t0_us: int  # absolute start of the common span (epoch microseconds, wall clock)
    span_s: float
    info: dict  # per-modality rows / duplicates / backward steps / rate


def window_recording(
    series: dict[str, tuple[np.ndarray, np.ndarray]], cfg: PreprocessConfig, name: str = "recording"
) -> RecordingWindows:
    """Align one recording's four modalities on time and cut it into windows.

    ``series[m] = (t_us int64, values [rows, C])`` in file order. Rows are sorted by time and exact
    duplicate timestamps dropped; every modality is linearly interpolated on time onto
    ``start + k / rate`` inside the span all modalities cover. Raises ``ValueError`` (the builder turns
    it into :class:`~data_partition.reader.MExFormatError`) when the recording is too short.

    A modality absent from ``series`` (a sensor that did not record: ``model.predict`` on new recordings) gets
    zero windows and no ``info`` entry, and the span is that of the present ones; the cache builder always
    passes all four.
    """
    from .reader import MExFormatError

    present = [m for m in MODALITIES if m in series]
    if not present:
        raise MExFormatError(f"{name}: no modality recorded")
    ref = min(int(series[m][0].min()) for m in present)
    cleaned: dict[str, CleanSeries] = {}
    info: dict[str, dict] = {}
    for m in present:
        t_us, x = series[m]
        c = clean_series(np.asarray(t_us, dtype=np.int64) - ref, x)
        first_us, last_us = (ref + int(c.t[0]), ref + int(c.t[-1])) if len(c.t) else (None, None)
        c.t = c.t.astype(np.float64) / 1e6
        if len(c.t) < 2:
            raise MExFormatError(f"{name}: modality {m} has {len(c.t)} distinct timestamp(s); need at least 2")
        cleaned[m] = c
        dur = float(c.t[-1] - c.t[0])
        info[m] = {
            "rows": int(len(t_us)),
            "first_us": first_us,
            "last_us": last_us,
            "duplicates": c.duplicates,
            "backward_steps": c.backward_steps,
            "duration_s": round(dur, 4),
            "rate_hz": round((len(c.t) - 1) / dur, 3) if dur > 0 else None,
            "max_gap_s": round(float(np.diff(c.t).max()), 4),
        }
    t0, t1 = common_span({m: c.t for m, c in cleaned.items()})
    starts = window_starts(t0, t1, cfg.window_s, cfg.step_s)
    if len(starts) == 0:
        raise MExFormatError(
            f"{name}: recording too short for one {cfg.window_s:g} s window: the span all {len(present)} modalities "
            f"cover is {max(t1 - t0, 0.0):.2f} s"
        )
    arrays: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        if m not in cleaned:
            arrays[m] = np.zeros((len(starts), cfg.steps(m), *SAMPLE_SHAPES[m]), dtype=np.float16)
            continue
        c = cleaned[m]
        with np.errstate(over="ignore"):
            v16 = resample_windows(c.t, c.x, starts, cfg.steps(m), cfg.rate(m), cfg.step_s, dtype=np.float16)
        if not np.isfinite(v16).all():
            raise MExFormatError(f"{name}: modality {m} has values outside the float16 range (|x| > 65504)")
        arrays[m] = v16.reshape(len(starts), cfg.steps(m), *SAMPLE_SHAPES[m])
    return RecordingWindows(
        arrays=arrays,
        starts=starts - t0,
        t0_us=ref + int(round(t0 * 1e6)),
        span_s=float(t1 - t0),
        info=info,
    )
