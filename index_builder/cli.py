"""``python -m index_builder {build,info,search,verify}``: thin argparse over the library.

User errors (bad corpus lines, a missing checkpoint, an unwritable output, an index
type FAISS rejects) print one precise message and exit with status 2, never a
traceback; a failed ``verify`` (mismatched fingerprint, vectors that differ) exits 1;
an interrupted build exits 130 and resumes when rerun with the same arguments; output
cut short by its reader (``info … | head``) ends quietly with status 141 (128 + SIGPIPE).
Under ``torchrun --nproc_per_node N -m index_builder build …`` the ranks split the
corpus and rank 0 merges (see ``index_builder.builder``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .errors import BuildError, VerifyError


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``minimum``, with a message naming the bound."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m index_builder",
        description="Encode a corpus with a OneGen checkpoint into an index directory (index.faiss, "
        "docstore.sqlite, manifest.json) that the engine serves.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,info,search,verify}")

    b = sub.add_parser("build", help="encode a corpus into an index directory (resumable; torchrun for several ranks)",
                       description="Encode a corpus into an index directory. Interrupted builds resume when rerun "
                       "with the same arguments; the output appears only when complete.")
    b.add_argument("--checkpoint", required=True, type=Path, help="OneGen checkpoint directory (onegen.json inside)")
    b.add_argument("--corpus", required=True, nargs="+", type=Path, metavar="PATH",
                   help="corpus JSONL ({id, text, title?, metadata?}), OneGen db.jsonl, .txt/.md files or folders "
                   "of them; .gz accepted")
    b.add_argument("--out", required=True, type=Path, help="index directory to create")
    b.add_argument("--index", default="flat",
                   help="index type: flat (exact inner product), hnsw (HNSW32), ivfpq (IVF-PQ sized to the corpus) "
                   "or any FAISS factory string such as 'IVF1024,PQ32' (default: flat)")
    b.add_argument("--batch-tokens", type=_positive_int, default=None,
                   help="token budget of one forward pass; documents are packed without padding (default: 4096 on "
                   "CPU, where bigger batches run slower, 16384 on GPU)")
    b.add_argument("--batch-size", type=_positive_int, default=512,
                   help="most documents in one forward pass (default: 512)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; under torchrun cuda means "
                   "cuda:LOCAL_RANK (default: auto)")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype for encoding; the engine must serve with the same for identical vectors. auto "
                   "is the engine's default: float32 on the CPU, bfloat16 (float16 without bf16 support) on a GPU; "
                   "the manifest records what it resolved to (default: auto)")
    b.add_argument("--chunk-tokens", type=_positive_int, default=None,
                   help="split documents longer than this many tokens into overlapping passages {id}#{k} "
                   "(default: no chunking)")
    b.add_argument("--chunk-overlap", type=_nonneg_int, default=0,
                   help="tokens shared by neighbouring passages (default: 0)")
    b.add_argument("--max-doc-tokens", type=_positive_int, default=None,
                   help="without chunking, truncate documents to this many tokens (reported); documents are always "
                   "cut to the model's context")
    b.add_argument("--shard-size", type=_positive_int, default=4096,
                   help="documents per shard file, the unit of resumption and of distribution (default: 4096)")
    b.add_argument("--train-size", type=_positive_int, default=100_000,
                   help="most vectors an IVF/PQ index trains on, a seeded sample (default: 100000)")
    b.add_argument("--nprobe", type=_positive_int, default=16,
                   help="IVF lists searched per query, stored in the index (default: 16)")
    b.add_argument("--ef-search", type=_positive_int, default=64,
                   help="HNSW search breadth, stored in the index (default: 64)")
    b.add_argument("--skip-invalid", action="store_true",
                   help="leave out invalid lines, empty texts and duplicate ids instead of failing; they are "
                   "counted and listed in rejected.jsonl in the index")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists (swapped in when complete)")
    b.add_argument("--restart", action="store_true",
                   help="discard an interrupted build of --out instead of resuming it")
    b.add_argument("--faiss-threads", type=_positive_int, default=None,
                   help="OpenMP threads for FAISS training and adding (default: all cores; use fewer on a busy "
                   "machine, where FAISS's spinning threads slow down sharply)")
    b.add_argument("--seed", type=int, default=0, help="seed of the IVF/PQ training sample (default: 0)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--dist-timeout", type=_positive_int, default=24 * 3600,
                   help="seconds a rank waits for the others under torchrun (default: 86400)")

    i = sub.add_parser("info", help="what is in an index directory", description="Show an index's manifest, "
                       "FAISS type, docstore counts and a few documents.")
    i.add_argument("index_dir", type=Path, help="index directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--samples", type=_nonneg_int, default=3, help="documents to show (default: 3)")

    s = sub.add_parser("search", help="search an index with queries encoded by the checkpoint",
                       description="Encode queries (query template + query token) and print the top-k documents.")
    s.add_argument("index_dir", type=Path, help="index directory")
    s.add_argument("query", nargs="+", help="query text(s)")
    s.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint the index was built with")
    s.add_argument("-k", type=_positive_int, default=5, help="results per query (default: 5)")
    s.add_argument("--nprobe", type=_positive_int, default=None, help="IVF lists to search (default: the index's)")
    s.add_argument("--ef-search", type=_positive_int, default=None, help="HNSW search breadth (default: the index's)")
    s.add_argument("--device", default="cpu", help="device for encoding the queries (default: cpu)")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")

    v = sub.add_parser("verify", help="check an index against a checkpoint",
                       description="Check the fingerprint and re-encode a sample of documents to compare with the "
                       "stored vectors. Exit status 1 when the index does not match.")
    v.add_argument("index_dir", type=Path, help="index directory")
    v.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint the index should match")
    v.add_argument("--sample", type=_positive_int, default=32, help="documents to re-encode (default: 32)")
    v.add_argument("--atol", type=float, default=1e-4,
                   help="largest absolute difference allowed per vector component (default: 1e-4)")
    v.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    v.add_argument("--device", default="cpu", help="device for re-encoding (default: cpu)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


# Exit status when the reader of stdout went away (``… | head``): 128 + SIGPIPE, as a tool killed by it.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "build":
            status = _build(args)
        elif args.command == "info":
            status = _info(args)
        elif args.command == "search":
            status = _search(args)
        else:
            status = _verify(args)
        sys.stdout.flush()  # here, so that a closed pipe is noticed inside this try, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader closed the pipe (`info … | head`): stop quietly. stdout now points at /dev/null so
        # that the interpreter's own flush at exit does not raise (and print) the same error again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except VerifyError as e:
        print(f"verify failed: {e}", file=sys.stderr)
        return 1
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _load_checkpoint(path: Path):
    from onegen_core.checkpoint import CheckpointError, load_checkpoint
    from onegen_core.spec import SpecError

    try:
        return load_checkpoint(path)
    except (CheckpointError, SpecError, OSError) as e:
        raise BuildError(f"--checkpoint {path}: {e}") from None


def _build(args: argparse.Namespace) -> int:
    from onegen_core.distributed import PeerFailed, RankContext

    from .builder import BuildConfig, build_index

    # gloo whatever the encode device: the group carries only barriers and failure flags
    dist = RankContext.from_env(backend="gloo", timeout_s=args.dist_timeout)

    def log(msg: str) -> None:
        if dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    try:
        try:
            cfg = BuildConfig(
                checkpoint=args.checkpoint, corpus=args.corpus, out=args.out, index=args.index,
                batch_tokens=args.batch_tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                chunk_tokens=args.chunk_tokens, chunk_overlap=args.chunk_overlap, max_doc_tokens=args.max_doc_tokens,
                shard_size=args.shard_size, train_size=args.train_size, nprobe=args.nprobe, ef_search=args.ef_search,
                on_invalid="skip" if args.skip_invalid else "error", overwrite=args.overwrite, restart=args.restart,
                progress=not args.quiet and dist.is_main, seed=args.seed, faiss_threads=args.faiss_threads,
                log=log,
            )
        except ValueError as e:
            raise BuildError(str(e)) from None
        try:
            result = build_index(cfg, dist=dist)
        except PeerFailed:
            return 2
    finally:
        dist.close()
    if not dist.is_main:
        print(f"rank {dist.rank}: encoded {result.documents_encoded} documents in {result.shards_encoded} shard(s)",
              file=sys.stderr)
        return 0
    m = result.manifest
    assert m is not None
    encode_s = result.timings.get("encode", 0.0)
    rate = f" at {result.documents_encoded / encode_s:.1f} doc/s" if encode_s > 0 else ""
    print(
        f"built {result.out}: {result.count} vectors ({m.factory}, dim {m.dim}) in {result.seconds:.1f}s; "
        f"encoded {result.documents_encoded} documents{rate} in {result.shards_encoded} shard(s), "
        f"reused {result.shards_reused} shard(s) of an interrupted build "
        f"({', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())})"
        + (f"; {result.truncated} truncated" if result.truncated else "")
        + (f"; {result.rejected} rejected (see rejected.jsonl)" if result.rejected else "")
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from .tools import format_info, index_info

    info = index_info(args.index_dir, samples=args.samples)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _search(args: argparse.Namespace) -> int:
    from .tools import search

    ckpt = _load_checkpoint(args.checkpoint)
    results = search(args.index_dir, ckpt, args.query, args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                     device=args.device)
    if args.json:
        print(json.dumps([{"query": q, "hits": [asdict(h) for h in hits]}
                          for q, hits in zip(args.query, results, strict=True)], indent=2))
        return 0
    for q, hits in zip(args.query, results, strict=True):
        print(f"query: {q}")
        for rank, h in enumerate(hits, start=1):
            text = " ".join((h.text or "").split())
            text = text if len(text) <= 120 else text[:119] + "…"
            title = f" — {h.title}" if h.title else ""
            print(f"  {rank:>2}. {h.score:.4f}  {h.doc_id}{title}: {text}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .tools import verify

    ckpt = _load_checkpoint(args.checkpoint)
    report = verify(args.index_dir, ckpt, sample=args.sample, seed=args.seed, atol=args.atol, device=args.device)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        kind = "exact" if report.exact else "quantised (compared through its codec)"
        print(f"index {report.path}: fingerprint {report.fingerprint} matches the checkpoint; {report.count} vectors, "
              f"{report.checked} re-encoded ({kind}): max |diff| {report.max_abs_diff:.2e}, "
              f"min cosine {report.min_cosine:.6f}")
        for f in report.failures:
            print(f"  FAIL: {f}", file=sys.stderr)
        print("ok" if report.ok else "verify failed")
    return 0 if report.ok else 1
