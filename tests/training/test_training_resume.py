"""An interrupted run resumes from its last checkpoint and ends where the uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from training.config import TrainConfig
from training.trainer import latest_checkpoint, run_training


class Interrupted(RuntimeError):
    pass


def _cfg(task, base, tmp, name, **kw) -> TrainConfig:
    return TrainConfig(base_model=str(base), train_file=str(task.train_file), db_file=str(task.db_file),
                       output_dir=str(tmp / name), max_steps=6, save_steps=2, per_device_train_batch_size=4,
                       n_neg_per_pos=2, learning_rate=1e-3, max_length=64, eval_at_start=False, plot=False,
                       logging_steps=1, loss_type="bpr", seed=3, **kw)


def test_resume_after_interruption(tmp_path, synthetic_task, synthetic_base):
    full = run_training(_cfg(synthetic_task, synthetic_base, tmp_path, "a"), progress=False)

    cfg = _cfg(synthetic_task, synthetic_base, tmp_path, "b")

    def crash(step: int) -> None:
        if step == 5:
            raise Interrupted("simulated crash")

    with pytest.raises(Interrupted):
        run_training(cfg, on_step=crash, progress=False)
    assert not (tmp_path / "b").exists()  # no partial checkpoint
    assert latest_checkpoint(cfg.run_path).name == "step-0000004"
    assert len(list((cfg.run_path / "checkpoints").glob("step-*"))) == 2  # save_total_limit
    resumed = run_training(cfg, progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 6

    a = load_file(str(full.output_dir / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the interrupted step 5 was logged once, after the resume


def test_resume_refuses_changed_settings(tmp_path, synthetic_task, synthetic_base):
    cfg = _cfg(synthetic_task, synthetic_base, tmp_path, "c")

    def crash(step: int) -> None:
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_training(cfg, on_step=crash, progress=False)
    changed = _cfg(synthetic_task, synthetic_base, tmp_path, "c", n_pos_per_sent=2)
    with pytest.raises(ValueError, match="resume: .* was written for other data or settings"):
        run_training(changed, progress=False)
