"""Drop-in replacements for `nn.Linear` with int8 or int4 weights (W8A16, W4A16).

    layer = Int8Linear.from_linear(linear)                     # symmetric, per output channel
    layer = Int4Linear.from_linear(linear, group_size=128)     # asymmetric, per group of inputs
    y = layer(x)                                               # x [..., in] -> [..., out]

The forward contract is nn.Linear's with one convention: the product runs in bf16 (the kernels take
bf16 rows) and comes back in the input's dtype, so a bf16 model (what `quantize_model` makes, and
what the engine then runs: bf16 activations, bf16 KV pool) never converts, and an fp32 caller still
gets fp32. The bias, when there is one, is added in bf16.

State dict (what a checkpoint stores, the same on every device; the scheme is implied by it):
    Int8Linear: weight int8 [N, K], scales bf16 [N], (bias)
    Int4Linear: qweight uint8 [N, K / 2] (two codes a byte), scales, zeros bf16 [N, K / G], (bias)
Int4Linear also keeps its weight in its device's kernel layout (llm/quant/kernels.py), built from the
stored form when the model is quantized or loaded (or, after a move to another device, at the next
forward): in RAM both copies, 0.5 byte per weight each; per token the kernel reads only its own.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.quant.kernels import (COMPUTE_DTYPE, Int4Kernel, int4_dequantize, int4_kernel, int4_quantize, int8_codes,
                               int8_dequantize, int8_matmul_for, int8_scales, pack_nibbles, unpack_nibbles)


def _flat_bf16(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """[..., K] -> bf16 [M, K], contiguous (what the kernels take); a no-op for a decoder's rows."""
    if x.dim() != 2:
        x = x.reshape(-1, in_features)
    if x.dtype != COMPUTE_DTYPE:
        x = x.to(COMPUTE_DTYPE)
    return x if x.is_contiguous() else x.contiguous()


def _shaped(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The product back in x's leading shape and dtype, the bias added (in bf16). Why the tests of
    `dim` and `dtype` before calling: each no-op call still costs ~1 us, and a decode step makes ~50."""
    if bias is not None:
        out = out + bias
    if x.dim() != 2:
        out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if x.dtype == out.dtype else out.to(x.dtype)


def _bias(linear: nn.Linear) -> nn.Parameter | None:
    if linear.bias is None:
        return None
    return nn.Parameter(linear.bias.detach().to(COMPUTE_DTYPE).clone(), requires_grad=False)


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        assert weight.dtype == torch.int8 and scales.shape == (weight.shape[0],), (weight.dtype, scales.shape)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.bias = bias
        self._matmul = None  # the device's kernel, found at the first forward (and after a move)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        scales = int8_scales(w)
        return cls(int8_codes(w, scales), scales, _bias(linear))

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, device=None) -> "Int8Linear":
        """Zeros of the right shapes, for `load_state_dict` to fill."""
        b = nn.Parameter(torch.zeros(out_features, dtype=COMPUTE_DTYPE, device=device), requires_grad=False)
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                   torch.ones(out_features, dtype=COMPUTE_DTYPE, device=device), b if bias else None)

    @property
    def weight_nbytes(self) -> int:
        """Bytes the kernel reads per call (weights and scales)."""
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def _apply(self, fn, recurse: bool = True):
        self._matmul = None  # .to(device) and friends: the kernel may differ there
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._matmul is None:
            self._matmul = int8_matmul_for(self.weight.device.type)
        return _shaped(self._matmul(_flat_bf16(x, self.in_features), self.weight, self.scales), x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: nn.Parameter | None = None) -> None:
        super().__init__()
        assert qweight.dtype == torch.uint8 and scales.shape == zeros.shape, (qweight.dtype, scales.shape)
        self.out_features, self.in_features = qweight.shape[0], 2 * qweight.shape[1]
        self.group_size = self.in_features // scales.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.register_buffer("zeros", zeros.to(COMPUTE_DTYPE))
        self.bias = bias
        self._kernel: Int4Kernel | None = None  # not a buffer: its layout belongs to one device

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        codes, scales, zeros = int4_quantize(linear.weight.detach(), group_size)
        return cls.from_codes(codes, scales, zeros, _bias(linear))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: nn.Parameter | None) -> "Int4Linear":
        return cls(pack_nibbles(codes), scales, zeros, bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, group_size: int, device=None) -> "Int4Linear":
        """Zeros of the right shapes, for `load_state_dict` to fill."""
        groups = (out_features, in_features // group_size)
        b = nn.Parameter(torch.zeros(out_features, dtype=COMPUTE_DTYPE, device=device), requires_grad=False)
        return cls(torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                   torch.ones(groups, dtype=COMPUTE_DTYPE, device=device),
                   torch.zeros(groups, dtype=COMPUTE_DTYPE, device=device), b if bias else None)

    def kernel(self) -> Int4Kernel:
        """The weight in the kernel layout of the module's device, built when missing."""
        if self._kernel is None:
            self._kernel = int4_kernel(self.qweight, self.scales, self.zeros)
        return self._kernel

    def _apply(self, fn, recurse: bool = True):
        self._kernel = None  # .to(device) and friends: lay the weights out again for the new device
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel = None  # new numbers: lay them out again

    @property
    def weight_nbytes(self) -> int:
        """Bytes the kernel reads per call (its layout of the weights, scales and zeros)."""
        return self.kernel().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _shaped(self.kernel().matmul(_flat_bf16(x, self.in_features)), x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


def dequantized_weight(layer: Int8Linear | Int4Linear) -> torch.Tensor:
    """The fp32 weight [N, K] a quantized layer stands for (references, tests, simulations)."""
    if isinstance(layer, Int8Linear):
        return int8_dequantize(layer.weight, layer.scales)
    return int4_dequantize(unpack_nibbles(layer.qweight), layer.scales, layer.zeros)
