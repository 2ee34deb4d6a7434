"""Find and read MEx: zip or folder, download + checksum, strict CSV parsing.

Nothing here aligns or windows data (see :mod:`data_partition.align`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import atomic_write, file_mode
from .constants import (
    ENV_CACHE_DIR,
    ENV_DATA_PATH,
    ENV_MEX_SHA256,
    ENV_MEX_URL,
    FOLDERS,
    MEX_SHA256,
    MEX_URL,
    MEX_ZIP_NAME,
    MODALITIES,
    NUM_COLUMNS,
)

RecordingKey = tuple[int, int, int]  # (subject, exercise, recording)


class MExFormatError(ValueError):
    """Malformed or incomplete MEx input. The message names the file (and line where it applies)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line


class ChecksumError(ValueError):
    """A downloaded archive does not have the expected sha256."""


# --------------------------------------------------------------------------------------------
# Cache folder, hashing


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$FEDTIME_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedtime-magnet``
    (``~/.cache/fedtime-magnet``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedtime-magnet"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


_HASH_MEMO = "source-hashes.json"


def memoized_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of a file, memoised per (absolute path, size, mtime) in ``<cache_dir>/source-hashes.json``
    so warm loads do not re-read a 75 MB archive."""
    p = Path(path).resolve()
    st = p.stat()
    memo_path = default_cache_dir(cache_dir) / _HASH_MEMO
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo: dict = {}
    try:
        memo = json.loads(memo_path.read_text())
        hit = memo.get(str(p))
        if hit and hit.get("size") == ident["size"] and hit.get("mtime_ns") == ident["mtime_ns"]:
            return hit["sha256"]
    except (OSError, ValueError, AttributeError):
        memo = {}
    digest = sha256_file(p)
    memo = memo if isinstance(memo, dict) else {}
    memo[str(p)] = {**ident, "sha256": digest}
    try:
        _atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    except OSError:
        pass  # read-only cache folder: just hash again next time
    return digest


# --------------------------------------------------------------------------------------------
# Download


def _zip_members_with_sha(zf: zipfile.ZipFile, member: str) -> str:
    h = hashlib.sha256()
    with zf.open(member) as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def download_mex(
    cache_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download the MEx archive into ``<cache_dir>/MEx.zip`` and verify its sha256.

    ``url`` defaults to ``$FEDTIME_MEX_URL`` or :data:`MEX_URL`; ``sha256`` to ``$FEDTIME_MEX_SHA256`` or
    :data:`MEX_SHA256`. If the downloaded file itself does not match but is a zip wrapping an inner
    ``.zip`` that does (UCI serves the data archive wrapped), the inner archive is kept. On a mismatch
    nothing is left behind and :class:`ChecksumError` is raised.
    """
    from tqdm.auto import tqdm

    url = url or os.environ.get(ENV_MEX_URL, "").strip() or MEX_URL
    expected = (sha256 or os.environ.get(ENV_MEX_SHA256, "").strip() or MEX_SHA256).lower()
    dest_dir = default_cache_dir(cache_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / MEX_ZIP_NAME
    fd, part = tempfile.mkstemp(prefix=f".{MEX_ZIP_NAME}.", suffix=".part", dir=dest_dir)
    inner_tmp = None
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total and total.isdigit() else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"download {MEX_ZIP_NAME}",
                disable=not progress,
            ) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        got = h.hexdigest()
        if got == expected:
            os.chmod(part, file_mode())
            os.replace(part, dest)
            return dest
        found = [got]
        if zipfile.is_zipfile(part):
            with zipfile.ZipFile(part) as zf:
                for name in zf.namelist():
                    if name.lower().endswith(".zip") and "__MACOSX" not in name:
                        inner = _zip_members_with_sha(zf, name)
                        found.append(inner)
                        if inner == expected:
                            ifd, inner_tmp = tempfile.mkstemp(prefix=f".{MEX_ZIP_NAME}.", suffix=".inner", dir=dest_dir)
                            with os.fdopen(ifd, "wb") as out, zf.open(name) as src:
                                shutil.copyfileobj(src, out, 1 << 20)
                            os.chmod(inner_tmp, file_mode())
                            os.replace(inner_tmp, dest)
                            inner_tmp = None
                            return dest
        raise ChecksumError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {', '.join(found)} "
            f"(set {ENV_MEX_SHA256} if the archive legitimately changed)"
        )
    finally:
        for p in (part, inner_tmp):
            if p and os.path.exists(p):
                os.unlink(p)


