"""Start-up failures that the file system already explains end ``python -m server`` before it binds a port."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from server_harness import REPO, free_port


def _run_server(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if k not in ("ONEGEN_CHECKPOINT", "ONEGEN_INDEX")}
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("which", ["checkpoint", "index"])
def test_a_missing_path_is_one_line_and_status_2_without_starting_uvicorn(tmp_path, which):
    missing = tmp_path / "nonexistent"
    args = {"checkpoint": ["--checkpoint", str(missing), "--index", "X"],
            "index": ["--checkpoint", str(tmp_path), "--index", str(missing)]}[which]
    r = _run_server(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines == [f"onegen server: --{which} {missing}: does not exist"], r.stderr
