"""The CoCa decoder with a KV cache: open_clip's text tower followed by its multimodal decoder.

References: Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models" (2022);
open_clip `coca_model.py` / `transformer.py` (TextTransformer, MultimodalTransformer), whose
weights this module loads and whose logits it reproduces.

    token ids ─ embedding + position ─ text blocks (causal self-attn, MLP) ──┐
                                                                               ▼
    image tokens ─ LN ─ K/V (once per image) ─► multimodal layers: causal self-attn block,
                                                then cross-attn block ─ LN ─ projection ─ logits

The text tower's CLS token (appended last, seen by nobody under the causal mask) only feeds the
contrastive latent, so generation never computes it. Cross-attention K/V depend on the image alone:
`cross_kv()` computes them once and every decode step reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class CoCaDecoderConfig:
    vocab_size: int
    width: int
    heads: int
    text_layers: int
    multimodal_layers: int
    context_length: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False

    @classmethod
    def from_coca_kwargs(cls, coca: dict) -> "CoCaDecoderConfig":
        text, mm = coca["text_cfg"], coca["multimodal_cfg"]
        if text["width"] != mm["width"]:
            raise ValueError("text and multimodal widths differ; open_clip CoCa feeds one into the other")
        return cls(vocab_size=mm["vocab_size"], width=mm["width"], heads=mm.get("heads", 8),
                   text_layers=text.get("layers", 12), multimodal_layers=mm.get("layers", 12),
                   context_length=min(text.get("context_length", 77), mm.get("context_length", 77)),
                   mlp_ratio=mm.get("mlp_ratio", 4.0), quick_gelu=bool(coca.get("quick_gelu", False)))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, cfg: CoCaDecoderConfig) -> None:
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.c_fc = nn.Linear(cfg.width, hidden)
        self.act = QuickGELU() if cfg.quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class KVCache:
    """A contiguous cache per self-attention layer: [batch, heads, context, head_dim]."""

    def __init__(self, n_layers: int, batch: int, cfg: CoCaDecoderConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch, cfg.heads, cfg.context_length, cfg.width // cfg.heads)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]


class SelfAttentionBlock(nn.Module):
    """Pre-LN causal self-attention + MLP; its K/V go to the cache."""

    def __init__(self, cfg: CoCaDecoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        rows = torch.arange(b, device=x.device)[:, None]
        k_cache[rows, :, positions] = k.transpose(1, 2)  # scatter each row's new K/V at its own positions
        v_cache[rows, :, positions] = v.transpose(1, 2)
        # Key j is visible to a query at position p iff j <= p: the cache holds each row's tokens at
        # positions 0..len-1, so this one mask is both causal and padding-safe.
        key_pos = torch.arange(k_cache.shape[2], device=x.device)
        mask = key_pos[None, None, None, :] <= positions[:, None, :, None]
        attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln_2(x))


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention to the image tokens + MLP."""

    def __init__(self, cfg: CoCaDecoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.ln_1_kv = nn.LayerNorm(cfg.width)
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def image_kv(self, image_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, w = image_embs.shape
        k, v = self.kv(self.ln_1_kv(image_embs)).view(b, n, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return k, v  # [B, H, N, D] each

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q = self.q(self.ln_1(x)).view(b, t, self.heads, w // self.heads).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln_2(x))


class CoCaDecoder(nn.Module):
    def __init__(self, cfg: CoCaDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.text_blocks = nn.ModuleList(SelfAttentionBlock(cfg) for _ in range(cfg.text_layers))
        self.mm_self = nn.ModuleList(SelfAttentionBlock(cfg) for _ in range(cfg.multimodal_layers))
        self.mm_cross = nn.ModuleList(CrossAttentionBlock(cfg) for _ in range(cfg.multimodal_layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    @property
    def n_cache_layers(self) -> int:
        return self.cfg.text_layers + self.cfg.multimodal_layers

    def new_cache(self, batch: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.n_cache_layers, batch, self.cfg, p.dtype, p.device)

    def cross_kv(self, image_embs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The image's K/V for every multimodal layer, computed once per image."""
        image_embs = image_embs.to(self.lm_head.weight.dtype)
        return [block.image_kv(image_embs) for block in self.mm_cross]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                cross: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """ids, positions: [B, T] -> logits [B, T, vocab]; writes the new tokens' K/V into `cache`."""
        x = self.token_embedding(ids) + self.positional_embedding[positions]
        layer = 0
        for block in self.text_blocks:
            x = block(x, positions, cache.k[layer], cache.v[layer])
            layer += 1
        for self_block, cross_block, (k, v) in zip(self.mm_self, self.mm_cross, cross):
            x = self_block(x, positions, cache.k[layer], cache.v[layer])
            x = cross_block(x, k, v)
            layer += 1
        return self.lm_head(self.ln_final(x))


def _block_state(sd: dict, prefix: str, cross: bool) -> dict:
    """open_clip ResidualAttentionBlock weights -> ours (fused in_proj split for cross-attention)."""
    w, b = sd[f"{prefix}.attn.in_proj_weight"], sd[f"{prefix}.attn.in_proj_bias"]
    width = w.shape[1]
    if any(f"{prefix}.ls_{i}.gamma" in sd for i in (1, 2)):
        raise ValueError("layer scale (ls_init_value) is not supported by the CoCa decoder yet")
    out = {
        "ln_1.weight": sd[f"{prefix}.ln_1.weight"], "ln_1.bias": sd[f"{prefix}.ln_1.bias"],
        "out.weight": sd[f"{prefix}.attn.out_proj.weight"], "out.bias": sd[f"{prefix}.attn.out_proj.bias"],
        "ln_2.weight": sd[f"{prefix}.ln_2.weight"], "ln_2.bias": sd[f"{prefix}.ln_2.bias"],
        "mlp.c_fc.weight": sd[f"{prefix}.mlp.c_fc.weight"], "mlp.c_fc.bias": sd[f"{prefix}.mlp.c_fc.bias"],
        "mlp.c_proj.weight": sd[f"{prefix}.mlp.c_proj.weight"], "mlp.c_proj.bias": sd[f"{prefix}.mlp.c_proj.bias"],
    }
    if cross:
        out |= {"q.weight": w[:width], "q.bias": b[:width], "kv.weight": w[width:], "kv.bias": b[width:],
                "ln_1_kv.weight": sd[f"{prefix}.ln_1_kv.weight"], "ln_1_kv.bias": sd[f"{prefix}.ln_1_kv.bias"]}
    else:
        out |= {"qkv.weight": w, "qkv.bias": b}
    return out


def decoder_from_open_clip(coca_kwargs: dict, state_dict: dict) -> CoCaDecoder:
    """Build our decoder from an open_clip CoCa config and state dict (text + text_decoder weights)."""
    cfg = CoCaDecoderConfig.from_coca_kwargs(coca_kwargs)
    sd = state_dict
    ours = {
        "token_embedding.weight": sd["text.token_embedding.weight"],
        "positional_embedding": sd["text.positional_embedding"][: cfg.context_length],
        "ln_final.weight": sd["text_decoder.ln_final.weight"], "ln_final.bias": sd["text_decoder.ln_final.bias"],
        "lm_head.weight": sd["text_decoder.text_projection"].T,
    }
    for i in range(cfg.text_layers):
        for k, v in _block_state(sd, f"text.transformer.resblocks.{i}", cross=False).items():
            ours[f"text_blocks.{i}.{k}"] = v
    for i in range(cfg.multimodal_layers):
        for k, v in _block_state(sd, f"text_decoder.resblocks.{i}", cross=False).items():
            ours[f"mm_self.{i}.{k}"] = v
        for k, v in _block_state(sd, f"text_decoder.cross_attn.{i}", cross=True).items():
            ours[f"mm_cross.{i}.{k}"] = v
    decoder = CoCaDecoder(cfg)
    decoder.load_state_dict({k: v.detach().clone().contiguous() for k, v in ours.items()}, strict=True)
    return decoder.eval()
