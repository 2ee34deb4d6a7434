"""Small synthetic MEx-shaped data for tests (reusable from other test folders).

Layout and quirks follow the real dataset: ``<prefix>act/SS/EE_act_R.csv`` etc., no header,
timestamp first, both timestamp forms (rows whose microseconds are 0 have no fraction),
accelerometers ~100 Hz, depth camera irregular ~10.4 Hz with a gap, pressure mat 15 Hz with a
backward step and a duplicate timestamp, modalities starting and ending at different times.

Every value is a *linear* function of time (:func:`signal`), so time-based linear interpolation
reproduces it exactly (up to float16 rounding) and tests can compute expected windows.
"""

from __future__ import annotations

import datetime as dt
import os
import zipfile
from pathlib import Path

import numpy as np

MODALITIES = ("act", "acw", "dc", "pm")
FOLDERS = {"act": "act", "acw": "acw", "dc": "dc_0.05_0.05", "pm": "pm_1.0_1.0"}
CHANNELS = {"act": 3, "acw": 3, "dc": 192, "pm": 512}
#: (exercise, recording) of every subject: exercise 4 twice, like the real data.
RECORDINGS = ((1, 1), (2, 1), (3, 1), (4, 1), (4, 2), (5, 1), (6, 1), (7, 1))
#: Start / end offsets (s) of each modality relative to the recording's base time.
START = {"act": 0.0, "acw": 0.013, "dc": 0.65, "pm": 0.2}
END_TRIM = {"act": 0.0, "acw": 0.05, "dc": 0.3, "pm": 0.1}
BASE = dt.datetime(2018, 11, 8, 11, 34, 51)


def recording_base(subject: int, exercise: int, recording: int) -> dt.datetime:
    return BASE + dt.timedelta(hours=subject, minutes=2 * exercise + recording)


def signal(modality: str, subject: int, exercise: int, recording: int, t_rel: np.ndarray) -> np.ndarray:
    """Values ``[len(t_rel), C]`` at times ``t_rel`` (seconds after :func:`recording_base`)."""
    t = np.asarray(t_rel, dtype=np.float64)[:, None]
    c = np.arange(CHANNELS[modality], dtype=np.float64)[None, :]
    if modality in ("act", "acw"):
        return 0.5 * subject + 0.1 * exercise + 0.05 * recording + 0.1 * c + 0.02 * (c + 1) * t
    if modality == "dc":
        return 0.05 * subject + 0.01 * exercise + c / 400.0 + 0.01 * t
    return 10.0 * subject + exercise + 0.5 * c + 2.0 * t  # pm


def sample_times(modality: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds after the recording base, rounded to microseconds, in file order."""
    start, end = START[modality], duration_s - END_TRIM[modality]
    if modality == "act":
        t = start + np.arange(0, end - start, 0.01)
    elif modality == "acw":
        t = start + np.arange(0, end - start, 1 / 97.0)
    elif modality == "pm":
        t = start + np.arange(0, end - start, 1 / 15.0)
    else:  # dc: irregular, ~10.4 Hz, with a 0.6 s gap
        steps = rng.uniform(0.05, 0.142, size=int(duration_s * 20))
        steps[len(steps) // 3] = 0.6
        t = start + np.concatenate([[0.0], np.cumsum(steps)])
        t = np.append(t[t < end - 0.04], end)  # last frame exactly at the end: deterministic span
    return np.round(t, 6)


def _fmt_time(ts: dt.datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S.%f") if ts.microsecond else ts.strftime("%Y-%m-%d %H:%M:%S")


def recording_csv(
    modality: str, subject: int, exercise: int, recording: int, duration_s: float = 12.0, seed: int = 0
) -> str:
    """CSV text of one file."""
    rng = np.random.default_rng([seed, subject, exercise, recording, MODALITIES.index(modality)])
    t = sample_times(modality, duration_s, rng)
    rows_t = list(t)
    if modality == "pm":
        # a duplicated timestamp (same values) and a backward step (two rows swapped)
        k = len(rows_t) // 2
        rows_t.insert(k, rows_t[k])
        rows_t[k + 5], rows_t[k + 6] = rows_t[k + 6], rows_t[k + 5]
    rows_t = np.asarray(rows_t)
    values = signal(modality, subject, exercise, recording, rows_t)
    base = recording_base(subject, exercise, recording)
    lines = []
    for ti, v in zip(rows_t, values):
        ts = base + dt.timedelta(microseconds=int(round(ti * 1e6)))
        lines.append(_fmt_time(ts) + "," + ",".join(f"{x:.9g}" for x in v))
    return "\n".join(lines) + "\n"


def member_name(modality: str, subject: int, exercise: int, recording: int, prefix: str = "") -> str:
    return f"{prefix}{FOLDERS[modality]}/{subject:02d}/{exercise:02d}_{modality}_{recording}.csv"


def write_mex_tree(
    root: str | os.PathLike,
    subjects=(1, 2, 3),
    duration_s: float = 12.0,
    prefix: str = "MEx/",
    seed: int = 0,
    recordings=RECORDINGS,
) -> Path:
    """Write a synthetic MEx folder under ``root`` (modality folders inside ``root/prefix``)."""
    root = Path(root)
    for s in subjects:
        for e, r in recordings:
            for m in MODALITIES:
                p = root / member_name(m, s, e, r, prefix)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(recording_csv(m, s, e, r, duration_s, seed))
    return root


def zip_tree(tree: str | os.PathLike, zip_path: str | os.PathLike, arc_prefix: str = "") -> Path:
    """Zip a folder (directory entries included, like the UCI archive)."""
    tree, zip_path = Path(tree), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in os.walk(tree):
            dirnames.sort()
            rel = Path(dirpath).relative_to(tree)
            if str(rel) != ".":
                zf.writestr(arc_prefix + rel.as_posix() + "/", b"")
            for f in sorted(filenames):
                zf.write(Path(dirpath) / f, arc_prefix + (rel / f).as_posix())
    return zip_path


def write_mex_zip(zip_path: str | os.PathLike, subjects=(1, 2, 3), duration_s: float = 12.0, prefix: str = "", **kw) -> Path:
    """Write a synthetic MEx zip (modality folders at ``prefix`` inside the archive)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_mex_tree(d, subjects, duration_s, prefix="", **kw)
        return zip_tree(d, zip_path, arc_prefix=prefix)


def expected_window_count(duration_s: float = 12.0, window_s: float = 5.0, step_s: float = 1.0) -> int:
    """Windows per synthetic recording (the common span is set by dc's late start and early end)."""
    span = (duration_s - max(END_TRIM.values())) - max(START.values())
    return int(np.floor((span - window_s) / step_s + 1e-9)) + 1
