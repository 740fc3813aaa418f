"""``annotate`` query tokens (entity linking): search, record, insert nothing, force the follow-up."""

from __future__ import annotations

import torch
from core_test_data import CORPUS, PROMPTS
from naive_reference import naive_generate
from transformers import AutoModelForCausalLM

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document, write_index_dir
from onegen_core.formats.spec import PRESETS
from onegen_core.retrieval.encoder import Encoder
from onegen_core.testing import build_tiny_checkpoint, make_query_token_likely


def test_annotate_records_hits_and_forces_follow_up(tmp_path):
    d = build_tiny_checkpoint(tmp_path / "el", spec=PRESETS["entity-linking"], seed=1)
    make_query_token_likely(d, rank=0)
    ckpt = load_checkpoint(d)
    docs = [Document(id=f"e{i}", text=t) for i, t in enumerate(CORPUS)]
    vecs = Encoder.from_checkpoint(ckpt).encode_documents([x.text for x in docs])
    idx = write_index_dir(tmp_path / "idx", vecs, docs, checkpoint_fingerprint=ckpt.fingerprint)
    engine = Engine.from_checkpoint(ckpt, idx, EngineConfig(num_kv_blocks=64, block_size=8))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    lk, cont = ckpt.token_ids.by_name["[LK]"], ckpt.token_ids.by_name["[_CONTINUE_]"]
    n_annotations = 0
    for prompt in PROMPTS[:6]:
        res = engine.generate(prompt, SamplingParams(max_tokens=24), RetrievalParams(max_retrievals=3))[0]
        ref = naive_generate(hf, engine, prompt, max_tokens=24, max_retrievals=3)
        assert res.token_ids[: len(ref)] == ref[: len(res.token_ids)] and len(res.token_ids) == min(len(ref), 24)
        assert res.usage.retrieved_tokens == 0
        for rec in res.retrievals:
            assert rec.action == "annotate" and rec.inserted_tokens == 0 and rec.hits[0].doc_id.startswith("e")
            i = rec.output_token_index
            assert res.token_ids[i] == lk
            if i + 1 < len(res.token_ids):
                assert res.token_ids[i + 1] == cont
        n_annotations += len(res.retrievals)
    assert n_annotations >= 2
