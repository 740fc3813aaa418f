"""Host <-> device traffic per engine step: one upload of the step's inputs, one download of the sampled ids.

``engine.transfers`` counts what goes through ``transfers.py``; these tests also watch the
step itself, so a copy or a sync that bypasses it fails them:

- below Python, a ``TorchDispatchMode`` sees every aten op of the step: each copy between
  host and device (``_to_copy`` / ``to`` / ``copy_`` across devices, a tensor made on the
  device from host data: ``lift_fresh``) and each read of one value (``item`` /
  ``_local_scalar_dense`` / ``is_nonzero``: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``);
- above it, ``Tensor.cpu`` / ``.to`` / ``.tolist`` / ``.numpy`` are wrapped. On a CPU no copy
  happens, so a ``.cpu()`` or ``.to("cpu")`` of device data is counted as the download it
  would be on a GPU, and a ``.tolist()`` / ``.numpy()`` of device data that no download
  brought to the host is a read of device data on the host: a sync on a GPU.

On a CPU, "device data" is what the step computes from what lives on the device — the
model's weights and the KV cache — followed through every op; the small inputs a step
builds on the host (ids, positions, attention metadata) are host data until uploaded.

``pack``/``unpack`` (the one-copy layout) are checked byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from core_test_data import PROMPTS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.transfers import pack, unpack

aten = torch.ops.aten
_SCALAR_READS = {aten.item, aten._local_scalar_dense, aten.is_nonzero}
_COPIES = {aten._to_copy, aten.to, aten.copy_, aten.lift_fresh, aten.lift_fresh_copy}


@dataclass
class Seen:
    """What a step did, as observed (not as counted by ``transfers.py``)."""

    uploads: int = 0  # host -> device copies (none on a CPU)
    downloads: int = 0  # device -> host copies; on a CPU the .cpu() / .to("cpu") calls that would make them
    scalar_reads: int = 0  # .item(), int(t), float(t), bool(t) of a device tensor: a sync each
    stray_reads: int = 0  # .tolist() / .numpy() of a device tensor that no download brought to the host


class StepWatch(TorchDispatchMode):
    def __init__(self, device: torch.device, resident: list[torch.Tensor]):
        super().__init__()
        self.device = device
        self.seen = Seen()
        # on a CPU: the tensors holding device data, by id (held, so no other tensor takes an id meanwhile)
        self.device_data = {id(t): t for t in resident}

    def on_device(self, t: torch.Tensor) -> bool:
        if t.device.type != self.device.type:
            return False
        return self.device.type != "cpu" or id(t) in self.device_data

    def downloaded(self, t: torch.Tensor) -> torch.Tensor:
        """On a CPU ``t.cpu()`` is ``t`` itself: what it returns instead is another tensor over the same memory,
        host data, while ``t`` stays device data (as on a GPU)."""
        host = t.detach()
        self.device_data.pop(id(host), None)
        return host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(id(a) in self.device_data for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)):
            self.device_data.update((id(o), o) for o in tree_leaves(out) if isinstance(o, torch.Tensor))
        op = func.overloadpacket
        if op in _SCALAR_READS and self.on_device(args[0]):
            self.seen.scalar_reads += 1
        elif op in _COPIES:
            src = args[1] if op is aten.copy_ else args[0]
            dst = args[0] if op is aten.copy_ else out
            src_type = "cpu" if op in (aten.lift_fresh, aten.lift_fresh_copy) else src.device.type  # from host data
            if src_type != dst.device.type:
                if dst.device.type == "cpu":
                    self.seen.downloads += 1
                else:
                    self.seen.uploads += 1
        return out


@contextmanager
def watching(engine: Engine) -> Iterator[Seen]:
    """Watch everything the code run inside does with tensors (see the module docstring)."""
    device = engine.device
    watch = StepWatch(device, [*engine.model.parameters(), *engine.model.buffers(), *engine.runner.kv_cache])
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "to", "tolist", "numpy")}
    patched = {name: name in torch.Tensor.__dict__ for name in originals}

    def download(name: str) -> Callable:
        def call(t: torch.Tensor, *args, **kwargs):
            to_host = name == "cpu" or str(torch._C._nn._parse_to(*args, **kwargs)[0]) == "cpu"
            counted = to_host and device.type == "cpu" and watch.on_device(t)  # on a GPU the dispatch sees the copy
            out = originals[name](t, *args, **kwargs)
            if counted:
                watch.seen.downloads += 1
                out = watch.downloaded(out)
            return out
        return call

    def host_read(name: str) -> Callable:
        def call(t: torch.Tensor, *args, **kwargs):
            if watch.on_device(t):
                watch.seen.stray_reads += 1
            return originals[name](t, *args, **kwargs)
        return call

    wrappers = {"cpu": download("cpu"), "to": download("to"), "tolist": host_read("tolist"),
                "numpy": host_read("numpy")}
    for name, fn in wrappers.items():
        setattr(torch.Tensor, name, fn)
    try:
        with watch:
            yield watch.seen
    finally:
        for name, fn in originals.items():
            if patched[name]:
                setattr(torch.Tensor, name, fn)
            else:
                delattr(torch.Tensor, name)


def unaccounted(counted: tuple[int, int], seen: Seen, device: torch.device) -> list[str]:
    """What a step did beyond what ``transfers.py`` counted (empty: nothing)."""
    up, down = counted
    problems = []
    if seen.scalar_reads:
        problems.append(f"{seen.scalar_reads} scalar read(s) of device tensors (.item(), int(), bool())")
    if seen.stray_reads:
        problems.append(f"{seen.stray_reads} .tolist() / .numpy() of device tensors")
    if seen.downloads != down:
        problems.append(f"{seen.downloads} downloads, {down} counted")
    if seen.uploads != (0 if device.type == "cpu" else up):
        problems.append(f"{seen.uploads} uploads, {up} counted")
    return problems


def test_pack_unpack_round_trips_mixed_dtypes_and_shapes():
    tensors = [torch.arange(5, dtype=torch.long), torch.tensor([[True, False, True]]), torch.randn(3, 7),
               torch.tensor([7, -1], dtype=torch.int32), torch.empty(0, dtype=torch.long), torch.tensor([2.5])]
    buffer, offsets = pack(tensors)
    assert buffer.dtype == torch.uint8 and all(o % 16 == 0 for o in offsets)
    for got, want in zip(unpack(buffer.clone(), tensors, offsets), tensors, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


@pytest.fixture(scope="module")
def engine(retrieving_checkpoint, tiny_index):
    """FAISS searches on the host: the query vectors come down once and nothing goes back up. (The torch
    retriever searches on the device; its own traffic is not held here.)"""
    return Engine.from_checkpoint(retrieving_checkpoint, tiny_index,
                                  EngineConfig(num_kv_blocks=256, block_size=8, retriever="faiss"))


def _traffic_per_step(engine, sampling, retrieval, n=4):
    """(uploads, downloads) that ``transfers.py`` counted in each step after the prefill; every step is also
    watched, and must have done nothing else."""
    for p in PROMPTS[:n]:
        engine.add_request(p, sampling=sampling, retrieval=retrieval)
    engine.step()  # prefill
    per_step = []
    while engine.has_unfinished():
        before = engine.transfers.snapshot()
        with watching(engine) as seen:
            engine.step()
        after = engine.transfers.snapshot()
        counted = (after[0] - before[0], after[1] - before[1])
        assert unaccounted(counted, seen, engine.device) == [], f"step {len(per_step) + 1} after the prefill"
        per_step.append(counted)
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


@pytest.mark.parametrize("stray", [
    lambda t: t.sum().item(),
    lambda t: bool((t > 0).any()),
    lambda t: int(t.argmax()),
    lambda t: t[0].tolist(),
    lambda t: np.asarray(t),
    lambda t: t.cpu(),
    lambda t: t.to("cpu"),
], ids=["item", "bool", "int", "tolist", "asarray", "cpu", "to-cpu"])
def test_a_stray_sync_in_a_decode_step_is_seen(engine, monkeypatch, stray):
    """The watch itself: one extra read of the logits on the hot path, on whatever device the tests run."""
    compute_logits = engine.runner.compute_logits

    def leaky(hidden):
        logits = compute_logits(hidden)
        stray(logits)
        return logits

    engine.add_request(PROMPTS[0], sampling=SamplingParams(max_tokens=4, ignore_eos=True),
                       retrieval=RetrievalParams(enabled=False))
    engine.step()  # prefill
    monkeypatch.setattr(engine.runner, "compute_logits", leaky)
    before = engine.transfers.snapshot()
    with watching(engine) as seen:
        engine.step()
    after = engine.transfers.snapshot()
    monkeypatch.undo()
    while engine.has_unfinished():
        engine.step()
    assert unaccounted((after[0] - before[0], after[1] - before[1]), seen, engine.device) != []
