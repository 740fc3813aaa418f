"""training: fine-tune a base LLM into a OneGen checkpoint.

Every token of a training conversation is GEN (cross-entropy), CTX (no loss) or RET
(contrastive loss on its final-layer hidden state). Query RET tokens in assistant turns
are contrasted with the document units their ``positive`` / ``negative`` lists name; those
documents go through the same forward pass, and the hidden state at their document RET
token is the document vector. The result is a Contract-1 checkpoint the engine serves.

Entry point: ``python -m training train --config training/configs/multi_hop_qa.yaml``.
Library: :func:`training.trainer.run_training` with a :class:`training.config.TrainConfig`.
"""

from .config import TrainConfig, build_config
from .data import DataError

__all__ = ["DataError", "TrainConfig", "build_config", "run_training"]


def run_training(*args, **kwargs):
    """See :func:`training.trainer.run_training` (imported lazily: it pulls in transformers)."""
    from .trainer import run_training as _run

    return _run(*args, **kwargs)
