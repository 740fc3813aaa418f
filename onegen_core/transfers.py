"""Host <-> device traffic of an engine step: one packed upload, one download, counted.

On a GPU every ``torch.tensor(list, device=...)`` or ``.to(device)`` of a small host
tensor is a separate blocking copy, and a read of a device value (``.tolist()``,
``.item()``) right after the forward waits for the whole forward. A step therefore
builds all of its small inputs (token ids, positions, cache slots, attention index
tensors, the rows to gather) as host tensors and ``upload`` sends them in **one**
copy from a pinned staging buffer: each tensor's bytes are laid out at aligned
offsets of one ``uint8`` buffer, copied once, and viewed back as typed tensors on the
device. Results come back the same way, in one ``download``.

``TransferCounter`` counts both directions. The engine keeps one, and the tests read
it to hold a decode step to its minimum (one upload, one download) on any device:
on the CPU the copies are skipped but still counted, so the count shows the shape of
the step's traffic wherever the tests run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ALIGN = 16  # bytes: every packed tensor starts at an offset that any dtype can view


@dataclass
class TransferCounter:
    host_to_device: int = 0
    device_to_host: int = 0

    def snapshot(self) -> tuple[int, int]:
        return self.host_to_device, self.device_to_host


def upload(tensors: list[torch.Tensor], device: torch.device, counter: TransferCounter | None = None
           ) -> list[torch.Tensor]:
    """Host tensors -> the same tensors on ``device``, in one copy (counted once, even on the CPU)."""
    if counter is not None and tensors:
        counter.host_to_device += 1
    if device.type == "cpu" or not tensors:
        return list(tensors)
    staging, offsets = pack(tensors, pin=device.type == "cuda")
    return unpack(staging.to(device, non_blocking=True), tensors, offsets)


def pack(tensors: list[torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Lay the tensors' bytes out in one ``uint8`` buffer at aligned offsets -> (buffer, offsets)."""
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    offsets, total = [], 0
    for f in flat:
        offsets.append(total)
        total += (f.numel() + _ALIGN - 1) // _ALIGN * _ALIGN
    staging = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    for f, off in zip(flat, offsets, strict=True):
        staging[off : off + f.numel()].copy_(f)
    return staging, offsets


def unpack(buffer: torch.Tensor, like: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
    """Views of ``buffer`` (wherever it is) with the dtypes and shapes of ``like``."""
    out = []
    for t, off in zip(like, offsets, strict=True):
        n = t.numel() * t.element_size()
        out.append(buffer[off : off + n].view(t.dtype).view(t.shape))
    return out


def download(t: torch.Tensor, counter: TransferCounter | None = None) -> torch.Tensor:
    """A device tensor -> the host (one copy, counted); the caller packs what it needs into one tensor first."""
    if counter is not None:
        counter.device_to_host += 1
    return t.cpu()
