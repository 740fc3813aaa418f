"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, token masks.

Random rows use the exponential-race trick (``argmax(p / E)`` with ``E ~ Exp(1)``),
which samples from ``p`` without ``torch.multinomial`` and its host sync. A request
with a seed draws its noise from its own generator, one draw per sampled token, so its
output does not depend on what else is in the batch. The only host transfer is the
sampled ids, once per step for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingRow:
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    banned: list[int]  # token ids masked out of this row (e.g. query tokens once retrieval is spent)
    want_logprob: bool = False


class Sampler:
    def __init__(self, vocab_size: int, always_banned: list[int], device: torch.device, seed: int = 0):
        self.vocab_size = vocab_size
        self.always_banned = torch.tensor(sorted(set(always_banned)), dtype=torch.long, device=device)
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[float | None]]:
        """logits: [B, V] float32 -> (sampled ids, logprob of each sampled id or None)."""
        B = logits.shape[0]
        logits = logits[:, : self.vocab_size].clone()
        if self.always_banned.numel():
            logits[:, self.always_banned] = float("-inf")
        for i, r in enumerate(rows):
            if r.banned:
                logits[i, r.banned] = float("-inf")
        greedy = logits.argmax(dim=-1)  # [B]
        random_rows = [i for i, r in enumerate(rows) if r.temperature > 0 and r.top_k != 1]
        out = greedy
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            sub = logits[idx]
            temps = torch.tensor([rows[i].temperature for i in random_rows], device=logits.device)
            sub = sub / temps[:, None]
            sub = _apply_top_k_top_p(
                sub,
                torch.tensor([rows[i].top_k for i in random_rows], device=logits.device),
                torch.tensor([rows[i].top_p for i in random_rows], device=logits.device, dtype=torch.float32),
            )
            probs = sub.softmax(dim=-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(random_rows):
                noise[j].exponential_(generator=rows[i].generator or self.generator)
            sampled = (probs / noise).argmax(dim=-1)
            out = greedy.clone()
            out[idx] = sampled
        logprobs: list[float | None] = [None] * B
        want = [i for i, r in enumerate(rows) if r.want_logprob]
        if want:
            w = torch.tensor(want, device=logits.device)
            lp = torch.log_softmax(logits[w], dim=-1).gather(1, out[w][:, None]).squeeze(1).tolist()
            for j, i in enumerate(want):
                logprobs[i] = lp[j]
        return out.tolist(), logprobs


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
