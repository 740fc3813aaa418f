"""``python -m training prepare`` and the Wikipedia reader behind the default model's corpus."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from wiki_dump_fixture import ARTICLES, write_dump

from onegen_core.wikipedia import (
    article_passages,
    clean_wikitext,
    iter_pages,
    split_sentences,
    wikipedia_passages,
)
from training.prepare import PrepareConfig, prepare, split_articles


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    return write_dump(tmp_path_factory.mktemp("wiki") / "tiny-wiki.xml.bz2")


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_reader_keeps_articles_and_skips_redirects_disambiguation_and_other_namespaces(dump):
    assert [p.title for p in iter_pages(dump) if p.title in ARTICLES] == list(ARTICLES)
    titles = {p.article for p in wikipedia_passages(dump, max_words=40, min_article_words=40)}
    assert titles == set(ARTICLES)  # no "Zorblatt" redirect, no disambiguation page, no Talk: page


def test_markup_is_removed_and_sections_are_kept(dump):
    passages = list(wikipedia_passages(dump, max_words=40, min_article_words=40))
    for p in passages:
        for mark in ("{{", "}}", "[[", "]]", "<ref", "'''", "{|", "http", "Category:", "thumb|"):
            assert mark not in p.text, (mark, p.text)
        assert len(p.text.split()) <= 1.25 * 40 or len(split_sentences(p.text)) == 1
    assert len({p.id for p in passages}) == len(passages)
    zorblat = [p for p in passages if p.article == "Zorblat"]
    assert zorblat[0].title == "Zorblat" and zorblat[0].text.startswith("Zorblat is a fictional baker from the town")
    assert {p.section for p in zorblat} == {"", "Early life", "Career"}  # "References" is dropped
    assert next(p for p in zorblat if p.section == "Early life").title == "Zorblat: Early life"
    row = zorblat[1].to_json()
    assert row["metadata"] == {"article": "Zorblat", "section": zorblat[1].section} and row["title"] == zorblat[1].title


def test_clean_wikitext_links_and_nested_templates():
    text = clean_wikitext("A {{outer|{{inner}}}} [[Target page|label]] and [[Plain]] [[Image:x.png|a [[b]] c]]. &amp;")
    assert text == "A label and Plain . &"


def test_split_sentences():
    assert split_sentences("He left in 1915. The mill stood there. It ground rye!") == [
        "He left in 1915.", "The mill stood there.", "It ground rye!"]


def test_split_by_article_is_seeded_and_leaves_both_sides_non_empty():
    train, held = split_articles(["a", "b", "c", "d", "e"], 0.2, seed=3)
    assert len(held) == 1 and train | held == {"a", "b", "c", "d", "e"} and not train & held
    assert split_articles(["a", "b", "c", "d", "e"], 0.2, seed=3) == (train, held)
    with pytest.raises(ValueError, match="at least 2"):
        split_articles(["a"], 0.2, seed=0)


def test_prepare_writes_valid_data_with_no_heldout_article_in_training(tmp_path, dump):
    from onegen_core.wikipedia import write_corpus

    corpus = tmp_path / "passages.jsonl"
    write_corpus(wikipedia_passages(dump, max_words=40, min_article_words=40), corpus)
    out = tmp_path / "data"
    summary = prepare(corpus, out, PrepareConfig(heldout=0.34, seed=1, negatives_per_question=3, recipe="retrieval"))
    held = set(summary["heldout_articles"])
    assert len(held) == 2
    passages = {r["id"]: r for r in _rows(out / "corpus.jsonl")}
    db = _rows(out / "db.jsonl")
    assert {r["metadata"]["article"] for r in db} == set(ARTICLES) - held
    assert len(passages) == len(_rows(corpus))  # the index holds every article
    for split, articles in (("train", set(ARTICLES) - held), ("eval", held)):
        rows = _rows(out / f"{split}.jsonl")
        assert rows and summary[f"{split}_questions"] == len(rows)
        for r in rows:
            user, assistant = r["messages"]
            ((pos,),), (negs,) = assistant["positive"], assistant["negative"]
            p = passages[pos]
            assert p["metadata"]["article"] in articles and r["article"] == p["metadata"]["article"]
            assert pos not in negs and all(passages[n]["metadata"]["article"] in articles for n in negs)
            # the passage after [RQ] is what the engine inserts, and the answer is a sentence of it
            assert assistant["content"] == f"[RQ]<paragraph>{p['title']}\n{p['text']}</paragraph>{r['answer']}"
            assert r["answer"] in p["text"] and user["content"].endswith(("?", "."))
    kinds = summary["train_kinds"]
    assert kinds.get("definition") and kinds.get("fact") and kinds.get("section")
    questions = {r["messages"][0]["content"] for r in _rows(out / "train.jsonl") + _rows(out / "eval.jsonl")}
    assert any(re.fullmatch(r"(Who was|What is) \w[\w ]*\?", q) for q in questions)
    assert any(q.startswith(("When was", "Where was")) and q.endswith("born?") for q in questions)


def test_prepared_data_loads_in_training(tmp_path, dump, tiny_checkpoint):
    """train.jsonl + db.jsonl pass the trainer's own loader (unit ids resolve, conversations render)."""
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.text.rendering import Renderer
    from onegen_core.wikipedia import write_corpus
    from training.data import load_training_data

    corpus = tmp_path / "passages.jsonl"
    write_corpus(wikipedia_passages(dump, max_words=40, min_article_words=40), corpus)
    prepare(corpus, tmp_path / "data", PrepareConfig(heldout=0.34, seed=1, recipe="retrieval"))
    ckpt = load_checkpoint(tiny_checkpoint)
    data = load_training_data(Renderer.for_checkpoint(ckpt), train_file=tmp_path / "data/train.jsonl",
                              db_file=tmp_path / "data/db.jsonl", max_length=512, progress=False)
    assert data.train and all(e.query_positions and e.positives[0] for e in data.train)


