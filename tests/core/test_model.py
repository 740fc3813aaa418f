"""The native forward equals transformers' logits for every supported architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from onegen_core.engine.kv_cache import allocate_kv_cache
from onegen_core.formats.checkpoint import CheckpointError, load_checkpoint
from onegen_core.model import build_attention_metadata, build_model
from onegen_core.testing import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_native_logits_match_transformers(tiny_checkpoint_factory, arch):
    path = tiny_checkpoint_factory(arch)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, torch.float32, torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    lens = [23, 7, 41]
    seqs = [torch.randint(0, ckpt.config.vocab_size, (n,)) for n in lens]
    # packed, no cache (the encoder's path)
    hidden = model(torch.cat(seqs), build_attention_metadata(lens, lens))
    logits = model.compute_logits(hidden)
    start = 0
    for s in seqs:
        with torch.no_grad():
            ref = hf(s[None]).logits[0]
        assert torch.allclose(logits[start : start + len(s)], ref, atol=1e-4), arch
        start += len(s)


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_cached_chunks_and_decode_match_full_forward(tiny_checkpoint_factory, arch):
    """Prefill in chunks + decode steps through the paged cache == one full forward."""
    ckpt = load_checkpoint(tiny_checkpoint_factory(arch))
    model = build_model(ckpt, torch.float32, torch.device("cpu"))
    bs = 4
    cache = allocate_kv_cache(len(model.layers), 32, bs, model.num_kv_heads, model.head_dim, torch.float32, torch.device("cpu"))
    torch.manual_seed(1)
    a, b = torch.randint(0, 300, (19,)), torch.randint(0, 300, (11,))
    full_a = model(a, build_attention_metadata([19], [19]))
    full_b = model(b, build_attention_metadata([11], [11]))
    bt_a, bt_b = [3, 9, 1, 4, 12], [5, 6, 7]  # non-contiguous blocks on purpose
    # step 1: a's first 10 tokens and b's first 8; step 2: a's next 8 and b's 2; step 3: decode 1 + 1
    plan = [((0, 10), (0, 8)), ((10, 18), (8, 10)), ((18, 19), (10, 11))]
    out_a, out_b = [], []
    for (a0, a1), (b0, b1) in plan:
        meta = build_attention_metadata([a1 - a0, b1 - b0], [a1, b1], block_tables=[bt_a, bt_b], block_size=bs)
        h = model(torch.cat([a[a0:a1], b[b0:b1]]), meta, cache)
        out_a.append(h[: a1 - a0])
        out_b.append(h[a1 - a0 :])
    assert torch.allclose(torch.cat(out_a), full_a, atol=1e-5)
    assert torch.allclose(torch.cat(out_b), full_b, atol=1e-5)


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'.*supported: LlamaForCausalLM"):
        load_checkpoint(tmp_path)


def test_cuda_graph_decode_inputs_match_the_eager_metadata():
    """The graph runner's host-side inputs (runs on CPU) equal what the eager path computes; padding
    rows touch only the scratch block."""
    from onegen_core.model.cuda_graphs import capture_sizes, decode_host_inputs

    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40] and capture_sizes(3) == [1, 2, 3]
    block_tables = [[3, 9, 1], [5], [7, 2]]
    positions = [37, 4, 16]
    ids, pos, slots, ctx, bt = decode_host_inputs([11, 12, 13], positions, block_tables, padded_size=4,
                                                  max_blocks=5, block_size=16, scratch_block=99)
    meta = build_attention_metadata([1, 1, 1], [p + 1 for p in positions], block_tables=block_tables, block_size=16)
    assert slots[:3].tolist() == meta.slot_mapping.tolist()
    assert ids.tolist() == [11, 12, 13, 0] and ctx.tolist() == [38, 5, 17, 1] and pos.tolist() == positions + [0]
    assert slots[3].item() == 99 * 16 and bt[3].tolist() == [99] * 5
    assert bt[0].tolist() == [3, 9, 1, 99, 99]


def test_rope_is_bit_identical_to_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from onegen_core.model.llama import apply_rope, signed_sin

    torch.manual_seed(0)
    T, H, D = 9, 3, 16
    q, k = torch.randn(T, H, D), torch.randn(T, 1, D)
    ang = torch.randn(T, D // 2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    qk = apply_rope(torch.cat([q, k], dim=1), cos, signed_sin(sin))
    assert torch.equal(qk[:, :H], ref_q[0].transpose(0, 1)) and torch.equal(qk[:, H:], ref_k[0].transpose(0, 1))
