"""The CLI: precise user errors (exit 2, no traceback, no half-written index), info and search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ib_data import make_records, write_jsonl

from index_builder.cli import main

REPO = Path(__file__).resolve().parents[2]


def build(args: list[str]) -> int:
    return main(["build", "--device", "cpu", "--quiet", *args])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created by a failed build"
    assert not out.with_name(out.name + ".building").exists(), "a failed corpus read left its work dir"


def test_bad_lines_are_all_reported_with_file_and_line(tiny_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n{"id": "c"}\n{"id": "d", "text": " "}\n')
    out = tmp_path / "idx"
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{corpus}:2: malformed JSON" in err
    assert f"{corpus}:3: document 'c': missing 'text'" in err
    assert f"{corpus}:4: document 'd': empty text" in err
    assert "--skip-invalid" in err and "Traceback" not in err
    assert_nothing_written(out)


def test_duplicate_ids_name_both_lines(tiny_checkpoint, tmp_path, capsys):
    recs = make_records(4)
    corpus = write_jsonl(tmp_path / "c.jsonl", [*recs, {"id": "d2", "text": "again"}])
    out = tmp_path / "idx"
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{corpus}:5: duplicate id 'd2'; first seen at {corpus}:3" in err
    assert_nothing_written(out)


def test_empty_corpus_file(tiny_checkpoint, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", make_records(2))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "idx"
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(good), str(empty), "--out", str(out)]) == 2
    assert f"{empty}: empty corpus file" in capsys.readouterr().err
    assert_nothing_written(out)


def test_unwritable_output(tiny_checkpoint, small_corpus, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "idx"
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(small_corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot write the output" in err and str(blocker) in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory"


def test_unknown_index_type_fails_before_any_work(tiny_checkpoint, small_corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(small_corpus), "--out", str(out),
                  "--index", "NotAnIndex42"]) == 2
    assert "'NotAnIndex42' is not a FAISS factory string" in capsys.readouterr().err
    assert_nothing_written(out)


def test_too_small_for_the_index_type(tiny_checkpoint, small_corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(small_corpus), "--out", str(out),
                  "--index", "ivfpq"]) == 2
    assert "needs at least 256 documents" in capsys.readouterr().err
    assert not out.exists()
    # an explicit IVF with more lists than training vectors is refused before encoding
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(small_corpus), "--out", str(out),
                  "--index", "IVF128,Flat"]) == 2
    assert "128 inverted lists but only 60 training vectors" in capsys.readouterr().err
    # ... and the corpus read is kept: another index type resumes from it without re-reading
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(small_corpus), "--out", str(out),
                  "--index", "IVF4,Flat"]) == 0
    assert "IVF4,Flat" in capsys.readouterr().out


def test_existing_output_needs_overwrite(tiny_checkpoint, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(3))
    out = tmp_path / "idx"
    args = ["--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus), "--out", str(out)]
    assert build(args) == 0
    assert "built" in capsys.readouterr().out
    assert build(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    write_jsonl(corpus, make_records(5))
    assert build([*args, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["count"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "idx"]


def test_bad_flags_and_missing_checkpoint(tmp_path, small_corpus, capsys):
    out = tmp_path / "idx"
    with pytest.raises(SystemExit) as e:
        build(["--checkpoint", "x", "--corpus", str(small_corpus), "--out", str(out), "--batch-tokens", "0"])
    assert e.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err
    assert build(["--checkpoint", str(tmp_path / "nope"), "--corpus", str(small_corpus), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert build(["--checkpoint", str(tmp_path / "nope"), "--corpus", str(small_corpus), "--out", str(out),
                  "--chunk-overlap", "4"]) == 2
    assert "--chunk-overlap needs --chunk-tokens" in capsys.readouterr().err


def test_info_and_search(flat_index, tiny_checkpoint, capsys):
    assert main(["info", str(flat_index)]) == 0
    out = capsys.readouterr().out
    assert "60 x 64" in out and "Flat (IndexFlat" in out and "[0] d0 — Title 0" in out
    assert main(["info", str(flat_index), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == info["docstore_rows"] == 60 and info["manifest"]["factory"] == "Flat"
    assert main(["search", str(flat_index), "--checkpoint", str(tiny_checkpoint), "capital of france", "-k", "3",
                 "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    scores = [h["score"] for h in result["hits"]]
    assert result["query"] == "capital of france" and len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert all(h["doc_id"].startswith("d") and h["text"] for h in result["hits"])
    assert main(["search", str(flat_index), "--checkpoint", str(tiny_checkpoint), "the dog", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: the dog" and lines[1].lstrip().startswith("1. ") and len(lines) == 3


def test_a_real_process_exits_2_without_a_traceback(tiny_checkpoint, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "fine"}\nnot json\n')
    out = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "index_builder", "build", "--checkpoint", str(tiny_checkpoint), "--corpus",
         str(corpus), "--out", str(out), "--device", "cpu", "--quiet"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: invalid corpus input:\n  {corpus}:2: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_written(out)


def test_output_into_a_closed_pipe_exits_quietly(flat_index):
    """``index_builder info INDEX | head``: the reader goes away; no BrokenPipe traceback, status 141."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "index_builder", "info", str(flat_index), "--samples", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    proc.stdout.close()  # the reader is gone before anything is written: every write hits a closed pipe
    try:
        err = proc.stderr.read().decode(errors="replace")
        status = proc.wait(timeout=120)
    finally:
        proc.stderr.close()
    assert status == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_ctrl_c_exits_130_and_says_how_to_resume(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from index_builder import builder as builder_mod

    def interrupted(path, array):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder_mod, "save_npy_atomic", interrupted)
    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(4))
    out = tmp_path / "idx"
    assert build(["--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus), "--out", str(out)]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "idx.building" / "ingest.json").is_file()
