"""Checkpoint and onegen.json validation: precise errors, presets, LoRA adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.roles import Role
from onegen_core.formats.spec import PRESETS, OneGenSpec, SpecError
from onegen_core.text.rendering import Renderer


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_onegen_json(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    (d / "onegen.json").unlink()
    with pytest.raises(SpecError, match="onegen.json not found"):
        load_checkpoint(d)


def test_malformed_onegen_json_names_line(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    (d / "onegen.json").write_text('{\n  "preset": "default",\n  "query_tokens": [\n}')
    with pytest.raises(SpecError, match=r"onegen.json:4:1: malformed JSON"):
        load_checkpoint(d)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"bogus": 1}, r"unknown field\(s\) \['bogus'\]"),
        ({"preset": "nope"}, "unknown preset 'nope'"),
        ({"query_tokens": [{"token": "[RQ]", "action": "jump"}]}, "action 'jump'"),
        ({"document_template": "{body}"}, r"unknown field\(s\) \['body'\]"),
        ({"add_bos": "yes"}, "'add_bos' must be true or false"),
        ({"retrieval": {"k": 0}}, "retrieval.k must be >= 1"),
    ],
)
def test_invalid_spec_fields(tiny_checkpoint, tmp_path, patch, message):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    data = json.loads((d / "onegen.json").read_text())
    data.update(patch)
    (d / "onegen.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=message):
        load_checkpoint(d)


def test_unknown_special_token(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    data = json.loads((d / "onegen.json").read_text())
    data["document_token"] = "[NOT_IN_VOCAB]"
    (d / "onegen.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"unknown special token '\[NOT_IN_VOCAB\]'"):
        load_checkpoint(d)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_and_load(tiny_checkpoint_factory, name):
    spec = PRESETS[name]
    assert OneGenSpec.from_dict(spec.to_dict()) == spec
    ckpt = load_checkpoint(tiny_checkpoint_factory("llama", spec=spec))
    assert set(ckpt.token_ids.by_name) == set(spec.special_tokens)
    if name == "entity-linking":
        (qid,) = ckpt.token_ids.query
        assert ckpt.token_ids.query[qid].action == "annotate"
        assert ckpt.token_ids.follow_up[qid] == ckpt.token_ids.by_name["[_CONTINUE_]"]


def test_preset_by_name_in_file(tiny_checkpoint_factory, tmp_path):
    d = _copy(tiny_checkpoint_factory("llama", spec=PRESETS["multi-hop"]), tmp_path / "c")
    (d / "onegen.json").write_text(json.dumps({"preset": "multi-hop", "retrieval": {"k": 3, "max_retrievals": 2}}))
    ckpt = load_checkpoint(d)
    assert ckpt.spec.query_tokens[0].token == "[Question Representation]"
    assert ckpt.spec.retrieval.k == 3


def test_rendering_adds_nothing_behind_the_callers_back(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    r = Renderer.for_checkpoint(ckpt)
    tok = ckpt.tokenizer
    p = r.prompt("Paris is")
    assert p.ids == tok.encode("Paris is", add_special_tokens=False) and set(p.roles) == {Role.CTX}
    assert tok.bos_token_id not in p.ids and tok.eos_token_id not in p.ids
    doc = r.document("Rome is the capital of Italy.")
    assert doc[-1] == ckpt.token_ids.document and doc[:-1] == tok.encode("Rome is the capital of Italy.", add_special_tokens=False)
    psg = r.passage("Rome")
    assert psg[0] == ckpt.token_ids.passage_open and psg[-1] == ckpt.token_ids.passage_close
    chat = r.chat([{"role": "user", "content": "hi"}])
    assert tok.decode(chat.ids) == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_lora_adapter_checkpoint_is_merged_at_load(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from onegen_core.model import build_attention_metadata, build_model

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_checkpoint)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.copy(tiny_checkpoint / "onegen.json", adapter / "onegen.json")
    ckpt = load_checkpoint(adapter)
    assert ckpt.adapter_path == adapter and ckpt.fingerprint != load_checkpoint(tiny_checkpoint).fingerprint
    model = build_model(ckpt, torch.float32, torch.device("cpu"))
    ids = torch.arange(3, 20)
    with torch.no_grad():
        ref = peft_model(ids[None]).logits[0]
    got = model.compute_logits(model(ids, build_attention_metadata([17], [17])))
    assert torch.allclose(got, ref, atol=1e-4)


def test_sharded_safetensors_and_half_precision(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from onegen_core.model import build_attention_metadata, build_model

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    d = tmp_path / "sharded"
    hf.save_pretrained(d, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "onegen.json", "chat_template.jinja"):
        shutil.copy(tiny_checkpoint / f, d / f)
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 1
    ckpt = load_checkpoint(d)
    ids = torch.arange(3, 30)
    ref = hf(ids[None]).logits[0].detach()
    scale = ref.abs().max()
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.05 * scale), (torch.float16, 0.01 * scale)):
        model = build_model(ckpt, dtype, torch.device("cpu"))
        got = model.compute_logits(model(ids, build_attention_metadata([27], [27])))
        assert got.dtype == torch.float32
        assert torch.allclose(got, ref, atol=tol), dtype
