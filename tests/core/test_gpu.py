"""GPU checks (deselected by default; run with ``-m gpu`` on a CUDA machine).

The CUDA engine — SDPA, or flash-attn when installed — gives the CPU engine's greedy
tokens in fp32, and bf16 runs end to end with retrieval.
"""

from __future__ import annotations

import pytest
import torch
from core_test_data import PROMPTS

from onegen_core.engine import Engine, EngineConfig
from onegen_core.params import RetrievalParams, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _tokens(engine):
    return [r.token_ids for r in engine.generate(PROMPTS, SamplingParams(max_tokens=24), RetrievalParams(max_retrievals=2))]


@pytest.mark.parametrize("backend,block_size", [("sdpa", 16), ("flash", 256)])
def test_cuda_engine_matches_cpu(retrieving_checkpoint, tiny_index, backend, block_size):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    cpu = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(device="cpu", dtype="float32",
                                                                                num_kv_blocks=256, block_size=8))
    gpu = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(
        device="cuda", dtype="float32", attention_backend=backend, block_size=block_size, num_kv_blocks=64))
    assert gpu.backend == backend
    assert _tokens(gpu) == _tokens(cpu)


def test_cuda_bf16_runs_with_retrieval(retrieving_checkpoint, tiny_index):
    gpu = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(device="cuda", dtype="bfloat16"))
    res = gpu.generate(PROMPTS, SamplingParams(max_tokens=24), RetrievalParams(max_retrievals=2))
    assert all(r.finish_reason in ("stop", "length") for r in res)
