"""The model side of training: special tokens, new-row initialisation, LoRA, the joint forward, saving.

* The spec's special tokens are added to the base tokenizer where missing; each new
  embedding row (and LM-head row, when untied) starts as the mean of the rows of its
  description's tokens, so ``[RQ]`` starts near "retrieve a relevant document …".
* ``finetune: lora`` wraps the model with peft LoRA and makes the special tokens' rows
  trainable too (peft ``trainable_token_indices``), so the adapter carries them.
* :class:`OneGenModel` is the one ``nn.Module`` DDP / DeepSpeed wrap: one forward over
  conversations and documents returns the LM loss sum over GEN targets and the final-layer
  hidden states (after the final norm, what the LM head reads and what the engine uses as
  query / document vectors) at the query and document RET tokens.
* :func:`save_onegen_checkpoint` writes Contract 1: weights (merged, or a LoRA adapter over
  the base directory), tokenizer, ``onegen.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onegen_core.device import DTYPES
from onegen_core.formats.checkpoint import SpecialTokenIds, resolve_special_tokens
from onegen_core.formats.spec import PRESETS, SPEC_FILENAME, OneGenSpec, SpecError
from onegen_core.model.bucketing import length_buckets

from .config import TrainConfig


def import_peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a core dependency
        raise ImportError("finetune: lora needs peft: pip install peft") from e
    return peft


def resolve_base_dir(name: str) -> Path:
    """The base model as a local directory (a hub name resolves through the local Hugging Face cache)."""
    p = Path(name)
    if p.is_dir():
        return p.resolve()
    if p.exists() or name.startswith((".", "/")):
        raise ValueError(f"base_model: {name} is not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as e:  # noqa: BLE001 - any hub failure is the same user error
        raise ValueError(f"base_model: {name!r} is neither a local directory nor a downloadable model: {e}") from None


def resolve_spec(cfg: TrainConfig, base_dir: Path) -> OneGenSpec:
    """The preset, else the base's own onegen.json, else the default; then the config's ``spec`` fields."""
    where = f"{cfg.source}: spec" if cfg.source else "spec"
    if cfg.preset is not None:
        spec = PRESETS[cfg.preset]
    elif (base_dir / SPEC_FILENAME).is_file():
        spec = OneGenSpec.load(base_dir)
    else:
        spec = OneGenSpec()
    data = spec.to_dict()
    # Queries render the way training places the query token: after the chat prompt, or after plain text.
    data["query_format"] = "chat" if cfg.conversation_format == "chat_template" else "template"
    data.update(cfg.spec or {})
    try:
        return OneGenSpec.from_dict(data, source=where)
    except SpecError as e:
        raise ValueError(str(e)) from None


def prepare_tokenizer(cfg: TrainConfig, base_dir: Path, spec: OneGenSpec) -> tuple[Any, list[str], SpecialTokenIds]:
    """Load the base tokenizer, set the chat template, add the spec's missing special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    vocab = tok.get_vocab()
    missing = [t for t in spec.special_tokens
               if t not in vocab or tok.encode(t, add_special_tokens=False) != [vocab[t]]]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    token_ids = resolve_special_tokens(tok, spec, source="training spec")
    return tok, missing, token_ids


def token_descriptions(cfg: TrainConfig, spec: OneGenSpec) -> dict[str, str]:
    out = spec.token_descriptions()
    for k, v in (cfg.token_descriptions or {}).items():
        if k not in out:
            raise ValueError(f"token_descriptions: {k!r} is not a special token of the spec ({sorted(out)})")
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"token_descriptions: the description of {k!r} must be a non-empty string")
        out[k] = v
    return out


