"""The naive reference: recompute the whole sequence with transformers every token, no cache.

Same rules as the engine (banned tokens, query-token masking after the retrieval
budget, passages inserted after the query token, logits at the query token not
sampled), written as plainly as possible so that the engine can be checked against it.

It shares no code with the engine's pipeline, so a bug there cannot hide in both:

* prompts and passages are rendered here from the checkpoint's ``onegen.json`` templates
  with ``str.format`` and one ``tokenizer.encode`` (not ``onegen_core.text.rendering``);
* special token ids come from the tokenizer by name (not ``engine.token_ids``);
* search is a brute-force numpy inner product over the vectors of ``index.faiss`` read with
  plain ``faiss.read_index``, documents straight from ``docstore.sqlite`` (not ``engine.retriever``);
* the forward and the query vector are transformers' (``hf_model``).

From the engine it reads only configuration: the checkpoint's spec and tokenizer
(``engine.checkpoint``) and where its index directory is (``engine.index.path``).
"""

from __future__ import annotations

import sqlite3
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


@lru_cache(maxsize=8)
def _load_index(index_dir: str) -> tuple[np.ndarray, list[tuple[str | None, str]]]:
    """(vectors [n, d], [(title, text)] by vector id) of an index dir, read with plain faiss and sqlite3."""
    import faiss

    index = faiss.read_index(str(Path(index_dir) / "index.faiss"))
    vectors = index.reconstruct_n(0, index.ntotal)  # flat indexes: vector id == position
    con = sqlite3.connect(str(Path(index_dir) / "docstore.sqlite"))
    try:
        rows = con.execute("SELECT vector_id, title, text FROM documents ORDER BY vector_id").fetchall()
    finally:
        con.close()
    assert [r[0] for r in rows] == list(range(index.ntotal)), "the reference reads flat indexes only"
    return vectors, [(title, text) for _, title, text in rows]


def brute_force_search(index_dir: str | Path, query: np.ndarray, k: int) -> list[tuple[str | None, str]]:
    """The top-``k`` documents (title, text) by inner product with ``query``, best first."""
    vectors, docs = _load_index(str(index_dir))
    scores = vectors @ np.asarray(query, dtype=np.float32)
    return [docs[i] for i in np.argsort(-scores, kind="stable")[:k]]


def _special_strings(tok, spec) -> list[str]:
    return [s for s in {*spec.special_tokens, *tok.all_special_tokens, *map(str, tok.added_tokens_decoder.values())} if s]


def _check_plain(tok, spec, *texts: str | None) -> None:
    # The format's rule for user and corpus text is "never special tokens": the values filled into a
    # template are plain, the template's own text is markup. When the values spell no special token,
    # that is simply the tokenizer's encoding of the formatted string, so the reference keeps to such text.
    leaked = [s for s in _special_strings(tok, spec) for t in texts if t and s in t]
    assert not leaked, f"the naive reference only renders text without special-token strings, got {leaked}"


def render_prompt(tok, spec, prompt: str) -> list[int]:
    """BOS if ``add_bos``, then the prompt, formatted with ``prompt_template`` when there is one."""
    _check_plain(tok, spec, prompt)
    bos = [tok.bos_token_id] if spec.add_bos and tok.bos_token_id is not None else []
    text = spec.prompt_template.format(prompt=prompt) if spec.prompt_template else prompt
    return bos + tok.encode(text, add_special_tokens=False)


def render_passage(tok, spec, text: str | None, title: str | None) -> list[int]:
    """What an insert puts after the query token: open + passage_template(text, title) + close."""
    _check_plain(tok, spec, text, title)
    body = spec.passage_template.format(text=text or "", title=title or "")
    return [_id(tok, spec.passage_open)] + tok.encode(body, add_special_tokens=False) + [_id(tok, spec.passage_close)]


def _id(tok, name: str) -> int:
    ids = tok.encode(name, add_special_tokens=False)
    assert len(ids) == 1, f"{name!r} is not one token"
    return ids[0]


@torch.no_grad()
def naive_generate(hf_model, engine, prompt: str, *, max_tokens: int, max_retrievals: int, k: int = 1,
                   queries_out: list | None = None, index_dir: str | Path | None = None,
                   forced_tokens: dict[int, int] | None = None, search=None) -> list[int]:
    """Greedy tokens for ``prompt``; ``forced_tokens`` as ``SamplingParams.forced_tokens`` (output position ->
    token appended there instead of the argmax); ``search(query [d], k) -> [(title, text)]`` replaces the
    brute-force search over the engine's index dir (or ``index_dir``)."""
    spec, tok = engine.checkpoint.spec, engine.checkpoint.tokenizer
    if search is None:
        index_dir = index_dir if index_dir is not None else engine.index.path
        search = lambda q, k: brute_force_search(index_dir, q, k)  # noqa: E731
    forced_tokens = forced_tokens or {}
    query = {_id(tok, q.token): q for q in spec.query_tokens}
    follow_up = {qid: _id(tok, q.follow_up) for qid, q in query.items() if q.follow_up}
    banned = [_id(tok, spec.document_token), _id(tok, spec.passage_open), _id(tok, spec.passage_close),
              *follow_up.values()]
    eos = hf_model.config.eos_token_id
    eos_ids = {*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id} - {None}

    ids = render_prompt(tok, spec, prompt)
    out: list[int] = []
    n_ret = 0
    while len(out) < max_tokens:
        logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
        logits[banned] = float("-inf")
        if n_ret >= max_retrievals:
            logits[list(query)] = float("-inf")
        t = forced_tokens.get(len(out), int(logits.argmax()))
        ids.append(t)
        out.append(t)
        if t in eos_ids:
            break
        if t in query and n_ret < max_retrievals and len(out) < max_tokens:
            h = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1].float()
            q = h / h.norm()
            if queries_out is not None:
                queries_out.append(q)
            hits = search(q.numpy(), k)
            n_ret += 1
            if query[t].action == "insert":
                for title, text in hits:
                    ids += render_passage(tok, spec, text, title)
            elif t in follow_up:  # annotate: nothing inserted; the follow-up token is forced
                ids.append(follow_up[t])
                out.append(follow_up[t])
    return out
