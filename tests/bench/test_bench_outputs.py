"""Where the bench scripts write: a quick or partial run goes under bench/results/quick/ (git-ignored), so it never
overwrites the committed full results (issue #19: ``efficiency.py --quick`` used to rewrite results/efficiency.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def test_quick_results_are_git_ignored():
    probe = common.QUICK_RESULTS / "efficiency.md"
    r = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=BENCH, capture_output=True)
    assert r.returncode == 0, f"{probe} is not git-ignored"


@pytest.mark.parametrize("argv,full", [([], True), (["--quick"], False), (["--quick", "--out-dir", "/tmp/x"], None)])
def test_efficiency_quick_writes_elsewhere(argv, full):
    import efficiency

    out = efficiency.parse_args(argv).out_dir
    assert out == {True: common.RESULTS, False: common.QUICK_RESULTS, None: Path("/tmp/x")}[full]


@pytest.mark.parametrize("argv,full", [([], True), (["--limit-retrieval", "100"], False), (["--skip-base"], False),
                                       (["--no-reference-rows"], False), (["--lm-passages", "0"], False),
                                       (["--limit-answers", "500"], True), (["--pool", "heldout"], True),
                                       (["--sets-only"], False), (["--limit-sets", "10"], False),
                                       (["--sets-dir", "bench/quality_sets"], True)])
def test_quality_reduced_run_writes_elsewhere(argv, full):
    import quality

    assert quality.parse_args(argv).json == (common.RESULTS if full else common.QUICK_RESULTS) / "quality.json"
    assert quality.parse_args([*argv, "--json", "/tmp/q.json"]).json == Path("/tmp/q.json")


@pytest.mark.parametrize("argv,full", [(["--model", "default"], True), ([], False),
                                       (["--model", "default", "--scenarios", "stall,auth"], False),
                                       (["--checkpoint", "c", "--index", "i"], False)])
def test_hostile_demo_or_partial_run_writes_elsewhere(argv, full):
    import hostile

    args, _ = hostile.parse_args(argv)
    assert Path(args.out) == (common.RESULTS if full else common.QUICK_RESULTS) / "hostile"


def test_a_report_is_the_table_and_its_json_each_replaced_whole(tmp_path, capsys):
    import argparse
    import json

    out = tmp_path / "deep" / "bench"
    (tmp_path / "deep").mkdir()
    out.with_suffix(".md").write_text("old table")
    args = argparse.Namespace(out=out, n=3)
    common.write_report(out, "| a |\n", {"runtime_s": 1.5, "args": common.plain_args(args), "when": Path("/x")})
    assert capsys.readouterr().out == "| a |\n\n"
    assert out.with_suffix(".md").read_text() == "| a |\n"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == {"runtime_s": 1.5, "args": {"out": str(out), "n": 3}, "when": "/x"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json", "bench.md"]  # no .tmp left behind
