"""Token roles from the OneGen paper.

Every token of a sequence is one of:

* ``GEN`` — generated text: it predicts the next token (LM loss in training).
* ``CTX`` — context only: prompts, inserted passages (no loss).
* ``RET`` — a retrieval token: its final-layer hidden state represents a sentence
  (contrastive loss in training, a query/document vector at inference).
"""

from __future__ import annotations

from enum import IntEnum


class Role(IntEnum):
    CTX = 0
    GEN = 1
    RET = 2
