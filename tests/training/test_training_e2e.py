"""End to end: train a tiny model from scratch on the synthetic task, index its corpus, answer through the engine.

The base is a random 2-layer Llama (onegen_core.testing) whose only knowledge is the
tokenizer. Training must take retrieval from chance to recall@1 >= 0.9 on held-out
questions in a budget of 150 steps (17-38 s on an idle 2-core CPU; the time is printed, not
asserted: timings belong to benchmarks, and a shared CI machine can be several times slower), teach the model to emit the query token where the
data puts it (first thing in the answer), and give a checkpoint that the engine serves:
the query token's hidden state finds the right document in the index, the passage is
inserted, and the model answers from it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document, write_index_dir
from training.config import TrainConfig
from training.trainer import run_training

RECIPE = dict(eval_ratio=0.15, learning_rate=3e-3, max_steps=150, per_device_train_batch_size=8, n_neg_per_pos=3,
              loss_type="infonce", temperature=0.05, warmup_steps=10, lr_scheduler="constant", max_length=64,
              logging_steps=10, save_steps=0, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_task, synthetic_base):
    out = tmp_path_factory.mktemp("e2e") / "onegen"
    cfg = TrainConfig(base_model=str(synthetic_base), train_file=str(synthetic_task.train_file),
                      db_file=str(synthetic_task.db_file), output_dir=str(out), **RECIPE)
    t0 = time.perf_counter()
    result = run_training(cfg, progress=False)
    return result, time.perf_counter() - t0, cfg


def test_training_takes_retrieval_from_chance_to_recall(trained):
    result, wall, _ = trained
    start, final = result.eval_start, result.eval_final
    assert start["eval_queries"] >= 20 and start["eval_pool"] == 48
    assert start["recall@1"] <= 0.15  # chance is 1/48
    assert final["recall@1"] >= 0.9, final
    assert final["recall@5"] >= final["recall@1"]
    assert final["eval_lm_loss"] < 0.25 * start["eval_lm_loss"]
    print(f"training: {result.steps} steps in {result.train_seconds:.1f}s")
    out = result.output_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "onegen.json", "metrics.jsonl",
                 "loss_curves.png", "training_summary.json"):
        assert (out / name).is_file(), name
    with open(out / "loss_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"lm_loss", "contrastive_loss", "lr", "tokens_per_s"} <= set(train[0])
    assert train[-1]["contrastive_loss"] < train[0]["contrastive_loss"]


def test_checkpoint_loads_plainly_and_emits_the_query_token(trained, synthetic_task):
    from transformers import AutoModelForCausalLM

    from onegen_core.text.rendering import Renderer

    result, _, _ = trained
    ckpt = load_checkpoint(result.output_dir)
    model = AutoModelForCausalLM.from_pretrained(result.output_dir)  # plain transformers loads it
    renderer = Renderer.for_checkpoint(ckpt)
    rq = ckpt.token_ids.by_name["[RQ]"]
    convs = synthetic_task.conversations[:16]
    firsts = []
    for c in convs:
        ids = renderer.chat(c["messages"][:1]).ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        firsts.append(int(logits.argmax()))
    assert firsts == [rq] * len(convs)  # the data puts the query token first in every answer


def test_engine_answers_with_retrieval(trained, synthetic_task, tmp_path):
    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.engine.params import RetrievalParams, SamplingParams
    from onegen_core.retrieval.encoder import Encoder

    result, _, _ = trained
    ckpt = load_checkpoint(result.output_dir)
    ids = list(synthetic_task.docs)
    enc = Encoder.from_checkpoint(ckpt)
    vecs = enc.encode_documents([(synthetic_task.docs[i], None) for i in ids])
    index = write_index_dir(tmp_path / "index", vecs, [Document(id=i, text=synthetic_task.docs[i]) for i in ids],
                            checkpoint_fingerprint=ckpt.fingerprint)
    engine = Engine.from_checkpoint(result.output_dir, index_dir=index, config=EngineConfig(device="cpu"))
    convs = synthetic_task.conversations[:24]
    results = engine.generate(messages=[c["messages"][:1] for c in convs],
                              sampling=SamplingParams(max_tokens=24, temperature=0.0),
                              retrieval=RetrievalParams(k=1, max_retrievals=1))
    right_doc = right_answer = 0
    for c, r in zip(convs, results, strict=True):
        assistant = c["messages"][1]
        assert r.retrievals, f"no retrieval for {c['messages'][0]['content']!r}: {r.text!r}"
        rec = r.retrievals[0]
        assert rec.output_token_index == 0 and rec.query_token == "[RQ]"
        right_doc += rec.hits[0].doc_id == assistant["positive"][0][0]
        answer = assistant["content"].split("</paragraph>")[1]
        right_answer += r.text.strip().endswith(answer)
    assert right_doc / len(convs) >= 0.9, right_doc
    assert right_answer / len(convs) >= 0.8, right_answer


def test_index_vectors_are_the_training_vectors(trained, synthetic_task):
    """The engine's encoder and the model training shaped agree on the document vectors (same rendering, same
    final-layer hidden state at [RD])."""
    from transformers import AutoModelForCausalLM

    from onegen_core.retrieval.encoder import Encoder
    from onegen_core.text.rendering import Renderer

    result, _, _ = trained
    ckpt = load_checkpoint(result.output_dir)
    texts = list(synthetic_task.docs.values())[:8]
    enc = Encoder.from_checkpoint(ckpt).encode_documents([(t, None) for t in texts])
    model = AutoModelForCausalLM.from_pretrained(result.output_dir)
    renderer = Renderer.for_checkpoint(ckpt)
    ref = []
    for t in texts:
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([renderer.document(t)])).last_hidden_state[0, -1]
        ref.append(torch.nn.functional.normalize(h, dim=-1).numpy())
    np.testing.assert_allclose(enc, np.stack(ref), atol=1e-5)
