"""Attention over the paged KV pool, and the per-step batch a model's forward receives.

A step's tokens come flattened: [N, width], every sequence's new tokens one after another, decodes
first (one token each), then prefill chunks. The models (llm/models/coca.py, llm/models/mllama.py) only ever call

    batch.self_attention(layer, q, k, v)   # writes k, v into the pool, attends through block tables
    batch.cross_attention(layer, q)        # attends to each sequence's image K/V

and never see the pool, the block tables or the grouping, which the model runner builds.

Self-attention K/V live in one preallocated pool per layer, [num_slots, kv_heads, head_dim] with
num_slots = num_blocks * block_size; token t of a sequence sits in slot
block_table[t // block_size] * block_size + t % block_size.

Two groups, because they want different shapes:
- decodes (one query each, the latency-bound bulk of serving) run as a few batched attentions, one
  per group of rows of similar length (`DecodeKeys`): each row gathers its keys through its block
  table into [B, kv_heads, L_group, head_dim], padding masked;
- each prefill chunk runs on its own with a causal mask shifted by its start, so a chunk of 200
  tokens never pads 15 decodes to 200.

GQA never repeats K/V: the query heads that share a K/V head are folded into the query length
([kv_heads, group * T, head_dim]), so one SDPA call serves the whole group.

Either pool may hold int8 K/V (llm/kv_cache.py, `kv_cache_dtype=int8`): what attention reads is
dequantized (`dense`) into the query's dtype first, the pools' new K/V quantized as they are written.

Attention kernels: torch SDPA (flash / memory-efficient / math, whichever the device has); on CUDA
with xformers installed, prefill chunks use xformers' memory-efficient attention. xformers raises
NotImplementedError on CPU, so it is detected, never required.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llm.kv_cache import KV, dense, write_kv


@functools.cache
def xformers_ops():
    """xformers.ops when importable, else None. Used only for CUDA tensors."""
    try:
        import xformers.ops as xops  # noqa: PLC0415
    except Exception:  # ImportError, or a build that does not match this torch
        return None
    return xops


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, Hq, T, D] against k, v [B, Hkv, L, D]; mask broadcastable to [B, 1, T, L] (True = attend).
    Returns [B, Hq, T, D]."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qg = q.reshape(b, hkv, group * t, d)
    if mask is not None and t > 1:  # one query per row (decode): [B, 1, 1, L] already broadcasts over the group
        mask = mask.expand(b, 1, t, k.shape[2]).repeat(1, 1, group, 1)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(b, hq, t, d)


@dataclass(frozen=True, slots=True)
class KVShape:
    """The K/V a model keeps per token: layers x kv_heads x head_dim, K and V. A model declares one
    for its self-attention pool (`kv_shape`) and one for its image K/V (`cross_kv_shape`)."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def elements_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim  # K and V

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.elements_per_token * torch.finfo(dtype).bits // 8


@dataclass
class DecodeKeys:
    """A run of decode rows (rows of the step) and the self-attention keys they read: through `slots`
    [rows, L] pool slots, masked by `mask` [rows, 1, 1, L] where a row has fewer than L keys; or, for
    a lone row whose keys fill consecutive slots, in place: `span` = (first slot, length). Single-stream
    decoding is latency-bound, and a gather there is a tenth of the step."""

    rows: slice
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    span: tuple[int, int] | None = None


@dataclass
class PrefillSpan:
    """One prefill chunk of the flat batch: rows start..end of the step, positions pos0..pos0+T-1."""

    rows: slice
    key_slots: torch.Tensor  # [pos0 + T] pool slots of positions 0 .. pos0+T-1
    causal_mask: torch.Tensor  # [T, pos0 + T] bool, True = attend
    cross_index: int | None  # which image run (of the step's list) this sequence attends to; None: no image
    cross_mask: torch.Tensor | None = None  # [T, N] bool: the image tokens each row sees; None: all


@dataclass
class CrossLayerKV:
    """One cross-attention layer's image K/V for the step: the decodes' stacked, each prefill's own."""

    decode_k: KV | None  # [B_img, Hkv, N_max, D]: the decode rows that have images
    decode_v: KV | None
    images: list[tuple[KV, KV]]  # per distinct image run: k, v [Hkv, N, D]
    decode_rows: torch.Tensor | None = None  # which decode rows have images (None: all); the others get 0


