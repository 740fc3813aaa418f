"""This process's rank under ``torchrun`` (or a world of one): the context training and the index builder share.

``RankContext.from_env`` reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_*``), picks this rank's device (``device.resolve_device``: a bare
``cuda`` is ``cuda:LOCAL_RANK``) and joins the process group. Its collectives:
``barrier``, ``sum`` (floats, e.g. a step's loss sums) and ``sync`` / ``synced`` — a
barrier that also propagates failure, so that an error on one rank stops every rank at
the next synchronisation point instead of leaving the others waiting.

Training runs NCCL on CUDA (its gradients travel over the group); the index builder
runs gloo whatever it encodes on: its group only carries barriers and failure flags,
tiny CPU tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from .device import resolve_device


class PeerFailed(ValueError):
    """Another rank failed; it printed the reason."""


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


@dataclass
class RankContext:
    """This process's rank: world of one unless ``from_env`` joined a launcher's process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank computes
    backend: str | None = None  # the process group's, when this context created one
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, *, device: str = "cpu", backend: str | None = None,
                 timeout_s: float | None = None) -> RankContext:
        """Join the launcher's process group if ``WORLD_SIZE`` > 1, else a world of one.

        ``device`` is resolved for this rank (``auto``: CUDA if available); ``backend`` defaults to
        NCCL on CUDA and gloo elsewhere.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
        local_rank = int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else 0
        dev = resolve_device(device, local_rank=local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        ctx = cls(rank, world, local_rank, dev)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                ctx.backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
                kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s is not None else {}
                init_process_group(ctx.backend, **kwargs)
                ctx.owns_group = True
            else:
                ctx.backend = dist.get_backend()
        return ctx

    @property
    def _collective_device(self) -> torch.device:
        """NCCL reduces tensors on this rank's GPU; gloo on the CPU."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over every rank (float64)."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t)
        return t.tolist()

    def sync(self, error: BaseException | None = None, *, peer_message: str | None = None) -> None:
        """A barrier that also propagates failure: raises ``error`` here, ``PeerFailed`` on the other ranks."""
        if self.distributed:
            import torch.distributed as dist

            flag = torch.tensor([1 if error is not None else 0], dtype=torch.int32, device=self._collective_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            failed = bool(flag.item())
        else:
            failed = error is not None
        if error is not None:
            raise error
        if failed:
            raise PeerFailed(peer_message or "another rank failed (its output says why)")

    @contextlib.contextmanager
    def synced(self, *, peer_message: str | None = None) -> Iterator[None]:
        """Run the block on every rank, then ``sync``: whatever it raises on one rank stops all of them."""
        error: BaseException | None = None
        try:
            yield
        except BaseException as e:  # handed to every rank by sync, which raises it again here
            error = e
        self.sync(error, peer_message=peer_message)

    def close(self) -> None:
        """Tear down the process group this context created."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False
