"""K/V storage for both pools: plain tensors in the model's dtype (or another float), or asymmetric int8.

    kv_dtype = resolve_kv_dtype("int8", torch.bfloat16)        # torch.int8: the quantized format
    cache = PagedKVCache(kv_shape, num_slots, kv_dtype, device)  # per layer K, V [num_slots, Hkv, D]
    write_kv(cache.k[layer], slots, k)                          # quantizes when the pool is int8
    keys = dense(cache.k[layer].index_select(0, slots), q.dtype)  # what attention reads

The int8 format is LMDeploy's online KV quantization (`quant_policy=8`): asymmetric, one scale and one
zero point per token and per head, computed from the values themselves as they are written, so it
needs no calibration. A (token, head) vector x of head_dim values is stored as

    q = round((x - zero) / scale) in int8,  scale = (max(x) - min(x)) / 255,  zero = min(x) + 128 * scale
    x' = q * scale + zero                    (|x - x'| <= scale / 2, a 510th of the vector's range)

with scale and zero in float16 (LMDeploy's choice; 4 bytes per token and head). q is computed against
the float16-rounded scale and zero, so their rounding is absorbed rather than added to the error.
Per token and head (not per channel) because K/V are written one token at a time during decoding:
a token's scale must not depend on tokens that come later. Attention dequantizes what it reads
(`dense`) into its compute dtype; the pool holds int8, so the same bytes hold about twice the tokens
of a bf16 pool (head_dim 64: 68 bytes per token and head against 128).

`QuantizedKV` answers the few tensor methods the pools and attention use on a pool (indexing, views,
`copy_`, `index_copy_`, `index_select`, `narrow`), each applied to the data and its scales alike, so
the image K/V pool and the paged pool hold either kind of storage behind the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # llm.attention reads pools through this module
    from llm.attention import KVShape

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED = torch.int8  # the kv dtype that names the quantized format
SCALE_DTYPE = torch.float16


def resolve_kv_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """A `kv_cache_dtype` setting -> the pools' dtype: "auto" (or None) the model's; "int8" the
    quantized format (torch.int8); else that float."""
    if name in (None, "", "auto"):
        return model_dtype
    if name == "int8":
        return QUANTIZED
    if name not in _FLOATS:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return _FLOATS[name]


def bytes_per_token(shape: KVShape, kv_dtype: torch.dtype) -> int:
    """What one token's K and V take in a pool of `kv_dtype`, scales and zero points included."""
    if kv_dtype == QUANTIZED:
        per_head = shape.head_dim + 2 * torch.finfo(SCALE_DTYPE).bits // 8
        return 2 * shape.layers * shape.kv_heads * per_head
    return shape.bytes_per_token(kv_dtype)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q int8 [..., D], scale, zero float16 [..., 1]), per vector over its last dim."""
    x = x.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    # a constant vector has no range: any positive scale stores it exactly (q = -128 .. rounding to zero)
    scale = ((hi - lo) / 255).clamp_min(torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE)
    zero = (lo + 128 * scale.float()).to(SCALE_DTYPE)
    q = ((x - zero.float()) / scale.float()).round_().clamp_(-128, 127).to(torch.int8)
    return q, scale, zero


@dataclass(frozen=True, slots=True)
class QuantizedKV:
    """int8 K or V with their scales and zero points: data [..., D], scale and zero [..., 1]; any view
    of a pool (a slot range, an image's [Hkv, N, D]) is again one."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device: torch.device | str = "cpu") -> "QuantizedKV":
        # zeros, not empty: the pages are faulted in at start, not in a request's first step
        return cls(torch.zeros(shape, dtype=torch.int8, device=device),
                   torch.zeros(*shape[:-1], 1, dtype=SCALE_DTYPE, device=device),
                   torch.zeros(*shape[:-1], 1, dtype=SCALE_DTYPE, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return QUANTIZED

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.addcmul(self.zero.to(dtype), self.data.to(dtype), self.scale.to(dtype))

    def __getitem__(self, index) -> "QuantizedKV":
        """Indexing over the leading dims (those before head_dim), as on a tensor."""
        return QuantizedKV(self.data[index], self.scale[index], self.zero[index])

    def view(self, *shape: int) -> "QuantizedKV":
        return QuantizedKV(self.data.view(*shape), self.scale.view(*shape[:-1], 1), self.zero.view(*shape[:-1], 1))

    def narrow(self, dim: int, start: int, length: int) -> "QuantizedKV":
        return QuantizedKV(*(t.narrow(dim, start, length) for t in (self.data, self.scale, self.zero)))

    def index_select(self, dim: int, index: torch.Tensor) -> "QuantizedKV":
        return QuantizedKV(*(t.index_select(dim, index) for t in (self.data, self.scale, self.zero)))

    def copy_(self, x: torch.Tensor) -> "QuantizedKV":
        """Quantizes x (this view's shape) into this view."""
        for dest, part in zip((self.data, self.scale, self.zero), quantize(x)):
            dest.copy_(part)
        return self

    def index_copy_(self, dim: int, index: torch.Tensor, x: torch.Tensor) -> "QuantizedKV":
        for dest, part in zip((self.data, self.scale, self.zero), quantize(x)):
            dest.index_copy_(dim, index, part)
        return self


KV = torch.Tensor | QuantizedKV  # one layer's K or V, in a pool or read from one


def dense(kv: KV, dtype: torch.dtype) -> torch.Tensor:
    """What attention computes with: K or V in `dtype`, dequantized when stored as int8."""
    return kv.dequantize(dtype) if isinstance(kv, QuantizedKV) else kv.to(dtype)


def write_kv(pool: KV, slots: torch.Tensor, x: torch.Tensor) -> None:
    """x [N, Hkv, D] into pool slots [N] (quantized for an int8 pool)."""
    pool.index_copy_(0, slots, x if isinstance(pool, QuantizedKV) else x.to(pool.dtype))


def zeros(shape: tuple[int, ...], kv_dtype: torch.dtype, device: torch.device | str) -> KV:
    return QuantizedKV.zeros(shape, device) if kv_dtype == QUANTIZED else torch.zeros(shape, dtype=kv_dtype,
                                                                                       device=device)


def nbytes(kv: KV) -> int:
    return kv.nbytes if isinstance(kv, QuantizedKV) else kv.numel() * kv.element_size()


class PagedKVCache:
    """The self-attention pool: per layer K and V [num_slots, kv_heads, head_dim], preallocated;
    token t of a sequence sits in slot block_table[t // block_size] * block_size + t % block_size."""

    def __init__(self, shape: KVShape, num_slots: int, kv_dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape, self.num_slots, self.dtype = shape, num_slots, kv_dtype
        size = (num_slots, shape.kv_heads, shape.head_dim)
        self.k: list[KV] = [zeros(size, kv_dtype, device) for _ in range(shape.layers)]
        self.v: list[KV] = [zeros(size, kv_dtype, device) for _ in range(shape.layers)]

    @staticmethod
    def blocks_for_budget(shape: KVShape, budget_bytes: int, block_size: int, kv_dtype: torch.dtype) -> int:
        """How many blocks of `block_size` tokens fit in `budget_bytes` (scales included); at least one."""
        return max(1, budget_bytes // (bytes_per_token(shape, kv_dtype) * block_size))

    @property
    def bytes(self) -> int:
        return sum(nbytes(t) for t in self.k + self.v)