@dataclass
class StepBatch:
    """Everything a forward needs besides the weights. Built by the model runner for each step."""

    token_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N] pool slot for each new token's K/V
    num_decodes: int  # rows 0 .. num_decodes-1 are single-token chunks
    decode_keys: list[DecodeKeys]  # covering rows 0 .. num_decodes-1 in order
    prefills: list[PrefillSpan]
    k_pool: list[KV]  # per self-attention layer [num_slots, Hkv, D] (llm/kv_cache.py: a tensor or int8)
    v_pool: list[KV]
    cross: list[CrossLayerKV]  # per cross-attention layer
    decode_cross_mask: torch.Tensor | None = None  # [B_img, 1, 1, N_max] when rows see different keys
    # Rows whose token sees an image (Mllama: tokens after the <|image|> token). None: every row does.
    image_visible: torch.Tensor | None = None  # [N] bool
    logits_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k and v [N, Hkv, D] for this step's tokens -> attention output [N, Hq, D]."""
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]
        write_kv(k_pool, self.slot_mapping, k)
        write_kv(v_pool, self.slot_mapping, v)
        n_dec = self.num_decodes
        if n_dec:
            parts = [_decode_attention(q[g.rows], k_pool, v_pool, g) for g in self.decode_keys]
            decoded = parts[0] if len(parts) == 1 else torch.cat(parts)
            if not self.prefills:
                return decoded
        out = torch.empty_like(q)
        if n_dec:
            out[:n_dec] = decoded
        for span in self.prefills:
            keys = dense(_gather(k_pool, span.key_slots), q.dtype)  # [L, Hkv, D]
            values = dense(_gather(v_pool, span.key_slots), q.dtype)
            out[span.rows] = _prefill_attention(q[span.rows], keys, values, span.causal_mask)
        return out

    def cross_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D] -> attention over each row's image K/V [N, Hq, D]; zero for rows of requests
        with no image (their cross-attention layers must leave them unchanged: llm/models/mllama.py)."""
        kv = self.cross[layer]
        n_dec = self.num_decodes
        if n_dec and kv.decode_k is not None:
            rows = q[:n_dec] if kv.decode_rows is None else q[kv.decode_rows]
            decoded = _grouped_sdpa(rows[:, :, None], dense(kv.decode_k, q.dtype), dense(kv.decode_v, q.dtype),
                                    self.decode_cross_mask)[:, :, 0]
            if kv.decode_rows is not None:
                decoded = torch.zeros_like(q[:n_dec]).index_copy_(0, kv.decode_rows, decoded)
        elif n_dec:
            decoded = torch.zeros_like(q[:n_dec])
        if n_dec and not self.prefills:
            return decoded
        out = torch.empty_like(q)
        if n_dec:
            out[:n_dec] = decoded
        for span in self.prefills:
            if span.cross_index is None:
                out[span.rows] = 0
                continue
            k, v = kv.images[span.cross_index]
            qs = q[span.rows].transpose(0, 1)[None]  # [1, Hq, T, D]
            mask = None if span.cross_mask is None else span.cross_mask[None, None]
            out[span.rows] = _grouped_sdpa(qs, dense(k, q.dtype)[None], dense(v, q.dtype)[None], mask)[0].transpose(0, 1)
        return out


def head_major(project, tokens: torch.Tensor, heads: int, head_dim: int, parts: int = 1,
               chunk_bytes: int = 8 << 20, out: tuple[torch.Tensor, ...] | list[torch.Tensor] | None = None
               ) -> list[torch.Tensor]:
    """Image K/V for a batch of images, each part contiguous [B, heads, N, head_dim], written into
    `out` (one tensor per part) when given. `project` maps tokens [b, N, W] to
    [b, N, parts * heads * head_dim] (K and V fused: parts=2).

    Why this layout: decode attention reads every image key once per step, and SDPA over a
    [B, H, N, D] view of the projection's [B, N, H*D] output (rows H*D floats apart) runs at ~60% of the
    contiguous speed here (64 images x 255 tokens x 12 layers: 123 vs 72 ms per step). The projection
    runs a few images at a time into a small scratch that the allocator reuses: one full-size output
    then a copy would touch twice the fresh pages, which on a VM cost more than the copy."""
    b, n, _ = tokens.shape
    outs = list(out) if out is not None else [tokens.new_empty(b, heads, n, head_dim) for _ in range(parts)]
    per_image = n * parts * heads * head_dim * tokens.element_size()
    step = max(1, chunk_bytes // per_image)
    for start in range(0, b, step):
        projected = project(tokens[start:start + step]).view(-1, n, parts, heads, head_dim)
        for p, out in enumerate(outs):
            out[start:start + step].copy_(projected[:, :, p].transpose(1, 2))
    return outs


def _decode_attention(q: torch.Tensor, k_pool: KV, v_pool: KV, group: DecodeKeys) -> torch.Tensor:
    """q [B, Hq, D], one query per row -> [B, Hq, D] over the rows' keys in the pool."""
    if group.span is not None:
        first, length = group.span
        keys, values = k_pool.narrow(0, first, length)[None], v_pool.narrow(0, first, length)[None]
    else:
        keys, values = _gather(k_pool, group.slots), _gather(v_pool, group.slots)
    keys, values = dense(keys, q.dtype).transpose(1, 2), dense(values, q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
    return _grouped_sdpa(q[:, :, None], keys, values, group.mask)[:, :, 0]


def _gather(pool: KV, slots: torch.Tensor) -> KV:
    """pool [S, H, D] at slots [...] -> [..., H, D]. index_select rather than pool[slots]: on CPU,
    advanced indexing of a few hundred rows costs 10-100x more (it forks a parallel region)."""
    return pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])


def _prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       causal_mask: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D], keys/values [L, Hkv, D] (L = start + T) -> [T, Hq, D], causal from the bottom right."""
    xops = xformers_ops() if q.is_cuda else None
    if xops is not None:
        t, hq, d = q.shape
        hkv = keys.shape[1]
        g = hq // hkv
        # xformers' 5-D layout [B, M, G, H, K] shares K/V across a head group without copying.
        qx = q.view(1, t, hkv, g, d)
        kx = keys[None, :, :, None].expand(1, keys.shape[0], hkv, g, d)
        vx = values[None, :, :, None].expand(1, values.shape[0], hkv, g, d)
        bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
        return xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias).view(t, hq, d)
    qs = q.transpose(0, 1)[None]  # [1, Hq, T, D]
    out = _grouped_sdpa(qs, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], causal_mask[None, None])
    return out[0].transpose(0, 1)
