"""Vision towers of Hugging Face image-to-text checkpoints, through transformers, behind the vision
stage's encoder interface: the encoders VisionEncoderDecoderModel pairs with its decoders (ViT, DeiT,
Swin, DonutSwin) and BLIP's vision model.

    PIL image ─ the checkpoint's image processor (preprocessor_config.json) ─ tower ─ last_hidden_state
              ─ [enc_to_dec_proj] ─ ImageFeatures(pooled = mean of the tokens, tokens)

`tokens` are exactly what transformers' decoder cross-attends to (VisionEncoderDecoderModel projects
the encoder's states with enc_to_dec_proj when the widths differ and the decoder names no
cross_attention_hidden_size; the projection is applied here, so the decoder sees its own width).
They are not reducible: these decoders were trained on every token, in order.

The image processor is built from the checkpoint's preprocessor_config.json by its
`image_processor_type`, one of `PROCESSORS` (a plain constructor; nothing reaches a hub); its settings
are `preprocess_cfg`, part of the feature-cache key with `name` and `weights_digest`.
"""

from __future__ import annotations

import json
from copy import deepcopy as copy_module
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vision.encoders.base import ImageFeatures

# image_processor_type -> transformers class name (the slow, PIL-based processors these checkpoints name)
PROCESSORS = ("ViTImageProcessor", "DeiTImageProcessor", "BlipImageProcessor", "DonutImageProcessor",
              "ViTImageProcessorFast", "DeiTImageProcessorFast", "BlipImageProcessorFast", "DonutImageProcessorFast")
# VisionEncoderDecoderModel encoders served: config.json's encoder.model_type
VED_ENCODERS = ("vit", "deit", "swin", "donut-swin")


@dataclass(frozen=True)
class HFPreprocessCfg:
    """An image processor's settings as data (its preprocessor_config.json, canonical JSON)."""

    settings_json: str

    @classmethod
    def from_dict(cls, d: dict) -> "HFPreprocessCfg":
        kind = d.get("image_processor_type")
        if kind not in PROCESSORS:
            raise ValueError(f"image_processor_type {kind!r} is not supported; supported: {', '.join(PROCESSORS)}")
        return cls(json.dumps(d, sort_keys=True))

    def to_dict(self) -> dict:
        return json.loads(self.settings_json)

    def image_processor(self):
        import transformers  # noqa: PLC0415

        settings = self.to_dict()
        kind = settings.pop("image_processor_type")
        settings.pop("processor_class", None)
        return getattr(transformers, kind)(**settings)


class HFVisionEncoder:
    reducible_tokens = False
    token_grid = None
    saliency_query = None

    def __init__(self, tower: nn.Module, preprocess_cfg: HFPreprocessCfg, name: str, weights_digest: str,
                 projection: nn.Linear | None = None) -> None:
        self.tower, self.projection = tower.eval(), None if projection is None else projection.eval()
        self.preprocess_cfg = preprocess_cfg
        self.processor = preprocess_cfg.image_processor()
        self.name, self.weights_digest = name, weights_digest

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def cast(self, dtype: torch.dtype) -> "HFVisionEncoder":
        """A copy whose tower (and projection) run in `dtype`; its features come out in it too."""
        if dtype == self.dtype:
            return self
        copy = lambda m: None if m is None else copy_module(m).to(dtype)  # noqa: E731
        return HFVisionEncoder(copy(self.tower), self.preprocess_cfg, f"{self.name}@{str(dtype).removeprefix('torch.')}",
                               self.weights_digest, copy(self.projection))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the tokens the decoder attends to [B, N, width]."""
        states = self.tower(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        return states if self.projection is None else self.projection(states)

    def encode(self, images: list[Image.Image]) -> list[ImageFeatures]:
        if not images:
            return []
        tokens = self.encode_pixels(self.preprocess(images))
        return [ImageFeatures(t.mean(0), t) for t in tokens]


def _from_pretrained(cls, path: Path):
    """transformers' own loading of a local checkpoint (it renames 5.x's changed module paths from the
    names checkpoints hold); nothing reaches a hub."""
    return cls.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()


def ved_encoder(path: Path, preprocess: dict, name: str, weights_digest: str) -> HFVisionEncoder:
    """A VisionEncoderDecoderModel checkpoint's encoder (and enc_to_dec_proj, when it has one);
    `preprocess` is its preprocessor_config.json."""
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel  # noqa: PLC0415

    kind = VisionEncoderDecoderConfig.from_pretrained(str(path), local_files_only=True).encoder.model_type
    if kind not in VED_ENCODERS:
        raise ValueError(f"VisionEncoderDecoderModel encoder {kind!r} is not supported; supported: "
                         f"{', '.join(VED_ENCODERS)}")
    model = _from_pretrained(VisionEncoderDecoderModel, path)
    projection = model.enc_to_dec_proj if hasattr(model, "enc_to_dec_proj") else None  # transformers' own attribute
    return HFVisionEncoder(model.encoder, HFPreprocessCfg.from_dict(preprocess), name, weights_digest, projection)


def blip_encoder(path: Path, preprocess: dict, name: str, weights_digest: str) -> HFVisionEncoder:
    """A BlipForConditionalGeneration checkpoint's vision model."""
    from transformers import BlipForConditionalGeneration  # noqa: PLC0415

    model = _from_pretrained(BlipForConditionalGeneration, path)
    return HFVisionEncoder(model.vision_model, HFPreprocessCfg.from_dict(preprocess), name, weights_digest)
