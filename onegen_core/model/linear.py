"""Linear-layer backends for the native model: aten, or oneDNN with prepacked weights (CPU).

At batch 1 a decode step is one GEMV per weight matrix, so its speed is the rate at
which the weights are read. On the 2-core EPYC this project is developed on, aten's
``F.linear`` (MKL sgemm with M = 1) reads fp32 weights at about 11 GB/s while a plain
``sum`` reads 30 GB/s; oneDNN with each weight reordered once into its blocked layout
reads about 19 GB/s, and it is also faster for prefill-sized inputs (M up to 1024).
``bench/linear.py`` measures both side by side.

``onednn`` replaces every ``nn.Linear`` in the model (and the logits projection) by a
``PackedLinear`` holding only the packed weight; the original weight is released, so
memory does not grow (a tied embedding keeps its table for lookups and gains one packed
copy for the logits). Results equal aten's up to float rounding: the summation order
differs (tests/core/test_linear.py holds it to 1e-5 relative on real shapes).
"""

from __future__ import annotations

import torch
from torch import nn

BACKENDS = ("auto", "aten", "onednn")  # the engine's linear_backend setting offers the same (tests/core/test_linear.py)
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def onednn_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prepacked oneDNN linears can run here (CPU build with oneDNN, fp32 or bf16 with hardware support)."""
    if device.type != "cpu" or dtype not in ONEDNN_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def resolve_linear_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` -> ``onednn`` where supported, else ``aten``; an explicit ``onednn`` that cannot run is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"linear backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "onednn" if onednn_supported(device, dtype) else "aten"
    if backend == "onednn" and not onednn_supported(device, dtype):
        raise ValueError(f"the onednn linear backend needs a CPU build of torch with oneDNN and float32 or bfloat16 "
                         f"(bfloat16 needs CPU support); got device {device.type}, {str(dtype).removeprefix('torch.')}")
    return backend


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` reordered once into oneDNN's blocked layout. Inputs are [N, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach()),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module) -> None:
    """Replace every ``nn.Linear`` under ``module`` by a ``PackedLinear``, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
        else:
            pack_linears(child)
