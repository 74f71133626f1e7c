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
from torch import nn

from llm.attention import KVShape, StepBatch, head_major
from llm.cross_plan import CrossPlan, ImageSpan


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
    # Structured pruning (llm/quant/prune.py) keeps fewer heads and MLP channels than open_clip's
    # config implies: 0 = the config's own (width // heads per head, width * mlp_ratio channels).
    head_width: int = 0
    mlp_width: int = 0

    @property
    def head_dim(self) -> int:
        return self.head_width or self.width // self.heads

    @property
    def attention_width(self) -> int:
        """The width attention works in: heads x head_dim (the model width unless heads were pruned)."""
        return self.heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_width or int(self.width * self.mlp_ratio)

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
        hidden = cfg.mlp_hidden
        self.c_fc = nn.Linear(cfg.width, hidden)
        self.act = QuickGELU() if cfg.quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class SelfAttentionBlock(nn.Module):
    """Pre-LN causal self-attention + MLP; its K/V go to the paged pool."""

    def __init__(self, cfg: CoCaDecoderConfig, layer: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.layer = cfg.heads, cfg.head_dim, layer
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.attention_width)
        self.out = nn.Linear(cfg.attention_width, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(self.ln_1(x)).view(n, 3, self.heads, self.head_dim).unbind(1)
        x = x + self.out(batch.self_attention(self.layer, q, k, v).reshape(n, -1))
        return x + self.mlp(self.ln_2(x))


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention to the image tokens + MLP."""

    def __init__(self, cfg: CoCaDecoderConfig, layer: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.layer = cfg.heads, cfg.head_dim, layer
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.ln_1_kv = nn.LayerNorm(cfg.width)
        self.q = nn.Linear(cfg.width, cfg.attention_width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.attention_width)
        self.out = nn.Linear(cfg.attention_width, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def image_kv(self, image_tokens: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, W] visual tokens -> K, V [B, heads, N, head_dim], each contiguous (`head_major`;
        written into `out` when given)."""
        k, v = head_major(lambda x: self.kv(self.ln_1_kv(x)), image_tokens, self.heads, self.head_dim,
                          parts=2, out=out)
        return k, v

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        q = self.q(self.ln_1(x)).view(n, self.heads, self.head_dim)
        x = x + self.out(batch.cross_attention(self.layer, q).reshape(n, -1))
        return x + self.mlp(self.ln_2(x))


class CoCaDecoder(nn.Module):
    def __init__(self, cfg: CoCaDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        n_text = cfg.text_layers
        self.text_blocks = nn.ModuleList(SelfAttentionBlock(cfg, i) for i in range(n_text))
        self.mm_self = nn.ModuleList(SelfAttentionBlock(cfg, n_text + i) for i in range(cfg.multimodal_layers))
        self.mm_cross = nn.ModuleList(CrossAttentionBlock(cfg, i) for i in range(cfg.multimodal_layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    # -- what the model runner needs to know --------------------------------------------------------
    @property
    def kv_shape(self) -> KVShape:
        return KVShape(layers=self.cfg.text_layers + self.cfg.multimodal_layers, kv_heads=self.cfg.heads,
                       head_dim=self.cfg.head_dim)

    @property
    def cross_kv_shape(self) -> KVShape:
        return KVShape(layers=self.cfg.multimodal_layers, kv_heads=self.cfg.heads,
                       head_dim=self.cfg.head_dim)

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def cross_plan(self, prompt_ids: list[int], images: list[ImageSpan]) -> CrossPlan:
        """Every CoCa token sees its one image, all of it."""
        if len(images) != 1:
            raise ValueError(f"a CoCa decoder cross-attends to exactly one image, got {len(images)}")
        return CrossPlan.everything(images[0].length)

    def cross_kv(self, image_tokens: torch.Tensor, out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Images [B, N, W] -> their K/V [B, heads, N, head_dim] for every multimodal layer
        (`cross_kv_shape`), written into `out` when given (the runner's preallocated pool): computed
        once per image (and for all of a step's new images in one matmul)."""
        image_tokens = image_tokens.to(self.token_embedding.weight.dtype)
        return [block.image_kv(image_tokens, None if out is None else out[i]) for i, block in enumerate(self.mm_cross)]

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """The step's flat tokens -> logits [len(batch.logits_rows), vocab]; K/V go to the pool."""
        x = self.token_embedding(batch.token_ids) + self.positional_embedding[batch.positions]
        for block in self.text_blocks:
            x = block(x, batch)
        for self_block, cross_block in zip(self.mm_self, self.mm_cross):
            x = cross_block(self_block(x, batch), batch)
        return self.lm_head(self.ln_final(x[batch.logits_rows]))


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
