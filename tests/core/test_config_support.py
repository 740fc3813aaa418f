"""Config switches of supported architectures: ``mlp_bias`` runs natively; what cannot run is refused in one line.

Both CLIs load checkpoints through ``load_checkpoint``; an unsupported config field must end them
with status 2 and one line naming the field, never a traceback from inside the model build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from onegen_core.formats.checkpoint import CheckpointError, load_checkpoint
from onegen_core.model import build_attention_metadata, build_model

REPO = Path(__file__).resolve().parents[2]
DYNAMIC_ROPE = {"rope_type": "dynamic", "factor": 2.0}


@pytest.mark.parametrize("backend", ["aten", "auto"])
def test_mlp_bias_logits_match_transformers(tiny_checkpoint_factory, backend):
    path = tiny_checkpoint_factory("llama", mlp_bias=True)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, torch.float32, torch.device("cpu"), linear_backend=backend)
    assert model.layers[0].mlp.down_proj.bias is not None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.model.layers[0].mlp.gate_proj.bias.abs().sum() > 0  # the fixture's biases are not zero
    torch.manual_seed(0)
    seq = torch.randint(0, ckpt.config.vocab_size, (29,))
    logits = model.compute_logits(model(seq, build_attention_metadata([29], [29])))
    with torch.no_grad():
        ref = hf(seq[None]).logits[0]
    assert torch.allclose(logits, ref, atol=1e-4)


def test_dynamic_rope_is_refused_at_load_naming_the_field(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", rope_scaling=DYNAMIC_ROPE)
    with pytest.raises(CheckpointError, match=r"unsupported rope_parameters\.rope_type 'dynamic'.*supported: default"):
        load_checkpoint(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_both_clis_serve_mlp_bias_and_refuse_dynamic_rope_in_one_line(tiny_checkpoint_factory, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"passage number {i}"}) + "\n" for i in range(3)))
    biased = tiny_checkpoint_factory("llama", mlp_bias=True)
    dynamic = tiny_checkpoint_factory("llama", rope_scaling=DYNAMIC_ROPE)

    def generate(ckpt: Path) -> subprocess.CompletedProcess:
        return _cli("onegen_core", "generate", "--checkpoint", str(ckpt), "--max-tokens", "4", "--device", "cpu",
                    "hello")

    def build(ckpt: Path, out: str) -> subprocess.CompletedProcess:
        return _cli("index_builder", "build", "--checkpoint", str(ckpt), "--corpus", str(corpus),
                    "--out", str(tmp_path / out), "--device", "cpu", "--quiet")

    for r in (generate(biased), build(biased, "biased")):
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "biased" / "manifest.json").is_file()

    for r in (generate(dynamic), build(dynamic, "dynamic")):
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "rope_parameters.rope_type 'dynamic'" in lines[0] and str(dynamic) in lines[0]
    assert not (tmp_path / "dynamic").exists()
