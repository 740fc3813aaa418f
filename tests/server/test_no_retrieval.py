"""Over HTTP, an answer for which the model emitted no query token, with retrieval on, says so: an empty
retrieval trace and no retrieved tokens in the usage of /generate, and the same text on the OpenAI route."""

from __future__ import annotations

import pytest
from server_harness import ServerProcess

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document, write_index_dir
from onegen_core.retrieval.encoder import Encoder

DOCS = ["Paris is the capital of France.", "Berlin is the capital of Germany.", "The harp has strings."]


@pytest.fixture(scope="module")
def quiet_model(tiny_checkpoint, tmp_path_factory):
    """A tiny random model that does not happen to emit its query token on the prompt below, and an index."""
    ckpt = load_checkpoint(tiny_checkpoint)
    docs = [Document(id=f"d{i}", text=t, title=f"T{i}") for i, t in enumerate(DOCS)]
    vecs = Encoder.from_checkpoint(ckpt).encode_documents([(d.text, d.title) for d in docs])
    index = write_index_dir(tmp_path_factory.mktemp("quiet") / "idx", vecs, docs,
                            checkpoint_fingerprint=ckpt.fingerprint, special_token_ids=ckpt.token_ids.by_name)
    return tiny_checkpoint, index


def test_http_reports_an_answer_without_retrieval(quiet_model, tmp_path):
    ckpt, index = quiet_model
    srv = ServerProcess(["--checkpoint", str(ckpt), "--index", str(index), "--dtype", "float32"],
                        tmp_path / "server.log")
    try:
        srv.wait_ready()
        with srv.client() as c:
            body = {"messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 12, "temperature": 0,
                    "retrieval": {"enabled": True, "return_passages": True}}
            out = c.post("/generate", json=body).json()
            model = c.get("/v1/models").json()["data"][0]["id"]
            chat = c.post("/v1/chat/completions", json={"model": model, "messages": body["messages"], "max_tokens": 12,
                                                        "temperature": 0}).json()
    finally:
        srv.stop()
    assert out["retrievals"] == [] and out["usage"]["retrieved_tokens"] == 0, out
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert chat["choices"][0]["message"]["content"] == out["text"]
