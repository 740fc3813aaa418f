"""OneGen training data: ``db.jsonl`` documents and ``train.jsonl`` conversations, validated and tokenised.

Files are read as OneGen published them (Contract 3):

* ``db.jsonl`` — OneGen's ``{"uid": str, "messages": [{"role", "content"}, ...]}`` entries or
  corpus lines ``{"id", "text", "title"?}``, read and rendered by ``onegen_core.text.documents``, the
  reader the index builder uses too: each document RET token in an entry's text ends a *unit*
  (a retrievable vector), encoded after the units before it in one sequence; a document without
  one is a single unit that renders exactly as ``Renderer.document`` renders it. So the vectors
  training shapes are the vectors the index holds.
* ``train.jsonl`` — ``{"messages": [...]}``; each assistant message with query RET tokens
  carries ``positive`` (and optionally ``negative``): one list of unit ids per RET token. A row
  ``{"text": str}`` instead is plain text, learned as a language model (no template). An assistant
  message with ``"learn_answer": false`` teaches its query tokens only (``onegen_core.text.conversation``).

Unit ids: a db ``uid`` names its unit 0; ``"<uid>-<k>"`` names unit *k* (OneGen's
``doc-sent`` ids). A reference is resolved by exact lookup, never by splitting at a
separator, and a reference that could mean two units is an error naming both lines.

Every error is collected with ``file:line`` and reported together before anything is
written. Tokenised data is cached under a key over the data files' bytes, the
tokenizer, the spec and the data settings, and the cache is only read when the key matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from onegen_core.text.conversation import render_conversation
from onegen_core.text.documents import EntryError, parse_entry, render_units, split_units
from onegen_core.text.rendering import Renderer, RenderError

CACHE_VERSION = 4  # 3: db.jsonl read through onegen_core.text.documents; 4: {"text"} rows
MAX_REPORTED_ERRORS = 20
MAX_NAMED_TRUNCATIONS = 5
TRUNCATION_POLICIES = ("drop", "keep", "error")


class DataError(ValueError):
    """Bad training data: every problem found, each as ``file:line: message``."""

    def __init__(self, errors: list[str], total: int | None = None):
        self.errors = errors
        total = total if total is not None else len(errors)
        more = f"\n... and {total - len(errors)} more" if total > len(errors) else ""
        super().__init__(f"{total} problem(s) in the training data:\n" + "\n".join(errors) + more)


class _Errors:
    def __init__(self) -> None:
        self.shown: list[str] = []
        self.total = 0

    def add(self, msg: str) -> None:
        self.total += 1
        if len(self.shown) < MAX_REPORTED_ERRORS:
            self.shown.append(msg)

    def raise_if_any(self) -> None:
        if self.total:
            raise DataError(self.shown, self.total)


# --------------------------------------------------------------------------- documents
@dataclass
class Corpus:
    """The documents of db.jsonl, tokenised; unit ``u`` is the RET token at ``unit_pos[u]`` of doc ``unit_doc[u]``."""

    path: str
    uids: list[str]
    lines: list[int]
    ids: list[np.ndarray]  # per document: int32 token ids (template + text + RET tokens)
    unit_doc: np.ndarray  # [U] int64: document of each unit
    unit_pos: np.ndarray  # [U] int64: position of the unit's RET token in its document
    first_unit: np.ndarray  # [D + 1] int64: units of doc d are first_unit[d] : first_unit[d + 1]
    truncated: int = 0  # documents cut to max_length
    _by_uid: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._by_uid:
            self._by_uid = {u: i for i, u in enumerate(self.uids)}

    @property
    def num_units(self) -> int:
        return int(len(self.unit_doc))

    def units_of(self, doc: int) -> range:
        return range(int(self.first_unit[doc]), int(self.first_unit[doc + 1]))

    def resolve(self, ref: Any) -> tuple[int | None, str | None]:
        """Unit index of a reference, or (None, why)."""
        if isinstance(ref, bool) or not isinstance(ref, str | int):
            return None, f"unit ids are strings, got {ref!r}"
        ref = str(ref)
        found: dict[int, str] = {}
        d = self._by_uid.get(ref)
        if d is not None:
            found[int(self.first_unit[d])] = f"{self.path}:{self.lines[d]} (uid {ref!r}, unit 0)"
        head, sep, tail = ref.rpartition("-")
        if sep and tail.isdigit() and (tail == "0" or not tail.startswith("0")):
            d2 = self._by_uid.get(head)
            if d2 is not None:
                k = int(tail)
                n = int(self.first_unit[d2 + 1] - self.first_unit[d2])
                if k < n:
                    found[int(self.first_unit[d2]) + k] = f"{self.path}:{self.lines[d2]} (uid {head!r}, unit {k})"
                elif d is None:
                    return None, f"document {head!r} ({self.path}:{self.lines[d2]}) has {n} unit(s), no unit {k}"
        if not found:
            return None, f"unknown document {ref!r}: no such uid or unit id in {self.path}"
        if len(found) > 1:
            return None, f"unit id {ref!r} is ambiguous: it names {' and '.join(found.values())}; rename one uid"
        return next(iter(found)), None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, error) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.rstrip("\r\n")), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"{path}:{lineno}:{e.colno}: malformed JSON: {e.msg}"


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def load_corpus(path: Path, renderer: Renderer, max_length: int, errors: _Errors, *, progress: bool = True) -> Corpus:
    doc_id = renderer.token_ids.document
    uids: list[str] = []
    lines: list[int] = []
    ids: list[np.ndarray] = []
    unit_doc: list[int] = []
    unit_pos: list[int] = []
    first_unit = [0]
    seen: dict[str, int] = {}
    truncated = 0
    bar = tqdm(_read_jsonl(path), total=_count_lines(path), desc=f"reading {path.name}", unit="doc",
               disable=not progress, leave=False)
    for lineno, obj, err in bar:
        if err:
            errors.add(err)
            continue
        try:
            entry = parse_entry(obj)
            units = split_units(entry, renderer.spec.document_token)
        except EntryError as e:
            errors.add(f"{path}:{lineno}: {e.reason}")
            continue
        uid = entry.id
        if uid in seen:
            errors.add(f"{path}:{lineno}: duplicate uid {uid!r} (first at line {seen[uid]})")
            continue
        seen[uid] = lineno
        toks, positions = render_units(renderer, units.texts, entry.title, units.trailing)
        if len(toks) > max_length:
            truncated += 1
            if len(positions) == 1 and positions[0] == len(toks) - 1:
                toks = toks[: max_length - 1] + [doc_id]  # keep the RET token, cut the text
                positions = [max_length - 1]
            else:
                toks = toks[:max_length]
                positions = [p for p in positions if p < max_length]
            if not positions:
                errors.add(f"{path}:{lineno}: document {uid!r} has no RET token within max_length={max_length}")
                continue
        uids.append(uid)
        lines.append(lineno)
        ids.append(np.asarray(toks, dtype=np.int32))
        d = len(uids) - 1
        unit_doc.extend([d] * len(positions))
        unit_pos.extend(positions)
        first_unit.append(first_unit[-1] + len(positions))
    if not uids and not errors.total:
        errors.add(f"{path}: no documents")
    return Corpus(
        path=str(path), uids=uids, lines=lines, ids=ids,
        unit_doc=np.asarray(unit_doc, dtype=np.int64), unit_pos=np.asarray(unit_pos, dtype=np.int64),
        first_unit=np.asarray(first_unit, dtype=np.int64), truncated=truncated,
    )


# --------------------------------------------------------------------------- conversations
@dataclass
class Example:
    """One tokenised conversation: labels, and per kept query RET token its position and candidate units."""

    ids: np.ndarray  # [L] int32
    targets: np.ndarray  # [L] bool: LM target
    query_positions: list[int]
    positives: list[list[int]]  # unit indices per query (may be empty: LM only, no contrastive loss)
    negatives: list[list[int]]  # hard negative unit indices per query, in file order
    line: int

    def labels(self, ignore_index: int = -100) -> np.ndarray:
        return np.where(self.targets, self.ids, ignore_index).astype(np.int64)


def _unit_lists(value: Any, count: int, name: str, where: str, corpus: Corpus, errors: _Errors,
                allow_scalar: bool) -> list[list[int]]:
    if value is None:
        return [[] for _ in range(count)]
    if not isinstance(value, list):
        errors.add(f"{where}: '{name}' must be a list (one entry per RET token), got {type(value).__name__}")
        return [[] for _ in range(count)]
    if len(value) != count:
        errors.add(
            f"{where}: the message has {count} query RET token(s) but '{name}' has {len(value)} entr"
            f"{'y' if len(value) == 1 else 'ies'} (one list of unit ids per RET token)"
        )
        return [[] for _ in range(count)]
    out: list[list[int]] = []
    for j, entry in enumerate(value):
        if not isinstance(entry, list):
            if allow_scalar and isinstance(entry, str | int) and not isinstance(entry, bool):
                entry = [entry]
            else:
                errors.add(f"{where}: {name}[{j}] must be a list of unit ids, got {entry!r}")
                out.append([])
                continue
        units = []
        for ref in entry:
            u, why = corpus.resolve(ref)
            if u is None:
                errors.add(f"{where}: {name}[{j}]: {why}")
            else:
                units.append(u)
        out.append(units)
    return out


def load_examples(path: Path, renderer: Renderer, corpus: Corpus, *, max_length: int, conversation_format: str,
                  errors: _Errors, progress: bool = True, truncation: str = "drop") -> tuple[list[Example], dict]:
    """Tokenised conversations. One longer than ``max_length`` loses the end of its assistant turn, so
    ``truncation`` says what happens to it: ``drop`` it (counted and named), ``keep`` it cut, or
    ``error`` (each one reported as ``file:line``)."""
    examples: list[Example] = []
    stats: dict[str, Any] = {"queries": 0, "queries_truncated": 0, "conversations_truncated": 0,
                             "conversations_dropped": 0, "queries_without_positive": 0, "plain_texts": 0,
                             "truncated_examples": []}
    bar = tqdm(_read_jsonl(path), total=_count_lines(path), desc=f"reading {path.name}", unit="conv",
               disable=not progress, leave=False)
    for lineno, obj, err in bar:
        if err:
            errors.add(err)
            continue
        where = f"{path}:{lineno}"
        if isinstance(obj, dict) and "messages" not in obj and "text" in obj:
            example = _plain_text_example(obj["text"], renderer, where, lineno, max_length, errors, stats)
            if example is not None:
                examples.append(example)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            errors.add(f"{where}: expected an object with a 'messages' list (or a 'text' string: plain text)")
            continue
        messages = obj["messages"]
        try:
            conv = render_conversation(renderer, messages, format=conversation_format)  # type: ignore[arg-type]
        except RenderError as e:
            errors.add(f"{where}: {e}")
            continue
        if not any(conv.targets):
            errors.add(f"{where}: no assistant text to learn (no assistant message, or only passages)")
            continue
        positives: list[list[int]] = []
        negatives: list[list[int]] = []
        for mi, m in enumerate(messages):
            count = conv.query_messages.count(mi)
            if m["role"] != "assistant":
                continue
            mwhere = f"{where}: messages[{mi}]"
            if count and "positive" not in m:
                errors.add(f"{mwhere}: {count} query RET token(s) but no 'positive' list")
            positives += _unit_lists(m.get("positive"), count, "positive", mwhere, corpus, errors, allow_scalar=True)
            negatives += _unit_lists(m.get("negative"), count, "negative", mwhere, corpus, errors, allow_scalar=False)
        ids, targets, qpos = conv.ids, conv.targets, conv.query_positions
        assert len(positives) == len(negatives) == len(qpos)
        stats["queries"] += len(qpos)
        if len(ids) > max_length:
            stats["conversations_truncated"] += 1
            lost = int(np.sum(targets[max_length:]))
            if len(stats["truncated_examples"]) < MAX_NAMED_TRUNCATIONS:
                stats["truncated_examples"].append(f"{where}: {len(ids)} tokens, {lost} target token(s) cut")
            if truncation == "error":
                errors.add(f"{where}: {len(ids)} tokens > max_length={max_length}: {lost} target token(s) would be "
                           "cut (raise max_length, or set truncation: drop / keep)")
                continue
            if truncation == "drop":
                stats["conversations_dropped"] += 1
                continue
            keep = [i for i, p in enumerate(qpos) if p < max_length]
            stats["queries_truncated"] += len(qpos) - len(keep)
            ids, targets = ids[:max_length], targets[:max_length]
            qpos = [qpos[i] for i in keep]
            positives = [positives[i] for i in keep]
            negatives = [negatives[i] for i in keep]
        stats["queries_without_positive"] += sum(1 for p in positives if not p)
        examples.append(Example(
            ids=np.asarray(ids, dtype=np.int32), targets=np.asarray(targets, dtype=bool),
            query_positions=list(qpos), positives=positives, negatives=negatives, line=lineno,
        ))
    if not examples and not errors.total:
        errors.add(f"{path}: no conversations")
    return examples, stats


def _plain_text_example(text: Any, renderer: Renderer, where: str, lineno: int, max_length: int, errors: _Errors,
                        stats: dict[str, Any]) -> Example | None:
    """A ``{"text": ...}`` row: plain text learned as a language model (no template, no special tokens parsed,
    every token after the first a target). Longer than ``max_length`` it is cut: plain text has no answer to lose."""
    if not isinstance(text, str) or not text.strip():
        errors.add(f"{where}: 'text' must be a non-empty string")
        return None
    ids = renderer.text(text)
    if len(ids) < 2:
        errors.add(f"{where}: 'text' is {len(ids)} token(s); a language-model row needs at least 2")
        return None
    stats["plain_texts"] += 1
    ids = ids[:max_length]
    targets = np.ones(len(ids), dtype=bool)
    targets[0] = False
    return Example(ids=np.asarray(ids, dtype=np.int32), targets=targets, query_positions=[], positives=[],
                   negatives=[], line=lineno)


def warn_truncation(stats: dict[str, Any], max_length: int, policy: str, warn: Any) -> None:
    """One loud warning per split whose conversations did not fit ``max_length``, naming a few of them."""
    for split in ("train", "eval"):
        st = stats.get(split) or {}
        n = st.get("conversations_truncated", 0)
        if not n:
            continue
        what = "dropped" if policy == "drop" else "kept with their answers cut"
        warn("%d %s conversation(s) are longer than max_length=%d and were %s (truncation: %s); raise max_length "
             "to keep them whole. First ones: %s", n, split, max_length, what, policy,
             "; ".join(st.get("truncated_examples", [])))


# --------------------------------------------------------------------------- the data set, cached
@dataclass
class TrainingData:
    corpus: Corpus
    train: list[Example]
    eval: list[Example]
    stats: dict[str, Any]
    cache_key: str
    from_cache: bool = False


def _hash_file(h: Any, path: Path) -> None:
    h.update(str(path.name).encode() + b"\0")
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    h.update(b"\0")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocabulary and class stand in for the model
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str([tokenizer.bos_token, tokenizer.eos_token, tokenizer.all_special_tokens]).encode())
    return h.hexdigest()


def cache_key(files: list[Path], tokenizer: Any, spec_dict: dict[str, Any], settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(f"onegen-training-data-v{CACHE_VERSION}\0".encode())
    for p in files:
        _hash_file(h, p)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(spec_dict, sort_keys=True).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _pack(arrays: list[np.ndarray], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    if arrays:
        offsets[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
    return flat, offsets


def _unpack(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _save_cache(directory: Path, key: str, corpus: Corpus, sets: dict[str, list[Example]],
                stats: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, np.ndarray] = {}
    tensors["db.ids"], tensors["db.offsets"] = _pack(corpus.ids, np.int32)
    tensors["db.unit_doc"], tensors["db.unit_pos"], tensors["db.first_unit"] = (
        corpus.unit_doc, corpus.unit_pos, corpus.first_unit)
    meta: dict[str, Any] = {
        "key": key, "version": CACHE_VERSION, "stats": stats,
        "db": {"path": corpus.path, "uids": corpus.uids, "lines": corpus.lines, "truncated": corpus.truncated},
    }
    for name, exs in sets.items():
        tensors[f"{name}.ids"], tensors[f"{name}.offsets"] = _pack([e.ids for e in exs], np.int32)
        tensors[f"{name}.targets"], _ = _pack([e.targets.astype(np.uint8) for e in exs], np.uint8)
        meta[name] = [
            {"line": e.line, "q": e.query_positions, "pos": e.positives, "neg": e.negatives} for e in exs
        ]
    save_file(tensors, str(tmp / "data.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _load_cache(directory: Path, key: str, set_names: list[str]) -> tuple[Corpus, dict[str, list[Example]], dict]:
    from safetensors.numpy import load_file

    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
        raise ValueError("stale cache")
    t = load_file(str(directory / "data.safetensors"))
    db = meta["db"]
    corpus = Corpus(
        path=db["path"], uids=db["uids"], lines=db["lines"], ids=_unpack(t["db.ids"], t["db.offsets"]),
        unit_doc=t["db.unit_doc"], unit_pos=t["db.unit_pos"], first_unit=t["db.first_unit"],
        truncated=db["truncated"],
    )
    sets = {}
    for name in set_names:
        ids = _unpack(t[f"{name}.ids"], t[f"{name}.offsets"])
        tg = _unpack(t[f"{name}.targets"], t[f"{name}.offsets"])
        if len(ids) != len(meta[name]):
            raise ValueError("inconsistent cache")
        sets[name] = [
            Example(ids=i, targets=g.astype(bool), query_positions=m["q"], positives=m["pos"], negatives=m["neg"],
                    line=m["line"])
            for i, g, m in zip(ids, tg, meta[name], strict=True)
        ]
    return corpus, sets, meta["stats"]


def load_training_data(
    renderer: Renderer,
    *,
    train_file: str | Path,
    db_file: str | Path,
    eval_file: str | Path | None = None,
    eval_ratio: float = 0.0,
    max_length: int = 1024,
    conversation_format: str = "chat_template",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    truncation: str = "drop",
) -> TrainingData:
    """Validate and tokenise the data (or read the matching cache); ``DataError`` lists every problem."""
    train_path, db_path = Path(train_file), Path(db_file)
    eval_path = Path(eval_file) if eval_file else None
    for name, p in (("train_file", train_path), ("db_file", db_path), ("eval_file", eval_path)):
        if p is not None and not p.is_file():
            raise DataError([f"{name}: {p} does not exist"])
    files = [db_path, train_path] + ([eval_path] if eval_path else [])
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation: {truncation!r} is not one of {list(TRUNCATION_POLICIES)}")
    settings = {"max_length": max_length, "conversation_format": conversation_format, "truncation": truncation}
    key = cache_key(files, renderer.tokenizer, renderer.spec.to_dict(), settings)
    set_names = ["train"] + (["eval"] if eval_path else [])
    cache = Path(cache_dir) / key if cache_dir else None
    loaded = None
    if cache is not None and (cache / "meta.json").is_file():
        try:
            loaded = _load_cache(cache, key, set_names)
        except (ValueError, KeyError, OSError, json.JSONDecodeError):
            loaded = None  # unreadable or stale: rebuild
    from_cache = loaded is not None
    if loaded is None:
        errors = _Errors()
        corpus = load_corpus(db_path, renderer, max_length, errors, progress=progress)
        errors.raise_if_any()  # unit ids cannot be checked against a broken db
        sets = {}
        stats: dict[str, Any] = {"db_documents": len(corpus.uids), "db_units": corpus.num_units,
                                 "db_truncated": corpus.truncated}
        for name, p in (("train", train_path), ("eval", eval_path)):
            if p is None:
                continue
            sets[name], st = load_examples(p, renderer, corpus, max_length=max_length,
                                           conversation_format=conversation_format, errors=errors, progress=progress,
                                           truncation=truncation)
            stats[name] = st
        errors.raise_if_any()
        if cache is not None:
            _save_cache(cache, key, corpus, sets, stats)
    else:
        corpus, sets, stats = loaded
    train = sets["train"]
    if eval_path is not None:
        evals = sets["eval"]
    elif eval_ratio > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(eval_ratio * len(train)))
        if n_eval >= len(train):
            raise DataError([f"{train_path}: eval_ratio={eval_ratio} leaves no conversation to train on"])
        held = set(order[:n_eval])
        evals = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    else:
        evals = []
    return TrainingData(corpus=corpus, train=train, eval=evals, stats=stats, cache_key=key, from_cache=from_cache)
