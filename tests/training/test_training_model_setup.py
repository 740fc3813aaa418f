"""Model setup: new special tokens and their initial rows, LoRA adapters that carry those rows, config files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig, build_config, read_config_file

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def cfg_for(base: Path, tmp: Path, **kw) -> TrainConfig:
    return TrainConfig(base_model=str(base), train_file="t.jsonl", db_file="d.jsonl", output_dir=str(tmp / "out"),
                       **kw)


def test_new_tokens_start_at_the_mean_of_their_description(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.modeling import build_model, prepare_tokenizer, resolve_base_dir, resolve_spec

    # the tiny base knows [RQ]/[RD]; the entity-linking preset needs [LK], [SE], [_CONTINUE_]
    cfg = cfg_for(tiny_checkpoint, tmp_path, preset="entity-linking",
                  token_descriptions={"[SE]": "document title text"})
    base = resolve_base_dir(cfg.base_model)
    spec = resolve_spec(cfg, base)
    tok, new, ids = prepare_tokenizer(cfg, base, spec)
    assert new == ["[LK]", "[SE]", "[_CONTINUE_]"]
    model = build_model(cfg, base, tok, new, spec, ids)
    ref = AutoModelForCausalLM.from_pretrained(base)
    old = ref.get_input_embeddings().weight.shape[0]
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == old + 3
    for name, desc in (("[LK]", "link the preceding mention"), ("[SE]", "document title text"),
                       ("[_CONTINUE_]", "continue generating")):
        d = tok.encode(desc, add_special_tokens=False)
        assert d and all(i < old for i in d)
        tid = ids.by_name[name]
        torch.testing.assert_close(model.get_input_embeddings().weight[tid],
                                   ref.get_input_embeddings().weight[d].mean(0))
        torch.testing.assert_close(model.get_output_embeddings().weight[tid],
                                   ref.get_output_embeddings().weight[d].mean(0))
    # rows of the old vocabulary are untouched
    torch.testing.assert_close(model.get_input_embeddings().weight[:old], ref.get_input_embeddings().weight)


def test_lora_trains_adapters_and_special_rows_only(tiny_checkpoint, tmp_path):
    from training.modeling import build_model, prepare_tokenizer, resolve_base_dir, resolve_spec

    cfg = cfg_for(tiny_checkpoint, tmp_path, finetune="lora", lora_r=4, gradient_checkpointing=True)
    base = resolve_base_dir(cfg.base_model)
    spec = resolve_spec(cfg, base)
    tok, new, ids = prepare_tokenizer(cfg, base, spec)
    model = build_model(cfg, base, tok, new, spec, ids)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert any("embed_tokens.token_adapter" in n for n in trainable)
    assert any("lm_head.token_adapter" in n for n in trainable)


def test_ready_configs_parse():
    files = sorted(CONFIGS.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"entity_linking", "single_hop_qa", "multi_hop_qa", "deepspeed_zero3"} <= names
    for f in files:
        if f.stem == "deepspeed_zero3":
            continue
        cfg = build_config(str(f), {})
        assert cfg.train_file.endswith("train.jsonl") and cfg.db_file.endswith("db.jsonl")
    el = build_config(str(CONFIGS / "entity_linking.yaml"), {"learning_rate": 1e-4})
    assert el.preset == "entity-linking" and el.learning_rate == 1e-4


def test_config_errors_name_the_field_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: b\ntrain_file: t\ndb_file: d\noutput_dir: o\nlearning_rate: 2e-5\nloss_type: hinge\n")
    with pytest.raises(ValueError, match=r"c.yaml: loss_type: 'hinge' is not one of \['bpr', 'infonce'\]"):
        build_config(str(p), {})
    cfg = build_config(str(p), {"loss_type": "infonce"})
    assert cfg.learning_rate == 2e-5  # YAML reads 2e-5 as a string: coerced
    p.write_text("base_model: b\nlearning_rat: 1\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown field\(s\) \['learning_rat'\]"):
        read_config_file(p)
    p.write_text("base_model: [b\n")
    with pytest.raises(ValueError, match=r"c.yaml:\d+:\d+: malformed YAML"):
        read_config_file(p)
    p.write_text(json.dumps({"base_model": "b", "train_file": "t", "db_file": "d", "output_dir": "o",
                             "max_length": "many"}))
    with pytest.raises(ValueError, match="max_length: expected int, got 'many'"):
        build_config(str(p.rename(tmp_path / "c.json")), {})


def test_every_field_is_a_flag(tmp_path):
    from training.__main__ import _parser

    args = _parser().parse_args(["show-config", "--base_model", "b", "--train-file", "t", "--db_file", "d",
                                 "--output_dir", "o", "--lora_target_modules", "q_proj,v_proj",
                                 "--in_batch_negatives", "false", "--spec", '{"document_template": "{title}: {text}"}',
                                 "--eval_file", "none"])
    over = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    cfg = build_config(None, over)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.in_batch_negatives is False
    assert cfg.spec == {"document_template": "{title}: {text}"} and cfg.eval_file is None
    fields = {f for f, d in TrainConfig.__dataclass_fields__.items() if not d.metadata.get("internal")}
    help_text = _parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(f"--{f}" in help_text for f in fields)


def test_validate_needs_no_output_dir(tmp_path, tiny_checkpoint, capsys):
    """`python -m training validate` writes nothing: it must not ask for --output_dir (train still does)."""
    from training.__main__ import main

    db = tmp_path / "db.jsonl"
    db.write_text(json.dumps({"uid": "paris", "messages": [{"role": "user", "content": "Paris is in France."}]}) + "\n")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Where is Paris?"},
        {"role": "assistant", "content": "[RQ]<paragraph>Paris is in France.</paragraph>France.",
         "positive": [["paris"]], "negative": [[]]}]}) + "\n")
    args = ["--base_model", str(tiny_checkpoint), "--train_file", str(train), "--db_file", str(db), "--quiet"]
    assert main(["validate", *args]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["train_conversations"] == 1
    assert sorted(tmp_path.iterdir()) == sorted([db, train])  # nothing written
    assert main(["train", *args]) == 2
    assert "output_dir: is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="output_dir: is required"):
        build_config(None, {"base_model": "b", "train_file": "t", "db_file": "d"})
    assert build_config(None, {"base_model": "b", "train_file": "t", "db_file": "d"}, validate_only=True).output_dir == ""
