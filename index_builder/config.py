"""The build's settings, declared once: name, default, help text, bounds and choices of each.

``build_index`` reads a ``BuildConfig``; ``python -m index_builder build`` derives a flag
from every field that has a help text here (``--batch-size`` for ``batch_size``, with this
help, bounds and choices: ``cli.py``) and builds the ``BuildConfig`` back from them, and a
config built in code is checked against the same bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from onegen_core.engine.engine_config import EngineConfig

# what the engine serves in (the index must be encoded in the same for identical vectors)
DTYPES: tuple[str, ...] = next(f for f in fields(EngineConfig) if f.name == "dtype").metadata["choices"]


def setting(default: Any = MISSING, help: str = "", *, ge: int | None = None, choices: tuple[str, ...] | None = None,
            flag: str | None = None, const: Any = None, nargs: str | None = None, metavar: str | None = None) -> Any:
    """A field with its help text and bounds: the one declaration its flag, the flag's parsing and the config's
    own check derive from. ``flag`` names a flag other than the field's (``--quiet`` sets ``progress`` off);
    with ``const`` the flag is a switch that stores that value (``--skip-invalid``: ``on_invalid="skip"``)."""
    metadata = {"help": help, "ge": ge, "choices": choices, "flag": flag, "const": const, "nargs": nargs,
                "metavar": metavar}
    return field(metadata=metadata) if default is MISSING else field(default=default, metadata=metadata)


def _as_in(cls: type, name: str) -> Any:
    """The field ``name`` exactly as ``cls`` declares it (default, help, bounds)."""
    f = next(f for f in fields(cls) if f.name == name)
    return field(default=f.default, metadata=f.metadata)


def check_settings(config: Any) -> None:
    """``ValueError`` naming the flag for a value outside its field's bounds or choices."""
    for f in fields(config):
        value, m = getattr(config, f.name), f.metadata
        if value is None or isinstance(value, bool) or "help" not in m:
            continue
        name = f.name if m["flag"] else "--" + f.name.replace("_", "-")
        if m["choices"] and value not in m["choices"]:
            raise ValueError(f"{name} must be one of {', '.join(m['choices'])}, got {value!r}")
        if m["ge"] is not None and value < m["ge"]:
            raise ValueError(f"{name} must be >= {m['ge']}, got {value}")


@dataclass(frozen=True)
class ChunkConfig:
    """How documents are cut into passages (``chunking.Chunker``)."""

    chunk_tokens: int | None = setting(None, "split documents longer than this many tokens into overlapping "
                                       "passages {id}#{k} (default: no chunking)", ge=1)
    chunk_overlap: int = setting(0, "tokens shared by neighbouring passages", ge=0)
    max_doc_tokens: int | None = setting(None, "without chunking, truncate documents to this many tokens (reported); "
                                         "documents are always cut to the model's context", ge=1)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.chunk_overlap and self.chunk_tokens is None:
            raise ValueError("--chunk-overlap needs --chunk-tokens")
        if self.chunk_tokens is not None and self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"--chunk-overlap ({self.chunk_overlap}) must be smaller than --chunk-tokens ({self.chunk_tokens})"
            )


@dataclass
class BuildConfig:
    """Everything ``python -m index_builder build`` takes (a flag per field with a help text); validates on
    construction."""

    checkpoint: Path = setting(help="OneGen checkpoint directory (onegen.json inside)")
    corpus: list[Path] = setting(help="corpus JSONL ({id, text, title?, metadata?}), OneGen db.jsonl, .txt/.md files "
                                 "or folders of them; .gz accepted", nargs="+", metavar="PATH")
    out: Path = setting(help="index directory to create")
    index: str = setting("flat", "index type: flat (exact inner product), hnsw (HNSW32), ivfpq (IVF-PQ sized to the "
                         "corpus) or any FAISS factory string such as 'IVF1024,PQ32'")
    batch_tokens: int | None = setting(None, "token budget of one forward pass; documents are packed without padding "
                                       "(default: 4096 on CPU, where bigger batches run slower, 16384 on GPU)", ge=1)
    batch_size: int = setting(512, "most documents in one forward pass", ge=1)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N; under torchrun cuda means cuda:LOCAL_RANK")
    dtype: str = setting("auto", "model dtype for encoding; the engine must serve with the same for identical "
                         "vectors. auto is the engine's default: float32 on the CPU, bfloat16 (float16 without bf16 "
                         "support) on a GPU; the manifest records what it resolved to", choices=DTYPES)
    chunk_tokens: int | None = _as_in(ChunkConfig, "chunk_tokens")
    chunk_overlap: int = _as_in(ChunkConfig, "chunk_overlap")
    max_doc_tokens: int | None = _as_in(ChunkConfig, "max_doc_tokens")
    shard_size: int = setting(4096, "documents per shard file, the unit of resumption and of distribution", ge=1)
    train_size: int = setting(100_000, "most vectors an IVF/PQ index trains on, a seeded sample", ge=1)
    nprobe: int | None = setting(16, "IVF lists searched per query, stored in the index", ge=1)
    ef_search: int | None = setting(64, "HNSW search breadth, stored in the index", ge=1)
    on_invalid: Literal["error", "skip"] = setting(
        "error", "leave out invalid lines, empty texts and duplicate ids instead of failing; they are counted and "
        "listed in rejected.jsonl in the index", choices=("error", "skip"), flag="skip-invalid", const="skip")
    overwrite: bool = setting(False, "replace --out if it exists (swapped in when complete)")
    restart: bool = setting(False, "discard an interrupted build of --out instead of resuming it")
    faiss_threads: int | None = setting(None, "OpenMP threads for FAISS training and adding (default: all cores; use "
                                        "fewer on a busy machine, where FAISS's spinning threads slow down sharply)",
                                        ge=1)
    seed: int = setting(0, "seed of the IVF/PQ training sample")
    bm25: bool = setting(True, "do not write the BM25 side index (bm25/ in the index, which hybrid retrieval needs; "
                         "written by default and needing bm25s, in the default-model extra)", flag="no-bm25")
    progress: bool = setting(True, "no progress bars", flag="quiet")
    log: Callable[[str], None] = field(default=lambda msg: None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.out = Path(self.out)
        self.corpus = [Path(p) for p in self.corpus]
        check_settings(self)
        self.chunking = ChunkConfig(self.chunk_tokens, self.chunk_overlap, self.max_doc_tokens)
