"""Where a batch-1 decode step goes, against the weights-read floor of this machine (issue #21).

    python bench/decode_profile.py [--checkpoint CKPT] [--dtype bfloat16] [--steps 48]

Prints (and writes to ``bench/results/decode_profile.txt``, or ``--out``): the machine's streaming read
bandwidth (a sum over a buffer larger than the weights, best of 5), the bytes of weights one decode step
reads, hence the floor in ms per token; the wall time of a decode step at batch 1 without the profiler;
and torch.profiler's self CPU time per operator over ``--steps`` decode steps, grouped into linears,
attention and the rest, so the gap between the step and the floor is split into what it is made of.
Default checkpoint: the default model as ``python -m server`` prepares it (``.cache/onegen-default``).
"""

from __future__ import annotations

import argparse
import io
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from onegen_core.engine import Engine, EngineConfig
from onegen_core.params import RetrievalParams, SamplingParams

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Tell me about the sea."
DEFAULT_CHECKPOINT = REPO / ".cache" / "onegen-default" / "checkpoint"


def stream_bandwidth(nbytes: int) -> float:
    """Bytes per second of a read-only pass (sum) over ``nbytes`` of float32, best of 5."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_steps(engine: Engine, steps: int) -> float:
    """Seconds per decode step at batch 1 (after the prefill and one decode step)."""
    sp, rp = SamplingParams(max_tokens=steps + 2, ignore_eos=True), RetrievalParams(enabled=False)
    engine.add_request(PROMPT, sampling=sp, retrieval=rp)
    engine.step()
    engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t) / steps
    while engine.sequences:
        engine.step()
    return dt


def result_path(checkpoint: str, steps: int) -> Path:
    """The committed results for the default model at the default size; any other run goes to results/quick/."""
    full = Path(checkpoint) == DEFAULT_CHECKPOINT and steps == 48
    return REPO / "bench" / "results" / ("" if full else "quick") / "decode_profile.txt"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="(default: the default model)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--out", type=Path, help="(default: bench/results/decode_profile.txt for the default model at "
                   "48 steps, else bench/results/quick/decode_profile.txt)")
    args = p.parse_args(argv)
    args.out = args.out or result_path(args.checkpoint, args.steps)
    engine = Engine.from_checkpoint(args.checkpoint, None, EngineConfig(dtype=args.dtype))
    # what a decode step reads: every projection's weight (the LM head included); packed weights (oneDNN) are
    # no registered tensors, so count in x out of each linear; norms and one embedding row are negligible
    itemsize = torch.empty((), dtype=engine.dtype).element_size()
    weight_bytes = itemsize * sum(m.in_features * m.out_features for m in engine.model.modules()
                                  if hasattr(m, "in_features") and hasattr(m, "out_features"))
    bandwidth = stream_bandwidth(max(2 * weight_bytes, 512 << 20))
    decode_steps(engine, 8)  # warm-up
    step_s = min(decode_steps(engine, args.steps) for _ in range(3))
    engine.add_request(PROMPT, sampling=SamplingParams(max_tokens=args.steps + 2, ignore_eos=True),
                       retrieval=RetrievalParams(enabled=False))
    engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps  # ms per step
    linear = sum(e.self_cpu_time_total for e in events if "linear" in e.key or e.key in ("aten::mm", "aten::addmm"))
    attention = sum(e.self_cpu_time_total for e in events if "attention" in e.key)
    linear, attention = linear / 1e3 / args.steps, attention / 1e3 / args.steps
    floor_ms = weight_bytes / bandwidth * 1e3
    out = io.StringIO()
    with redirect_stdout(out):
        print(f"checkpoint {args.checkpoint}, {args.dtype}, {torch.get_num_threads()} threads")
        print(f"weights read per decode step: {weight_bytes / 1e6:.0f} MB; stream read bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s -> floor {floor_ms:.1f} ms/token ({1e3 / floor_ms:.0f} tokens/s)")
        print(f"decode step at batch 1 (no profiler, best of 3 x {args.steps}): {step_s * 1e3:.1f} ms "
              f"({1 / step_s:.1f} tokens/s), {step_s * 1e3 / floor_ms:.2f}x the floor")
        print(f"operator time per step (profiler): {total:.1f} ms = linears {linear:.1f} ms "
              f"({weight_bytes / (linear / 1e3) / 1e9:.1f} GB/s effective) + attention {attention:.1f} ms + "
              f"other ops {total - linear - attention:.1f} ms; outside operators (Python, scheduling): "
              f"{step_s * 1e3 - total:.1f} ms (step without profiler minus operator time)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    print(out.getvalue())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(out.getvalue())


if __name__ == "__main__":
    main()
