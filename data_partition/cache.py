"""Window cache: build once (parallel parse, streamed float16 .npy, atomic rename), then memory-map.

Layout of ``<cache_dir>/windows-<key>/``::

    meta.json          parameters, source identity, per-recording facts, skipped recordings
    index.npy          structured rows (subject, exercise, recording, start_s, label), sorted by subject
    act.npy acw.npy dc.npy pm.npy   float16 [N, T, ...], row i = index row i
    stats-<hash>.json  NormStats fitted on a subject list (see ``load_split_stats``)

``key`` hashes the source's sha256 (or a folder fingerprint), every :class:`PreprocessConfig` field
and :data:`~data_partition.constants.CACHE_FORMAT_VERSION`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
import types
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .align import window_recording
from .config import PreprocessConfig
from .constants import CACHE_FORMAT_VERSION, MODALITIES
from .reader import (
    MExFormatError,
    MExLayout,
    default_cache_dir,
    parse_csv,
    read_member,
    resolve_source,
    scan_source,
    source_fingerprint,
)

INDEX_DTYPE = np.dtype(
    [("subject", "<i2"), ("exercise", "<i2"), ("recording", "<i2"), ("start_s", "<f8"), ("label", "<i2")]
)
INDEX_COLUMNS = ("subject", "exercise", "recording", "start_s", "label")


def cache_key(fingerprint: str, cfg: PreprocessConfig) -> str:
    payload = {"format": CACHE_FORMAT_VERSION, "source": fingerprint, "cfg": cfg.to_dict(), "dtype": "float16"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class WindowCache:
    """Memory-mapped preprocessed windows of one source at one :class:`PreprocessConfig`."""

    path: Path
    cfg: PreprocessConfig
    key: str
    index: pd.DataFrame
    arrays: dict[str, np.ndarray]
    meta: dict = field(repr=False)
    _bounds: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        subj = self.index["subject"].to_numpy()
        if len(subj) and np.any(np.diff(subj) < 0):
            raise MExFormatError(f"{self.path}: index is not sorted by subject")
        uniq, first = np.unique(subj, return_index=True)
        last = np.append(first[1:], len(subj))
        self._bounds = {int(s): (int(a), int(b)) for s, a, b in zip(uniq, first, last)}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def subjects(self) -> tuple[int, ...]:
        return tuple(sorted(self._bounds))

    @property
    def labels(self) -> np.ndarray:
        return self.index["label"].to_numpy()

    @property
    def skipped(self) -> list[dict]:
        """Recordings left out under ``on_bad="skip"`` (file and reason)."""
        return list(self.meta.get("skipped", []))

    def subject_rows(self, subject: int) -> slice:
        """Contiguous row slice of one subject's windows (``KeyError`` if the cache has none)."""
        try:
            a, b = self._bounds[int(subject)]
        except KeyError:
            raise KeyError(f"subject {subject} has no windows in this cache (subjects: {self.subjects})") from None
        return slice(a, b)

    def windows_per_subject(self) -> dict[int, int]:
        return {s: b - a for s, (a, b) in self._bounds.items()}

    def subject_array(self, modality: str, subject: int) -> np.ndarray:
        """A copy of one subject's rows of one array, checked against the CRC-32 written when the cache was built
        (caches built before the digests existed are not checked): a changed file is an error naming it, never
        silently wrong windows."""
        rows = self.subject_rows(subject)
        out = read_rows(self.arrays[modality], rows.start, rows.stop)
        want = self.meta.get("row_digests", {}).get(modality, {}).get(str(int(subject)))
        if want is not None and f"{zlib.crc32(out):08x}" != want:
            raise MExFormatError(f"{self.path / (modality + '.npy')}: the windows of subject {subject} are not the "
                                 f"bytes that were built (checksum {zlib.crc32(out):08x}, built {want}); the file "
                                 f"was changed or damaged: delete {self.path} and it is rebuilt")
        return out


def _subject_bounds(subjects: np.ndarray) -> list[tuple[int, int, int]]:
    uniq, first = np.unique(subjects, return_index=True)
    last = np.append(first[1:], len(subjects))
    return [(int(s), int(a), int(b)) for s, a, b in zip(uniq, first, last)]


def row_digests(folder: Path, subjects: np.ndarray) -> dict[str, dict[str, str]]:
    """CRC-32 of each subject's rows of each array (``{modality: {subject: hex}}``), written at build time so a
    reader can tell whether the bytes it copies are those that were built (a file changed in place keeps its size
    and its .npy header)."""
    out: dict[str, dict[str, str]] = {}
    for m in MODALITIES:
        a = np.load(folder / f"{m}.npy", mmap_mode="r", allow_pickle=False)
        out[m] = {str(s): f"{zlib.crc32(read_rows(a, lo, hi)):08x}" for s, lo, hi in _subject_bounds(subjects)}
    return out


