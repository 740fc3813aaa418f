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


def test_cuda_sdpa_engine_matches_cpu(retrieving_checkpoint, tiny_index):
    cpu = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(device="cpu", dtype="float32",
                                                                                num_kv_blocks=256, block_size=8))
    gpu = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(
        device="cuda", dtype="float32", attention_backend="sdpa", num_kv_blocks=64))
    assert _tokens(gpu) == _tokens(cpu)


def test_flash_backend_matches_sdpa(retrieving_checkpoint):
    """flash-attn (paged, varlen + kvcache) vs SDPA on the same chunk plan, bf16."""
    pytest.importorskip("flash_attn")
    from onegen_core.checkpoint import load_checkpoint
    from onegen_core.kv_cache import allocate_kv_cache
    from onegen_core.model import build_attention_metadata, build_model

    dev = torch.device("cuda")
    model = build_model(load_checkpoint(retrieving_checkpoint), torch.bfloat16, dev)
    torch.manual_seed(0)
    a, b = torch.randint(0, 300, (300,), device=dev), torch.randint(0, 300, (40,), device=dev)
    outs = {}
    for backend in ("sdpa", "flash"):
        cache = allocate_kv_cache(len(model.layers), 8, 256, model.num_kv_heads, model.head_dim, torch.bfloat16, dev)
        plan = [((0, 290), (0, 40)), ((290, 299), None), ((299, 300), None)]  # prefill, extend, decode
        hs = []
        for (a0, a1), _ in plan:
            meta = build_attention_metadata([a1 - a0], [a1], block_tables=[[5, 2]], block_size=256, device=dev,
                                            backend=backend)
            hs.append(model(a[a0:a1], meta, cache))
        meta = build_attention_metadata([40], [40], block_tables=[[7]], block_size=256, device=dev, backend=backend)
        hs.append(model(b, meta, cache))
        outs[backend] = torch.cat(hs).float()
    assert torch.allclose(outs["flash"], outs["sdpa"], atol=5e-2, rtol=5e-2)


def test_cuda_graph_decode_equals_eager(retrieving_checkpoint, tiny_index):
    """Replayed decode graphs (with padded batch sizes) give the eager flash engine's tokens."""
    pytest.importorskip("flash_attn")
    cfg = dict(device="cuda", dtype="bfloat16", attention_backend="flash", block_size=256, num_kv_blocks=40,
               max_num_seqs=12)
    eager = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(**cfg))
    graphs = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(**cfg, cuda_graphs=True))
    assert graphs.graph_runner is not None and graphs.graph_runner.sizes == [1, 2, 4, 8, 12]
    assert _tokens(graphs) == _tokens(eager)


def test_cuda_bf16_runs_with_retrieval(retrieving_checkpoint, tiny_index):
    gpu = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(device="cuda", dtype="bfloat16"))
    res = gpu.generate(PROMPTS, SamplingParams(max_tokens=24), RetrievalParams(max_retrievals=2))
    assert all(r.finish_reason in ("stop", "length") for r in res)
