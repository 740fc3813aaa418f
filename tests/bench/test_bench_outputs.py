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
