"""Ranks for distributed embedding under ``torchrun`` (gloo; the build is coordinated through files).

Ranks share the build's work directory (one node, or a filesystem every node sees):
rank 0 reads the corpus into the staged docstore, every rank encodes its share of the
pending shards into shard files, rank 0 merges them. The process group only carries
barriers and failure flags (tiny CPU tensors, so gloo serves CUDA builds too); no
vectors and no pickled objects travel over it. A failure on any rank stops all ranks
at the next synchronisation point instead of leaving them waiting.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from .errors import BuildError


class PeerFailed(BuildError):
    """Another rank failed; it printed the reason."""


class Dist:
    """This process's rank in the build (world of one when not launched by torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, *, initialised: bool = False):
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self._initialised = initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float = 24 * 3600) -> Dist:
        """Join torchrun's process group if ``WORLD_SIZE`` > 1 (gloo), else a world of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        import torch.distributed as dist

        from onegen_core.distributed import init_process_group

        if not dist.is_initialized():
            init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, local_rank, initialised=True)

    def sync(self, error: BaseException | None = None) -> None:
        """A barrier that also propagates failure: raises ``error`` here, ``PeerFailed`` on the other ranks."""
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([1 if error is not None else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            failed = bool(flag.item())
        else:
            failed = error is not None
        if error is not None:
            raise error
        if failed:
            raise PeerFailed("another rank of the distributed build failed (its output says why)")

    def close(self) -> None:
        if self._initialised:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._initialised = False
