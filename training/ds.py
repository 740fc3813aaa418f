"""DeepSpeed path (ZeRO-2 / ZeRO-3) for models too large for DDP, on GPU clusters.

Launch with ``deepspeed --num_gpus 8 -m training train --config … --deepspeed
training/configs/deepspeed_zero3.yaml`` (or torchrun; the env is the same). ``"auto"``
values in the DeepSpeed config are filled from the training config (micro-batch size,
accumulation, clipping, bf16). Under ZeRO-3 the weights are partitioned as they load
(``HfDeepSpeedConfig``), gathered to initialise the new token rows, and consolidated to
16-bit on rank 0 for the final checkpoint, which is then the same Contract-1 directory the
DDP path writes. Resume checkpoints use DeepSpeed's own format (its ``save_checkpoint``)
inside the run directory's ``step-N`` folders.

DeepSpeed is imported lazily: it is not a dependency of the package (``pip install
deepspeed`` on the GPU machines that use it). This path needs CUDA and is not exercised
by the CPU test suite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from onegen_core.device import auto_dtype, resolve_device

from .config import TrainConfig

_HF_DS_CONFIG: Any = None  # must stay alive while models load under ZeRO-3


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("the deepspeed option needs DeepSpeed on a CUDA machine: pip install deepspeed") from e
    return deepspeed


def read_deepspeed_config(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"deepspeed: config file {p} does not exist")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"deepspeed: {p}: malformed config: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed: {p}: expected a mapping")
    return data


def prepare_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config with ``auto`` fields filled; registers it with transformers for ZeRO-3 loading."""
    global _HF_DS_CONFIG
    import_deepspeed()
    ds = read_deepspeed_config(str(cfg.deepspeed))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and auto_dtype(resolve_device("auto")) == torch.bfloat16)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds)
    return ds


def gathered(params: list[torch.nn.Parameter]):
    """Context in which ZeRO-3-partitioned ``params`` are whole on every rank (rank 0's edits kept)."""
    import contextlib

    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    return import_deepspeed().zero.GatheredParameters(params, modifier_rank=0)


class DeepSpeedRunner:
    """The DeepSpeed engine in place of DDP: forward, backward + step, grad norm, save / load, 16-bit export."""

    def __init__(self, trainer: Any, ds_config: dict[str, Any]):
        deepspeed = import_deepspeed()
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.engine, _, _, _ = deepspeed.initialize(
            model=trainer.model, model_parameters=[p for _, p in trainer.params], optimizer=trainer.optimizer,
            lr_scheduler=trainer.scheduler, config=ds_config,
        )

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # steps the optimiser only at accumulation boundaries

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="deepspeed")

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory), tag="deepspeed", load_optimizer_states=True,
                                    load_lr_scheduler_states=True)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights of the causal LM (names without the wrapper's ``lm.``), on rank 0; None elsewhere."""
        if self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict()
        if sd is None:
            return None
        return {k[len("lm."):] if k.startswith("lm.") else k: v for k, v in sd.items()}
