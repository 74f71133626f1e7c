"""Vision towers that sit in `open_clip.CoCa` in place of `model.visual`.

`ConvTower` is the demo model's encoder: a small strided CNN whose last feature map is the patch-token
grid. It keeps open_clip's visual interface: `forward(images) -> (pooled, tokens)` with
`tokens` of shape [B, H*W, width] and `pooled` of shape [B, embed_dim] (the contrastive latent).
A from-scratch ViT trained on two CPU cores learns colour but barely shape; a CNN learns both in
minutes, which is why the demo uses one (../shared/README.md has the measurements).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from open_clip.transformer import Transformer
from torch import nn


@dataclass(frozen=True)
class ConvTowerCfg:
    image_size: int = 128
    channels: tuple[int, ...] = (32, 64, 128, 128)  # one stride-2 stage each
    width: int = 128  # token width; must equal the multimodal decoder's width
    embed_dim: int = 64
    # Optional transformer blocks over the token grid after the CNN. A CNN token sees ~30 px, less
    # than a large object, so "which tokens are the square?" has no local answer. The bundled model
    # has none (0) and answers "what color is the {shape}?" on two-object scenes only ~78% right; a
    # trial with 1 block fixed that (100%) but lost captions at the same budget (75%): see issue notes.
    mixer_layers: int = 0
    mixer_heads: int = 4

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** len(self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConvTowerCfg":
        return cls(**{**d, "channels": tuple(d["channels"])})


class ConvTower(nn.Module):
    def __init__(self, cfg: ConvTowerCfg) -> None:
        super().__init__()
        assert cfg.channels[-1] == cfg.width, "the last stage's channels are the token width"
        self.cfg = cfg
        self.output_tokens = True
        self.grid_size = (cfg.grid_size, cfg.grid_size)
        stages, c_in = [], 3
        for c_out in cfg.channels:
            stages += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.grid_size ** 2, cfg.width))
        self.mixer = Transformer(cfg.width, cfg.mixer_layers, cfg.mixer_heads) if cfg.mixer_layers else None
        self.ln_post = nn.LayerNorm(cfg.width)
        # The zero-shot label of a two-object image is the large object's: a learned attention pool
        # can weight it, where a plain mean would blend both objects.
        self.pool_query = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Parameter(torch.randn(cfg.width, cfg.embed_dim) * cfg.width ** -0.5)
        nn.init.normal_(self.positional_embedding, std=0.02)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stages(images)  # [B, C, h, w]
        tokens = x.flatten(2).transpose(1, 2) + self.positional_embedding
        if self.mixer is not None:
            tokens = self.mixer(tokens)
        tokens = self.ln_post(tokens)
        weights = torch.softmax(tokens @ self.pool_query, dim=1)  # [B, N]
        pooled = (weights.unsqueeze(-1) * tokens).sum(dim=1) @ self.proj
        return pooled, tokens
