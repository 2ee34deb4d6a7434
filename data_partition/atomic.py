"""Files written whole or not at all: a temporary file beside the target, renamed onto it. Every writer of the
project (window-cache metadata, statistics, downloads, results.json, checkpoints) goes through here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def file_mode() -> int:
    """The mode `open()` would give a new file: 0666 less the process's umask, read without setting it
    (`os.umask` would change it for every thread meanwhile). `mkstemp`'s own 0600 is what a temporary file needs,
    not what the file it becomes should keep."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp)` a temporary file next to `path`, then rename it onto `path`: a reader (or a killed process)
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
