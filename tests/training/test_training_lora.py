"""LoRA fine-tuning writes a checkpoint the project serves: an adapter carrying the new token rows, or merged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from onegen_core.formats.checkpoint import load_checkpoint
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


def _peft_reference(adapter_dir, base_dir):
    """The adapter as plain transformers + peft run it: the base grown by the new tokens, the adapter applied
    by peft's own forward (not merged, and nothing of onegen_core's loading)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    return tok, PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@torch.no_grad()
def _last_hidden(model, ids: list[int]) -> np.ndarray:
    h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1].float()
    return (h / h.norm()).numpy()


@torch.no_grad()
def _peft_greedy(model, tok, spec, prompt_ids, doc_vecs, doc_texts, *, max_tokens, max_retrievals, forced):
    """Greedy decoding with OneGen's rules by full recompute: after the query token, its hidden state searches
    ``doc_vecs`` by brute force and the best passage follows it between the passage delimiters."""
    name = lambda s: tok.convert_tokens_to_ids(s)  # noqa: E731
    qid, popen, pclose = name(spec.query_tokens[0].token), name(spec.passage_open), name(spec.passage_close)
    banned = [name(spec.document_token), popen, pclose]
    ids, out, hits, logprobs = list(prompt_ids), [], [], []
    while len(out) < max_tokens:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logits[banned] = float("-inf")
        if len(hits) >= max_retrievals:
            logits[qid] = float("-inf")
        t = forced.get(len(out), int(logits.argmax()))
        ids.append(t)
        out.append(t)
        logprobs.append(float(torch.log_softmax(logits, -1)[t]))
        if t in (tok.eos_token_id, model.config.eos_token_id):
            break
        if t == qid and len(hits) < max_retrievals and len(out) < max_tokens:
            best = int(np.argmax(doc_vecs @ _last_hidden(model, ids)))
            hits.append(best)
            ids += [popen] + tok.encode(doc_texts[best], add_special_tokens=False) + [pclose]
    return out, hits, logprobs


def test_engine_serves_a_lora_adapter_with_new_tokens(tmp_path, multihop_task, synthetic_base):
    """The trained adapter in the real Engine gives what transformers + peft give: the same document vectors,
    and the same greedy tokens, retrievals and log-probabilities for chat questions whose answers go through
    the new tokens ([Question Representation] forced first, as training places it, then <paragraph> ...)."""
    from transformers import AutoConfig

    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.engine.params import RetrievalParams, SamplingParams
    from onegen_core.formats.index_store import Document, write_index_dir
    from onegen_core.retrieval.encoder import Encoder

    res = _train(multihop_task, synthetic_base, tmp_path / "adapter")
    out = res.output_dir
    assert (out / "adapter_config.json").is_file()
    ckpt = load_checkpoint(out)
    spec = ckpt.spec
    # the reference renders documents and passages as "{text}" with no BOS: what this preset's spec says
    assert (spec.document_template, spec.passage_template, spec.add_bos) == ("{text}", "{text}", False)
    tok, ref = _peft_reference(out, synthetic_base)
    qid = tok.convert_tokens_to_ids(spec.query_tokens[0].token)
    doc_token = tok.convert_tokens_to_ids(spec.document_token)
    assert min(qid, doc_token) >= AutoConfig.from_pretrained(synthetic_base).vocab_size  # tokens training added

    doc_ids, doc_texts = list(multihop_task.docs), list(multihop_task.docs.values())
    ref_vecs = np.stack([_last_hidden(ref, tok.encode(t, add_special_tokens=False) + [doc_token]) for t in doc_texts])
    cfg = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64, block_size=8)
    # the index builder's encoder (what python -m index_builder build runs) on the adapter checkpoint
    vecs = Encoder.from_checkpoint(ckpt).encode_documents([(t, None) for t in doc_texts])
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
    docs = [Document(id=i, text=t) for i, t in zip(doc_ids, doc_texts, strict=True)]
    index = write_index_dir(tmp_path / "index", vecs, docs, checkpoint_fingerprint=ckpt.fingerprint)
    engine = Engine.from_checkpoint(out, index, cfg)

    forced = {0: qid}
    questions = [c["messages"][0]["content"] for c in multihop_task.conversations[:4]]
    sp = SamplingParams(max_tokens=16, forced_tokens=forced, logprobs=True)
    results = engine.generate(messages=[[{"role": "user", "content": q}] for q in questions], sampling=sp,
                              retrieval=RetrievalParams(max_retrievals=2, k=1))
    for q, r in zip(questions, results, strict=True):
        chat = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok.encode(chat, add_special_tokens=False)
        want, want_hits, want_lps = _peft_greedy(ref, tok, spec, prompt_ids, ref_vecs, doc_texts, max_tokens=16,
                                                 max_retrievals=2, forced=forced)
        assert r.usage.prompt_tokens == len(prompt_ids), q
        assert r.token_ids == want, q
        assert [h.doc_id for t in r.retrievals for h in t.hits] == [doc_ids[i] for i in want_hits], q
        assert r.retrievals and r.retrievals[0].inserted_tokens > 2
        # a forced token has no sampled log-probability; the others are the reference's, new tokens' rows included
        got = [lp for i, lp in enumerate(r.logprobs) if i not in forced]
        np.testing.assert_allclose(got, [lp for i, lp in enumerate(want_lps) if i not in forced], atol=1e-4)


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
