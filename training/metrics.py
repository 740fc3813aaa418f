"""Training metrics: JSONL records (always), TensorBoard scalars (when installed), a PNG of the loss curves.

``metrics.jsonl`` has one object per line: ``{"split": "train"|"eval", "step", ...}``.
A resumed run first drops the records past the step it resumes from, so the file always
describes one consistent history.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("training")


class MetricsLogger:
    def __init__(self, path: Path, *, report_to: str = "auto", tensorboard_dir: Path | None = None,
                 enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if report_to in ("auto", "tensorboard") and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                if report_to == "tensorboard":
                    raise ImportError("report_to: tensorboard needs tensorboard: pip install tensorboard") from None
                log.info("tensorboard is not installed; metrics go to %s only", path)

    def truncate_after(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("step", "split") and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def plot_loss_curves(records: list[dict[str, Any]], out: Path) -> Path | None:
    """LM loss, contrastive loss and eval recall against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("lm_loss", "eval_lm_loss", "LM loss (GEN tokens)"),
              ("contrastive_loss", None, "contrastive loss (RET tokens)")]
    for ax, (key, ekey, title) in zip(axes, panels, strict=False):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label="train")
        if ekey:
            epts = [(r["step"], r[ekey]) for r in evals if ekey in r and math.isfinite(r[ekey])]
            if epts:
                ax.plot(*zip(*epts, strict=True), "o-", label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    ax = axes[2]
    for k in ("recall@1", "recall@5"):
        pts = [(r["step"], r[k]) for r in evals if k in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=k)
    ax.set_ylim(0, 1.05)
    ax.set_title("eval retrieval recall")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
