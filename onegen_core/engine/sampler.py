"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, token masks.

Random rows use the exponential-race trick (``argmax(p / E)`` with ``E ~ Exp(1)``),
which samples from ``p`` without ``torch.multinomial`` and its host sync. A request
with a seed draws its noise from its own generator, one draw per sampled token, so its
output does not depend on what else is in the batch.

Traffic per call: the per-row parameters that are needed (which rows may not retrieve,
temperatures / top-k / top-p of the random rows, the rows that want logprobs) go up in
one upload, none for a batch of greedy rows that agree on retrieval; the sampled ids and logprobs come
back in one download. Tokens are banned with mask ops over a fixed id set, never with
per-row Python indexing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..transfers import TransferCounter, download, upload


@dataclass
class SamplingRow:
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    may_retrieve: bool = True  # False: the retrieval (query) tokens are masked out of this row
    want_logprob: bool = False


class Sampler:
    def __init__(self, vocab_size: int, always_banned: list[int], retrieval_ids: list[int], device: torch.device,
                 seed: int = 0, counter: TransferCounter | None = None):
        self.vocab_size = vocab_size
        self.device = device
        self.counter = counter
        self.always_banned = torch.tensor(sorted(set(always_banned)), dtype=torch.long, device=device)
        self.retrieval_ids = torch.tensor(sorted(set(retrieval_ids)), dtype=torch.long, device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[float | None]]:
        """logits: [B, V] float32 -> (sampled ids, logprob of each sampled id or None)."""
        logits = logits[:, : self.vocab_size].clone()
        if self.always_banned.numel():
            logits[:, self.always_banned] = float("-inf")
        random_rows = [i for i, r in enumerate(rows) if r.temperature > 0 and r.top_k != 1]
        want = [i for i, r in enumerate(rows) if r.want_logprob]
        no_retrieval = [not r.may_retrieve for r in rows]

        mixed = any(no_retrieval) and not all(no_retrieval) and self.retrieval_ids.numel() > 0
        host: list[torch.Tensor] = []  # what this call needs on the device, in one upload
        if mixed:
            host.append(torch.tensor(no_retrieval, dtype=torch.bool))
        if random_rows:
            host += [torch.tensor(random_rows, dtype=torch.long),
                     torch.tensor([rows[i].temperature for i in random_rows], dtype=torch.float32),
                     torch.tensor([rows[i].top_k for i in random_rows], dtype=torch.long),
                     torch.tensor([rows[i].top_p for i in random_rows], dtype=torch.float32)]
        if want:
            host.append(torch.tensor(want, dtype=torch.long))
        dev = iter(upload(host, self.device, self.counter))

        if mixed:  # some rows may retrieve, some may not
            banned_rows = next(dev)
            cols = logits[:, self.retrieval_ids]
            logits[:, self.retrieval_ids] = cols.masked_fill(banned_rows[:, None], float("-inf"))
        elif all(no_retrieval) and self.retrieval_ids.numel():  # no row may: no per-row flags to send
            logits[:, self.retrieval_ids] = float("-inf")
        out = logits.argmax(dim=-1)  # [B] greedy
        if random_rows:
            idx, temps, top_k, top_p = next(dev), next(dev), next(dev), next(dev)
            sub = _apply_top_k_top_p(logits.index_select(0, idx) / temps[:, None], top_k, top_p)
            probs = sub.softmax(dim=-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(random_rows):
                noise[j].exponential_(generator=rows[i].generator or self.generator)
            out = out.index_copy(0, idx, (probs / noise).argmax(dim=-1))
        back = out.double()
        if want:
            w = next(dev)
            lp = torch.log_softmax(logits.index_select(0, w), dim=-1).gather(1, out.index_select(0, w)[:, None])
            back = torch.cat([back, lp.squeeze(1).double()])
        values = download(back, self.counter).tolist()  # ids are exact in float64
        B = len(rows)
        logprobs: list[float | None] = [None] * B
        for j, i in enumerate(want):
            logprobs[i] = values[B + j]
        return [int(v) for v in values[:B]], logprobs


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k / nucleus. top_k 0 = off, top_p 1.0 = off."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    mask = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    mask |= (cum - probs) >= top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    mask[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
