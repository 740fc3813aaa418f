"""Corpus, prompts, the step loop and a search recorder shared by the engine tests."""

from contextlib import contextmanager

CORPUS = [
    "Paris is the capital of France.",
    "Berlin is the capital of Germany and lies on a river.",
    "Rome is the capital of Italy.",
    "The quick brown fox jumps over the lazy dog.",
    "Zorblat lives in Quenta and works as a baker.",
    "Mirelle was born in Odrin and plays the harp.",
]

PROMPTS = [
    "Question: who wrote the book?",
    "Paris is",
    "The river flows to the sea and",
    "Zorblat lives in",
    "Numbers 0 1 2",
    "Mirelle was born",
    "The quick brown fox jumps over the lazy dog. A retrieval augmented model reads",
    "Madrid",
    "Rome is the capital of Italy. Madrid is the capital of Spain. Who",
    "Entity mention linking",
]


def step_until(engine, request_id: str):
    """Step ``engine`` until the request's ``Finished`` / ``SearchDone`` comes out, and return that event."""
    from onegen_core.engine.outputs import Finished, SearchDone

    for _ in range(1000):
        for ev in engine.step():
            if isinstance(ev, Finished | SearchDone) and ev.request_id == request_id:
                return ev
    raise AssertionError(f"{request_id} did not finish in 1000 steps")


@contextmanager
def retrieve_batches(engine, field: str):
    """Inside the block, record for every batched search ``engine`` makes the set of its requests'
    ``retrieval.<field>`` (e.g. ``"mode"``, ``"index"``): the list shows whether one step served several kinds."""
    batches: list[set] = []
    real = engine._retrieve

    def spy(seqs, queries):
        batches.append({getattr(s.retrieval, field) for s in seqs})
        return real(seqs, queries)

    engine._retrieve = spy
    try:
        yield batches
    finally:
        del engine._retrieve
