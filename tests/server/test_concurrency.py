"""32 concurrent requests, all answered, each exactly its sequential (greedy) answer."""

from __future__ import annotations

import asyncio

import httpx
from server_harness import sse_events

from server.demo import DEMO_CORPUS

PROMPTS = [f"{d.title}: {d.text[:30]}" for d in DEMO_CORPUS] + [f"Question {i}: who wrote the book?" for i in range(16)]


def _body(i: int, prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": 8 + (i % 4) * 6}  # different lengths finish at different steps


def test_32_concurrent_equal_sequential(live_server, client):
    assert len(PROMPTS) == 32
    sequential = []
    for i, p in enumerate(PROMPTS):
        r = client.post("/generate", json=_body(i, p))
        assert r.status_code == 200, r.text
        sequential.append(r.json())

    async def one(ac: httpx.AsyncClient, i: int, p: str) -> tuple[str, int, list]:
        if i % 2:  # half of them streamed
            text, trace = "", []
            async with ac.stream("POST", "/generate", json={**_body(i, p), "stream": True}) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines()]
            for e in sse_events(lines):
                if isinstance(e, dict) and e["type"] == "token":
                    text += e["text"]
                elif isinstance(e, dict) and e["type"] == "final":
                    trace = e["retrievals"]
            return text, sum(len(t["hits"]) for t in trace), [h["doc_id"] for t in trace for h in t["hits"]]
        r = await ac.post("/generate", json=_body(i, p))
        assert r.status_code == 200, r.text
        out = r.json()
        return out["text"], sum(len(t["hits"]) for t in out["retrievals"]), \
            [h["doc_id"] for t in out["retrievals"] for h in t["hits"]]

    async def main() -> list:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=120,
                                     limits=limits) as ac:
            return await asyncio.wait_for(asyncio.gather(*(one(ac, i, p) for i, p in enumerate(PROMPTS))), 180)

    concurrent = asyncio.run(main())
    assert len(concurrent) == 32
    for i, (seq, (text, _, docs)) in enumerate(zip(sequential, concurrent, strict=True)):
        assert text == seq["text"], f"request {i} differs when batched"
        assert docs == [h["doc_id"] for t in seq["retrievals"] for h in t["hits"]], i
    assert any(s["retrievals"] for s in sequential), "some of them retrieve"
