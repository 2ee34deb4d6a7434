"""Reader: layout discovery, timestamp parsing, and every kind of bad input."""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import synthetic_mex as sx

from data_partition import MExFormatError, PreprocessConfig, load_cache, parse_timestamps, scan_source
from data_partition.reader import parse_csv, timestamps_to_us

N_REC = 3 * len(sx.RECORDINGS)


def test_scan_finds_nested_folders_in_zip_and_folder(synthetic_zip, synthetic_tree, tmp_path):
    lz = scan_source(synthetic_zip, tmp_path)
    lt = scan_source(synthetic_tree, tmp_path)
    assert lz.kind == "zip" and lt.kind == "dir"
    assert set(lz.roots.values()) == {"data/MEx/"} and set(lt.roots.values()) == {"MEx/"}
    assert lz.recordings() == lt.recordings() and len(lz.recordings()) == N_REC
    assert all(set(f) == set(sx.MODALITIES) for f in lz.files.values())


def test_scan_unwraps_zip_inside_zip(synthetic_zip, tmp_path):
    outer = tmp_path / "uci.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(synthetic_zip, "data.zip")
        zf.writestr("readme.txt", "MEx")
    layout = scan_source(outer, tmp_path / "cache")
    assert layout.origin == outer.resolve() and layout.source != layout.origin
    assert len(layout.recordings()) == N_REC


def test_parse_timestamps_both_forms():
    us = parse_timestamps(["2018-11-08 11:34:51.474000", "2018-11-08 11:34:52", "2018-11-08 11:34:52.000250"])
    assert us.dtype == np.int64
    assert np.array_equal(np.diff(us), [526000, 250])
    assert us[1] % 1_000_000 == 0


@pytest.mark.parametrize("unit", ["ns", "us", "ms"])
def test_timestamps_to_us_any_unit(unit):
    s = pd.Series(pd.to_datetime(["2018-11-08 11:34:51.474", "2018-11-08 11:34:52"], format="ISO8601")).astype(f"datetime64[{unit}]")
    us = timestamps_to_us(s)
    assert us[1] - us[0] == 526000
    assert us[1] == 1541676892 * 1_000_000


def test_parse_csv_values_and_mixed_forms():
    text = sx.recording_csv("act", 1, 1, 1).encode()
    assert re.search(rb"\n2018-11-08 12:37:5\d,", text), "synthetic data must contain the seconds-only form"
    t_us, x = parse_csv(text, "act.csv", "act")
    assert x.shape == (len(t_us), 3) and x.dtype == np.float64
    t_rel = (t_us - t_us[0]) / 1e6
    assert np.allclose(x, sx.signal("act", 1, 1, 1, t_rel), atol=1e-7)


# ------------------------------------------------------------------------------------------
# bad input: each case raises MExFormatError naming the file (and line), or is skipped with a warning


def _member(root: Path, m: str, s: int, e: int, r: int) -> Path:
    return root / sx.member_name(m, s, e, r, "MEx/")


def _edit_line(path: Path, line: int, fn) -> None:
    lines = path.read_text().split("\n")
    lines[line - 1] = fn(lines[line - 1])
    path.write_text("\n".join(lines))


def _build(root: Path, tmp_path: Path, on_bad: str = "raise"):
    return load_cache(root, PreprocessConfig(on_bad=on_bad), tmp_path / f"cache-{on_bad}", workers=1, progress=False)


def _check(root, tmp_path, file_part: str, pattern: str, line: int | None, skipped_recs: int = 1):
    with pytest.raises(MExFormatError) as ei:
        _build(root, tmp_path)
    msg = str(ei.value)
    assert file_part in msg, msg
    assert re.search(pattern, msg), msg
    if line is not None:
        assert f"line {line}" in msg and ei.value.line == line, msg
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        wc = _build(root, tmp_path, "skip")
    assert any(file_part in str(x.message) for x in w), [str(x.message) for x in w]
    assert len(wc.meta["recordings"]) == N_REC - skipped_recs
    assert len(wc.skipped) == skipped_recs and file_part in wc.skipped[0]["reason"]
    return wc