def read_rows(arr: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Copy of rows ``start:stop`` of a cached array. For a memory-mapped .npy the bytes are read
    from the file instead of through the map, so the process's RSS grows by the copy only (pages
    touched through a map count as resident too)."""
    start = max(0, int(start))
    stop = max(start, min(len(arr), int(stop)))
    if not (isinstance(arr, np.memmap) and getattr(arr, "filename", None) and arr.flags.c_contiguous):
        return np.array(arr[start:stop])
    out = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
    if out.size == 0:
        return out
    buf = memoryview(out.reshape(-1)).cast("B")
    row = buf.nbytes // (stop - start)
    with open(arr.filename, "rb", buffering=0) as f:
        f.seek(int(arr.offset) + start * row)
        pos = 0
        while pos < buf.nbytes:
            n = f.readinto(buf[pos:])
            if not n:
                raise OSError(f"{arr.filename}: unexpected end of file")
            pos += n
    return out


# --------------------------------------------------------------------------------------------
# Streaming .npy writer


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


class _NpyStream:
    """Append rows to a .npy file without knowing their number in advance; the header (which
    numpy pads for a growing first axis) is rewritten in place on close."""

    def __init__(self, path: Path, item_shape: tuple[int, ...], dtype=np.float16):
        self.path, self.item_shape, self.dtype = path, tuple(item_shape), np.dtype(dtype)
        self.n = 0
        self._header_len = len(_npy_header(self.dtype, (0, *self.item_shape)))
        self.f = open(path, "wb")
        self.f.write(_npy_header(self.dtype, (0, *self.item_shape)))

    def write(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.shape[1:] != self.item_shape:
            raise ValueError(f"{self.path.name}: rows of shape {a.shape[1:]}, expected {self.item_shape}")
        self.f.write(memoryview(a).cast("B"))
        self.n += a.shape[0]

    def close(self) -> None:
        header = _npy_header(self.dtype, (self.n, *self.item_shape))
        if len(header) != self._header_len:  # cannot happen with numpy's growth padding
            raise RuntimeError("npy header length changed")
        self.f.seek(0)
        self.f.write(header)
        self.f.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()


# --------------------------------------------------------------------------------------------
# Per-recording work (runs in worker processes)


def _process_recording(task: tuple) -> tuple:
    source, kind, key, members, cfg = task
    layout = MExLayout(source=Path(source), kind=kind, origin=Path(source), roots={})
    s, e, r = key
    try:
        series = {}
        for m in MODALITIES:
            series[m] = parse_csv(read_member(layout, members[m]), layout.display(members[m]), m)
        name = f"subject {s:02d} exercise {e:02d} recording {r} ({layout.display(members['act'])} and siblings)"
        rw = window_recording(series, cfg, name=name)
    except MExFormatError as err:
        file = err.file or layout.display(members["act"])
        return ("bad", key, str(err), (file, err.line), _maxrss_mb())
    return ("ok", key, rw, _maxrss_mb())


def _maxrss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except ImportError:  # pragma: no cover
        return 0.0


@contextlib.contextmanager
def _workers_skip_main():
    """Worker processes (spawn and forkserver alike) import the parent's ``__main__`` before their first task. A
    script that calls :func:`load_cache` without an ``if __name__ == "__main__":`` guard would then build again in
    every worker, waiting for the lock its parent holds: a silent deadlock. The workers need only this module, so
    ``__main__`` is hidden while they start (they start in ``Pool()`` and are not restarted)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _pool_context():
    """forkserver (fork is unsafe in processes that run threads: Ray, torch), without re-importing the
    caller's ``__main__`` in the server (an unguarded script would otherwise run again there)."""
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([])
        return ctx
    return mp.get_context("spawn")


# --------------------------------------------------------------------------------------------
# Build


def _host() -> str:
    return socket.gethostname().replace("-", "_")[:32]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _bad(cfg: PreprocessConfig, message: str, skipped: list, file: str | None = None, line: int | None = None) -> None:
    if cfg.on_bad == "raise":
        raise MExFormatError(message, file=file, line=line)
    warnings.warn(f"skipping recording: {message}", stacklevel=3)
    skipped.append({"file": file, "line": line, "reason": message})


