"""The vision encoder: preprocess a batch of images and run an open_clip-style visual tower.

Returns per image the pooled contrastive latent and the tokens the decoder cross-attends to (patch
tokens, or the attentional pooler's outputs for open_clip's own CoCa configs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from vision.preprocess import PreprocessCfg, preprocess


@dataclass(frozen=True)
class ImageFeatures:
    pooled: torch.Tensor  # [embed_dim], not normalized
    tokens: torch.Tensor  # [n_tokens, width]
    # How many leading tokens text at and after the image attends to; None: all. Mllama's padding
    # tiles come last: only text BEFORE <|image|> sees them (vision/mllama_encoder.py).
    attended_tokens: int | None = None


class VisionEncoder:
    # The vision stage may reduce these tokens (pool, merge, prune); an encoder whose tokens the
    # decoder addresses by position says False (vision/mllama_encoder.py).
    reducible_tokens = True

    def __init__(self, visual: nn.Module, preprocess_cfg: PreprocessCfg, name: str, weights_digest: str) -> None:
        if not getattr(visual, "output_tokens", False):
            raise ValueError("the visual tower must return tokens (set output_tokens=True)")
        self.visual = visual.eval()
        self.preprocess_cfg = preprocess_cfg
        self.name = name
        self.weights_digest = weights_digest

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> list[ImageFeatures]:
        if not images:
            return []
        pooled, tokens = self.visual(preprocess(images, self.preprocess_cfg))
        return [ImageFeatures(p, t) for p, t in zip(pooled, tokens)]
