"""open_clip-style visual towers (open_clip's ViTs, the demo's CNN tower) behind `ImageEncoder`.

Returns per image the pooled contrastive latent and the tokens the decoder cross-attends to (patch
tokens, or the attentional pooler's outputs for open_clip's own CoCa configs).
"""

from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn

from vision.encoders.base import Grid, ImageFeatures
from vision.preprocess import PreprocessCfg, preprocess
from vision.towers import ConvTower


def tower_grid(visual: nn.Module) -> Grid | None:
    """The (h, w) patch grid of a tower's tokens; None for tokens with no grid (open_clip's attentional
    pooler outputs: 255 learned queries, not patches)."""
    if isinstance(visual, ConvTower):
        return visual.grid_size
    if isinstance(visual, VisionTransformer) and visual.attn_pool is None:
        return (int(visual.grid_size[0]), int(visual.grid_size[1]))
    return None


def tower_saliency_query(visual: nn.Module) -> torch.Tensor | None:
    """The demo tower's learned attention-pool query, in the tokens' own space: what "keep" ranks by
    (VisionZip). open_clip ViTs return no CLS token beside the patch tokens: None, rank by norm."""
    return visual.pool_query.detach().clone() if isinstance(visual, ConvTower) else None


class VisionEncoder:
    reducible_tokens = True

    def __init__(self, visual: nn.Module, preprocess_cfg: PreprocessCfg, name: str, weights_digest: str) -> None:
        if isinstance(visual, VisionTransformer) and not visual.output_tokens:
            raise ValueError("the visual tower must return tokens (set output_tokens=True)")
        self.visual = visual.eval()
        self.preprocess_cfg = preprocess_cfg
        self.name = name
        self.weights_digest = weights_digest
        self.token_grid = tower_grid(visual)
        self.saliency_query = tower_saliency_query(visual)
        weight = next(visual.parameters(), None)
        self.dtype = weight.dtype if weight is not None else torch.float32

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> list[ImageFeatures]:
        if not images:
            return []
        pixels = preprocess(images, self.preprocess_cfg)
        pooled, tokens = self.visual(pixels.to(self.dtype))
        return [ImageFeatures(p, t) for p, t in zip(pooled, tokens)]
