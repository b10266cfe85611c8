"""examples/scale_out.py against the test server (it creates and drops its own schema)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "scale_out.py"


def test_the_scale_out_example_runs(pg_server: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(EXAMPLE.parents[1]))
    done = subprocess.run([sys.executable, str(EXAMPLE), pg_server], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "returns 0 candidates" in done.stdout and "the same as one index" in done.stdout
