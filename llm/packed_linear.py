"""Linear layers with their weights pre-packed for the CPU's matrix kernels (oneDNN), once, at load.

Decoding multiplies a few rows (one per running sequence) by every weight matrix. For those shapes
the default fp32 path (MKL sgemm on a row-major [out, in] weight) reaches a third of what oneDNN
does on a weight it has already re-laid out in its blocked format: on the 2-core AVX2 machine of
bench/RESULTS.md, a 4096x768 weight times 16 rows runs at ~35-65 GFLOP/s as `F.linear` and ~95-115
GFLOP/s packed, and the 32000x768 lm_head times one row reads its weight at twice the speed. The
packing is what inductor's CPU "freezing" does for a compiled model; here it is one visible step.

    pack_linears(model)   # every nn.Linear -> PackedLinear, every nn.MultiheadAttention ->
                          # PackedMultiheadAttention, in place; a no-op where oneDNN can't

Only fp32 weights on the CPU are packed (oneDNN's bf16 path needs AVX512 or AVX-NE-CONVERT, which
this class of machine lacks); on CUDA, cuBLAS needs no help. Results equal `F.linear` up to fp32
summation order (~1e-6 relative).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# The same call as an opaque custom op, for torch.compile (llm/model_runner.py, `compile_decode`):
# inductor's own lowering of mkldnn._linear_pointwise expects weights it packed itself and fails on
# ours. Eager code calls `_packed_linear` directly: a custom op's Python dispatch costs ~10 us a call.
@torch.library.custom_op("mmserve::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _packed_linear(x, packed, bias)


@packed_linear_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


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

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "PackedLinear":
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return cls(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear_op(x, self.packed_weight, self.bias)
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


class PackedMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` for inference with packed projections and torch SDPA: the same call and
    results (up to fp32 summation order). Why: open_clip's ViT towers run every attention through it,
    and its in/out projections are MKL sgemm calls at the slow speed this module's docstring names
    (a ViT-B/32 tower, 16 images, best of 8: 1.33 s unpacked, 1.20 s with these and the MLP packed, which
    is then compute-bound at ~125 GFLOP/s per matmul, what oneDNN reaches at those shapes alone).

    A module whose q, k, v share one in_proj packs it whole, so self-attention (query is key is value,
    the only use in open_clip's towers) is one matmul; when such a module is called with a separate
    key or value, each input goes through the whole in_proj and keeps its third: correct, not fast."""

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> bool:
        return mha.bias_k is None and not mha.add_zero_attn

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not self.supports(mha):
            raise ValueError("bias_k / bias_v / add_zero_attn are not supported by the packed attention")
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        bias = mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            self.in_proj = PackedLinear.of(mha.in_proj_weight, bias)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            biases = bias.chunk(3) if bias is not None else (None, None, None)
            self.in_proj = None
            self.q_proj, self.k_proj, self.v_proj = (
                PackedLinear.of(w, b) for w, b in zip((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight),
                                                      biases))
        self.out_proj = PackedLinear.of(mha.out_proj.weight, mha.out_proj.bias)

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if self.in_proj is None:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        e = self.embed_dim
        return self.in_proj(query)[..., :e], self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1 - self.batch_first) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        if not self.batch_first:  # [L, B, E] -> [B, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)
        b, length, h = q.shape[0], q.shape[1], self.num_heads
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
        mask = _additive_mask(attn_mask, key_padding_mask, b, h, q.dtype)
        if need_weights:
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            weights = (scores if mask is None else scores + mask).softmax(-1)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 - self.batch_first)
            weights = None if weights is None else weights[0]
        return out, weights


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int,
                   heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (bool True = may NOT attend, or float added) as one float mask
    broadcastable to [B, H, L, S]."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # [B * H, L, S]
            mask = mask.view(batch, heads, *mask.shape[1:])
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]  # [B, 1, 1, S]
        mask = padding if mask is None else mask + padding
    return mask


def _fp32_cpu(module: nn.Module) -> bool:
    weight = next(module.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def packable(model: nn.Module) -> bool:
    return _fp32_cpu(model) and onednn_packing_works()


def pack_linears(model: nn.Module) -> int:
    """Replace every fp32 CPU `nn.Linear` inside `model` by a `PackedLinear` and every
    `nn.MultiheadAttention` by a `PackedMultiheadAttention`, in place; -> how many modules.
    The model is then for inference only (the packed weights take no gradient)."""
    if not packable(model):
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _fp32_cpu(child):
                setattr(parent, name, PackedLinear(child))
            elif type(child) is nn.MultiheadAttention and _fp32_cpu(child) and PackedMultiheadAttention.supports(child):
                setattr(parent, name, PackedMultiheadAttention(child))
            else:
                continue
            count += 1
    return count


def unpack_linears(model: nn.Module) -> nn.Module:
    """In place: every PackedLinear an `nn.Linear` again (before code that edits weights). -> model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PackedLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.to_linear())
    return model


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