def test_cli_prepares_a_dump_and_reports_bad_input(tmp_path, dump):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "training", "prepare", "--wikipedia", str(dump), "--out", str(out),
                          "--heldout", "0.3", "--max-words", "40", "--min-article-words", "40", "--recipe", "retrieval"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["articles"] == len(ARTICLES)
    assert {p.name for p in out.iterdir()} >= {"passages.jsonl", "corpus.jsonl", "db.jsonl", "train.jsonl",
                                               "eval.jsonl", "split.json"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    res = subprocess.run([sys.executable, "-m", "training", "prepare", "--corpus", str(bad), "--out", str(out),
                          "--recipe", "retrieval"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and f"{bad}:2: duplicate id 'a'" in res.stderr and "Traceback" not in res.stderr


def test_article_passages_of_a_stub_is_empty():
    from onegen_core.wikipedia import Page

    assert article_passages(Page("1", "Stub", "'''Stub''' is short.")) == []


def test_the_cli_asks_for_the_base_of_the_mixed_recipe_before_reading_the_corpus(tmp_path):
    res = subprocess.run([sys.executable, "-m", "training", "prepare", "--corpus", str(tmp_path / "none.jsonl"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--base CHECKPOINT" in res.stderr and "Traceback" not in res.stderr


def test_gensim_test_data_is_read_out_of_its_wheel_without_gensim_installed(tmp_path, monkeypatch):
    """``find_gensim_file`` (the Wikipedia sample, the news stories of ``--plain-text-file gensim-news``): with no
    gensim installed, the file is read out of the wheel in the cache and written next to it, once."""
    import importlib.util
    import zipfile

    from onegen_core.wikipedia import GENSIM_NEWS, find_gensim_file

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "gensim-9.9-py3-none-any.whl", "w") as z:
        z.writestr(GENSIM_NEWS, "First story.\nSecond story.\n")
    path = find_gensim_file(GENSIM_NEWS, tmp_path)
    assert path == tmp_path / "lee_background.cor" and path.read_text() == "First story.\nSecond story.\n"
    (tmp_path / "wheels" / "gensim-9.9-py3-none-any.whl").unlink()
    assert find_gensim_file(GENSIM_NEWS, tmp_path) == path  # extracted once: no wheel needed again
