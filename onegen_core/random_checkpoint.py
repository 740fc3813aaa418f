"""Random-weight OneGen checkpoints, built offline in seconds: the demo model, the tests' tiny models.

``build_tiny_checkpoint`` trains a small BPE tokenizer locally (``tokenizers``), adds
the spec's special tokens, gives it a minimal chat template, builds a random model
from a config (Llama, Llama 3 rope scaling, Qwen2, Mistral, tied embeddings) and saves
it as a normal Hugging Face directory plus ``onegen.json``. Nothing is downloaded.
``make_query_token_likely`` edits such a model so that it emits its query token and
retrieves while it generates (``server.demo`` serves one). The tests reach these through
``onegen_core.testing``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .formats.spec import OneGenSpec

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_BASE_TEXT = """
The quick brown fox jumps over the lazy dog. A retrieval augmented model reads passages
and answers questions. Paris is the capital of France. Berlin is the capital of Germany.
Rome is the capital of Italy. Madrid is the capital of Spain. The river flows to the sea.
Question: who wrote the book? Answer: the author wrote it in the year 1990.
Zorblat lives in Quenta and works as a baker. Mirelle was born in Odrin and plays the harp.
Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024. Entity mention linking document title text.
"""

ARCHS = ("llama", "llama3", "qwen2", "mistral", "tied")


def build_tokenizer(spec: OneGenSpec, extra_text: str = "", vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences, with the spec's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base_specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=base_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_BASE_TEXT, extra_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    fast.add_tokens(spec.special_tokens, special_tokens=True)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                max_positions: int = 512, **extra: Any):
    """A tiny config of ``arch``; ``extra`` sets further config fields (``mlp_bias=True``, ``rope_scaling={...}``)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **extra,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "tied":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "llama3":
        return LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    raise ValueError(f"unknown tiny arch {arch!r}; one of {ARCHS}")


def build_tiny_checkpoint(
    out_dir: str | os.PathLike,
    *,
    arch: str = "llama",
    spec: OneGenSpec | None = None,
    seed: int = 0,
    extra_text: str = "",
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Write a random tiny OneGen checkpoint to ``out_dir`` and return its path."""
    from transformers import AutoModelForCausalLM

    spec = spec or OneGenSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec, extra_text)
    config = tiny_config(arch, len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is small; widen it so that greedy outputs are not all one token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    if arch == "qwen2":  # make the q/k/v bias non-zero so that tests see it
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    if getattr(config, "mlp_bias", False):  # likewise the MLP biases (initialised to zero)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    proj.bias.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    spec.save(out)
    return out


def make_query_token_likely(ckpt_dir: str | os.PathLike, prompts: list[str] | None = None, rank: int = 1) -> int:
    """Make a random tiny model emit its first query token sometimes (tests of in-flight retrieval).

    Greedy-decodes a few prompts with transformers, picks the ``rank``-th most frequent
    generated token and gives the query token that token's LM-head row scaled by 1.05:
    wherever that token would win, the query token now wins instead; once retrieval is
    spent (the token masked out) the original token takes its place again. Returns the
    id of the token whose row was copied.
    """
    from collections import Counter

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .formats.spec import OneGenSpec

    ckpt_dir = Path(ckpt_dir)
    spec = OneGenSpec.load(ckpt_dir)
    tok = AutoTokenizer.from_pretrained(ckpt_dir)
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    special = set(tok.convert_tokens_to_ids(spec.special_tokens)) | set(tok.all_special_ids)
    counts: Counter[int] = Counter()
    for p in prompts or ["The river flows", "Paris is the capital", "Question: who wrote", "Zorblat lives in"]:
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False)
        counts.update(t for t in out[0, ids.shape[1]:].tolist() if t not in special)
    donor = [t for t, _ in counts.most_common()][min(rank, len(counts) - 1)]
    qid = tok.convert_tokens_to_ids(spec.query_tokens[0].token)
    path = ckpt_dir / "model.safetensors"
    sd = load_file(str(path))
    key = "lm_head.weight" if "lm_head.weight" in sd else "model.embed_tokens.weight"
    sd[key][qid] = sd[key][donor] * 1.05
    save_file(sd, str(path), metadata={"format": "pt"})
    return donor
