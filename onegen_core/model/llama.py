"""A native forward for the Llama family: Llama 2 / 3.x, Qwen2 / 2.5, Mistral, SmolLM2.

Differences between the family members are config switches: q/k/v bias (Qwen2),
``attention_bias`` / ``mlp_bias`` (Llama configs that set them), tied embeddings (SmolLM2, small Qwen2), grouped-query attention, rope scaling
(transformers' own rope utilities compute the inverse frequencies, so Llama 3.x
scaling and YaRN match it exactly). q/k/v and gate/up projections are fused at load.

Projections are ``nn.Linear`` (aten) or, on the CPU, oneDNN-prepacked ``PackedLinear``
(``linear.py``; chosen by ``build_model``'s ``linear_backend``).

``forward`` works on a packed token stream (see ``attention.py``) and returns the
final-layer hidden states after the last norm; ``compute_logits`` is a separate call,
so a retrieval token's hidden state costs nothing extra.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, attention
from .linear import PackedLinear, pack_linears, resolve_linear_backend

log = logging.getLogger(__name__)

STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(config: Any, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, head_dim] computed exactly as transformers does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {sorted(STATIC_ROPE_TYPES)}")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    pos = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, so that ``rotate_half(x) * sin == swap_halves(x) * signed_sin``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, bit-identical to transformers' ``x * cos + rotate_half(x) * sin`` in four kernels.

    x: [T, H, D]; cos / sin_signed: [T, D] (``signed_sin``). Swapping the halves is a flip of a
    [2, D/2] view, and the sign of ``rotate_half`` lives in the table (negation is exact).
    """
    T, H, D = x.shape
    swapped = x.reshape(T, H, 2, D // 2).flip(2).reshape(T, H, D)
    return x * cos[:, None, :] + swapped * sin_signed[:, None, :]


class Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bool(getattr(config, "attention_bias", False)))
        self.scale = self.head_dim**-0.5

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)  # one rope for q and k
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        o = attention(q, k, v, meta, k_cache, v_cache, self.scale)  # [T, H, D]
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.inter = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))  # Llama's mlp_bias: gate, up and down all carry one
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.inter, bias=bias)
        self.down_proj = nn.Linear(self.inter, config.hidden_size, bias=bias)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, meta, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaFamilyModel(nn.Module):
    def __init__(self, config: Any, max_positions: int | None = None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.linear_backend = "aten"
        cos, sin = rope if rope is not None else rope_cos_sin(config, max_positions or config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin_signed", signed_sin(sin), persistent=False)  # see apply_rope

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,  # each [L, num_blocks, block_size, Hkv, D]
    ) -> torch.Tensor:  # [T, hidden] final-layer hidden states (after the last norm)
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[meta.positions].to(x.dtype)
        sin = self.rope_sin_signed[meta.positions].to(x.dtype)
        for i, layer in enumerate(self.layers):
            kc = kv_cache[0][i] if kv_cache is not None else None
            vc = kv_cache[1][i] if kv_cache is not None else None
            x = layer(x, cos, sin, meta, kc, vc)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        if self.lm_head is None:  # tied, aten backend
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def use_linear_backend(self, backend: str) -> None:
        """Switch every projection (logits included) to ``backend`` ("aten" keeps them as they are)."""
        if backend == "onednn":
            pack_linears(self)
            if self.lm_head is None:  # tied: the table stays for lookups, a packed copy computes the logits
                self.lm_head = PackedLinear(self.embed_tokens.weight)
        self.linear_backend = backend

    # ------------------------------------------------------------------ weights
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face parameter names, fusing q/k/v and gate/up."""
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        own = self.state_dict()
        new: dict[str, torch.Tensor] = {}
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise KeyError(f"checkpoint is missing weight {name!r}")
            used.add(name)
            return sd[name]

        for i in range(len(self.layers)):
            p = f"layers.{i}."
            new[p + "self_attn.qkv_proj.weight"] = torch.cat(
                [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0
            )
            if self.layers[i].self_attn.qkv_proj.bias is not None:
                new[p + "self_attn.qkv_proj.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            new[p + "self_attn.o_proj.weight"] = take(p + "self_attn.o_proj.weight")
            if self.layers[i].self_attn.o_proj.bias is not None:
                new[p + "self_attn.o_proj.bias"] = take(p + "self_attn.o_proj.bias")
            new[p + "mlp.gate_up_proj.weight"] = torch.cat(
                [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], dim=0
            )
            new[p + "mlp.down_proj.weight"] = take(p + "mlp.down_proj.weight")
            if self.layers[i].mlp.gate_up_proj.bias is not None:
                new[p + "mlp.gate_up_proj.bias"] = torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")])
                new[p + "mlp.down_proj.bias"] = take(p + "mlp.down_proj.bias")
            for n in ("input_layernorm", "post_attention_layernorm"):
                new[p + f"{n}.weight"] = take(p + f"{n}.weight")
        new["embed_tokens.weight"] = take("embed_tokens.weight")
        new["norm.weight"] = take("norm.weight")
        if not self.tie_word_embeddings:
            new["lm_head.weight"] = take("lm_head.weight")
        sd.pop("lm_head.weight", None)  # tied checkpoints may still carry a copy
        unused = sorted(set(sd) - used - {"lm_head.weight"})
        unused = [u for u in unused if "rotary_emb" not in u]
        if unused:
            raise KeyError(f"checkpoint has weights this model does not use: {unused[:5]}")
        for k, v in new.items():
            if own[k].shape != v.shape:
                raise ValueError(f"weight {k}: checkpoint shape {tuple(v.shape)} != model {tuple(own[k].shape)}")
        self.load_state_dict(new, strict=False)


def build_model(checkpoint: Any, dtype: torch.dtype, device: torch.device, max_positions: int | None = None,
                linear_backend: str = "auto") -> LlamaFamilyModel:
    """Native model for a ``Checkpoint`` with its (merged) weights, in eval mode.

    ``linear_backend``: ``auto`` (oneDNN-prepacked weights on CPU where supported, else aten),
    ``aten`` or ``onednn`` (see ``linear.py``).
    """
    backend = resolve_linear_backend(linear_backend, torch.device(device), dtype)
    config = checkpoint.config
    cos, sin = rope_cos_sin(config, max_positions or config.max_position_embeddings)
    with torch.device("meta"):
        model = LlamaFamilyModel(config, max_positions, rope=(cos, sin))
    model = model.to_empty(device="cpu")
    model.load_hf_state_dict(checkpoint.state_dict(torch.float32))
    model = model.to(device=device, dtype=dtype)
    model.rope_cos, model.rope_sin_signed = cos.to(device), signed_sin(sin).to(device)  # rope tables stay fp32
    model = model.eval().requires_grad_(False)
    model.use_linear_backend(backend)
    return model
