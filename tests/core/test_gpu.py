"""GPU checks (deselected by default; run with ``-m gpu`` on a CUDA machine).

The CUDA engine — SDPA, or flash-attn when installed — gives the CPU engine's greedy
tokens and retrievals in fp32, and bf16 runs end to end with retrieval: every request
retrieves, and each first search finds what the fp32 CPU engine's finds.
"""

from __future__ import annotations

import pytest
import torch
from core_test_data import CORPUS, PROMPTS

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.params import RetrievalParams, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _outputs(engine):
    """Greedy tokens and retrieval traces (where, which documents, how many tokens inserted) of every prompt."""
    res = engine.generate(PROMPTS, SamplingParams(max_tokens=24), RetrievalParams(max_retrievals=2))
    traces = [[(t.output_token_index, [h.doc_id for h in t.hits], t.inserted_tokens) for t in r.retrievals]
              for r in res]
    assert sum(len(t) for t in traces) >= 3, "the fixture model retrieves in several of these prompts"
    return [r.token_ids for r in res], traces


def _cpu_engine(checkpoint, index):
    return Engine.from_checkpoint(checkpoint, index, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=256,
                                                                  block_size=8))


def test_cuda_sdpa_engine_matches_cpu(retrieving_checkpoint, tiny_index):
    cpu = _cpu_engine(retrieving_checkpoint, tiny_index)
    gpu = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(
        device="cuda", dtype="float32", attention_backend="sdpa", num_kv_blocks=64))
    assert _outputs(gpu) == _outputs(cpu)


def test_flash_backend_matches_sdpa(retrieving_checkpoint):
    """flash-attn (paged, varlen + kvcache) vs SDPA on the same chunk plan, bf16."""
    pytest.importorskip("flash_attn")
    from onegen_core.engine.kv_cache import allocate_kv_cache
    from onegen_core.formats.checkpoint import load_checkpoint
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
    assert graphs.runner.graph_runner is not None and graphs.runner.graph_runner.sizes == [1, 2, 4, 8, 12]
    assert _outputs(graphs) == _outputs(eager)


def test_cuda_bf16_runs_with_retrieval(retrieving_checkpoint, tiny_index):
    """bf16 on CUDA retrieves in every request, and its first search agrees with the fp32 CPU engine's.

    [RQ] is forced as each request's first output token, so the first query of every prompt is the same
    position in both engines (later tokens may differ in bf16). Where the CPU's best hit leads the next
    by more than bf16 can move a score, the GPU must find the same document with about the same score.
    """
    cpu = _cpu_engine(retrieving_checkpoint, tiny_index)
    gpu = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(device="cuda", dtype="bfloat16"))
    qid = gpu.token_ids.query_ids[0]
    sp = SamplingParams(max_tokens=24, forced_tokens={0: qid})
    rp = RetrievalParams(max_retrievals=2, k=2, return_passages=True)
    res = gpu.generate(PROMPTS, sp, rp)
    ref = cpu.generate(PROMPTS, sp, rp)
    tol = 0.03  # bf16 vs fp32 query vectors move a score by ~0.005 on this model
    compared = 0
    for prompt, g, c in zip(PROMPTS, res, ref, strict=True):
        assert g.finish_reason in ("stop", "length"), (prompt, g.finish_reason, g.error)
        assert g.retrievals, prompt
        first = g.retrievals[0]
        assert first.output_token_index == 0 and g.token_ids[0] == qid
        assert len(first.hits) == 2 and first.inserted_tokens > 0
        assert all(h.text in CORPUS for h in first.hits)
        assert g.usage.retrieved_tokens == sum(t.inserted_tokens for t in g.retrievals) > 0
        want = c.retrievals[0].hits
        if want[0].score - want[1].score > 2 * tol:
            assert first.hits[0].doc_id == want[0].doc_id, prompt
            assert abs(first.hits[0].score - want[0].score) < tol, prompt
            compared += 1
        if [h.doc_id for h in first.hits] == [h.doc_id for h in want]:
            assert first.inserted_tokens == c.retrievals[0].inserted_tokens, prompt  # the same passages inserted
    assert compared >= len(PROMPTS) // 2, "too few clear-cut searches to compare"
