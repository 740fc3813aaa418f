"""Checkpoint directories (Contract 1): a Hugging Face model dir plus ``onegen.json``.

A PEFT LoRA adapter directory whose base is such a model is a checkpoint too: its
``onegen.json`` and tokenizer live in the adapter dir (training adds the special
tokens there) and the adapter is merged into the base weights at load.

``load_checkpoint`` reads config, tokenizer and spec and checks that every special
token the spec names is exactly one token of the tokenizer; weights are read by
``Checkpoint.state_dict`` (safetensors only, sharded or not) when a model is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .spec import SPEC_FILENAME, OneGenSpec, QueryToken, SpecError

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM (Llama 2 / 3.x, SmolLM2)",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM (Qwen2 / 2.5)",
}
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served, with the reason."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids of the spec's special tokens in this checkpoint's tokenizer."""

    query: dict[int, QueryToken]  # query RET token id -> its definition
    document: int
    passage_open: int
    passage_close: int
    follow_up: dict[int, int] = field(default_factory=dict)  # query token id -> forced follow-up id
    by_name: dict[str, int] = field(default_factory=dict)

    @property
    def query_ids(self) -> list[int]:
        return sorted(self.query)


@dataclass
class Checkpoint:
    path: Path
    model_path: Path  # where the (base) weights are
    adapter_path: Path | None
    config: Any  # transformers.PretrainedConfig
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    spec: OneGenSpec
    token_ids: SpecialTokenIds

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over config, tokenizer, spec and weights: an index built with it is only valid for it."""
        h = hashlib.sha256()
        dirs = [self.model_path] + ([self.adapter_path] if self.adapter_path else [])
        for d in dirs:
            for p in sorted(d.iterdir()):
                if p.is_file() and p.suffix in (".json", ".safetensors", ".model", ".txt") and not p.name.startswith("."):
                    h.update(p.name.encode() + b"\0")
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 22), b""):
                            h.update(chunk)
        return h.hexdigest()[:32]

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The model's weights (LoRA merged), Hugging Face names, in ``dtype``."""
        if self.adapter_path is None:
            return {k: v.to(dtype) for k, v in load_safetensors_dir(self.model_path).items()}
        return _merged_adapter_state_dict(self, dtype)


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found (pickled .bin weights are not loaded)")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(str(path / name)))
    return out


def _merged_adapter_state_dict(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - peft is a core dependency
        raise CheckpointError("loading a LoRA adapter needs peft: pip install peft") from e
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ckpt.model_path, dtype=torch.float32)
    if base.get_input_embeddings().weight.shape[0] < len(ckpt.tokenizer):  # the adapter added tokens
        base.resize_token_embeddings(len(ckpt.tokenizer), mean_resizing=False)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (FutureWarning on every load); nothing
        # of ours to fix, and a user loading a checkpoint should not have to read it
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        model = PeftModel.from_pretrained(base, str(ckpt.adapter_path)).merge_and_unload()
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint dir (or a LoRA adapter dir over one) and validate it; weights stay on disk."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    adapter_path: Path | None = None
    model_path = path
    if (path / ADAPTER_CONFIG).is_file():
        adapter_path = path
        acfg = json.loads((path / ADAPTER_CONFIG).read_text())
        base = acfg.get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path")
        model_path = Path(base) if Path(base).is_absolute() else (path / base).resolve()
        if not model_path.is_dir():
            raise CheckpointError(f"{path}: the adapter's base model {base!r} is not a local directory")
    if not (model_path / "config.json").is_file():
        raise CheckpointError(f"{model_path}: no config.json (not a Hugging Face model directory)")
    config = AutoConfig.from_pretrained(model_path)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES.values())
        raise CheckpointError(
            f"{model_path}: unsupported architecture {config.model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or [])}); supported: {supported}"
        )
    unsupported = unsupported_config_field(config, model_path / "config.json")
    if unsupported is not None:
        raise CheckpointError(f"{model_path}: {unsupported}")
    spec_dir = adapter_path or model_path
    spec = OneGenSpec.load(spec_dir)
    tok_dir = adapter_path if adapter_path and (adapter_path / "tokenizer_config.json").is_file() else model_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    token_ids = resolve_special_tokens(tokenizer, spec, source=str(spec_dir / SPEC_FILENAME))
    if adapter_path is not None and len(tokenizer) > config.vocab_size:
        config.vocab_size = len(tokenizer)  # training added special tokens; the merged weights carry their rows
    return Checkpoint(path, model_path, adapter_path, config, tokenizer, spec, token_ids)


def unsupported_config_field(config: Any, config_file: Path) -> str | None:
    """What in a supported architecture's config the native model cannot run (naming the field), or None.

    Checked at load, so that the CLIs and the server refuse such a checkpoint with one line
    instead of failing later inside the model build.
    """
    from ..model.llama import STATIC_ROPE_TYPES

    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else None
    if rope_type not in STATIC_ROPE_TYPES:
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError):
            raw = {}
        key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"  # the name config.json uses
        return (f"unsupported {key}.rope_type {rope_type!r} in config.json; supported: "
                f"{', '.join(sorted(STATIC_ROPE_TYPES))}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        return f"unsupported hidden_act {act!r} in config.json; supported: silu"
    return None


def resolve_special_tokens(tokenizer: Any, spec: OneGenSpec, *, source: str = SPEC_FILENAME) -> SpecialTokenIds:
    """Map each special token of ``spec`` to its single id; error on any the tokenizer lacks."""
    by_name: dict[str, int] = {}
    vocab = tokenizer.get_vocab()
    for name in spec.special_tokens:
        tid = vocab.get(name)
        ids = tokenizer.encode(name, add_special_tokens=False)
        if tid is None or ids != [tid]:
            raise SpecError(
                f"{source}: unknown special token {name!r}: the tokenizer does not have it as a single token "
                f"(it encodes to {ids}); add it when training or fix the name"
            )
        by_name[name] = tid
    query = {by_name[q.token]: q for q in spec.query_tokens}
    follow = {by_name[q.token]: by_name[q.follow_up] for q in spec.query_tokens if q.follow_up}
    return SpecialTokenIds(
        query=query,
        document=by_name[spec.document_token],
        passage_open=by_name[spec.passage_open],
        passage_close=by_name[spec.passage_close],
        follow_up=follow,
        by_name=by_name,
    )
