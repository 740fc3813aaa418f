"""The shared process-group set-up tears gloo down completely, even after torch._dynamo is imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_destroy_process_group_joins_gloo_threads(tmp_path):
    # a fresh interpreter: torch._dynamo must not be imported yet when the group is created
    script = textwrap.dedent(f"""
        import os, sys
        import torch
        import torch.distributed as dist
        from onegen_core.distributed import init_process_group

        assert "torch._dynamo" not in sys.modules
        init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        from transformers import AutoConfig  # what a model load does after the group exists
        import torch._dynamo  # noqa: F401
        flag = torch.zeros(1)
        dist.all_reduce(flag)
        dist.destroy_process_group()
        names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        print("gloo threads:", sum("gloo" in n for n in names))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gloo threads: 0" in out.stdout, out.stdout
