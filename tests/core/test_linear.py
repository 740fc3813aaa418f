"""The oneDNN prepacked-linear fast path equals aten's F.linear (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_test_data import PROMPTS
from torch import nn

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.model import build_attention_metadata, build_model
from onegen_core.model.linear import PackedLinear, onednn_supported, resolve_linear_backend
from onegen_core.testing import ARCHS

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not onednn_supported(CPU, torch.float32), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_packed_linear_equals_f_linear(rows, bias):
    torch.manual_seed(rows)
    lin = nn.Linear(576, 960, bias=bias)  # SmolLM2's fused qkv shape
    x = torch.randn(rows, 576)
    with torch.inference_mode():
        ref = F.linear(x, lin.weight, lin.bias)
        out = PackedLinear(lin.weight, lin.bias)(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn_supported(CPU, torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_packed_linear_bf16_matches_fp32_within_bf16_rounding():
    torch.manual_seed(0)
    w, x = torch.randn(256, 128), torch.randn(5, 128)
    with torch.inference_mode():
        out = PackedLinear(w.bfloat16())(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, w), rtol=2e-2, atol=0.15)


@needs_onednn
@pytest.mark.parametrize("arch", ARCHS)
def test_onednn_model_equals_aten_model(tiny_checkpoint_factory, arch):
    ckpt = load_checkpoint(tiny_checkpoint_factory(arch))
    fast = build_model(ckpt, torch.float32, CPU)
    ref = build_model(ckpt, torch.float32, CPU, linear_backend="aten")
    assert fast.linear_backend == "onednn" and ref.linear_backend == "aten"
    assert not any(isinstance(m, nn.Linear) for m in fast.modules()), "every projection is packed"
    assert isinstance(fast.lm_head, PackedLinear)  # tied configs too: a packed copy computes the logits
    torch.manual_seed(0)
    lens = [17, 1, 30]
    ids = torch.randint(0, ckpt.config.vocab_size, (sum(lens),))
    meta = build_attention_metadata(lens, lens)
    with torch.inference_mode():
        h_fast, h_ref = fast(ids, meta), ref(ids, meta)
        torch.testing.assert_close(h_fast, h_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.compute_logits(h_fast), ref.compute_logits(h_ref), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_engine_greedy_tokens_are_the_same_with_either_backend(retrieving_checkpoint, tiny_index):
    outs = {}
    for backend in ("aten", "onednn"):
        eng = Engine.from_checkpoint(retrieving_checkpoint, tiny_index,
                                     EngineConfig(num_kv_blocks=128, block_size=8, linear_backend=backend))
        assert eng.model.linear_backend == backend
        res = eng.generate(PROMPTS[:6], SamplingParams(max_tokens=20), RetrievalParams(max_retrievals=2))
        outs[backend] = [(r.token_ids, [[h.doc_id for h in t.hits] for t in r.retrievals]) for r in res]
    assert outs["onednn"] == outs["aten"]
    assert any(trace for _, trace in outs["aten"]), "the fixture model should retrieve"


def test_backend_resolution_and_errors():
    assert resolve_linear_backend("aten", CPU, torch.float32) == "aten"
    assert resolve_linear_backend("auto", torch.device("cuda"), torch.bfloat16) == "aten"
    assert resolve_linear_backend("auto", CPU, torch.float16) == "aten"  # oneDNN path is fp32/bf16 only
    with pytest.raises(ValueError, match="onednn linear backend needs .* got device cpu, float16"):
        resolve_linear_backend("onednn", CPU, torch.float16)
    with pytest.raises(ValueError, match="linear backend must be one of auto, aten, onednn, got 'mkl'"):
        resolve_linear_backend("mkl", CPU, torch.float32)
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        EngineConfig(linear_backend="fast")


def test_the_engine_setting_offers_the_backends_the_model_has():
    """engine_config.py declares linear_backend's choices without importing the model (it loads no torch):
    they must stay the model's own list."""
    from dataclasses import fields

    from onegen_core.model.linear import BACKENDS

    [field] = [f for f in fields(EngineConfig) if f.name == "linear_backend"]
    assert field.metadata["choices"] == BACKENDS