def _zip_signature(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def resolve_source(
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Where MEx is read from: ``path``, else ``$FEDTIME_DATA_PATH``, else a previously downloaded
    ``<cache_dir>/MEx.zip``, else download it there (progress bar, sha256 verified).

    An empty string counts as "not configured" (the run config's ``data-path = ""``).
    """
    for candidate, origin in ((path, "path"), (os.environ.get(ENV_DATA_PATH), f"${ENV_DATA_PATH}")):
        if candidate is not None and str(candidate).strip():
            p = Path(str(candidate).strip()).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"MEx data not found at {p} (from {origin})")
            return p.resolve()
    cached = default_cache_dir(cache_dir) / MEX_ZIP_NAME
    if cached.is_file():
        return cached.resolve()
    try:
        return download_mex(cache_dir, url=url, sha256=sha256, progress=progress).resolve()
    except OSError as err:  # URLError, timeouts, DNS: no network here
        raise ConnectionError(f"MEx is not on this machine and could not be downloaded ({err}); set "
                              f"${ENV_DATA_PATH} or the run-config key data-path to a local MEx.zip or folder") from err


# --------------------------------------------------------------------------------------------
# Layout discovery

_FOLDER_TO_MOD = {v: k for k, v in FOLDERS.items()}
_REC_RE = re.compile(
    r"(?:^|/)(?P<folder>" + "|".join(re.escape(f) for f in FOLDERS.values()) + r")/"
    r"(?P<subject>\d+)/(?P<exercise>\d+)_(?P<mod>[A-Za-z]+)_(?P<rec>\d+)\.csv$"
)


@dataclass
class MExLayout:
    """Where every recording file of every modality sits inside a source."""

    source: Path  # the zip or folder that is read (an inner zip when the source wraps one)
    kind: str  # "zip" or "dir"
    origin: Path  # what the user pointed at
    roots: dict[str, str]  # modality -> prefix of its folder ("" or "MEx/" ...)
    files: dict[RecordingKey, dict[str, str]] = field(default_factory=dict)  # key -> modality -> member

    def recordings(self) -> list[RecordingKey]:
        return sorted(self.files)

    def display(self, member: str) -> str:
        return f"{self.source}:{member}" if self.kind == "zip" else str(self.source / member)

    def expected_member(self, key: RecordingKey, modality: str) -> str:
        s, e, r = key
        return f"{self.roots[modality]}{FOLDERS[modality]}/{s:02d}/{e:02d}_{modality}_{r}.csv"


def _is_junk(name: str) -> bool:
    return "__MACOSX" in name or os.path.basename(name).startswith("._")


def _scan_names(names: list[str], where: str) -> tuple[dict[str, str], dict[RecordingKey, dict[str, str]], set[str]]:
    roots: dict[str, set[str]] = {m: set() for m in MODALITIES}
    folders_seen: set[str] = set()
    files: dict[RecordingKey, dict[str, str]] = {}
    for name in names:
        if _is_junk(name):
            continue
        parts = name.rstrip("/").split("/")
        for part in parts:
            if part in _FOLDER_TO_MOD:
                folders_seen.add(_FOLDER_TO_MOD[part])
        m = _REC_RE.search(name)
        if not m:
            continue
        mod = _FOLDER_TO_MOD[m["folder"]]
        if m["mod"] != mod:
            raise MExFormatError(
                f"{where}:{name}: file of modality '{m['mod']}' inside the '{m['folder']}' folder", file=name
            )
        prefix = name[: m.start("folder")]
        roots[mod].add(prefix)
        key = (int(m["subject"]), int(m["exercise"]), int(m["rec"]))
        files.setdefault(key, {})[mod] = name
    out_roots: dict[str, str] = {}
    for mod, prefixes in roots.items():
        if len(prefixes) > 1:
            raise MExFormatError(
                f"{where}: modality folder '{FOLDERS[mod]}' found in several places: {sorted(prefixes)}"
            )
        if prefixes:
            out_roots[mod] = prefixes.pop()
    return out_roots, files, folders_seen


def _nested_extract_dir(cache_dir: str | os.PathLike | None) -> Path:
    d = default_cache_dir(cache_dir) / "nested"
    d.mkdir(parents=True, exist_ok=True)
    return d


def scan_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                require_all: bool = True) -> MExLayout:
    """Locate the four modality folders (at any depth) in a zip or folder and list the recordings.

    A zip (or folder) that holds no modality folder but wraps an inner ``.zip`` that does (the UCI
    download) is unwrapped once into ``<cache_dir>/nested/``.
    Raises :class:`MExFormatError` when a modality folder is missing (with ``require_all=False``, only when
    none is found: new recordings without some sensor, ``model.predict``).
    """
    origin = Path(source).expanduser()
    if not origin.exists():
        raise FileNotFoundError(f"MEx data not found at {origin}")
    origin = origin.resolve()
    if origin.is_dir():
        names = []
        for dirpath, dirnames, filenames in os.walk(origin):
            dirnames.sort()
            rel = os.path.relpath(dirpath, origin).replace(os.sep, "/")
            rel = "" if rel == "." else rel + "/"
            names.append(rel)
            names.extend(rel + f for f in sorted(filenames))
        kind = "dir"
    elif zipfile.is_zipfile(origin):
        with zipfile.ZipFile(origin) as zf:
            names = zf.namelist()
        kind = "zip"
    elif origin.is_file() and _zip_signature(origin):
        raise MExFormatError(f"{origin}: a damaged zip archive (truncated or overwritten: its central directory is "
                             f"unreadable); download it again", file=str(origin))
    else:
        raise MExFormatError(f"{origin}: neither a folder nor a zip archive", file=str(origin))

    roots, files, seen = _scan_names(names, str(origin))
    if not roots:
        inner = [n for n in names if n.lower().endswith(".zip") and not _is_junk(n)]
        for name in inner:
            target = _unwrap(origin, kind, name, cache_dir)
            try:
                layout = scan_source(target, cache_dir, require_all=require_all)
            except MExFormatError:
                continue
            layout.origin = origin
            return layout
    missing = [m for m in MODALITIES if m not in roots]
    if missing and (require_all or not roots):
        details = ", ".join(
            f"'{FOLDERS[m]}' ({m}{': folder present but holds no recording files' if m in seen else ''})"
            for m in missing
        )
        raise MExFormatError(f"{origin}: modality folder(s) not found: {details}", file=str(origin))
    return MExLayout(source=origin, kind=kind, origin=origin, roots=roots, files=files)


def _unwrap(origin: Path, kind: str, member: str, cache_dir) -> Path:
    if kind == "dir":
        return origin / member
    st = origin.stat()
    tag = hashlib.sha256(f"{origin}|{st.st_size}|{st.st_mtime_ns}|{member}".encode()).hexdigest()[:16]
    target = _nested_extract_dir(cache_dir) / f"{tag}-{os.path.basename(member)}"
    if not target.exists():
        def extract(tmp: str) -> None:
            with open(tmp, "wb") as out, zipfile.ZipFile(origin) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)

        atomic_write(target, extract)
    return target


def source_fingerprint(layout: MExLayout, cache_dir: str | os.PathLike | None = None) -> str:
    """Identity of the data for the cache key: the sha256 of the zip (memoised), or for a folder a
    hash of every recording file's relative path, size and modification time."""
    if layout.kind == "zip":
        return memoized_sha256(layout.source, cache_dir)
    h = hashlib.sha256()
    for key in sorted(layout.files):
        for mod in MODALITIES:
            member = layout.files[key].get(mod)
            if member is None:
                continue
            st = (layout.source / member).stat()
            h.update(f"{member}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "dir-" + h.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading files

_ZIP_HANDLES: dict[tuple[str, int], zipfile.ZipFile] = {}


def read_member(layout: MExLayout, member: str) -> bytes:
    """Raw bytes of one file of the source (zip handles are cached per process)."""
    if layout.kind == "dir":
        return (layout.source / member).read_bytes()
    key = (str(layout.source), os.getpid())
    zf = _ZIP_HANDLES.get(key)
    if zf is None:
        zf = _ZIP_HANDLES[key] = zipfile.ZipFile(layout.source)
    return zf.read(member)


def _line_numbers(data: bytes) -> list[int]:
    """1-based file line number of each non-blank line (pandas skips blank lines)."""
    return [i + 1 for i, ln in enumerate(data.split(b"\n")) if ln.strip()]


def _first_bad_field_count(data: bytes, ncols: int) -> tuple[int, int] | None:
    for i, ln in enumerate(data.split(b"\n")):
        if not ln.strip():
            continue
        n = ln.count(b",") + 1
        if n != ncols:
            return i + 1, n
    return None


def _is_number_dtype(dt) -> bool:
    return pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_bool_dtype(dt)


def parse_csv(data: bytes, name: str, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one MEx CSV strictly.

    Returns ``(t_us, values)``: int64 microseconds since the epoch (wall clock, as written) and
    float64 values ``[rows, channels]`` in file order. Any defect (empty file, wrong column count,
    non-numeric cell, NaN/inf, unparsable timestamp) raises :class:`MExFormatError` naming the file
    and, where it applies, the line.
    """
    ncols = NUM_COLUMNS[modality]
    if not data.strip():
        raise MExFormatError(f"{name}: empty file", file=name)

    def bad_columns() -> None:
        bad = _first_bad_field_count(data, ncols)
        if bad is not None:
            line, n = bad
            raise MExFormatError(
                f"{name}: line {line}: expected {ncols} columns ({modality}), found {n}", file=name, line=line
            )

    try:
        df = pd.read_csv(io.BytesIO(data), header=None, engine="c")
    except pd.errors.ParserError as e:
        bad_columns()
        raise MExFormatError(f"{name}: cannot parse CSV: {e}", file=name) from e
    except pd.errors.EmptyDataError as e:
        raise MExFormatError(f"{name}: empty file", file=name) from e
    if df.shape[1] != ncols or len(df) == 0:
        bad_columns()
        raise MExFormatError(f"{name}: expected {ncols} columns ({modality}), found {df.shape[1]}", file=name)

    vals = df.iloc[:, 1:]
    nonnum = [j for j, dt in enumerate(vals.dtypes) if not _is_number_dtype(dt)]
    if nonnum:
        bad_columns()
        j = nonnum[0]
        col = vals.iloc[:, j]
        coerced = pd.to_numeric(col, errors="coerce")
        rows = np.flatnonzero(coerced.isna().to_numpy() & col.notna().to_numpy())
        r = int(rows[0]) if len(rows) else 0
        line = _line_numbers(data)[r]
        raise MExFormatError(
            f"{name}: line {line}, column {j + 2}: non-numeric value {col.iloc[r]!r}", file=name, line=line
        )
    values = vals.to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        bad_columns()
        r, j = (int(v[0]) for v in np.nonzero(~finite))
        line = _line_numbers(data)[r]
        what = "missing or NaN value" if np.isnan(values[r, j]) else f"non-finite value {values[r, j]}"
        raise MExFormatError(f"{name}: line {line}, column {j + 2}: {what}", file=name, line=line)

    col0 = df.iloc[:, 0]
    if _is_number_dtype(col0.dtype):
        raise MExFormatError(f"{name}: line 1, column 1: expected a timestamp, found {col0.iloc[0]!r}", file=name, line=1)
    try:
        ts = pd.to_datetime(col0, format="ISO8601")
        bad_rows = np.flatnonzero(ts.isna().to_numpy())
    except (ValueError, TypeError, OverflowError):
        coerced = pd.to_datetime(col0, format="ISO8601", errors="coerce")
        bad_rows = np.flatnonzero(coerced.isna().to_numpy())
        ts = None
    if len(bad_rows):
        r = int(bad_rows[0])
        line = _line_numbers(data)[r]
        raise MExFormatError(f"{name}: line {line}, column 1: bad timestamp {col0.iloc[r]!r}", file=name, line=line)
    return timestamps_to_us(ts), values


def timestamps_to_us(ts) -> np.ndarray:
    """datetime Series/array (any unit: pandas 2 ns, pandas 3 us; naive or tz-aware) -> int64 us."""
    s = pd.Series(ts)
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    return s.to_numpy().astype("datetime64[us]").astype(np.int64)


def parse_timestamps(strings) -> np.ndarray:
    """Parse MEx timestamp strings (with or without fractional seconds) to int64 microseconds."""
    return timestamps_to_us(pd.to_datetime(pd.Series(strings), format="ISO8601"))
