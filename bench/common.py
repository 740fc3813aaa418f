"""Helpers the bench scripts share: the machine a result was measured on, where the default model is, where a
run writes, the hand-written evaluation sets of ``quality.py``, the timestamped progress line.

Scripts run as ``python bench/NAME.py``, so this module is importable as ``common``. It imports no torch
at module level (``hostile.py`` drives a server in another process and does not need it).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / ".cache" / "onegen-default"  # the trained default model, its index and data (server.prepare_default)
RESULTS = REPO / "bench" / "results"
QUICK_RESULTS = RESULTS / "quick"  # git-ignored: quick runs never overwrite the committed full results
QUALITY_SETS = REPO / "bench" / "quality_sets"  # hand-written evaluation sets (their README says how)
SET_NAMES = ("knowledge", "no_corpus", "general")


def log(msg: str) -> None:
    """A progress line on stderr, stamped with the wall-clock time (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def add_served_model_args(p: Any, index_help: str) -> None:
    """``--checkpoint``, ``--index`` and ``--dtype`` of a bench that starts servers (default: the default model)."""
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint (default: the default model, which "
                   "`python -m server` prepares under .cache/onegen-default)")
    p.add_argument("--index", type=Path, help=index_help)
    p.add_argument("--dtype", help="server --dtype (default: the server's: bfloat16 for the default model)")


def served_model(args: Any) -> tuple[Path, Path, str | None]:
    """(checkpoint, index, dtype) to serve: ``--checkpoint``/``--index``, else the default model, prepared as
    ``python -m server`` prepares it."""
    if args.checkpoint:
        return args.checkpoint, args.index, args.dtype
    from server.prepare_default import serve_default
    from server.settings import parse_settings

    log("no --checkpoint: the default model, prepared as `python -m server` prepares it")
    s = serve_default(parse_settings(["--dtype", args.dtype] if args.dtype else []))
    return s.checkpoint, s.index["default"], s.dtype


def plain_args(args: Any) -> dict[str, Any]:
    """An argparse namespace as JSON-ready values (paths as strings), for a result file."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_report(out: str | Path, md: str, result: dict[str, Any], *, also: str = "") -> Path:
    """Print the table, then write ``OUT.md`` and ``OUT.json`` (each atomically: a crash leaves the old file).

    ``also`` names other files the caller wrote next to them, for the closing log line."""
    print(md)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", md), (".json", json.dumps(result, indent=1, default=str) + "\n")):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out.with_suffix(suffix))
    runtime = result.get("runtime_s")
    log(f"wrote {out.with_suffix('.md')}, .json{also}" + (f" in {runtime:.0f} s" if runtime is not None else ""))
    return out


def cpu_name(fallback: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo, else ``fallback`` (default: platform's processor or machine)."""
    name = fallback if fallback is not None else (platform.processor() or platform.machine())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def machine_info(device: Any = None) -> dict[str, Any]:
    """CPU, cores, torch threads and versions; with a torch ``device``, its type (and the GPU and CUDA on one)."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform()}
    if device is not None:
        info["device"] = device.type
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
            info["cuda"] = torch.version.cuda
    return info


def read_set(name: str, folder: Path = QUALITY_SETS) -> list[dict[str, Any]]:
    """The rows of ``folder/NAME.jsonl`` (one of ``SET_NAMES``), in file order."""
    path = Path(folder) / f"{name}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus_articles(folder: Path = QUALITY_SETS) -> list[str]:
    """The default corpus's article names, as committed in ``articles.txt`` (sorted)."""
    return [a for a in (Path(folder) / "articles.txt").read_text(encoding="utf-8").splitlines() if a]


def heldout_articles(folder: Path = QUALITY_SETS, heldout: float = 0.2, seed: int = 0) -> set[str]:
    """The held-out articles of ``python -m training prepare``'s default split, from ``articles.txt``."""
    from training.prepare import split_articles

    return split_articles(corpus_articles(folder), heldout, seed)[1]
