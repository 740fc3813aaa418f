"""onegen_core: one model that both generates and retrieves, in one pass.

The engine decodes with a model fine-tuned OneGen-style: when it samples a query
retrieval token (``[RQ]``) the final-layer hidden state of that token is the query
vector; the passage it finds is appended to the same sequence and prefilled on the
existing KV cache, and decoding goes on.

This package knows nothing of HTTP, training loops or CLIs of other packages; the
server, the index builder and the training package import it, never each other.
"""

__version__ = "0.1.0"
