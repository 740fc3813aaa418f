"""Process-group set-up shared by the distributed index build and training (torchrun)."""

from __future__ import annotations

from typing import Any


def init_process_group(backend: str, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group``, with ``torch._dynamo`` imported first.

    Imported after the group exists (transformers imports it when a model loads),
    ``torch._dynamo`` keeps a reference to the default group that ``destroy_process_group``
    does not drop (torch 2.13). gloo's worker threads then outlive the group, and one that
    wakes during interpreter shutdown aborts the finished process ("terminate called without
    an active exception"): a torchrun build that succeeded reported failure about one run in
    fifteen on a loaded 2-core machine. Imported first, the group is torn down cleanly.
    """
    import torch._dynamo  # noqa: F401  (see above)
    import torch.distributed as dist

    dist.init_process_group(backend, **kwargs)