def _build(
    layout: MExLayout,
    fingerprint: str,
    cfg: PreprocessConfig,
    key: str,
    final: Path,
    workers: int,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    root = final.parent
    tmp = root / f".tmp-{final.name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    writers: dict[str, _NpyStream] = {}
    try:
        skipped: list[dict] = []
        tasks = []
        for rkey in layout.recordings():
            members = layout.files[rkey]
            absent = [m for m in MODALITIES if m not in members]
            if absent:
                present = [m for m in MODALITIES if m in members]
                files = ", ".join(layout.display(layout.expected_member(rkey, m)) for m in absent)
                _bad(
                    cfg,
                    f"{files}: missing {'/'.join(absent)} file of subject {rkey[0]:02d} exercise {rkey[1]:02d} "
                    f"recording {rkey[2]} (present: {', '.join(present)})",
                    skipped,
                    file=layout.display(layout.expected_member(rkey, absent[0])),
                )
                continue
            if not 1 <= rkey[1] <= 7:
                _bad(cfg, f"{layout.display(members['act'])}: exercise id {rkey[1]} outside 1..7", skipped,
                     file=layout.display(members["act"]))
                continue
            tasks.append((str(layout.source), layout.kind, rkey, members, cfg))

        writers = {m: _NpyStream(tmp / f"{m}.npy", cfg.window_shape(m)) for m in MODALITIES}
        index_parts: list[np.ndarray] = []
        recordings: list[dict] = []
        desc = f"MEx windows acc {cfg.acc_hz:g} Hz / frames {cfg.frame_hz:g} Hz"
        bar = tqdm(total=len(tasks), desc=desc, unit="rec", disable=not progress)
        use_pool = workers > 1 and len(tasks) >= 16
        worker_rss = 0.0
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            if use_pool:
                with _workers_skip_main():
                    pool = stack.enter_context(_pool_context().Pool(workers))
                results = pool.imap(_process_recording, tasks, chunksize=1)
            else:
                results = map(_process_recording, tasks)
            for res in results:
                bar.update(1)
                worker_rss = max(worker_rss, res[-1])
                if res[0] == "bad":
                    _bad(cfg, res[2], skipped, file=res[3][0], line=res[3][1])
                    continue
                _, (s, e, r), rw, _ = res
                n = len(rw.starts)
                for m in MODALITIES:
                    writers[m].write(rw.arrays[m])
                part = np.empty(n, dtype=INDEX_DTYPE)
                part["subject"], part["exercise"], part["recording"] = s, e, r
                part["start_s"] = rw.starts
                part["label"] = e - 1
                index_parts.append(part)
                recordings.append(
                    {
                        "subject": s,
                        "exercise": e,
                        "recording": r,
                        "windows": n,
                        "span_s": round(rw.span_s, 4),
                        "t0": str(np.datetime64(rw.t0_us, "us")),
                        "modalities": rw.info,
                    }
                )
        for w in writers.values():
            w.close()
        index = np.concatenate(index_parts) if index_parts else np.empty(0, dtype=INDEX_DTYPE)
        if len(index) == 0:
            raise MExFormatError(f"{layout.origin}: no usable recording (all {len(layout.files)} left out)")
        np.save(tmp / "index.npy", index)
        digests = row_digests(tmp, index["subject"])
        meta = {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "cfg": cfg.to_dict(),
            "dtype": "float16",
            "shapes": {m: list(cfg.window_shape(m)) for m in MODALITIES},
            "source": {"path": str(layout.origin), "read": str(layout.source), "kind": layout.kind,
                       "fingerprint": fingerprint},
            "windows": int(len(index)),
            "recordings": recordings,
            "skipped": skipped,
            "build_seconds": round(time.perf_counter() - t_start, 3),
            "build_workers": workers if use_pool else 0,
            "build_worker_peak_rss_mb": round(worker_rss, 1) if use_pool else None,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "row_digests": digests,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# Load

_OPEN: dict[str, WindowCache] = {}


def _open(final: Path, cfg: PreprocessConfig, key: str) -> WindowCache:
    meta = json.loads((final / "meta.json").read_text())
    if meta.get("key") != key or meta.get("format") != CACHE_FORMAT_VERSION:
        raise ValueError("meta.json does not match the key")
    idx = np.load(final / "index.npy", allow_pickle=False)
    if idx.dtype != INDEX_DTYPE or len(idx) != meta["windows"]:
        raise ValueError("index.npy does not match meta.json")
    arrays = {}
    for m in MODALITIES:
        a = np.load(final / f"{m}.npy", mmap_mode="r", allow_pickle=False)
        if a.dtype != np.float16 or a.shape != (len(idx), *cfg.window_shape(m)):
            raise ValueError(f"{m}.npy has shape {a.shape} {a.dtype}")
        arrays[m] = a
    index = pd.DataFrame({c: idx[c].astype(np.float64 if c == "start_s" else np.int64) for c in INDEX_COLUMNS})
    return WindowCache(path=final, cfg=cfg, key=key, index=index, arrays=arrays, meta=meta)


def load_cache(
    source: str | os.PathLike | None = None,
    cfg: PreprocessConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> WindowCache:
    """Open the window cache of ``source`` at ``cfg``, building it first if needed.

    ``source``: zip or folder (``None`` -> :func:`resolve_source`), or a prebuilt cache folder (see
    :func:`open_prebuilt`; nothing is built then). ``cache_dir``: default
    ``$FEDTIME_CACHE_DIR`` or ``~/.cache/fedtime-magnet``. ``workers``: parsing processes for a build
    (default ``min(2, cpu_count)``). A cache whose key matches is never rebuilt (unless
    ``rebuild=True`` or it is found corrupt); a build is atomic and serialised by a file lock.
    """
    cfg = cfg or PreprocessConfig()
    root = default_cache_dir(cache_dir)
    src = resolve_source(source, cache_dir=root, progress=progress)
    if is_prebuilt_cache(src):
        return open_prebuilt(src, cfg)
    layout = scan_source(src, root)
    fingerprint = source_fingerprint(layout, root)
    key = cache_key(fingerprint, cfg)
    final = root / f"windows-{key}"
    if not rebuild:
        hit = _OPEN.get(str(final))
        if hit is not None and (final / "meta.json").is_file():
            return hit
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    with _locked(root / f".lock-windows-{key}"):
        for stale in root.glob(f".tmp-{final.name}-{_host()}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed build (a live one would hold the lock)
        if final.exists() and not rebuild:
            try:
                wc = _open(final, cfg, key)
                _OPEN[str(final)] = wc
                return wc
            except (OSError, ValueError, KeyError) as err:
                warnings.warn(f"window cache {final} is unreadable ({err}); rebuilding", stacklevel=2)
        if final.exists():
            trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
            _OPEN.pop(str(final), None)
        _build(layout, fingerprint, cfg, key, final, workers, progress)
        wc = _open(final, cfg, key)
        _OPEN[str(final)] = wc
        return wc


def is_prebuilt_cache(path: Path) -> bool:
    """A folder of built windows (one ``windows-<key>`` folder, or a cache directory holding some)
    rather than the MEx archive: what a GPU node is given when the raw data should not travel."""
    path = Path(path)
    return path.is_dir() and ((path / "meta.json").is_file() or any(path.glob("windows-*/meta.json")))


def open_prebuilt(path: Path, cfg: PreprocessConfig) -> WindowCache:
    """Open the window cache at ``cfg`` inside a prebuilt folder; without the source it cannot be rebuilt,
    so a missing configuration or a cache that fails its checks is an error naming what was found."""
    path = Path(path)
    hit = _OPEN.get(f"{path}::{cfg}")
    if hit is not None:
        return hit
    folders = [path] if (path / "meta.json").is_file() else sorted(path.glob("windows-*"))
    wanted = json.loads(json.dumps(cfg.to_dict()))
    seen = []
    for folder in folders:
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as err:
            seen.append(f"{folder.name}: unreadable meta.json ({err})")
            continue
        seen.append(f"{folder.name}: {meta.get('cfg')}")
        if meta.get("format") != CACHE_FORMAT_VERSION or meta.get("cfg") != wanted:
            continue
        key = cache_key(str(meta.get("source", {}).get("fingerprint")), cfg)
        if meta.get("key") != key:
            raise ValueError(f"prebuilt window cache {folder}: meta.json's key {meta.get('key')!r} does not match "
                             f"its source and parameters ({key!r}); it was edited or is corrupt")
        try:
            wc = _open(folder, cfg, key)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"prebuilt window cache {folder} is unreadable ({err}); rebuild it from the MEx "
                             "archive (data-path = the zip) and copy it again") from err
        _OPEN[f"{path}::{cfg}"] = wc
        return wc
    raise FileNotFoundError(
        f"{path} holds no window cache at {wanted} (format {CACHE_FORMAT_VERSION}); found: "
        + ("; ".join(seen) or "nothing") + ". Build it where the MEx archive is (data-path = the zip) and copy "
        "its windows-<key> folder here")


def clear_memo() -> None:
    """Forget caches opened in this process (the next ``load_cache`` re-reads the folder)."""
    _OPEN.clear()
