"""The OneGen training loop: one process, or one per device under torchrun / accelerate launch / DeepSpeed.

A step reads as a sentence: collate (conversations + their documents) → forward →
losses (LM on GEN targets, contrastive on RET tokens against documents gathered from
every rank) → backward → optimiser step. Losses are normalised by *global* counts (GEN
targets, queries) so that a DDP step over shards equals the single-process step over the
whole batch.

Around it: the run directory (``<output_dir>.run``) holds resume checkpoints (written
aside and renamed, safetensors + JSON, never pickle), ``metrics.jsonl``, TensorBoard logs
and the tokenised-data cache; the checkpoint (Contract 1) is written to ``output_dir`` once,
at the end, aside and renamed — bad data or a crash never leaves a partial one.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from onegen_core.device import auto_dtype
from onegen_core.distributed import RankContext
from onegen_core.text.rendering import Renderer

from .batching import Batch, OneGenCollator, batch_rng, micro_batches
from .config import TrainConfig
from .data import DataError, TrainingData, load_training_data, warn_truncation
from .evaluate import evaluate
from .losses import all_gather_variable, bpr_loss, gather_sizes, info_nce_loss, negative_mask
from .metrics import MetricsLogger, plot_loss_curves, read_metrics
from .modeling import (
    OneGenModel,
    build_model,
    prepare_tokenizer,
    resolve_base_dir,
    resolve_spec,
    save_onegen_checkpoint,
)

log = logging.getLogger("training")
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


# --------------------------------------------------------------------------- what a step adds up
@dataclass
class StepSums:
    """What training steps add up for the log: summed over micro-batches and steps, then over ranks."""

    lm_loss: float = 0.0  # LM cross-entropy summed over GEN targets
    lm_targets: float = 0.0
    contrastive_loss: float = 0.0  # contrastive loss summed over queries
    queries: float = 0.0
    tokens: float = 0.0  # non-pad tokens
    conversations: float = 0.0

    def __add__(self, other: StepSums) -> StepSums:
        return StepSums(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def over_ranks(self, ctx: RankContext) -> StepSums:
        return StepSums(*ctx.sum(list(astuple(self))))


# --------------------------------------------------------------------------- optimiser and schedule
def make_optimizer(cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon)


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


# --------------------------------------------------------------------------- resume checkpoints (no pickle)
def _save_optimizer(opt: torch.optim.Optimizer, directory: Path) -> None:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def _load_optimizer(opt: torch.optim.Optimizer, directory: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, v in load_file(str(directory / "optimizer.safetensors"), device=str(device)).items():
        idx, name = key.split(".", 1)
        state[int(idx)][name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state[int(idx)][name] = v
    for st in state.values():  # the step counter lives on the CPU in torch's optimisers
        if "step" in st and torch.is_tensor(st["step"]):
            st["step"] = st["step"].cpu()
    opt.load_state_dict({"state": dict(state), "param_groups": meta["param_groups"]})


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / CHECKPOINTS).glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / STATE_FILE).is_file()]
    return ckpts[-1] if ckpts else None


# --------------------------------------------------------------------------- the trainer
@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_seconds: float
    eval_start: dict[str, float] | None
    eval_final: dict[str, float] | None
    resumed_from: int = 0


class Trainer:
    def __init__(self, cfg: TrainConfig, *, on_step: Callable[[int], None] | None = None, progress: bool = True):
        self.cfg = cfg
        self.on_step = on_step
        self.progress = progress

    # ------------------------------------------------------------ setup
    def _check_output(self) -> None:
        out = Path(self.cfg.output_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not self.cfg.overwrite_output_dir:
            raise ValueError(
                f"output_dir: {out} already exists; set overwrite_output_dir: true to replace it or pick another"
            )

    def _load_data(self, renderer: Renderer) -> TrainingData:
        """Rank 0 validates, tokenises and caches; the other ranks then read the cache."""
        cfg, ctx = self.cfg, self.ctx
        kw = dict(train_file=cfg.train_file, db_file=cfg.db_file, eval_file=cfg.eval_file,
                  eval_ratio=cfg.eval_ratio, max_length=cfg.max_length,
                  conversation_format=cfg.conversation_format, seed=cfg.seed, cache_dir=cfg.cache_path,
                  truncation=cfg.truncation)
        data: TrainingData | None = None
        with ctx.synced(peer_message="rank 0 rejected the training data (its error is in rank 0's output)"):
            if ctx.is_main:
                data = load_training_data(renderer, progress=self.progress, **kw)
        if not ctx.is_main:
            data = load_training_data(renderer, progress=False, **kw)
        assert data is not None
        if ctx.is_main:
            warn_truncation(data.stats, cfg.max_length, cfg.truncation, log.warning)
        return data

    def _autocast(self) -> Any:
        p = self.cfg.precision
        dev = self.ctx.device
        if p == "auto":
            p = "bf16" if auto_dtype(dev) == torch.bfloat16 else "fp32"  # no fp16 autocast: without bf16, fp32
        if p == "bf16" and self.deepspeed is None:
            return lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def _digest(self, data: TrainingData) -> str:
        keys = ("base_model", "preset", "spec", "finetune", "lora_r", "lora_alpha", "lora_target_modules",
                "per_device_train_batch_size", "gradient_accumulation_steps", "n_pos_per_sent", "n_neg_per_pos",
                "seed", "optimizer")
        blob = json.dumps({k: getattr(self.cfg, k) for k in keys}, sort_keys=True, default=str) + data.cache_key
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def setup(self) -> None:
        """Rank, data, model, runner: everything ``train`` needs, resumed from a checkpoint if there is one."""
        cfg = self.cfg
        self.ctx = RankContext.from_env(device="auto")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self._check_output()
        self._setup_data()
        self._setup_model()
        self._setup_runner()

    def _setup_data(self) -> None:
        """The base's tokenizer with the spec's tokens, the validated data, the collator."""
        cfg, ctx = self.cfg, self.ctx
        self.base_dir = resolve_base_dir(cfg.base_model)
        self.spec = resolve_spec(cfg, self.base_dir)
        self.tokenizer, self.new_tokens, self.token_ids = prepare_tokenizer(cfg, self.base_dir, self.spec)
        self.renderer = Renderer(self.tokenizer, self.spec, self.token_ids)
        self.data = d = self._load_data(self.renderer)
        if ctx.is_main:
            log.info("data: %d train / %d eval conversations, %d documents (%d units)%s", len(d.train), len(d.eval),
                     len(d.corpus.uids), d.corpus.num_units, " [cached]" if d.from_cache else "")
        if cfg.lambda_r > 0 and not any(p for e in d.train for p in e.positives):
            raise DataError([f"{cfg.train_file}: no query RET token has a positive: nothing for the contrastive loss "
                             "(set lambda_r: 0 to train the LM only)"])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.collator = OneGenCollator(d.corpus, n_pos_per_sent=cfg.n_pos_per_sent,
                                       n_neg_per_pos=cfg.n_neg_per_pos, pad_id=self.pad_id)

    def _setup_model(self) -> None:
        """The model (DeepSpeed's config decides its load dtype), its optimiser and learning-rate schedule."""
        cfg, ctx = self.cfg, self.ctx
        self.deepspeed = None
        self.ds_config = None
        if cfg.deepspeed:
            from .ds import prepare_deepspeed_config

            self.ds_config = prepare_deepspeed_config(cfg, ctx.world_size)
        torch.manual_seed(cfg.seed)
        bf16 = self.ds_config is not None and self.ds_config.get("bf16", {}).get("enabled")
        self.lm = build_model(cfg, self.base_dir, self.tokenizer, self.new_tokens, self.spec, self.token_ids,
                              dtype=torch.bfloat16 if bf16 else torch.float32)
        self.model = OneGenModel(self.lm).to(ctx.device)
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if ctx.is_main:
            n_train = sum(p.numel() for _, p in self.params)
            n_all = sum(p.numel() for p in self.model.parameters())
            log.info("model: %s, %s fine-tune, %.2fM / %.2fM parameters trainable, new tokens %s",
                     self.base_dir.name, cfg.finetune, n_train / 1e6, n_all / 1e6, self.new_tokens or "none")
        self.optimizer = make_optimizer(cfg, self.params)
        n_micro = len(micro_batches(len(self.data.train), cfg.per_device_train_batch_size, seed=cfg.seed, epoch=0,
                                    rank=ctx.rank, world_size=ctx.world_size))
        self.steps_per_epoch = max(1, math.ceil(n_micro / cfg.gradient_accumulation_steps))
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(
            1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        self.lr_factor = lr_factor(cfg, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)

    def _setup_runner(self) -> None:
        """The run directory and its metrics, the module that runs steps (DeepSpeed, DDP or the model), resume."""
        cfg, ctx = self.cfg, self.ctx
        self.run_dir = cfg.run_path
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        self.metrics = MetricsLogger(self.run_dir / "metrics.jsonl", report_to=cfg.report_to,
                                     tensorboard_dir=self.run_dir / "tensorboard", enabled=ctx.is_main)
        self.digest = self._digest(self.data)
        self.step = 0
        self.resumed_from = 0
        if self.ds_config is not None:
            from .ds import DeepSpeedRunner

            self.deepspeed = DeepSpeedRunner(self, self.ds_config)
            self.runner: torch.nn.Module = self.deepspeed.engine
        elif ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.runner = DDP(self.model, device_ids=ids)
        else:
            self.runner = self.model
        self.autocast = self._autocast()
        self._maybe_resume()
        self.metrics.truncate_after(self.step if self.resumed_from else -1)

    def release_runner(self) -> None:
        """Drop the DDP / DeepSpeed wrapper while the process group still exists.

        DDP's Reducer holds the gloo process group. Freed after ``destroy_process_group``, it is the
        group's last owner, and the group's destructor joins gloo's worker threads while holding the
        GIL; a worker still freeing the last barrier's tensors waits for the GIL, so the finished
        rank hangs (about one torchrun run in ten on a loaded 2-core machine). Freed first, the Reducer
        only drops a reference, and ``destroy_process_group`` frees the group with the GIL released.
        """
        if hasattr(self, "runner"):
            self.runner = self.model
        self.deepspeed = None
        gc.collect()

    # ------------------------------------------------------------ resume
    def _maybe_resume(self) -> None:
        cfg = self.cfg
        if cfg.resume == "never":
            return
        path = Path(cfg.resume) if cfg.resume != "auto" else latest_checkpoint(self.run_dir)
        if path is None:
            return
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("digest") != self.digest:
            raise ValueError(
                f"resume: {path} was written for other data or settings (digest {state.get('digest')} != "
                f"{self.digest}); set resume: never to start over, or use a fresh run_dir"
            )
        if self.deepspeed is not None:
            self.deepspeed.load(path)
        else:
            from safetensors.torch import load_file

            weights = load_file(str(path / "trainable.safetensors"), device=str(self.ctx.device))
            names = {n for n, _ in self.params}
            missing = names - set(weights)
            if missing:
                raise ValueError(f"resume: {path} lacks {len(missing)} trainable tensor(s), e.g. {sorted(missing)[0]}")
            self.model.load_state_dict(weights, strict=False)
            _load_optimizer(self.optimizer, path, self.ctx.device)
        self.step = int(state["step"])
        self.resumed_from = self.step
        self.scheduler.last_epoch = self.step
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            g["lr"] = base * self.lr_factor(self.step)
        rng_file = path / f"rng-rank{self.ctx.rank}.safetensors"
        if rng_file.is_file():
            from safetensors.torch import load_file

            torch.set_rng_state(load_file(str(rng_file))["torch"])
        if self.ctx.is_main:
            log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)

    def _save_resume(self) -> None:
        from safetensors.torch import save_file

        ctx = self.ctx
        ckdir = self.run_dir / CHECKPOINTS
        final = ckdir / f"step-{self.step:07d}"
        tmp = ckdir / f".step-{self.step:07d}.tmp"
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        ctx.barrier()
        save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-rank{ctx.rank}.safetensors"))
        if self.deepspeed is not None:
            self.deepspeed.save(tmp)
        elif ctx.is_main:
            weights = {n: p.detach().cpu().contiguous() for n, p in self.params}
            save_file(weights, str(tmp / "trainable.safetensors"))
            _save_optimizer(self.optimizer, tmp)
        ctx.barrier()
        if ctx.is_main:
            state = {"step": self.step, "total_steps": self.total_steps, "digest": self.digest,
                     "world_size": ctx.world_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            old = sorted((p for p in ckdir.glob("step-*[0-9]")), key=lambda p: int(p.name.split("-")[1]))
            for p in old[: -self.cfg.save_total_limit]:
                shutil.rmtree(p, ignore_errors=True)
        ctx.barrier()

    # ------------------------------------------------------------ one step
    def _losses(self, lm_sum: torch.Tensor, n_tgt: torch.Tensor, q: torch.Tensor, d: torch.Tensor,
                batch: Batch) -> tuple[torch.Tensor, StepSums]:
        """Global-count-normalised loss of this rank's micro-batch, and its sums for logging."""
        cfg, ctx = self.cfg, self.ctx
        n_q = q.shape[0]
        n_tgt_all, n_q_all = ctx.sum([float(n_tgt), float(n_q)])
        ctr_sum = q.new_zeros(())
        if cfg.lambda_r > 0:
            sizes = gather_sizes(d.shape[0], ctx.device)
            q_sizes = gather_sizes(n_q, ctx.device)
            q_off, d_off = sum(q_sizes[: ctx.rank]), sum(sizes[: ctx.rank])
            d_all = all_gather_variable(d, sizes, with_grad=True)  # [M_all, H]
            units_all = all_gather_variable(batch.cand_units, sizes, with_grad=False)
            owner = torch.where(batch.cand_owner >= 0, batch.cand_owner + q_off, batch.cand_owner)
            owner_all = all_gather_variable(owner, sizes, with_grad=False)
            query_ids = torch.arange(n_q, device=q.device) + q_off
            mask = negative_mask(units_all, owner_all, query_ids, batch.query_pos_units,
                                 in_batch=cfg.in_batch_negatives)
            pos_index = batch.pos_index + d_off
            if cfg.loss_type == "infonce":
                ctr_sum = info_nce_loss(q, d_all, pos_index, mask, cfg.temperature, reduction="sum")
            else:
                ctr_sum = bpr_loss(q, d_all, pos_index, mask, reduction="sum")
        w = ctx.world_size
        loss = w * (cfg.lambda_g * lm_sum / max(n_tgt_all, 1.0) + cfg.lambda_r * ctr_sum / max(n_q_all, 1.0))
        return loss, StepSums(float(lm_sum.detach()), float(n_tgt), float(ctr_sum.detach()), float(n_q),
                              float(batch.num_tokens), float(batch.num_conversations))

    def train_step(self, epoch: int, group: list[int], micros: list[list[int]]) -> tuple[StepSums, float]:
        cfg, ctx = self.cfg, self.ctx
        self.runner.train()
        sums = StepSums()
        for j, mi in enumerate(group):
            batch = self.collator([self.data.train[i] for i in micros[mi]],
                                  batch_rng(cfg.seed, epoch, mi, ctx.rank)).to(ctx.device)
            last = j == len(group) - 1
            sync = self.runner.no_sync() if (ctx.distributed and self.deepspeed is None and not last) \
                else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    lm_sum, n_tgt, q, d = self.runner(
                        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                        query_rows=batch.query_rows, query_cols=batch.query_cols,
                        doc_rows=batch.doc_rows, doc_cols=batch.doc_cols)
                loss, parts = self._losses(lm_sum, n_tgt, q, d, batch)
                if self.deepspeed is not None:
                    self.deepspeed.backward_and_step(loss)  # DeepSpeed scales by 1/accumulation itself
                else:
                    (loss / len(group)).backward()
            sums = sums + parts
        if self.deepspeed is not None:
            grad_norm = self.deepspeed.grad_norm()
        else:
            params = [p for _, p in self.params]
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return sums, grad_norm

    # ------------------------------------------------------------ evaluation
    def run_eval(self) -> dict[str, float] | None:
        if not self.data.eval:
            return None
        res = evaluate(self.model, self.data.eval, self.data.corpus, batch_size=self.cfg.eval_batch_size,
                       pad_id=self.pad_id, device=self.ctx.device, pool_size=self.cfg.eval_pool_size,
                       seed=self.cfg.seed, autocast=self.autocast(), progress=self.progress and self.ctx.is_main)
        self.metrics.log({"split": "eval", "step": self.step, **res})
        if self.ctx.is_main:
            log.info("eval @ step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
        return res

    # ------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        eval_start = self.run_eval() if (cfg.eval_at_start and self.step == 0) else None
        n_train = len(self.data.train)
        epoch = self.step // self.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not (ctx.is_main and self.progress), dynamic_ncols=True)
        window = StepSums()
        t_window = time.perf_counter()
        t0 = time.perf_counter()
        while self.step < self.total_steps:
            micros = micro_batches(n_train, cfg.per_device_train_batch_size, seed=cfg.seed, epoch=epoch,
                                   rank=ctx.rank, world_size=ctx.world_size)
            start = (self.step - epoch * self.steps_per_epoch) * cfg.gradient_accumulation_steps
            for s0 in range(start, len(micros), cfg.gradient_accumulation_steps):
                group = list(range(s0, min(s0 + cfg.gradient_accumulation_steps, len(micros))))
                lr = self.optimizer.param_groups[0]["lr"]
                sums, grad_norm = self.train_step(epoch, group, micros)
                self.step += 1
                window = window + sums
                bar.update(1)
                if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                    self._log_train(window, time.perf_counter() - t_window, lr, grad_norm, epoch, bar)
                    window = StepSums()
                    t_window = time.perf_counter()
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                    self.run_eval()
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self._save_resume()
                if self.on_step is not None:
                    self.on_step(self.step)
                if self.step >= self.total_steps:
                    break
            epoch += 1
        bar.close()
        train_seconds = time.perf_counter() - t0
        eval_final = self.run_eval()
        out = self._write_output(eval_start, eval_final, train_seconds)
        return TrainResult(output_dir=out, steps=self.step, train_seconds=train_seconds, eval_start=eval_start,
                           eval_final=eval_final, resumed_from=self.resumed_from)

    def _log_train(self, window: StepSums, seconds: float, lr: float, grad_norm: float, epoch: int,
                   bar: Any) -> None:
        w = window.over_ranks(self.ctx)
        rec = {
            "split": "train", "step": self.step, "epoch": epoch,
            "lm_loss": w.lm_loss / w.lm_targets if w.lm_targets else float("nan"),
            "contrastive_loss": w.contrastive_loss / w.queries if w.queries else float("nan"),
            "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": w.tokens / seconds if seconds > 0 else 0.0,
            "conversations_per_s": w.conversations / seconds if seconds > 0 else 0.0,
        }
        rec["loss"] = self.cfg.lambda_g * (rec["lm_loss"] if w.lm_targets else 0.0) + self.cfg.lambda_r * (
            rec["contrastive_loss"] if w.queries else 0.0)
        self.metrics.log(rec)
        bar.set_postfix(lm=f"{rec['lm_loss']:.3f}", ret=f"{rec['contrastive_loss']:.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{rec['tokens_per_s']:.0f}")

    # ------------------------------------------------------------ output
    def _write_output(self, eval_start: dict | None, eval_final: dict | None, train_seconds: float) -> Path:
        cfg, ctx = self.cfg, self.ctx
        out = Path(cfg.output_dir)
        partial = out.with_name(out.name + ".partial")
        state_dict = self.deepspeed.consolidated_state_dict() if self.deepspeed is not None else None
        if ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            save_onegen_checkpoint(self.lm, self.tokenizer, self.spec, partial, cfg=cfg, base_dir=self.base_dir,
                                   state_dict=state_dict)
            summary = {"steps": self.step, "train_seconds": train_seconds, "resumed_from": self.resumed_from,
                       "world_size": ctx.world_size, "eval_start": eval_start, "eval_final": eval_final,
                       "data": self.data.stats, "data_cache_key": self.data.cache_key}
            (partial / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            (partial / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
            self.metrics.close()
            records = read_metrics(self.run_dir / "metrics.jsonl")
            if records:
                shutil.copyfile(self.run_dir / "metrics.jsonl", partial / "metrics.jsonl")
            if cfg.plot and records:
                plot_loss_curves(records, partial / "loss_curves.png")
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(partial, out)
            log.info("wrote the OneGen checkpoint %s", out)
        ctx.barrier()
        return out


def run_training(cfg: TrainConfig, *, on_step: Callable[[int], None] | None = None,
                 progress: bool = True) -> TrainResult:
    """Train per ``cfg`` and write the checkpoint; tears down the process group it created."""
    if not cfg.output_dir:  # a validate-only config (build_config(validate_only=True)) has none
        raise ValueError(f"{cfg.source + ': ' if cfg.source else ''}output_dir: is required")
    trainer = Trainer(cfg, on_step=on_step, progress=progress)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.release_runner()
        ctx = getattr(trainer, "ctx", None)
        if ctx is not None:
            ctx.close()
