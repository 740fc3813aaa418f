"""Wikipedia dumps to passages: the default model's corpus, read offline.

A MediaWiki XML dump (``pages-articles``, plain or ``.bz2``) is streamed page by page;
redirects, disambiguation pages and non-article namespaces are skipped, and the wiki
markup is removed (templates, tables, references, files and categories, comments,
HTML tags; links keep their label, bold and italics their text). What remains is cut at
its ``== headings ==`` into sections, and each section into passages of whole
paragraphs, or of whole sentences when a paragraph is long, of at most
``max_words`` words. A passage keeps its article and section: its ``title`` is
``"Article: Section"`` (``"Article"`` for the lead), and ``metadata`` holds both.

The default corpus is the English Wikipedia sample that gensim ships among its test
data (``enwiki-latest-pages-articles1...-shortened.bz2``, about 100 articles). It is
found in an installed ``gensim`` without importing it, or read out of a gensim wheel
(``pip download --no-deps gensim``): no hub, no network beyond the package index.

Passages are cut here, at paragraph and sentence boundaries, rather than as token
windows, so that a passage never starts mid-sentence; the index builder's token
chunking stays a safety net for passages that a tokenizer still finds too long.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from xml.etree import ElementTree

GENSIM_TEST_DATA = "gensim/test/test_data"
GENSIM_ENWIKI = f"{GENSIM_TEST_DATA}/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_NEWS = f"{GENSIM_TEST_DATA}/lee_background.cor"  # 300 Australian news stories, one per line (not Wikipedia)
SKIPPED_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes", "works cited", "gallery",
    "bibliography and further reading", "selected bibliography", "publications",
}
MIN_PASSAGE_WORDS = 20  # shorter passages (a stray line, a lone list item) are merged or dropped
MIN_ARTICLE_WORDS = 150  # stubs shorter than this are left out (the default corpus was cut with 150)


@dataclass(frozen=True)
class Passage:
    id: str
    article: str
    section: str  # "" for the lead section
    text: str

    @property
    def title(self) -> str:
        return f"{self.article}: {self.section}" if self.section else self.article

    def to_json(self) -> dict:
        return {"id": self.id, "title": self.title, "text": self.text,
                "metadata": {"article": self.article, "section": self.section}}


# --------------------------------------------------------------------------- locating the dump
def find_gensim_enwiki(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of gensim's English Wikipedia sample: in an installed gensim, else extracted from its wheel.

    Without gensim installed, ``pip download --no-deps gensim`` fetches the wheel (from the
    package index, the one network access allowed) into ``cache_dir`` and the file is read out of it.
    """
    return find_gensim_file(GENSIM_ENWIKI, cache_dir)


