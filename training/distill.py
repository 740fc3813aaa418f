"""Self-distillation: the base model's own answers, generated offline with the engine, as training targets.

The mixed recipe (``training.mix``) trains the model on conversations that need no retrieval with
the answers the *base* model gives them, so fine-tuning for retrieval keeps what the base could
do (the answers are greedy, with retrieval off). The engine generates far faster than training
runs: batches of conversations go through ``Engine.generate``.

Answers are cached in a JSONL file, one line per conversation keyed by a hash of its messages and
the generation settings, appended as each batch finishes: an interrupted run resumes where it
stopped, and a rerun with the same inputs generates nothing. An answer that hits ``max_tokens``
is kept as ``None`` (the conversation is left out of training: a cut-off answer would teach the
model to stop mid-sentence).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

Messages = Sequence[dict[str, str]]


def conversation_key(messages: Messages, max_tokens: int) -> str:
    blob = json.dumps({"m": [[m["role"], m["content"]] for m in messages], "t": max_tokens}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write: that answer is generated again
                continue
            out[row["key"]] = row["answer"]
    return out


def distill(base_checkpoint: str | os.PathLike, conversations: Sequence[Messages], cache: str | os.PathLike, *,
            max_tokens: int = 160, batch_size: int = 32, dtype: str = "auto", device: str = "auto",
            progress: bool = True) -> list[str | None]:
    """The base model's greedy answer (no retrieval) to each conversation, in order; ``None`` where it was cut off.

    ``cache`` (JSONL) holds the answers generated so far and is appended to batch by batch.
    """
    cache = Path(cache)
    keys = [conversation_key(m, max_tokens) for m in conversations]
    done = _read_cache(cache)
    todo = list(dict.fromkeys(k for k in keys if k not in done))
    if todo:
        first = {k: m for k, m in zip(keys, conversations, strict=True)}
        _generate(base_checkpoint, [(k, first[k]) for k in todo], cache, done, max_tokens=max_tokens,
                  batch_size=batch_size, dtype=dtype, device=device, progress=progress)
    return [done[k] for k in keys]


def _generate(base_checkpoint: str | os.PathLike, items: list[tuple[str, Messages]], cache: Path,
              done: dict[str, str | None], *, max_tokens: int, batch_size: int, dtype: str, device: str,
              progress: bool) -> None:
    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.params import RetrievalParams, SamplingParams

    cfg = EngineConfig(dtype=dtype, device=device, max_num_seqs=max(batch_size, 1))
    engine = Engine.from_checkpoint(base_checkpoint, None, cfg)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    cache.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(items), desc="self-distillation", unit="answer", disable=not progress, dynamic_ncols=True)
    try:
        with open(cache, "a", encoding="utf-8") as f:
            for lo in range(0, len(items), batch_size):
                chunk = items[lo: lo + batch_size]
                results = engine.generate(messages=[list(m) for _, m in chunk], sampling=sampling,
                                          retrieval=RetrievalParams(enabled=False))
                for (key, _), res in zip(chunk, results, strict=True):
                    answer = _answer_of(res)
                    done[key] = answer
                    f.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(chunk))
    finally:
        bar.close()


def _answer_of(result: Any) -> str | None:
    text = result.text.strip()
    if result.finish_reason != "stop" or not text:
        return None
    return text
