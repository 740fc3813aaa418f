"""The DEMO model and index: random weights, for tests and for trying the stack without the default model.

The README's serve command serves the trained default model (``server.prepare_default``).
This demo is what the tests and ``bench/serve.py`` serve instead: a tiny Llama with RANDOM
WEIGHTS (``onegen_core.random_checkpoint.build_tiny_checkpoint``, with its query token made
likely so that it retrieves while it generates) and a FAISS index over a small built-in
corpus, encoded by that model with the same encoder the engine uses. It exercises every
route end to end; its text is gibberish and its retrievals are arbitrary. The checkpoint
carries a marker file, so the server labels itself as a demo in /info and in its logs.

    python -m server.demo            # -> .cache/onegen-demo/{checkpoint,index}

The tests and ``bench/serve.py`` call ``prepare_demo`` / ``build_index``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
from pathlib import Path

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document

from .prepare_default import index_matches

DEMO_ROOT = Path(".cache/onegen-demo")
DEMO_MARKER = "ONEGEN_DEMO.txt"  # the server labels a checkpoint holding this file as a demo
DEMO_NOTE = (
    "DEMO CHECKPOINT - NOT A TRAINED MODEL.\n"
    "A tiny Llama with random weights built by `python -m server.demo` so that the OneGen server\n"
    "runs on a fresh machine. Its generations are gibberish and its retrievals arbitrary.\n"
    "Serve a real OneGen checkpoint with: python -m server --checkpoint DIR --index DIR\n"
)

DEMO_CORPUS: list[Document] = [
    Document(id=f"demo-{i:02d}", title=title, text=text)
    for i, (title, text) in enumerate([
        ("Paris", "Paris is the capital of France. The river flows to the sea through the city."),
        ("Berlin", "Berlin is the capital of Germany."),
        ("Rome", "Rome is the capital of Italy."),
        ("Madrid", "Madrid is the capital of Spain."),
        ("Zorblat", "Zorblat lives in Quenta and works as a baker."),
        ("Mirelle", "Mirelle was born in Odrin and plays the harp."),
        ("Quenta", "Quenta is a small town where Zorblat bakes bread for the people."),
        ("Odrin", "Odrin is the town where Mirelle was born in the year 1990."),
        ("The quick brown fox", "The quick brown fox jumps over the lazy dog."),
        ("Retrieval", "A retrieval augmented model reads passages and answers questions."),
        ("OneGen", "One model both generates text and retrieves documents in a single pass."),
        ("Entity linking", "Entity linking maps a mention in the text to a document title."),
        ("The book", "Question: who wrote the book? Answer: the author wrote it in the year 1990."),
        ("Numbers", "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024."),
        ("The harp", "The harp is an instrument with strings; Mirelle plays it in Odrin."),
        ("Bread", "A baker works early and bakes bread; Zorblat is a baker in Quenta."),
    ])
]


def corpus_text(documents: list[Document]) -> str:
    return "\n".join(f"{d.title}. {d.text}" for d in documents)


def build_index(checkpoint_dir: str | Path, documents: list[Document], out_dir: str | Path) -> Path:
    """Encode ``documents`` with the checkpoint's model (the engine's encoder) and write an index dir."""
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import write_index_dir
    from onegen_core.retrieval.encoder import Encoder

    ckpt = load_checkpoint(checkpoint_dir)
    vectors = Encoder.from_checkpoint(ckpt).encode_documents([(d.text, d.title) for d in documents])
    digest = hashlib.sha256(
        json.dumps([[d.id, d.title, d.text] for d in documents], ensure_ascii=False).encode()
    ).hexdigest()[:32]
    return write_index_dir(
        out_dir, vectors, documents, checkpoint_fingerprint=ckpt.fingerprint,
        special_token_ids=dict(ckpt.token_ids.by_name), corpus_digest=digest,
        extra={"source": "server.demo corpus"},
    )


_BUILDING = ".onegen-demo-building"  # present while a demo checkpoint is being written


def _build_demo_checkpoint(ckpt: Path) -> None:
    """Write the demo checkpoint into ``ckpt`` (which may be a mount point: its contents are replaced,
    never the directory itself). Refuses a non-empty directory that is not a demo checkpoint."""
    from onegen_core.random_checkpoint import build_tiny_checkpoint, make_query_token_likely

    ckpt.mkdir(parents=True, exist_ok=True)
    ours = (ckpt / DEMO_MARKER).is_file() or (ckpt / _BUILDING).is_file()
    existing = list(ckpt.iterdir())
    if existing and not ours:
        raise ValueError(f"{ckpt} is not empty and holds no demo checkpoint; refusing to overwrite it")
    (ckpt / _BUILDING).touch()
    for p in existing:
        if p.name != _BUILDING:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    work = ckpt / ".build"
    build_tiny_checkpoint(work, arch="llama", extra_text=corpus_text(DEMO_CORPUS), max_positions=2048)
    make_query_token_likely(work, rank=0)  # so that the demo retrieves while it generates
    for p in work.iterdir():
        p.rename(ckpt / p.name)
    work.rmdir()
    (ckpt / DEMO_MARKER).write_text(DEMO_NOTE)  # the marker says: complete
    (ckpt / _BUILDING).unlink()


def prepare_demo(
    root: str | Path = DEMO_ROOT,
    *,
    checkpoint_dir: str | Path | None = None,
    index_dir: str | Path | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Build (or reuse) the demo checkpoint and its index; returns ``(checkpoint_dir, index_dir)``."""
    root = Path(root)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else root / "checkpoint"
    index = Path(index_dir) if index_dir else root / "index"
    complete = (ckpt / DEMO_MARKER).is_file() and not (ckpt / _BUILDING).exists()
    if force or not complete:
        _build_demo_checkpoint(ckpt)
    if force or not complete or not index_matches(load_checkpoint(ckpt), index, "float32"):  # encoded in float32
        build_index(ckpt, DEMO_CORPUS, index)
    return ckpt, index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.demo",
        description="Build the DEMO checkpoint (tiny, random weights: not a trained model) and an index over a "
        "small built-in corpus, so that the server runs without a checkpoint. Reuses what is already there.",
    )
    parser.add_argument("--root", type=Path, default=DEMO_ROOT, help=f"where to put both (default: {DEMO_ROOT})")
    parser.add_argument("--checkpoint-dir", type=Path, help="checkpoint directory (default: ROOT/checkpoint)")
    parser.add_argument("--index-dir", type=Path, help="index directory (default: ROOT/index)")
    parser.add_argument("--force", action="store_true", help="rebuild even if both exist")
    args = parser.parse_args(argv)
    ckpt, index = prepare_demo(args.root, checkpoint_dir=args.checkpoint_dir, index_dir=args.index_dir,
                                  force=args.force)
    print("DEMO checkpoint (random weights, not a trained model):", file=sys.stderr)
    print(f"ONEGEN_CHECKPOINT={shlex.quote(str(ckpt))}")  # shell-quoted: `eval "$(...)"` works
    print(f"ONEGEN_INDEX={shlex.quote(str(index))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
