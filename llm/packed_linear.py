"""Linear layers with their weights pre-packed for the CPU's matrix kernels (oneDNN), once, at load.

Decoding multiplies a few rows (one per running sequence) by every weight matrix. For those shapes
the default fp32 path (MKL sgemm on a row-major [out, in] weight) reaches a third of what oneDNN
does on a weight it has already re-laid out in its blocked format: on the 2-core AVX2 machine of
bench/RESULTS.md, a 4096x768 weight times 16 rows runs at ~35-65 GFLOP/s as `F.linear` and ~95-115
GFLOP/s packed, and the 32000x768 lm_head times one row reads its weight at twice the speed. The
packing is what inductor's CPU "freezing" does for a compiled model; here it is one visible step.

    pack_linears(model)   # every nn.Linear -> PackedLinear, in place; a no-op where oneDNN can't

Only fp32 weights on the CPU are packed (oneDNN's bf16 path needs AVX512 or AVX-NE-CONVERT, which
this class of machine lacks); on CUDA, cuBLAS needs no help. Results equal `F.linear` up to fp32
summation order (~1e-6 relative).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def onednn_packing_works() -> bool:
    """True when this torch build and CPU run oneDNN's packed fp32 linear and get F.linear's answer."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(24, 16), torch.randn(3, 16)
        return torch.allclose(_packed_linear(x, _pack(w), None), torch.nn.functional.linear(x, w), atol=1e-5)
    except (RuntimeError, AttributeError):  # an op missing from this build, or a CPU it refuses
        return False


class PackedLinear(nn.Module):
    """`nn.Linear` for inference with a oneDNN-packed weight (an opaque tensor: not a parameter, not
    in the state dict). The bias, when there is one, stays an ordinary parameter."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = _pack(linear.weight)
        self.weight_nbytes = linear.weight.numel() * linear.weight.element_size()
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed_weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """The plain `nn.Linear` again, with the exact weights (oneDNN's reorder is lossless)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.packed_weight.to_dense(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packable(model: nn.Module) -> bool:
    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_packing_works()


def pack_linears(model: nn.Module) -> int:
    """Replace every fp32 CPU `nn.Linear` inside `model` by a `PackedLinear`, in place; -> how many.
    The model is then for inference only (the packed weights take no gradient)."""
    if not packable(model):
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def dense_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in which every PackedLinear is an `nn.Linear` again (packed weights are
    opaque tensors: `copy.deepcopy` and `.to(dtype)` cannot handle them)."""
    memo = {id(m): m.to_linear() for m in model.modules() if isinstance(m, PackedLinear)}
    return copy.deepcopy(model, memo)


def weight_bytes(model: nn.Module, skip: str | None = None) -> int:
    """Bytes of the weights the model reads, packed or not; `skip`: leave out names containing it."""
    params = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not (skip and skip in name))
    packed = sum(m.weight_nbytes for name, m in model.named_modules()
                 if isinstance(m, PackedLinear) and not (skip and skip in name))
    return params + packed
