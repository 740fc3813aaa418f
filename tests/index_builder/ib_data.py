"""Small corpora for the index builder's tests, written on the fly."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over lazy dog paris capital france berlin germany rome italy river flows sea "
    "question answer author wrote book year zorblat lives quenta baker mirelle born odrin plays harp"
).split()


def make_records(n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 60, prefix: str = "d") -> list[dict]:
    """``n`` corpus records with varied lengths (so that length sorting has something to do)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))}
        if i % 3 == 0:
            rec["title"] = f"Title {i % 5}"
        if i % 4 == 0:
            rec["metadata"] = {"n": i}
        out.append(rec)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
