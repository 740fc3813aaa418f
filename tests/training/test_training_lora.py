"""LoRA fine-tuning writes a checkpoint the project serves: an adapter carrying the new token rows, or merged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from onegen_core.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.trainer import run_training


@pytest.fixture(scope="module")
def multihop_task(tmp_path_factory, synthetic_task_factory):
    # OneGen's multi-hop token names: the tiny base has neither, so training adds and initialises both
    return synthetic_task_factory(tmp_path_factory.mktemp("mh"), n_entities=6, query_token="[Question Representation]")


def _train(task, base, out, **kw):
    cfg = TrainConfig(base_model=str(base), train_file=str(task.train_file), db_file=str(task.db_file),
                      output_dir=str(out), preset="multi-hop", finetune="lora", lora_r=4, max_steps=3,
                      per_device_train_batch_size=4, n_neg_per_pos=2, learning_rate=5e-3, max_length=64,
                      eval_at_start=False, save_steps=0, plot=False, **kw)
    return run_training(cfg, progress=False)


def _reference_vectors(model, ckpt, texts):
    from onegen_core.rendering import Renderer

    r = Renderer.for_checkpoint(ckpt)
    out = []
    for t in texts:
        with torch.no_grad():
            h = model.get_decoder()(input_ids=torch.tensor([r.document(t)])).last_hidden_state[0, -1]
        out.append(torch.nn.functional.normalize(h, dim=-1).numpy())
    return np.stack(out)


def test_lora_adapter_checkpoint(tmp_path, multihop_task, synthetic_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = _train(multihop_task, synthetic_base, tmp_path / "adapter")
    out = res.output_dir
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(synthetic_base)
    ckpt = load_checkpoint(out)
    assert ckpt.adapter_path == out and ckpt.spec.preset == "multi-hop"
    qid = ckpt.token_ids.by_name["[Question Representation]"]
    # plain transformers + peft load it (the base grows by the new tokens first)
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(synthetic_base)
    old_vocab = base.get_input_embeddings().weight.shape[0]
    assert qid >= old_vocab
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    # the new rows travelled in the adapter: not the resized base's rows
    fresh = AutoModelForCausalLM.from_pretrained(synthetic_base)
    fresh.resize_token_embeddings(len(tok))
    assert not torch.allclose(model.get_input_embeddings().weight[qid], fresh.get_input_embeddings().weight[qid])
    # onegen_core merges the adapter the same way
    sd = ckpt.state_dict()
    torch.testing.assert_close(sd["model.embed_tokens.weight"], model.get_input_embeddings().weight)
    torch.testing.assert_close(sd["lm_head.weight"], model.get_output_embeddings().weight)


def test_engine_serves_a_lora_adapter_with_new_tokens(tmp_path, multihop_task, synthetic_base):
    from transformers import AutoModelForCausalLM

    from onegen_core.encoder import Encoder

    res = _train(multihop_task, synthetic_base, tmp_path / "adapter")
    ckpt = load_checkpoint(res.output_dir)
    texts = list(multihop_task.docs.values())[:4]
    enc = Encoder.from_checkpoint(ckpt).encode_documents([(t, None) for t in texts])
    model = AutoModelForCausalLM.from_pretrained(synthetic_base)
    model.resize_token_embeddings(len(ckpt.tokenizer))
    model.load_state_dict(ckpt.state_dict())
    np.testing.assert_allclose(enc, _reference_vectors(model, ckpt, texts), atol=1e-5)


def test_lora_merged_checkpoint(tmp_path, multihop_task, synthetic_base):
    from transformers import AutoModelForCausalLM

    res = _train(multihop_task, synthetic_base, tmp_path / "merged", merge_lora=True)
    out = res.output_dir
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    ckpt = load_checkpoint(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(ckpt.tokenizer)
    sd = ckpt.state_dict()
    torch.testing.assert_close(sd["model.embed_tokens.weight"], model.get_input_embeddings().weight)
