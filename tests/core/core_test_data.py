"""Corpus, prompts and the step loop shared by the engine tests."""

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
