"""Self-distillation: the base model's own answers, generated offline with the engine, as training targets.

The mixed recipe (``training.mix``) trains the model on conversations that need no retrieval with
the answers the *base* model gives them, so fine-tuning for retrieval keeps what the base could
do (the answers are greedy, with retrieval off). The engine generates far faster than training
runs: batches of conversations go through ``Engine.generate``.

Answers are cached in a JSONL file, one line per conversation keyed by a hash of its messages and
the generation settings, appended as each batch finishes: an interrupted run resumes where it
stopped, and a rerun with the same inputs generates nothing. An answer that hits ``max_tokens``
is cut back to its last complete sentence (``whole_sentences``) when that keeps at least half of
it, and is ``None`` otherwise (the conversation is left out of training: a target cut mid-sentence
would teach the model to stop mid-sentence). SmolLM2-135M runs past 160 tokens on about half of
the factual questions, usually after a first sentence that answers them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

Messages = Sequence[dict[str, str]]


def conversation_key(messages: Messages, max_tokens: int) -> str:
    blob = json.dumps({"m": [[m["role"], m["content"]] for m in messages], "t": max_tokens}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def whole_sentences(text: str, finished: bool) -> str | None:
    """The answer to train on: ``text`` if the model finished it, else its complete sentences when they keep at
    least half of it (a list or a sentence cut in the middle is dropped: ``None``)."""
    text = text.strip()
    if finished or not text:
        return text or None
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    return text[: cut + 1] if cut + 1 >= len(text) / 2 else None


def _read_cache(path: Path) -> dict[str, tuple[str, bool]]:
    """key -> (generated text, finished); lines cut by a crash mid-write are generated again."""
    out: dict[str, tuple[str, bool]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "text" in row:
                out[row["key"]] = (row["text"], row["finish_reason"] == "stop")
    return out


def distill(base_checkpoint: str | os.PathLike, conversations: Sequence[Messages], cache: str | os.PathLike, *,
            max_tokens: int = 160, batch_size: int = 32, dtype: str = "auto", device: str = "auto",
            progress: bool = True) -> list[str | None]:
    """The base model's greedy answer (no retrieval) to each conversation, in order (``whole_sentences``).

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
    return [whole_sentences(*done[k]) for k in keys]


def _generate(base_checkpoint: str | os.PathLike, items: list[tuple[str, Messages]], cache: Path,
              done: dict[str, tuple[str, bool]], *, max_tokens: int, batch_size: int, dtype: str, device: str,
              progress: bool) -> None:
    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.engine.params import RetrievalParams, SamplingParams

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
                    done[key] = (res.text, res.finish_reason == "stop")
                    row = {"key": key, "text": res.text, "finish_reason": res.finish_reason}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(chunk))
    finally:
        bar.close()
