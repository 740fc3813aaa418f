"""What the tests import to build tiny random checkpoints (``onegen_core.random_checkpoint``).

The builders themselves are no test code (``server.demo`` serves one), so they live in
``random_checkpoint``; the tests keep importing them from here: the tiny architectures the
suite covers (``ARCHS``), the tokenizer and config builders, and the checkpoint editors.
"""

from .random_checkpoint import (
    ARCHS,
    build_tiny_checkpoint,
    build_tokenizer,
    make_query_token_likely,
    tiny_config,
)

__all__ = ["ARCHS", "build_tiny_checkpoint", "build_tokenizer", "make_query_token_likely", "tiny_config"]
