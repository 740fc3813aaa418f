"""Host <-> device traffic per engine step: one upload of the step's inputs, one download of the sampled ids.

On the CPU the copies are skipped but counted at the same points, so these tests hold the
step to its minimum wherever they run; ``pack``/``unpack`` (the one-copy layout) are
checked byte for byte.
"""

from __future__ import annotations

import pytest
import torch
from core_test_data import PROMPTS

from onegen_core.engine import Engine, EngineConfig
from onegen_core.params import RetrievalParams, SamplingParams
from onegen_core.transfers import pack, unpack


def test_pack_unpack_round_trips_mixed_dtypes_and_shapes():
    tensors = [torch.arange(5, dtype=torch.long), torch.tensor([[True, False, True]]), torch.randn(3, 7),
               torch.tensor([7, -1], dtype=torch.int32), torch.empty(0, dtype=torch.long), torch.tensor([2.5])]
    buffer, offsets = pack(tensors)
    assert buffer.dtype == torch.uint8 and all(o % 16 == 0 for o in offsets)
    for got, want in zip(unpack(buffer.clone(), tensors, offsets), tensors, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


@pytest.fixture(scope="module")
def engine(retrieving_checkpoint, tiny_index):
    return Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(num_kv_blocks=256, block_size=8))


def _traffic_per_step(engine, sampling, retrieval, n=4):
    for p in PROMPTS[:n]:
        engine.add_request(p, sampling=sampling, retrieval=retrieval)
    engine.step()  # prefill
    per_step = []
    while engine.has_unfinished():
        before = engine.transfers.snapshot()
        engine.step()
        after = engine.transfers.snapshot()
        per_step.append((after[0] - before[0], after[1] - before[1]))
    return per_step


def test_a_greedy_decode_step_is_one_upload_and_one_download(engine):
    steps = _traffic_per_step(engine, SamplingParams(max_tokens=8, ignore_eos=True), RetrievalParams(enabled=False))
    assert steps and set(steps) == {(1, 1)}


def test_random_rows_and_logprobs_add_one_upload(engine):
    sampling = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3, logprobs=True)
    steps = _traffic_per_step(engine, sampling, RetrievalParams(enabled=False))
    assert steps and set(steps) == {(2, 1)}


def test_retrieval_steps_stay_at_one_transfer_each_way(engine):
    """The forced query token is appended without sampling (nothing comes down); the next step downloads the
    query vectors instead of sampled ids (every row inserts a passage, none samples); then decoding resumes."""
    qid = engine.token_ids.query_ids[0]
    sampling = SamplingParams(max_tokens=6, ignore_eos=True, forced_tokens={1: qid})
    steps = _traffic_per_step(engine, sampling, RetrievalParams(max_retrievals=1, k=1))
    assert steps[0] == (1, 0)
    assert set(steps[1:]) == {(1, 1)}
