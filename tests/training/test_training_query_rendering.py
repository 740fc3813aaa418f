"""One rendering rule for queries: ``/retrieve`` encodes the tokens that chat training puts before [RQ].

Regression for the default model's trial run: training placed ``[RQ]`` inside the chat template
while ``Encoder.encode_queries`` rendered ``query + [RQ]`` as plain text, so ``/retrieve`` and
in-generation retrieval computed different vectors. Also: length-bucketed training forwards equal
one padded forward (the buckets themselves: tests/core/test_bucketing.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.spec import OneGenSpec
from onegen_core.retrieval.encoder import Encoder
from onegen_core.text.conversation import render_conversation
from onegen_core.text.rendering import Renderer
from training import modeling
from training.config import TrainConfig
from training.modeling import OneGenModel, resolve_spec

QUESTIONS = ["Where does Karho live?", "What is the job of Mirelle, the harpist of Odrin?"]


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", spec=OneGenSpec(query_format="chat"), key="llama-chat-queries")


def test_retrieve_query_vector_is_the_chat_trained_query_vector(chat_checkpoint):
    from transformers import AutoModelForCausalLM

    ckpt = load_checkpoint(chat_checkpoint)
    renderer = Renderer.for_checkpoint(ckpt)
    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32)
    vectors = Encoder.from_checkpoint(ckpt).encode_queries(QUESTIONS)
    for q, vec in zip(QUESTIONS, vectors, strict=True):
        conv = render_conversation(renderer, [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "[RQ]<paragraph>The home of Karho is Quenby.</paragraph>Quenby."},
        ], format="chat_template")
        (p,) = conv.query_positions
        assert conv.ids[: p + 1] == renderer.query(q)  # the same tokens ...
        with torch.no_grad():
            h = model(torch.tensor([conv.ids]), output_hidden_states=True).hidden_states[-1][0, p]
        trained = torch.nn.functional.normalize(h, dim=-1).numpy()
        np.testing.assert_allclose(vec, trained, atol=1e-5)  # ... and the same vector


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(base_model="b", train_file="t", db_file="d", output_dir="o", **kw)


def test_training_writes_the_query_format_its_conversations_use(tmp_path):
    assert resolve_spec(_cfg(), tmp_path).query_format == "chat"  # chat_template is the default format
    assert resolve_spec(_cfg(conversation_format="concat"), tmp_path).query_format == "template"
    explicit = _cfg(conversation_format="chat_template", spec={"query_format": "template"})
    assert resolve_spec(explicit, tmp_path).query_format == "template"  # an explicit spec field wins


def test_bucketed_forward_equals_one_padded_forward(tiny_checkpoint, monkeypatch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    runner = OneGenModel(lm)
    lengths = [60, 57, 12, 9, 30, 11]
    R, L = len(lengths), max(lengths)
    vocab = lm.config.vocab_size
    ids = torch.randint(0, vocab, (R, L))
    mask = torch.zeros(R, L, dtype=torch.long)
    labels = torch.full((R, L), -100)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
        if r < 2:  # conversations carry LM targets
            labels[r, 1:n] = ids[r, 1:n]
    args = dict(input_ids=ids, attention_mask=mask, labels=labels, query_rows=torch.tensor([0, 1]),
                query_cols=torch.tensor([20, 56]), doc_rows=torch.tensor([2, 3, 4, 5, 4]),
                doc_cols=torch.tensor([11, 8, 29, 10, 5]))
    with torch.no_grad():
        bucketed = runner(**args)
        monkeypatch.setattr(modeling, "length_buckets", lambda lens, **_: [list(range(len(lens)))])
        padded = runner(**args)
    assert int(bucketed[1]) == int(padded[1]) > 0
    torch.testing.assert_close(bucketed[0], padded[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(bucketed[2], padded[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bucketed[3], padded[3], atol=1e-5, rtol=1e-5)