def test_missing_modality_folder_always_raises(corrupt_copy, tmp_path):
    root = corrupt_copy()
    import shutil

    shutil.rmtree(root / "MEx" / "dc_0.05_0.05")
    for on_bad in ("raise", "skip"):
        with pytest.raises(MExFormatError, match=r"dc_0\.05_0\.05"):
            _build(root, tmp_path, on_bad)


def test_missing_recording_of_one_modality(corrupt_copy, tmp_path):
    root = corrupt_copy()
    _member(root, "pm", 2, 3, 1).unlink()
    wc = _check(root, tmp_path, "pm_1.0_1.0/02/03_pm_1.csv", r"missing pm file", None)
    assert not ((wc.index.subject == 2) & (wc.index.exercise == 3)).any()


def test_empty_file(corrupt_copy, tmp_path):
    root = corrupt_copy()
    _member(root, "act", 1, 5, 1).write_text("")
    _check(root, tmp_path, "act/01/05_act_1.csv", r"empty file", None)


@pytest.mark.parametrize("extra, found", [(",1.0", 5), (None, 3)])
def test_wrong_column_count(corrupt_copy, tmp_path, extra, found):
    root = corrupt_copy()
    f = _member(root, "acw", 3, 4, 2)
    _edit_line(f, 7, (lambda ln: ln + extra) if extra else (lambda ln: ln.rsplit(",", 1)[0]))
    _check(root, tmp_path, "acw/03/04_acw_2.csv", rf"expected 4 columns .*found {found}", 7)


def test_wrong_column_count_everywhere(corrupt_copy, tmp_path):
    root = corrupt_copy()
    f = _member(root, "dc", 1, 1, 1)
    f.write_text("\n".join(ln.rsplit(",", 1)[0] for ln in f.read_text().splitlines()) + "\n")
    _check(root, tmp_path, "dc_0.05_0.05/01/01_dc_1.csv", r"expected 193 columns .*found 192", 1)


def test_non_numeric_cell(corrupt_copy, tmp_path):
    root = corrupt_copy()
    f = _member(root, "dc", 2, 6, 1)
    _edit_line(f, 5, lambda ln: ",".join(ln.split(",")[:10] + ["abc"] + ln.split(",")[11:]))
    _check(root, tmp_path, "dc_0.05_0.05/02/06_dc_1.csv", r"column 11: non-numeric value 'abc'", 5)


@pytest.mark.parametrize("cell", ["nan", ""])
def test_nan_cell(corrupt_copy, tmp_path, cell):
    root = corrupt_copy()
    f = _member(root, "pm", 1, 7, 1)
    _edit_line(f, 12, lambda ln: ",".join(ln.split(",")[:3] + [cell] + ln.split(",")[4:]))
    _check(root, tmp_path, "pm_1.0_1.0/01/07_pm_1.csv", r"column 4: missing or NaN value", 12)


def test_bad_timestamp(corrupt_copy, tmp_path):
    root = corrupt_copy()
    f = _member(root, "act", 3, 2, 1)
    _edit_line(f, 9, lambda ln: "2018-13-45 99:00:00," + ln.split(",", 1)[1])
    _check(root, tmp_path, "act/03/02_act_1.csv", r"bad timestamp", 9)


def test_recording_too_short(corrupt_copy, tmp_path):
    root = corrupt_copy()
    for m in sx.MODALITIES:
        _member(root, m, 2, 2, 1).write_text(sx.recording_csv(m, 2, 2, 1, duration_s=5.0))
    _check(root, tmp_path, "act/02/02_act_1.csv", r"too short for one 5 s window", None)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "nope.zip", PreprocessConfig(), tmp_path, progress=False)
