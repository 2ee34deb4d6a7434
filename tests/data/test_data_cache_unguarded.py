"""Building the window cache from a script without an `if __name__ == "__main__":` guard finishes (it hung:
the build's worker processes re-imported the script, called load_cache and waited for the lock their parent
held)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_unguarded_script_builds_the_cache_with_workers(synthetic_zip, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(f"""
        from data_partition import PreprocessConfig, load_cache
        wc = load_cache({str(synthetic_zip)!r}, PreprocessConfig(), {str(tmp_path / 'cache')!r}, workers=2,
                        progress=False)
        print("windows", len(wc))
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("windows") == 1 and int(proc.stdout.split()[-1]) > 0  # built once, by the script
