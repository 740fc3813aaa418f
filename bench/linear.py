"""Projection kernels on the CPU: aten ``F.linear`` vs oneDNN prepacked weights, side by side.

    python bench/linear.py [--layers 30] [--dtype float32|bfloat16] [--rows 1,16,256]

Every weight of a SmolLM2-135M-shaped stack (fused qkv 960x576, o 576x576, fused
gate/up 3072x576, down 576x1536, per layer) is applied in turn to an input of M rows,
so the weights stream from memory as they do in a real decode step (~430 MB in fp32,
more than any cache). The table gives milliseconds per pass, the weight-read rate, and
the speed-up of the packed path; a plain ``sum`` over the same bytes is the reference
for what the memory system can deliver.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def time_pass(fn, weights, inputs, repeats: int) -> float:
    for w, x in zip(weights, inputs, strict=True):  # warm-up
        fn(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w, x in zip(weights, inputs, strict=True):
            fn(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rows", default="1,16,256", help="comma-separated input rows (M)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from onegen_core.model.linear import PackedLinear, onednn_supported

    dtype = getattr(torch, args.dtype)
    if not onednn_supported(torch.device("cpu"), dtype):
        raise SystemExit(f"oneDNN linears are not supported here for {args.dtype}")
    torch.manual_seed(0)
    weights = [torch.randn(o, i, dtype=dtype) for _ in range(args.layers) for o, i in SHAPES]
    packed = [PackedLinear(w) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    with torch.inference_mode():
        flat = torch.cat([w.flatten() for w in weights])
        t_sum = time_pass(lambda x, w: w.sum(), [flat], [None], args.repeats)
        print(f"\n{args.layers} layers, {nbytes / 1e6:.0f} MB of {args.dtype} weights, {torch.get_num_threads()} threads; "
              f"sum() reads {nbytes / t_sum / 1e9:.1f} GB/s")
        print(f"{'rows':>5} {'aten ms':>9} {'aten GB/s':>10} {'onednn ms':>10} {'onednn GB/s':>12} {'speed-up':>9}")
        for m in (int(r) for r in args.rows.split(",")):
            inputs = [torch.randn(m, w.shape[1], dtype=dtype) for w in weights]
            t_aten = time_pass(lambda x, w: F.linear(x, w), weights, inputs, args.repeats)
            t_dnn = time_pass(lambda x, lin: lin(x), packed, inputs, args.repeats)
            print(f"{m:>5} {t_aten * 1e3:>9.2f} {nbytes / t_aten / 1e9:>10.1f} {t_dnn * 1e3:>10.2f} "
                  f"{nbytes / t_dnn / 1e9:>12.1f} {t_aten / t_dnn:>8.2f}x")


if __name__ == "__main__":
    main()
