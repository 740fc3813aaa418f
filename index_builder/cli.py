"""``python -m index_builder {build,update,info,search,verify}``: thin argparse over the library.

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
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import BuildConfig
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


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag for every field of ``cls`` declared with a help text (``config.setting``), in field order: the
    field's name (``--batch-size``) or its ``flag``, its default, and its bounds and choices checked as it parses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "help" not in m:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": m["help"]}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            switch = m["const"] is not None or isinstance(f.default, bool)
            if f.default is not None and not switch and "(default" not in m["help"]:
                kwargs["help"] += f" (default: {f.default})"
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse formats help with %
        typ = hints[f.name]
        if isinstance(typ, types.UnionType):  # int | None -> int
            (typ,) = [t for t in typing.get_args(typ) if t is not type(None)]
        if m["const"] is not None:
            kwargs.update(action="store_const", const=m["const"])
        elif typ is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            if typing.get_origin(typ) is list:  # list[Path] -> one or more Paths
                (typ,) = typing.get_args(typ)
            kwargs.update(nargs=m["nargs"], metavar=m["metavar"], choices=m["choices"])
            kwargs["type"] = _int_at_least(m["ge"]) if typ is int and m["ge"] is not None else typ
        parser.add_argument("--" + (m["flag"] or f.name.replace("_", "-")), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m index_builder",
        description="Encode a corpus with a OneGen checkpoint into an index directory (index.faiss, "
        "docstore.sqlite, manifest.json) that the engine serves.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,update,info,search,verify}")

    b = sub.add_parser("build", help="encode a corpus into an index directory (resumable; torchrun for several ranks)",
                       description="Encode a corpus into an index directory. Interrupted builds resume when rerun "
                       "with the same arguments; the output appears only when complete.")
    _add_config_flags(b, BuildConfig)
    b.add_argument("--dist-timeout", type=_positive_int, default=24 * 3600,
                   help="seconds a rank waits for the others under torchrun (default: 86400)")

    u = sub.add_parser("update", help="add, replace and delete documents: a new version of an index directory",
                       description="Encode only the changed documents, carry every other vector over bit for bit, "
                       "and publish the result as a new version of --index (DIR/versions/NNNNNN, DIR/CURRENT switched "
                       "atomically). A plain index directory becomes version 1. Resumable: rerun the same command.")
    u.add_argument("--index", required=True, type=Path, help="index directory to update (plain or versioned)")
    u.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint the index was built with")
    u.add_argument("--corpus", nargs="+", type=Path, default=[], metavar="PATH",
                   help="documents to add or replace by id (same formats as build); a document of several chunks "
                   "or units is replaced whole")
    u.add_argument("--delete", type=Path, default=None, metavar="IDS.txt", help="ids to delete, one a line")
    u.add_argument("--keep", type=_positive_int, default=3,
                   help="versions to keep; older version directories are removed after publishing (default: 3)")
    u.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    u.add_argument("--dtype", default=None, help="encode dtype; must resolve to the index's (default: the index's)")
    u.add_argument("--restart", action="store_true", help="discard an interrupted update of another set of arguments")
    u.add_argument("--no-bm25", dest="bm25", action="store_false",
                   help="do not write the new version's BM25 side index (rebuilt from its docstore by default; "
                   "hybrid retrieval needs it; bm25s is in the default-model extra)")
    u.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")

    i = sub.add_parser("info", help="what is in an index directory", description="Show an index's manifest, "
                       "FAISS type, docstore counts, its versions and a few documents.")
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
        elif args.command == "update":
            status = _update(args)
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
    from onegen_core.formats.checkpoint import CheckpointError, load_checkpoint
    from onegen_core.formats.spec import SpecError

    try:
        return load_checkpoint(path)
    except (CheckpointError, SpecError, OSError) as e:
        raise BuildError(f"--checkpoint {path}: {e}") from None


def _build(args: argparse.Namespace) -> int:
    from onegen_core.distributed import PeerFailed, RankContext

    from .builder import build_index

    # gloo whatever the encode device: the group carries only barriers and failure flags
    dist = RankContext.from_env(backend="gloo", timeout_s=args.dist_timeout)

    def log(msg: str) -> None:
        if dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    try:
        try:
            given = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig) if hasattr(args, f.name)}
            given["progress"] = given["progress"] and dist.is_main
            cfg = BuildConfig(**given, log=log)
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


def _update(args: argparse.Namespace) -> int:
    from .update import UpdateConfig, update_index

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        cfg = UpdateConfig(index=args.index, checkpoint=args.checkpoint, corpus=args.corpus, delete=args.delete,
                           keep=args.keep, device=args.device, dtype=args.dtype, restart=args.restart,
                           bm25=args.bm25, progress=args.progress, log=log)
    except ValueError as e:
        raise BuildError(str(e)) from None
    r = update_index(cfg)
    base = "plain directory, now version 1" if r.base_version is None else f"version {r.base_version}"
    print(f"published version {r.version} of {r.index} (from {base}): {r.count} vectors; {r.added} added, "
          f"{r.replaced} replaced, {r.deleted} deleted; encoded {r.documents_encoded} documents in {r.seconds:.1f}s"
          + (f"; removed version(s) {', '.join(map(str, r.removed_versions))}" if r.removed_versions else ""))
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
