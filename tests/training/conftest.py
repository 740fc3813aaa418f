"""Fixtures for the training tests: a synthetic retrieval task about invented entities, and tiny base models.

The task: every invented person has a home town and a job; the corpus has one document
per fact ("The home of Karho is Quenby."), and conversations ask about a fact in several
phrasings. The assistant emits the query token first, the passage follows, then the
answer copied from it:

    user:      Where does Karho live?
    assistant: [RQ]<paragraph>The home of Karho is Quenby.</paragraph>Quenby.

Nothing here is downloaded: the base model is a randomly initialised tiny Llama whose
tokenizer is trained on the task's own text (so each invented name is one token).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

SYLLABLES = ["zor", "vex", "mi", "rel", "quen", "ta", "od", "rin", "lu", "dar", "pim", "sol", "ka", "rho", "tek",
             "bal"]
TOWNS = ["Quenby", "Morvale", "Tissk", "Ardun", "Pellow", "Crag", "Vimmer", "Ostra"]
JOBS = ["baker", "sailor", "harpist", "miner", "weaver", "scribe", "potter", "ranger"]
QUESTIONS = {
    "town": ["Where does {n} live?", "What is the home of {n}?", "In which town does {n} live?"],
    "job": ["What does {n} do?", "What is the job of {n}?", "Which work does {n} do?"],
}


@dataclass
class SyntheticTask:
    directory: Path
    train_file: Path
    db_file: Path
    docs: dict[str, str]  # doc id -> text
    conversations: list[dict]  # also written to train_file
    text: str  # every string of the task (to train the tokenizer on)


def make_task(directory: Path, *, n_entities: int = 24, seed: int = 0, query_token: str = "[RQ]",
              passage: tuple[str, str] = ("<paragraph>", "</paragraph>")) -> SyntheticTask:
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_entities:
        n = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()
        if n not in names:
            names.append(n)
    docs: dict[str, str] = {}
    facts = []
    for n in names:
        town, job = rng.choice(TOWNS), rng.choice(JOBS)
        docs[f"{n.lower()}-town"] = f"The home of {n} is {town}."
        docs[f"{n.lower()}-job"] = f"The job of {n} is {job}."
        facts += [(n, "town", town), (n, "job", job)]
    convs = []
    for n, rel, answer in facts:
        did = f"{n.lower()}-{rel}"
        other = f"{n.lower()}-{'job' if rel == 'town' else 'town'}"
        same_rel = [f"{m.lower()}-{rel}" for m in names if m != n]
        for q in QUESTIONS[rel]:
            content = f"{query_token}{passage[0]}{docs[did]}{passage[1]}{answer}."
            convs.append({"messages": [
                {"role": "user", "content": q.format(n=n)},
                {"role": "assistant", "content": content, "positive": [[did]],
                 "negative": [[other] + rng.sample(same_rel, 2)]},
            ]})
    rng.shuffle(convs)
    directory.mkdir(parents=True, exist_ok=True)
    train = directory / "train.jsonl"
    db = directory / "db.jsonl"
    train.write_text("".join(json.dumps(c) + "\n" for c in convs))
    # OneGen's db.jsonl shape: {uid, messages}; the content is the document.
    db.write_text("".join(json.dumps({"uid": k, "messages": [{"role": "user", "content": v}]}) + "\n"
                          for k, v in docs.items()))
    text = "\n".join(list(docs.values()) + [m["content"] for c in convs for m in c["messages"]])
    return SyntheticTask(directory, train, db, docs, convs, text)


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory) -> SyntheticTask:
    return make_task(tmp_path_factory.mktemp("synthetic"))


def build_base(out: Path, text: str, *, vocab_size: int = 600, hidden: int = 64, layers: int = 2,
               seed: int = 0) -> Path:
    """A randomly initialised tiny Llama (transformers' own init) with a tokenizer trained on ``text``."""
    import torch
    from transformers import AutoModelForCausalLM

    from onegen_core.formats.spec import OneGenSpec
    from onegen_core.testing import build_tokenizer, tiny_config

    spec = OneGenSpec()
    tok = build_tokenizer(spec, text, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), hidden=hidden, layers=layers))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    spec.save(out)
    return out


@pytest.fixture(scope="session")
def synthetic_base(tmp_path_factory, synthetic_task) -> Path:
    return build_base(tmp_path_factory.mktemp("synthetic-base"), synthetic_task.text * 3)


@pytest.fixture(scope="session")
def synthetic_task_factory():
    """``make_task`` for tests that need a variant (other token names, fewer entities)."""
    return make_task
