"""Download + checksum against a loopback HTTP server (never the internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from data_partition import ChecksumError, PreprocessConfig, load_cache, resolve_source
from data_partition.constants import MEX_URL


class _Quiet(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _Quiet.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def no_env(monkeypatch):
    for k in ("FEDTIME_DATA_PATH", "FEDTIME_CACHE_DIR", "FEDTIME_MEX_URL", "FEDTIME_MEX_SHA256"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_url_is_a_module_constant():
    assert MEX_URL.startswith("https://archive.ics.uci.edu/")


def test_download_verify_and_reuse(server, synthetic_zip, tmp_path, no_env):
    root, base = server
    (root / "mex.zip").write_bytes(synthetic_zip.read_bytes())
    cache = tmp_path / "cache"
    got = resolve_source(None, cache_dir=cache, url=f"{base}/mex.zip", sha256=_sha(synthetic_zip), progress=False)
    assert got == (cache / "MEx.zip").resolve() and _sha(got) == _sha(synthetic_zip)
    assert _Quiet.hits == ["/mex.zip"]
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]
    again = resolve_source(None, cache_dir=cache, url=f"{base}/mex.zip", sha256="0" * 64, progress=False)
    assert again == got and _Quiet.hits == ["/mex.zip"]  # cached copy, no second request


def test_download_via_env_then_build(server, synthetic_zip, tmp_path, no_env):
    root, base = server
    (root / "a.zip").write_bytes(synthetic_zip.read_bytes())
    no_env.setenv("FEDTIME_CACHE_DIR", str(tmp_path / "envcache"))
    no_env.setenv("FEDTIME_MEX_URL", f"{base}/a.zip")
    no_env.setenv("FEDTIME_MEX_SHA256", _sha(synthetic_zip))
    wc = load_cache(None, PreprocessConfig(), progress=False)
    assert (tmp_path / "envcache" / "MEx.zip").is_file()
    assert wc.path.parent == tmp_path / "envcache" and len(wc) > 0


def test_checksum_mismatch_leaves_nothing(server, synthetic_zip, tmp_path, no_env):
    root, base = server
    (root / "mex.zip").write_bytes(synthetic_zip.read_bytes())
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        resolve_source(None, cache_dir=cache, url=f"{base}/mex.zip", sha256="ab" * 32, progress=False)
    assert list(cache.iterdir()) == []


def test_download_unwraps_verified_inner_archive(server, synthetic_zip, tmp_path, no_env):
    root, base = server
    with zipfile.ZipFile(root / "uci.zip", "w") as zf:
        zf.write(synthetic_zip, "data.zip")
        zf.writestr("MEx readme.txt", "wrapper")
    got = resolve_source(None, cache_dir=tmp_path / "c", url=f"{base}/uci.zip", sha256=_sha(synthetic_zip), progress=False)
    assert _sha(got) == _sha(synthetic_zip)


def test_configured_path_wins_and_must_exist(synthetic_zip, tmp_path, no_env):
    assert resolve_source(str(synthetic_zip)) == synthetic_zip.resolve()
    no_env.setenv("FEDTIME_DATA_PATH", str(synthetic_zip))
    assert resolve_source(None, cache_dir=tmp_path) == synthetic_zip.resolve()
    assert resolve_source("", cache_dir=tmp_path) == synthetic_zip.resolve()  # run config data-path = ""
    no_env.setenv("FEDTIME_DATA_PATH", str(tmp_path / "missing.zip"))
    with pytest.raises(FileNotFoundError, match="FEDTIME_DATA_PATH"):
        resolve_source(None, cache_dir=tmp_path)
