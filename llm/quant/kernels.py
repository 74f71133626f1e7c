"""Weight-only int8 / int4 arithmetic: the integer formats, their (de)quantization, and the matmul kernels.

Formats (what a checkpoint stores; the same on every device):
- int8, symmetric per output channel: w ~= q * scale, q int8 [N, K], scale bf16 [N].
- int4, asymmetric per group of G inputs: w ~= (q - 8) * scale + zero, q in 0..15, scale and zero bf16
  [N, K / G]; `zero` is the value of code 8 (the convention of PyTorch's tinygemm kernels, gpt-fast and
  torchao), and q is stored two codes a byte, uint8 [N, K / 2], even input in the high nibble.
Scales and zeros are rounded to bf16 *before* the integers are chosen, so the codes fit the numbers the
kernels really multiply by.

Kernels, chosen once per device type by trying them on a small problem (never by version):
- int8: `aten._weight_int8pack_mm` (CPU; CUDA where the build has it), else int8 -> bf16 per call
  then matmul (gpt-fast's form, which torch.compile fuses).
- int4: `aten._weight_int4pack_mm_for_cpu` on weights from `_convert_weight_to_int4pack_for_cpu`
  (CPU), `aten._weight_int4pack_mm` on weights from `_convert_weight_to_int4pack` (CUDA), else a
  bf16 copy dequantized once (correct anywhere, bf16's speed and size). The packed layouts are the
  kernels' own, built at load, never stored.
All of them want bf16 activations: fed fp32 rows, the CPU ops run 20-300x slower (measured here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COMPUTE_DTYPE = torch.bfloat16
INT4_MID = 8  # the code whose value is `zero`


# -- the formats ---------------------------------------------------------------------------------

def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel, the largest magnitude maps to 127: scale bf16 [N]."""
    return (weight.float().abs().amax(dim=1) / 127).clamp(min=1e-10).to(COMPUTE_DTYPE)


