"""What every module of the package shares: the repository root, ``DeployError`` and the ``[deploy]``
log line on stderr."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


def _log(msg: str) -> None:
    print(f"[deploy] {msg}", file=sys.stderr, flush=True)