@torch.no_grad()
def init_new_token_rows(model: nn.Module, tokenizer: Any, new_tokens: list[str], descriptions: dict[str, str],
                        old_vocab: int) -> dict[str, list[int]]:
    """Each new row = mean of the rows of its description's (pre-existing) tokens; returns the ids used."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_w = head.weight if head is not None and head.weight.data_ptr() != emb.data_ptr() else None
    used: dict[str, list[int]] = {}
    if not new_tokens:
        return used
    from .ds import gathered

    with gathered([emb] + ([head_w] if head_w is not None else [])):
        for name in new_tokens:
            used[name] = _init_row(tokenizer, name, descriptions, old_vocab, emb, head_w)
    return used


def _init_row(tokenizer: Any, name: str, descriptions: dict[str, str], old_vocab: int, emb: torch.Tensor,
              head_w: torch.Tensor | None) -> list[int]:
    """Set the new token's rows to the mean of its description tokens' rows; returns those token ids."""
    tid = tokenizer.convert_tokens_to_ids(name)
    ids = [i for i in tokenizer.encode(descriptions.get(name, name), add_special_tokens=False) if i < old_vocab]
    if not ids:  # nothing to average: the mean of the whole old vocabulary
        ids = list(range(old_vocab))
    idx = torch.tensor(ids, device=emb.device)
    emb[tid] = emb[idx].float().mean(0).to(emb.dtype)
    if head_w is not None:
        head_w[tid] = head_w[idx].float().mean(0).to(head_w.dtype)
    return ids


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n.rsplit(".", 1)[-1]
    raise ValueError("module not found in model")  # pragma: no cover


def build_model(cfg: TrainConfig, base_dir: Path, tokenizer: Any, new_tokens: list[str], spec: OneGenSpec,
                token_ids: SpecialTokenIds, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Base causal LM with the special tokens added and initialised, LoRA-wrapped if asked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    old_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_vocab:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # ids of new tokens below old_vocab reuse padding rows of the base (e.g. Qwen's padded vocabulary)
    init_new_token_rows(model, tokenizer, new_tokens, token_descriptions(cfg, spec), min(old_vocab, len(tokenizer)))
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.finetune == "lora":
        peft = import_peft()
        special = sorted(token_ids.by_name.values())
        tti = {_module_name(model, model.get_input_embeddings()): special}
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            tti[_module_name(model, head)] = special
        lcfg = peft.LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules), trainable_token_indices=tti, task_type="CAUSAL_LM",
        )
        try:
            model = peft.get_peft_model(model, lcfg)
        except ValueError as e:
            raise ValueError(f"lora_target_modules {cfg.lora_target_modules}: {e}") from None
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a (possibly peft-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class OneGenModel(nn.Module):
    """One forward over conversations + documents: LM loss sum and RET-token hidden states."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-layer hidden states after the final norm: [R, L, H]."""
        decoder = causal_lm(self.lm).get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def lm_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sum of cross-entropy over LM targets (logits only where needed) and their count."""
        head = causal_lm(self.lm).get_output_embeddings()
        shift = labels[:, 1:]  # [R, L-1]
        sel = shift != -100
        n = int(sel.sum())
        if n == 0:  # keep the head in the graph (DDP expects every parameter to get a gradient)
            return head(hidden[:1, :1].reshape(1, -1)).float().sum() * 0.0, 0
        h = hidden[:, :-1][sel]  # [T, H]
        logits = head(h).float()  # [T, V]
        return F.cross_entropy(logits, shift[sel], reduction="sum"), n

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                query_rows: torch.Tensor, query_cols: torch.Tensor, doc_rows: torch.Tensor,
                doc_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """LM loss sum, target count, query vectors [Q, H] and document vectors [M, H] of a right-padded batch.

        Rows are run in length buckets (``onegen_core.model.bucketing``), each cut to its own longest row, so a batch
        of long conversations and short documents does not pad every document to the longest conversation.
        """
        lengths = attention_mask.sum(1).tolist()
        lm_sum = None
        n = 0
        q_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        d_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        buckets = length_buckets(lengths, power=1)  # a padded forward pads every layer: waste is linear
        slot_list, bucket_list = [0] * len(lengths), [0] * len(lengths)
        for b, rows in enumerate(buckets):
            for i, r in enumerate(rows):
                slot_list[r], bucket_list[r] = i, b
        slot = torch.tensor(slot_list, device=input_ids.device)  # [R] row -> index in its bucket
        bucket_of = torch.tensor(bucket_list, device=input_ids.device)  # [R] row -> its bucket
        for b, rows in enumerate(buckets):
            rows_t = torch.tensor(rows, dtype=torch.long, device=input_ids.device)
            width = max(lengths[r] for r in rows)
            h = self.hidden(input_ids[rows_t, :width], attention_mask[rows_t, :width])  # [r, width, H]
            s, k = self.lm_loss_sum(h, labels[rows_t, :width])
            lm_sum = s if lm_sum is None else lm_sum + s
            n += k
            for parts, r_idx, c_idx in ((q_parts, query_rows, query_cols), (d_parts, doc_rows, doc_cols)):
                mine = (bucket_of[r_idx] == b).nonzero().squeeze(1)  # [m] entries whose row is in this bucket
                if len(rows) == len(lengths) or mine.numel():
                    parts.append((mine, h[slot[r_idx[mine]], c_idx[mine]].float()))
        q = _in_order(q_parts, query_rows.shape[0], lm_sum)
        d = _in_order(d_parts, doc_rows.shape[0], lm_sum)
        return lm_sum, torch.tensor(n, device=input_ids.device), q, d


def _in_order(parts: list[tuple[torch.Tensor, torch.Tensor]], count: int, like: torch.Tensor) -> torch.Tensor:
    """Vectors gathered bucket by bucket, back in their original order: [count, H]."""
    index = torch.cat([i for i, _ in parts])
    vecs = torch.cat([v for _, v in parts])
    out = vecs.new_zeros((count, vecs.shape[1]))
    return out.index_copy(0, index, vecs)


def save_onegen_checkpoint(model: nn.Module, tokenizer: Any, spec: OneGenSpec, out: Path, *, cfg: TrainConfig,
                           base_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Contract 1 into ``out``: full weights (or merged LoRA) or a LoRA adapter whose base is ``base_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "get_base_model")
    dtype = save_dtype(cfg, base_dir)
    if is_peft and not cfg.merge_lora:
        # The special tokens' rows travel as trainable-token rows; the rest of the (resized) embedding is the base's.
        model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True, save_embedding_layers=False)
        acfg_path = out / "adapter_config.json"
        acfg = json.loads(acfg_path.read_text())
        acfg["base_model_name_or_path"] = str(base_dir)
        tmp = acfg_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(acfg, indent=2) + "\n")
        os.replace(tmp, acfg_path)
    else:
        if is_peft:
            if state_dict is not None:
                model.load_state_dict(state_dict, strict=False)
            model = model.merge_and_unload()
            state_dict = None
        if state_dict is not None:  # consolidated from DeepSpeed
            state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
        else:
            model.to(dtype)
        model.config.use_cache = True
        model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    spec.save(out)
    return out


def save_dtype(cfg: TrainConfig, base_dir: Path) -> torch.dtype:
    """``save_dtype``, or for ``auto`` the dtype the base model's config.json names (float32 if none)."""
    if cfg.save_dtype != "auto":
        return DTYPES[cfg.save_dtype]
    try:
        data = json.loads((base_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    return DTYPES.get(str(data.get("dtype") or data.get("torch_dtype")), torch.float32)