def int8_codes(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """weight [N, k] (any k columns) under per-row scales [N] -> int8 codes [N, k]."""
    return (weight.float() / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)


def int8_dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def int4_qparams(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max per group: the group's range spread over codes 0..15. -> scales, zeros, bf16 [N, K / G]."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-10).to(COMPUTE_DTYPE)
    zeros = (low + INT4_MID * scales.float()).to(COMPUTE_DTYPE)
    return scales, zeros


def int4_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """weight [N, k] under scales and zeros broadcastable to it (a column's per-row values [N, 1], or
    per-element) -> codes 0..15, uint8 [N, k]."""
    codes = (weight.float() - zeros.float()) / scales.float() + INT4_MID
    return codes.round().clamp(0, 15).to(torch.uint8)


def _per_input(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)


def int4_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest: -> codes uint8 [N, K], scales, zeros bf16 [N, K / G]."""
    scales, zeros = int4_qparams(weight, group_size)
    return int4_codes(weight, _per_input(scales, group_size), _per_input(zeros, group_size)), scales, zeros


def int4_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    group_size = codes.shape[1] // scales.shape[1]
    return (codes.float() - INT4_MID) * _per_input(scales, group_size) + _per_input(zeros, group_size)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes 0..15 [N, K] -> uint8 [N, K / 2], even input in the high nibble (what CUDA's packer reads)."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(packed.shape[0], -1)


# -- the kernels ---------------------------------------------------------------------------------

def _int8_aten(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, q, scales)


def _int8_dequant(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype)) * scales  # gpt-fast's form: the scale applies to the output


def int8_matmul_for(device_type: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The device's int8 product: (x bf16 [M, K] contiguous, q [N, K], scales [N]) -> bf16 [M, N]."""
    return _int8_aten if int8_backend(device_type) == "aten" else _int8_dequant


def _int4_dequant(x: torch.Tensor, weight: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor):
    return F.linear(x, weight)  # `weight` was dequantized to bf16 once, at layout time


def _int4_op(backend: str) -> Callable:
    if backend == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu
    return torch.ops.aten._weight_int4pack_mm if backend == "cuda" else _int4_dequant


@dataclass(frozen=True, slots=True)
class Int4Kernel:
    """An int4 weight laid out for one device's kernel. `backend`: "cpu" / "cuda" (the aten tinygemm
    ops; rows padded to the kernel's multiple, `out_features` the real count) or "dequant" (a bf16
    copy: correct anywhere, no faster than bf16)."""

    backend: str
    weight: torch.Tensor
    scales_and_zeros: torch.Tensor  # [K / G, N_padded, 2] bf16 for the aten ops; unused by "dequant"
    group_size: int
    out_features: int
    op: Callable  # (x, weight, group_size, scales_and_zeros) -> [M, N_padded]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_and_zeros))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x bf16 [M, K] contiguous -> bf16 [M, out_features]."""
        out = self.op(x, self.weight, self.group_size, self.scales_and_zeros)
        return out if out.shape[1] == self.out_features else out[:, : self.out_features]


# the tinygemm packers' row multiple (CPU: 16; CUDA: 8) and the inner K tiles they accept
_ROW_MULTIPLE = {"cpu": 16, "cuda": 8}


def int4_kernel(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                backend: str | None = None) -> Int4Kernel:
    """Lay the stored int4 format (nibbles uint8 [N, K / 2], scales and zeros [N, K / G]) out for the
    kernel of its device (`backend` None: the one `int4_backend` picked there)."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    group_size = k // scales.shape[1]
    backend = backend or int4_backend(packed.device.type)
    if backend == "dequant":
        weight = int4_dequantize(unpack_nibbles(packed), scales, zeros).to(COMPUTE_DTYPE)
        return Int4Kernel(backend, weight, torch.empty(0, device=packed.device), group_size, n, _int4_dequant)
    pad = -n % _ROW_MULTIPLE[backend]  # padded rows: code 8 with scale 0 and zero 0 compute zeros
    if pad:
        packed = F.pad(packed, (0, 0, 0, pad), value=(INT4_MID << 4) | INT4_MID)
        scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)  # K is a multiple of G >= 32
    if backend == "cpu":
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(packed).to(torch.int32),
                                                                    inner_k_tiles)
    else:
        weight = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), inner_k_tiles)
    scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)
    return Int4Kernel(backend, weight, scales_and_zeros, group_size, n, _int4_op(backend))


# -- feature detection ---------------------------------------------------------------------------

def _probe(n: int, k: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g).to(device), torch.randn(3, k, generator=g).to(device, COMPUTE_DTYPE))


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return out.shape == ref.shape and float((out.float() - ref).norm() / ref.norm()) < 1e-2


@functools.cache
def int8_backend(device_type: str) -> str:
    """"aten" when `_weight_int8pack_mm` runs on this device and gives the dequantized product, else "dequant"."""
    w, x = _probe(64, 128, device_type)
    scales = int8_scales(w)
    q = int8_codes(w, scales)
    try:
        ok = _close(_int8_aten(x, q, scales), x.float() @ int8_dequantize(q, scales).T)
    except (RuntimeError, NotImplementedError, AttributeError):  # no kernel for this device, dtype or CPU
        ok = False
    return "aten" if ok else "dequant"


@functools.cache
def int4_backend(device_type: str) -> str:
    """The device's tinygemm kernel ("cpu" / "cuda") when it packs and multiplies a probe weight to the
    dequantized product, else "dequant"."""
    if device_type not in _ROW_MULTIPLE:
        return "dequant"
    w, x = _probe(40, 256, device_type)  # 40 rows: the padding path is probed too
    codes, scales, zeros = int4_quantize(w, 32)
    try:
        out = int4_kernel(pack_nibbles(codes), scales, zeros, backend=device_type).matmul(x.contiguous())
        ok = _close(out, x.float() @ int4_dequantize(codes, scales, zeros).T)
    except (RuntimeError, NotImplementedError, AttributeError):
        ok = False
    return device_type if ok else "dequant"