def find_gensim_file(member: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``member`` of gensim's package (e.g. ``GENSIM_NEWS``), found as ``find_gensim_enwiki`` finds the
    Wikipedia sample."""
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            p = Path(root).parent / member
            if p.is_file():
                return p
    cache = Path(cache_dir or ".cache/onegen-default")
    target = cache / Path(member).name
    if target.is_file():
        return target
    wheels = sorted((cache / "wheels").glob("gensim-*.whl"))
    if not wheels:
        (cache / "wheels").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "gensim",
               "-d", str(cache / "wheels")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted((cache / "wheels").glob("gensim-*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(
                f"{Path(member).name} comes from gensim's test data (the default corpus is its Wikipedia sample), "
                "and neither an installed gensim nor a gensim wheel was found; "
                f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-400:]}"
            )
    with zipfile.ZipFile(wheels[-1]) as z:
        data = z.read(member)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------- reading pages
@dataclass(frozen=True)
class Page:
    id: str
    title: str
    wikitext: str


def _open(path: str | os.PathLike) -> IO[bytes]:
    f = open(path, "rb")
    if f.read(3) == b"BZh":
        f.seek(0)
        return bz2.open(f)  # type: ignore[return-value]
    f.seek(0)
    return f


def iter_pages(path: str | os.PathLike) -> Iterator[Page]:
    """Article pages (namespace 0, not redirects) of a MediaWiki XML dump, in dump order."""
    with _open(path) as f:
        title = page_id = ns = None
        text = ""
        redirect = False
        for _, elem in ElementTree.iterparse(f, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = elem.text
            elif tag == "id" and page_id is None:
                page_id = elem.text
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                if ns == "0" and not redirect and title and not text.lstrip().upper().startswith("#REDIRECT"):
                    yield Page(id=str(page_id), title=title, wikitext=text)
                title = page_id = ns = None
                text, redirect = "", False
                elem.clear()


# --------------------------------------------------------------------------- markup
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_BLOCK_TAGS = re.compile(r"<(gallery|math|code|pre|timeline|score|imagemap|syntaxhighlight|source)[^>]*>.*?</\1>",
                         re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_SPACES = re.compile(r"[ \t\u00a0]+")
_FILE_PREFIXES = ("file:", "image:", "category:", "media:")


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ … close`` spans (templates ``{{ }}``, tables ``{| |}``), nesting included."""
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; files, images and categories are removed."""
    out: list[str] = []
    i = 0
    while True:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        depth, k = 0, j
        while k < len(text):  # find the matching ]] (file captions nest links)
            if text.startswith("[[", k):
                depth += 1
                k += 2
            elif text.startswith("]]", k):
                depth -= 1
                k += 2
                if depth == 0:
                    break
            else:
                k += 1
        inner = text[j + 2:k - 2]
        if not inner.lower().lstrip(":").startswith(_FILE_PREFIXES):
            label = inner.rsplit("|", 1)[-1] if "|" in inner else inner
            out.append(_links(label))
        i = k
    return "".join(out)


def clean_wikitext(wikitext: str) -> str:
    """Wiki markup to plain text, keeping ``== heading ==`` lines (they mark sections) and paragraph breaks."""
    t = _COMMENT.sub("", wikitext)
    t = _REF.sub("", t)
    t = _BLOCK_TAGS.sub("", t)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = _links(t)
    t = _EXT_LINK.sub(lambda m: m.group(1), t)
    t = _TAG.sub("", t)
    t = html.unescape(t)
    t = _TAG.sub("", t)  # escaped tags (&lt;br&gt;) become tags only after unescaping
    t = _BOLD_ITALIC.sub("", t)
    t = _BARE_URL.sub("", t)
    lines = []
    for line in t.split("\n"):
        s = line.strip()
        if _HEADING.match(s):
            lines.append(s)
            continue
        s = s.lstrip("*#:;").strip()  # list and indent markers: keep the item's text
        if s.startswith(("|", "!", "__")) or s in ("----",):
            continue
        lines.append(_SPACES.sub(" ", s))
    return "\n".join(lines)


def sections(clean: str) -> list[tuple[str, list[str]]]:
    """``[(section heading, paragraphs)]``; the lead section's heading is ``""``. Sub-sections are their own."""
    out: list[tuple[str, list[str]]] = [("", [])]
    para: list[str] = []

    def flush() -> None:
        if para:
            out[-1][1].append(" ".join(para))
            para.clear()

    for line in clean.split("\n"):
        m = _HEADING.match(line)
        if m:
            flush()
            out.append((m.group(2).strip(), []))
        elif not line:
            flush()
        else:
            para.append(line)
    flush()
    return [(h, ps) for h, ps in out if ps]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph, split after ``.!?`` before a capital or digit (good enough for encyclopedic text)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _words(text: str) -> int:
    return len(text.split())


def passages_of(paragraphs: list[str], max_words: int) -> list[str]:
    """Group whole paragraphs (or, for long ones, whole sentences) into passages of at most ``max_words`` words."""
    units: list[str] = []
    for p in paragraphs:
        if _words(p) <= max_words:
            units.append(p)
        else:
            units.extend(split_sentences(p))
    out: list[str] = []
    cur: list[str] = []
    for u in units:
        if cur and _words(" ".join(cur)) + _words(u) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur.append(u)
    if cur:
        if out and _words(" ".join(cur)) < MIN_PASSAGE_WORDS and _words(out[-1]) + _words(" ".join(cur)) <= \
                max_words * 1.25:
            out[-1] = out[-1] + " " + " ".join(cur)  # a short tail joins the previous passage
        else:
            out.append(" ".join(cur))
    return [p for p in out if _words(p) >= MIN_PASSAGE_WORDS]


def _looks_like_disambiguation(page: Page, clean: str) -> bool:
    low = page.wikitext.lower()
    return "(disambiguation)" in page.title.lower() or "{{disambig" in low or "{{dab" in low or \
        "may refer to:" in clean[:600]


def article_passages(page: Page, max_words: int = 120, min_article_words: int = MIN_ARTICLE_WORDS) -> list[Passage]:
    """A page's passages, ids ``wiki-<page id>-<k>`` in article order; [] for disambiguation or stub pages.

    A passage holds at most ``max_words`` words, except that a short last piece of a section joins the
    passage before it (up to 1.25 x ``max_words``) rather than standing alone.
    """
    clean = clean_wikitext(page.wikitext)
    if _looks_like_disambiguation(page, clean):
        return []
    out: list[Passage] = []
    for heading, paras in sections(clean):
        if heading.lower() in SKIPPED_SECTIONS:
            continue
        for text in passages_of(paras, max_words):
            out.append(Passage(id=f"wiki-{page.id}-{len(out)}", article=page.title, section=heading, text=text))
    if sum(_words(p.text) for p in out) < min_article_words:
        return []
    return out


def wikipedia_passages(path: str | os.PathLike, *, max_words: int = 120, max_articles: int | None = None,
                       min_article_words: int = MIN_ARTICLE_WORDS) -> Iterator[Passage]:
    """Every passage of the dump's articles, in dump order."""
    n = 0
    for page in iter_pages(path):
        ps = article_passages(page, max_words, min_article_words)
        if not ps:
            continue
        yield from ps
        n += 1
        if max_articles is not None and n >= max_articles:
            return


def write_jsonl(rows: Iterable[dict], out: str | os.PathLike) -> int:
    """One JSON object per line, written aside and renamed (an interrupted write leaves no partial file);
    returns the count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    return n


def write_corpus(passages: Iterable[Passage], out: str | os.PathLike) -> int:
    """Corpus JSONL (``{id, title, text, metadata}``); returns the count."""
    return write_jsonl((p.to_json() for p in passages), out)
