"""``python -m training``: train a OneGen checkpoint, or only validate the data.

    python -m training train --config training/configs/multi_hop_qa.yaml [--field value ...]
    python -m training validate --config FILE        # check and tokenise the data, write nothing
    python -m training show-config --config FILE     # print the resolved config

Under several processes: ``torchrun --nproc_per_node 8 -m training train --config …``
(or ``accelerate launch -m training …``, or ``deepspeed`` with ``--deepspeed FILE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import add_config_flags, build_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "fine-tune and write the checkpoint to output_dir"),
        ("validate", "validate and tokenise train / db / eval files; print statistics"),
        ("show-config", "print the config after the file and the flags are applied"),
    ):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--config", help="YAML or JSON file of config fields")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        add_config_flags(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_config(args.config, overrides)
        if args.command == "show-config":
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
            return 0
        if args.command == "validate":
            return _validate(cfg, progress=not args.quiet)
        from .trainer import run_training

        result = run_training(cfg, progress=not args.quiet)
    except ValueError as e:  # user errors: config, data, paths — one clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps,
                          "train_seconds": round(result.train_seconds, 2), "eval_start": result.eval_start,
                          "eval_final": result.eval_final}, indent=2))
    return 0


def _validate(cfg, *, progress: bool) -> int:
    from onegen_core.rendering import Renderer

    from .data import load_training_data
    from .modeling import prepare_tokenizer, resolve_base_dir, resolve_spec

    base = resolve_base_dir(cfg.base_model)
    spec = resolve_spec(cfg, base)
    tok, new_tokens, ids = prepare_tokenizer(cfg, base, spec)
    data = load_training_data(Renderer(tok, spec, ids), train_file=cfg.train_file, db_file=cfg.db_file,
                              eval_file=cfg.eval_file, eval_ratio=cfg.eval_ratio, max_length=cfg.max_length,
                              conversation_format=cfg.conversation_format, seed=cfg.seed, cache_dir=None,
                              progress=progress)
    print(json.dumps({"ok": True, "train_conversations": len(data.train), "eval_conversations": len(data.eval),
                      "new_tokens": new_tokens, **data.stats}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
