"""Vision towers that sit in `open_clip.CoCa` in place of `model.visual`.

`ConvTower` is the demo model's encoder: a small strided CNN whose last feature map is the patch-token
grid. It keeps open_clip's visual interface: `forward(images) -> (pooled, tokens)` with
`tokens` of shape [B, H*W, width] and `pooled` of shape [B, embed_dim] (the contrastive latent).
A from-scratch ViT trained on two CPU cores learns colour but barely shape; a CNN learns both in
minutes, which is why the demo uses one (../shared/README.md has the measurements). Its tokens are
local, though: optional transformer blocks (`mixer_layers`) over the token grid let each token see
the whole object, and the other one, before the decoder cross-attends to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from open_clip.transformer import Transformer
from torch import nn


@dataclass(frozen=True)
class ConvTowerCfg:
    image_size: int = 128
    channels: tuple[int, ...] = (32, 64, 128, 128)  # one stride-2 stage each
    width: int = 128  # token width; must equal the multimodal decoder's width
    embed_dim: int = 64
    # Transformer blocks over the token grid after the CNN (self-attention across all 64 tokens, with
    # the positional embeddings added first). A CNN token sees ~30 px, less than a large object, and
    # the 2-layer decoder cannot bind one token's colour to another's shape: without a mixer the model
    # answers "what color is the {shape}?" on two-object scenes ~65% right. 0 = none (checkpoints
    # written before the field existed load as such).
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
        if self.mixer is not None:
            self._init_mixer(self.mixer)

    @staticmethod
    def _init_mixer(mixer: Transformer) -> None:
        """open_clip's text-tower scheme (TextTransformer.init_parameters): residual output projections
        scaled down by depth, so the blocks start close to the identity on top of the CNN's tokens."""
        proj_std = mixer.width ** -0.5 * (2 * mixer.layers) ** -0.5
        for block in mixer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=mixer.width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * mixer.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def grow_mixer(self, layers: int) -> "ConvTower":
        """This tower with `layers` mixer blocks, its own weights kept: the blocks it lacks are added with
        zeroed residual outputs, so the grown tower computes exactly what this one did until trained."""
        assert layers >= self.cfg.mixer_layers, "a mixer grows, never shrinks"
        grown = ConvTower(replace(self.cfg, mixer_layers=layers))
        missing, unexpected = grown.load_state_dict(self.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("mixer.") for k in missing), (missing, unexpected)
        for block in grown.mixer.resblocks[self.cfg.mixer_layers:]:
            for linear in (block.attn.out_proj, block.mlp.c_proj):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        return grown

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stages(images))

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last stage's feature map [B, C, h, w] -> (pooled, tokens). Split from `forward` so that a
        training run with frozen conv stages computes their features once per image."""
        tokens = x.flatten(2).transpose(1, 2) + self.positional_embedding
        if self.mixer is not None:
            tokens = self.mixer(tokens)
        tokens = self.ln_post(tokens)
        weights = torch.softmax(tokens @ self.pool_query, dim=1)  # [B, N]
        pooled = (weights.unsqueeze(-1) * tokens).sum(dim=1) @ self.proj
        return pooled, tokens
