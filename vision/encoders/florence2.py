"""Florence-2's image side through transformers, behind the vision stage's encoder interface.

    PIL image ─ CLIPImageProcessor (the checkpoint's preprocessor_config.json: square resize, no crop)
              ─ DaViT (Florence2VisionBackbone: conv stages, window and channel attention)
              ─ multi_modal_projector (2-D learned + 1-D cosine positions, a pooled token first,
                projection, LayerNorm) ─ ImageFeatures(pooled, tokens)

`tokens` [1 + (side / 32)^2, d_model] are exactly what transformers' Florence2Model scatters into the
`<image>` placeholders of the BART encoder's input (`get_image_features(...).pooler_output`); the
encoder reads them followed by the prompt's embeddings (app/models/families/florence2.py). Their
count is fixed by the processor's `image_seq_length` and their order is positional, so the stage must
not reduce them. `pooled` is their mean.

Reference: Xiao et al., "Florence-2: Advancing a Unified Representation for a Variety of Vision Tasks"
(2023); Ding et al., "DaViT: Dual Attention Vision Transformers" (2022); transformers 5.24
`models/florence2/modeling_florence2.py`.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from vision.encoders.base import ImageFeatures, weights_digest

VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


@dataclass(frozen=True)
class Florence2PreprocessCfg:
    """The checkpoint's preprocessor_config.json, as data (what the feature-cache key names)."""

    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.settings)

    def image_processor(self):
        """The class transformers' AutoImageProcessor picks for Florence-2, from these settings."""
        from transformers import CLIPImageProcessor  # noqa: PLC0415

        kind = self.settings.get("image_processor_type", "CLIPImageProcessor")
        if kind.removesuffix("Fast") not in ("CLIPImageProcessor",):
            raise ValueError(f"image processor {kind!r} is not supported for Florence-2 (CLIPImageProcessor)")
        settings = {k: v for k, v in self.settings.items() if k not in ("image_processor_type", "processor_class")}
        return CLIPImageProcessor(**settings)


class Florence2VisionEncoder:
    # The BART encoder reads the tokens by position, as many as the processor's image_seq_length.
    reducible_tokens = False
    token_grid = None
    saliency_query = None

    def __init__(self, tower: nn.Module, projector: nn.Module, preprocess_cfg: Florence2PreprocessCfg, name: str,
                 weights_digest: str) -> None:
        self.tower, self.projector = tower.eval(), projector.eval()
        self.preprocess_cfg = preprocess_cfg
        self.processor = preprocess_cfg.image_processor()
        self.name, self.weights_digest = name, weights_digest

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor], preprocess: dict,
                   name: str) -> "Florence2VisionEncoder":
        """From config.json (the whole Florence2Config: the projector reads both sides), the
        model.vision_tower.* and model.multi_modal_projector.* tensors and preprocessor_config.json."""
        from transformers import Florence2Config  # noqa: PLC0415
        from transformers.models.florence2.modeling_florence2 import (  # noqa: PLC0415
            Florence2MultiModalProjector, Florence2VisionBackbone)

        hf_config = Florence2Config.from_dict(config)
        with torch.device("meta"):
            tower, projector = Florence2VisionBackbone(hf_config.vision_config), Florence2MultiModalProjector(hf_config)
        for module, prefix in ((tower, VISION_PREFIXES[0]), (projector, VISION_PREFIXES[1])):
            part = {k.removeprefix(prefix): v.contiguous() for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(part, strict=True, assign=True)
        return cls(tower, projector, Florence2PreprocessCfg(preprocess), name, weights_digest(state))

    @classmethod
    def from_hf_model(cls, model: nn.Module, preprocess: dict, name: str = "florence2") -> "Florence2VisionEncoder":
        """From an in-memory transformers Florence2ForConditionalGeneration (shares its modules)."""
        inner = model.model
        state = {f"{VISION_PREFIXES[0]}{k}": v for k, v in inner.vision_tower.state_dict().items()}
        state |= {f"{VISION_PREFIXES[1]}{k}": v for k, v in inner.multi_modal_projector.state_dict().items()}
        return cls(inner.vision_tower, inner.multi_modal_projector, Florence2PreprocessCfg(preprocess), name,
                   weights_digest(state))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def cast(self, dtype: torch.dtype) -> "Florence2VisionEncoder":
        """A copy whose tower and projector run in `dtype` (CastableEncoder); the cache key names the dtype."""
        if dtype == self.dtype:
            return self
        return Florence2VisionEncoder(deepcopy(self.tower).to(dtype), deepcopy(self.projector).to(dtype),
                                      self.preprocess_cfg, f"{self.name}@{str(dtype).removeprefix('torch.')}",
                                      self.weights_digest)

    @property
    def tokens_per_image(self) -> int:
        return int(self.preprocess_cfg.settings.get("image_seq_length", 577))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> list[ImageFeatures]:
        tokens = self.projector(self.tower(pixel_values.to(self.dtype)).last_hidden_state)  # [B, 1 + h*w, d_model]
        return [ImageFeatures(t.mean(0), t) for t in tokens]

    def encode(self, images: list[Image.Image]) -> list[ImageFeatures]:
        if not images:
            return []
        return self.encode_pixels(self.preprocess(images))
