"""A DDP step on 2 CPU processes (gloo, launched by torchrun) gives the parameters of the single-process step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _data(tmp: Path) -> tuple[Path, Path]:
    """4 conversations whose documents are all distinct, with enough hard negatives that nothing is random."""
    docs = [{"uid": f"d{i}", "messages": [{"role": "user", "content": f"Fact number {i} is {i * 7}."}]}
            for i in range(12)]
    convs = []
    for i in range(4):
        convs.append({"messages": [
            {"role": "user", "content": f"What is fact {i}?"},
            {"role": "assistant", "content": f"[RQ]<paragraph>Fact number {i} is {i * 7}.</paragraph>It is {i * 7}.",
             "positive": [[f"d{i}"]], "negative": [[f"d{4 + 2 * i}", f"d{5 + 2 * i}"]]},
        ]})
    db, train = tmp / "db.jsonl", tmp / "train.jsonl"
    db.write_text("".join(json.dumps(d) + "\n" for d in docs))
    train.write_text("".join(json.dumps(c) + "\n" for c in convs))
    return train, db


def _config(tmp: Path, base: Path, name: str, batch: int) -> Path:
    train, db = _data(tmp)
    cfg = {
        "base_model": str(base), "train_file": str(train), "db_file": str(db), "output_dir": str(tmp / name),
        "per_device_train_batch_size": batch, "max_steps": 1, "optimizer": "sgd", "learning_rate": 0.5,
        "max_grad_norm": 0, "loss_type": "infonce", "temperature": 0.1, "in_batch_negatives": True,
        "n_pos_per_sent": 1, "n_neg_per_pos": 2, "save_steps": 0, "plot": False, "max_length": 64,
        "eval_at_start": False, "logging_steps": 1, "seed": 7,
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_ddp_step_matches_single_process(tmp_path, tiny_checkpoint):
    single = _config(tmp_path, tiny_checkpoint, "single", batch=4)
    ddp = _config(tmp_path, tiny_checkpoint, "ddp", batch=2)
    run = dict(cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    r1 = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(single), "--quiet"], **run)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                         "--nproc_per_node", "2", "-m", "training", "train", "--config", str(ddp), "--quiet"], **run)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "training_summary.json").read_text())["world_size"] == 2
    # both runs saw the same data: the same LM and contrastive loss in the step's log
    logs = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("single", "ddp")]
    for key in ("lm_loss", "contrastive_loss"):
        assert abs(logs[0][0][key] - logs[1][0][key]) < 1e-5, (key, logs)
    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    base = load_file(str(Path(tiny_checkpoint) / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0.0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5, msg=k)
        moved = max(moved, (a[k] - base[k]).abs().max().item())
    assert moved > 1e-3  # the step changed the weights
