"""The engine thread only steps: inputs are tokenised and checked on the tokenizer thread, searches run as steps.

Regression for "one request freezes every stream": a ``/retrieve`` batch used to be
encoded inside the engine thread in one piece, and a 1 MB prompt tokenised there
before its 422. These tests record which thread does what, with the real engine.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from onegen_core.engine import ContextLengthExceeded, Engine, EngineConfig
from onegen_core.engine.outputs import Finished
from onegen_core.engine.params import SamplingParams
from onegen_core.retrieval.encoder import InputTooLong
from server.metrics import Metrics
from server.worker import EngineWorker


class ThreadLog:
    """Wraps engine methods to record the name of the thread each call ran on."""

    def __init__(self, engine: Engine, names: list[str]):
        self.calls: list[tuple[str, str]] = []
        for name in names:
            real = getattr(engine, name)

            def spy(*a, _real=real, _name=name, **kw):
                self.calls.append((_name, threading.current_thread().name))
                return _real(*a, **kw)

            setattr(engine, name, spy)

    def threads(self, name: str) -> set[str]:
        return {t for n, t in self.calls if n == name}


@pytest.fixture()
def worker_env(demo_assets):
    ckpt, index = demo_assets
    box: dict = {}

    def factory():
        engine = Engine.from_checkpoint(ckpt, index, EngineConfig(num_kv_blocks=256, max_num_batched_tokens=64))
        box["log"] = ThreadLog(engine, ["prepare_request", "prepare_queries", "add_request", "add_search", "step"])
        return engine

    loop = asyncio.new_event_loop()
    worker = EngineWorker(factory, Metrics("test"))
    worker.start(loop)
    deadline = time.monotonic() + 120
    while worker.state == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.state == "ready", worker.error
    try:
        yield worker, box["log"], loop
    finally:
        worker.stop()
        loop.close()


def test_tokenising_runs_off_the_engine_thread_and_searches_run_as_steps(worker_env):
    worker, calls, loop = worker_env

    async def go():
        events: asyncio.Queue = asyncio.Queue()
        await worker.submit("g1", events, prompt="Question: who wrote the book?",
                            sampling=SamplingParams(max_tokens=4))
        hits = await worker.search(["who wrote the book?", "capital of France"], 2, True)
        while not isinstance(ev := await events.get(), Finished):
            pass
        return hits, ev

    hits, finished = loop.run_until_complete(go())
    assert finished.result.finish_reason in ("stop", "length")
    assert len(hits) == 2 and all(len(row) == 2 and row[0].text for row in hits)
    assert calls.threads("prepare_request") == calls.threads("prepare_queries") == {"onegen-tokenize_0"}
    assert calls.threads("add_request") == calls.threads("add_search") == calls.threads("step") == {"onegen-engine"}
    worker.stop()  # the engine is this thread's from here
    want = worker.engine.search(["who wrote the book?", "capital of France"], 2, True)  # same path, same answers
    assert [[h.doc_id for h in row] for row in hits] == [[h.doc_id for h in row] for row in want]


def test_oversized_inputs_are_refused_before_the_engine_thread_sees_them(worker_env):
    worker, calls, loop = worker_env
    engine = worker.engine

    async def go():
        with pytest.raises(ContextLengthExceeded, match="characters"):
            await worker.submit("big", asyncio.Queue(), prompt="x" * (2**20))
        with pytest.raises(InputTooLong) as e:
            await worker.search(["ok", "word " * (engine.max_model_len + 5)], 1, False)
        assert e.value.index == 1

    loop.run_until_complete(go())
    assert not calls.threads("add_request") and not calls.threads("add_search")
