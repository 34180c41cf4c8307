"""Run Python code in a fresh interpreter (imports that register process-wide state, such as
protobuf's default descriptor pool, must be tried in a process of their own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["REPO_ROOT", "run_fresh"]


def run_fresh(code: str, cwd: Path = REPO_ROOT) -> str:
    """Run ``python -c code`` in ``cwd`` with the repository on PYTHONPATH; assert it exits 0 and
    return its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
