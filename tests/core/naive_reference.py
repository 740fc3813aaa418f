"""The naive reference: recompute the whole sequence with transformers every token, no cache.

Same rules as the engine (banned tokens, query-token masking after the retrieval
budget, passages inserted after the query token, logits at the query token not
sampled), written as plainly as possible so that the engine can be checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def naive_generate(hf_model, engine, prompt: str, *, max_tokens: int, max_retrievals: int, k: int = 1,
                   queries_out: list | None = None) -> list[int]:
    tid = engine.token_ids
    ids = list(engine.renderer.prompt(prompt).ids)
    banned = [tid.document, tid.passage_open, tid.passage_close, *tid.follow_up.values()]
    out: list[int] = []
    n_ret = 0
    while len(out) < max_tokens:
        logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
        logits[banned] = float("-inf")
        if n_ret >= max_retrievals:
            logits[tid.query_ids] = float("-inf")
        t = int(logits.argmax())
        ids.append(t)
        out.append(t)
        if t in engine.eos_ids:
            break
        if t in tid.query and n_ret < max_retrievals and len(out) < max_tokens:
            h = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
            q = F.normalize(h.float(), dim=-1)
            if queries_out is not None:
                queries_out.append(q)
            hits = engine.retriever.search(q[None], k)[0]
            n_ret += 1
            if tid.query[t].action == "insert":
                for hit in hits:
                    ids += engine.renderer.passage(hit.text, hit.title)
            elif t in tid.follow_up:  # annotate: nothing inserted; the follow-up token is forced
                ids.append(tid.follow_up[t])
                out.append(tid.follow_up[t])
    return out
