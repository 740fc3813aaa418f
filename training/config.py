"""Training configuration: one flat dataclass, read from YAML / JSON, every field also a flag.

``python -m training train --config multi_hop_qa.yaml --learning_rate 1e-5`` — the file
sets the fields, flags override them. Field names follow OneGen's workflow files and
Hugging Face ``TrainingArguments`` where those have one (``n_pos_per_sent``,
``per_device_train_batch_size``, …). Every value a user can set is checked in
``__post_init__``; a bad one raises ``ValueError`` naming the field (and the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onegen_core.formats.spec import PRESETS
from onegen_core.text.conversation import CONVERSATION_FORMATS

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    if isinstance(default, list | dict):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model and special tokens
    base_model: str = _f("", "base model: a local Hugging Face directory or a hub name (cached locally)")
    preset: str | None = _f(None, f"onegen.json preset for the special tokens: one of {sorted(PRESETS)}")
    spec: dict | None = _f(None, "onegen.json fields (JSON object); overrides the preset / the base's onegen.json")
    token_descriptions: dict | None = _f(
        None, "text per special token whose mean embedding initialises the new rows (JSON object)"
    )
    chat_template: str | None = _f(None, "Jinja chat template to set on the tokenizer (saved with the checkpoint)")
    # ---------------------------------------------------------------- data
    train_file: str = _f("", "OneGen train.jsonl: messages with positive / negative unit ids per RET token")
    db_file: str = _f("", "OneGen db.jsonl ({uid, messages}) or a corpus JSONL ({id, text, title?})")
    eval_file: str | None = _f(None, "held-out conversations (train.jsonl schema) for recall@k and LM loss")
    eval_ratio: float = _f(0.0, "when eval_file is unset: fraction of train_file held out for evaluation")
    conversation_format: str = _f(
        "chat_template", f"how messages become text: one of {CONVERSATION_FORMATS} (concat = OneGen's DocumentTemplator)"
    )
    max_length: int = _f(1024, "tokens per conversation / document; longer documents are truncated")
    truncation: str = _f(
        "drop", "a conversation longer than max_length loses answer tokens: drop it (counted and named in a "
        "warning), keep it cut, or error"
    )
    cache_dir: str | None = _f(None, "tokenised-data cache (default: <run_dir>/cache)")
    # ---------------------------------------------------------------- OneGen objective
    loss_type: str = _f("bpr", "contrastive loss: bpr (OneGen's default) or infonce")
    temperature: float = _f(0.02, "InfoNCE temperature (cosine similarity / temperature)")
    n_pos_per_sent: int = _f(1, "query RET tokens sampled per conversation per step")
    n_neg_per_pos: int = _f(4, "negatives per query: hard negatives first, then random units")
    in_batch_negatives: bool = _f(True, "also use every other document of the (global) batch as a negative")
    lambda_g: float = _f(1.0, "weight of the LM loss on GEN tokens")
    lambda_r: float = _f(1.0, "weight of the contrastive loss on RET tokens")
    # ---------------------------------------------------------------- fine-tuning method
    finetune: str = _f("full", "full or lora")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target_modules: list = _f(list(DEFAULT_LORA_TARGETS), "LoRA target modules (comma-separated)")
    merge_lora: bool = _f(False, "write merged full weights instead of an adapter (LoRA only)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    precision: str = _f("auto", "auto (bf16 on GPUs that support it, else fp32), bf16 or fp32")
    save_dtype: str = _f("auto", "dtype of the written weights: auto (the base model's), float32, bfloat16, float16")
    # ---------------------------------------------------------------- optimisation
    learning_rate: float = _f(2e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    optimizer: str = _f("adamw", "adamw or sgd")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    lr_scheduler: str = _f("linear", "linear, cosine or constant (after warmup)")
    warmup_ratio: float = _f(0.0, "fraction of the steps spent warming up")
    warmup_steps: int = _f(0, "warmup steps (overrides warmup_ratio when > 0)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    per_device_train_batch_size: int = _f(2, "conversations per device per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimiser step")
    num_train_epochs: float = _f(1.0, "epochs (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "optimiser steps (overrides num_train_epochs when > 0)")
    seed: int = _f(42, "seed for initialisation, data order and negative sampling")
    # ---------------------------------------------------------------- output, logging, evaluation
    output_dir: str = _f("", "the OneGen checkpoint written at the end (Contract 1)")
    run_dir: str | None = _f(None, "resume checkpoints, metrics and cache (default: <output_dir>.run)")
    overwrite_output_dir: bool = _f(False, "replace an existing output_dir")
    save_steps: int = _f(500, "write a resume checkpoint every N steps (0 = only at the end)")
    save_total_limit: int = _f(2, "resume checkpoints kept")
    resume: str = _f("auto", "auto (latest checkpoint in run_dir), never, or a checkpoint path")
    logging_steps: int = _f(10, "log metrics every N steps")
    eval_steps: int = _f(0, "evaluate every N steps (0 = at the start and the end only)")
    eval_batch_size: int = _f(8, "sequences per forward in evaluation")
    eval_pool_size: int = _f(
        1000, "documents ranked per eval query: positives, hard negatives and a seeded random fill (0 = every unit "
        "of db_file, slow on a CPU for a large corpus)"
    )
    eval_at_start: bool = _f(True, "evaluate before training (the chance-level baseline)")
    report_to: str = _f("auto", "jsonl, tensorboard, or auto (jsonl + tensorboard when installed)")
    plot: bool = _f(True, "write loss_curves.png at the end")
    deepspeed: str | None = _f(None, "DeepSpeed config file (YAML / JSON), e.g. training/configs/deepspeed_zero3.yaml")

    source: str | None = field(default=None, repr=False, metadata={"help": "", "internal": True})
    # ``python -m training validate`` writes nothing, so it does not need output_dir.
    validate_only: bool = field(default=False, repr=False, metadata={"help": "", "internal": True})

    # ---------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""

        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"{where}{name}: {msg}")

        for name in ("base_model", "train_file", "db_file") + (() if self.validate_only else ("output_dir",)):
            if not getattr(self, name):
                raise bad(name, "is required")
        if self.preset is not None and self.preset not in PRESETS:
            raise bad("preset", f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        for name in ("spec", "token_descriptions"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, dict):
                raise bad(name, f"must be an object, got {type(v).__name__}")
        choices = {
            "conversation_format": CONVERSATION_FORMATS,
            "loss_type": ("bpr", "infonce"),
            "finetune": ("full", "lora"),
            "precision": ("auto", "bf16", "fp32"),
            "save_dtype": ("auto", "float32", "bfloat16", "float16"),
            "optimizer": ("adamw", "sgd"),
            "lr_scheduler": ("linear", "cosine", "constant"),
            "report_to": ("auto", "jsonl", "tensorboard"),
            "truncation": ("drop", "keep", "error"),
        }
        for name, allowed in choices.items():
            v = getattr(self, name)
            if isinstance(v, str):
                v = v.lower()
                setattr(self, name, v)
            if v not in allowed:
                raise bad(name, f"{v!r} is not one of {list(allowed)}")
        positive = ("max_length", "n_pos_per_sent", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "eval_batch_size", "logging_steps", "lora_r", "lora_alpha", "save_total_limit")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        non_negative = ("n_neg_per_pos", "weight_decay", "warmup_steps", "max_grad_norm", "save_steps",
                        "eval_steps", "eval_pool_size", "lambda_g", "lambda_r", "num_train_epochs")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_length < 8:
            raise bad("max_length", f"must be >= 8, got {self.max_length}")
        if self.learning_rate <= 0:
            raise bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.temperature <= 0:
            raise bad("temperature", f"must be > 0, got {self.temperature}")
        if not 0.0 <= self.eval_ratio < 1.0:
            raise bad("eval_ratio", f"must be in [0, 1), got {self.eval_ratio}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise bad("num_train_epochs", "must be > 0 when max_steps is not set")
        if self.lambda_g == 0 and self.lambda_r == 0:
            raise bad("lambda_g", "lambda_g and lambda_r are both 0: nothing to train")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if not self.lora_target_modules:
            raise bad("lora_target_modules", "must name at least one module")
        if self.merge_lora and self.finetune != "lora":
            raise bad("merge_lora", "only applies to finetune: lora")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise bad("resume", f"{self.resume!r} is neither auto, never nor a checkpoint directory")

    # ---------------------------------------------------------------- derived paths
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(str(Path(self.output_dir)) + ".run")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.run_path / "cache"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}


# --------------------------------------------------------------------------- loading
def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON object of config fields; errors carry file:line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{mark.line + 1}:{mark.column + 1}" if mark else "1"
            raise ValueError(f"{path}:{loc}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    known = {f.name for f in _fields()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    # Relative data / output paths in a config file are relative to the working directory (as in OneGen).
    return data


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``list`` -> list."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {e.msg}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def _parse_none_or(kind: Any):
    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "null"):
            return None
        return kind(text)

    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field`` flag per config field (defaults left unset so the config file wins unless given)."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("config fields (override the --config file)")
    for f in _fields():
        tp = hints[f.name]
        base = _base_type(tp)
        optional = base is not tp
        if base is bool:
            conv: Any = _parse_bool
            metavar = "BOOL"
        elif base is int:
            conv, metavar = int, "INT"
        elif base is float:
            conv, metavar = float, "FLOAT"
        elif base is dict:
            conv, metavar = _parse_json_object, "JSON"
        elif base is list:
            conv, metavar = (lambda s: [m.strip() for m in s.split(",") if m.strip()]), "A,B,..."
        else:
            conv, metavar = str, "STR"
        if optional:
            conv = _parse_none_or(conv)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        group.add_argument(
            f"--{f.name}", f"--{f.name.replace('_', '-')}", dest=f.name, type=conv, default=argparse.SUPPRESS,
            metavar=metavar, help=help_text,
        )


def build_config(config_file: str | None, overrides: dict[str, Any], *, validate_only: bool = False) -> TrainConfig:
    """Config file fields, then flag overrides; validated (``validate_only``: output_dir may be unset)."""
    source = str(config_file) if config_file else "flags"
    data: dict[str, Any] = read_config_file(config_file) if config_file else {}
    data = {k: _coerce(k, v, source) for k, v in data.items()}
    data.update(overrides)
    return TrainConfig(**data, source=source, validate_only=validate_only)


def _coerce(name: str, value: Any, source: str) -> Any:
    """A config-file value to its field's type (YAML reads ``2e-5`` as a string); ValueError names the field."""
    tp = typing.get_type_hints(TrainConfig)[name]
    base = _base_type(tp)
    if value is None:
        if base is tp:
            raise ValueError(f"{source}: {name}: must not be null")
        return None
    try:
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is dict:
            return value if isinstance(value, dict) else _parse_json_object(str(value))
        if base is list:
            if isinstance(value, str):
                return [m.strip() for m in value.split(",") if m.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
        if not isinstance(value, str):
            raise ValueError
        return value
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ValueError(f"{source}: {name}: expected {getattr(base, '__name__', base)}, got {value!r}") from None
