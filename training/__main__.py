"""``python -m training``: train a OneGen checkpoint, or only validate the data.

    python -m training train --config training/configs/multi_hop_qa.yaml [--field value ...]
    python -m training validate --config FILE        # check and tokenise the data, write nothing
    python -m training show-config --config FILE     # print the resolved config
    python -m training prepare --wikipedia --out DIR  # a corpus of passages -> train/eval data (split by article)

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
    _add_prepare_parser(sub)
    return p


def _add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    from .mix import add_mix_flags
    from .prepare import RECIPES, PrepareConfig
    from .questions import CLOZE_ANSWERS

    d = PrepareConfig()
    sp = sub.add_parser(
        "prepare", help="turn a corpus of passages into OneGen training data, split by article",
        description="Write corpus.jsonl, db.jsonl (training articles), train.jsonl, eval.jsonl (held-out articles) "
        "and split.json: questions with the passage that answers it, hard negatives and a grounded answer.")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="corpus JSONL of passages ({id, title, text, metadata?})")
    src.add_argument("--wikipedia", nargs="?", const="gensim", metavar="DUMP",
                     help="a MediaWiki XML dump (.xml or .xml.bz2) cut into passages; without a value, the English "
                     "Wikipedia sample in gensim's test data (the default model's corpus)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--max-words", type=int, default=90, help="words per passage cut from a dump (default: 90)")
    sp.add_argument("--min-article-words", type=int, default=150,
                    help="articles of a dump shorter than this are left out as stubs (default: 150)")
    sp.add_argument("--heldout", type=float, default=d.heldout,
                    help=f"fraction of articles held out for evaluation (default: {d.heldout})")
    sp.add_argument("--seed", type=int, default=d.seed, help=f"seed of the split and sampling (default: {d.seed})")
    sp.add_argument("--max-questions-per-passage", type=int, default=d.max_questions_per_passage,
                    help=f"questions per passage at most (default: {d.max_questions_per_passage})")
    sp.add_argument("--negatives-per-question", type=int, default=d.negatives_per_question,
                    help=f"hard negatives per question (default: {d.negatives_per_question})")
    sp.add_argument("--recipe", default=d.recipe, choices=list(RECIPES),
                    help="mixed: retrieval QA + refusals + no-retrieval chat + passage reading, the chat answers "
                    "distilled from --base (docs/training.md); retrieval: retrieval QA only (default: mixed)")
    sp.add_argument("--cloze-answer", default=d.cloze_answer, choices=list(CLOZE_ANSWERS),
                    help="answer of an inverse-cloze question: its whole sentence, the hidden term in a short "
                    "sentence, or none (the question trains retrieval only; its answer is not learned) "
                    f"(docs/training.md has what each taught the default model) (default: {d.cloze_answer})")
    add_mix_flags(sp)
    sp.add_argument("--passage-template", default=d.passage_template,
                    help="how the inserted passage reads after the query token; must equal the checkpoint spec's "
                    f"passage_template (default: {d.passage_template!r})")


def _prepare(args: argparse.Namespace) -> int:
    from onegen_core.wikipedia import find_gensim_enwiki, wikipedia_passages, write_corpus

    from .mix import mix_config
    from .prepare import PrepareConfig, prepare

    cfg = PrepareConfig(heldout=args.heldout, seed=args.seed, max_questions_per_passage=args.max_questions_per_passage,
                        negatives_per_question=args.negatives_per_question, passage_template=args.passage_template,
                        recipe=args.recipe, cloze_answer=args.cloze_answer)
    mix = mix_config(args)
    if cfg.recipe == "mixed":
        mix.check_base()  # before minutes of corpus work
    corpus = args.corpus
    if args.wikipedia is not None:
        if args.max_words < 20:
            raise ValueError(f"--max-words must be >= 20, got {args.max_words}")
        dump = find_gensim_enwiki() if args.wikipedia == "gensim" else args.wikipedia
        if not os.path.isfile(dump):
            raise ValueError(f"--wikipedia: {dump} does not exist")
        corpus = os.path.join(args.out, "passages.jsonl")
        os.makedirs(args.out, exist_ok=True)
        passages = wikipedia_passages(dump, max_words=args.max_words, min_article_words=args.min_article_words)
        n = write_corpus(passages, corpus)
        print(f"{dump}: {n} passages -> {corpus}", file=sys.stderr)
    summary = prepare(corpus, args.out, cfg, mix)
    print(json.dumps({k: v for k, v in summary.items() if k != "heldout_articles"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        try:
            return _prepare(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_config(args.config, overrides, validate_only=args.command == "validate")
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
    from onegen_core.text.rendering import Renderer

    from .data import load_training_data, warn_truncation
    from .modeling import prepare_tokenizer, resolve_base_dir, resolve_spec

    base = resolve_base_dir(cfg.base_model)
    spec = resolve_spec(cfg, base)
    tok, new_tokens, ids = prepare_tokenizer(cfg, base, spec)
    data = load_training_data(Renderer(tok, spec, ids), train_file=cfg.train_file, db_file=cfg.db_file,
                              eval_file=cfg.eval_file, eval_ratio=cfg.eval_ratio, max_length=cfg.max_length,
                              conversation_format=cfg.conversation_format, seed=cfg.seed, cache_dir=None,
                              progress=progress, truncation=cfg.truncation)
    warn_truncation(data.stats, cfg.max_length, cfg.truncation, lambda msg, *a: print(msg % a, file=sys.stderr))
    print(json.dumps({"ok": True, "train_conversations": len(data.train), "eval_conversations": len(data.eval),
                      "new_tokens": new_tokens, **data.stats}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
