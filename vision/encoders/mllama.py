"""The Llama-3.2-Vision image side through transformers, behind the vision stage's encoder interface.

    PIL image ─ MllamaImageProcessor (tiles, aspect ratio) ─ MllamaVisionModel ─ multi_modal_projector
              ─ ImageFeatures(pooled, tokens)

`tokens` [max_num_tiles * patches_per_tile, text_hidden] are the projected cross-attention states
transformers' MllamaModel feeds its cross-attention layers, flattened over all max_num_tiles tiles:
the image's real tiles first, then its padding tiles (an image with fewer tiles than the maximum).
`attended_tokens` = real tiles * patches_per_tile: text at and after <|image|> attends to those only
(transformers' cross-attention mask); text before it attends to all of them, padding tiles included
(transformers turns its all-masked row into an all-zero one; see llm/models/mllama.py). `pooled` is the mean
of the real tiles' tokens (Mllama has no pooled contrastive latent).

The processor is built from the checkpoint's preprocessor_config.json (offline, a plain constructor);
its settings are `preprocess_cfg`, part of the feature-cache key with `name` and `weights_digest`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torch import nn

from vision.encoders.base import ImageFeatures, weights_digest

VISION_PREFIXES = ("vision_model.", "model.vision_model.", "multi_modal_projector.", "model.multi_modal_projector.")


@dataclass(frozen=True)
class MllamaPreprocessCfg:
    """MllamaImageProcessor's settings, as data."""

    tile_size: int
    max_image_tiles: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = 2  # PIL.Image.BILINEAR, transformers' default for Mllama

    @classmethod
    def from_dict(cls, d: dict) -> "MllamaPreprocessCfg":
        """From preprocessor_config.json (or an MllamaImageProcessor's to_dict())."""
        size = d.get("size", {"height": 224, "width": 224})
        if size["height"] != size["width"]:
            raise ValueError(f"Mllama tiles are square; preprocessor size is {size}")
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_pad", "do_convert_rgb"):
            if not d.get(flag, True):
                raise ValueError(f"preprocessor setting {flag}=False is not supported")
        return cls(int(size["height"]), int(d.get("max_image_tiles", 4)), tuple(d.get("image_mean", (0.5,) * 3)),
                   tuple(d.get("image_std", (0.5,) * 3)), float(d.get("rescale_factor", 1 / 255)),
                   int(d.get("resample", 2)))

    def to_dict(self) -> dict:
        return asdict(self)

    def image_processor(self):
        from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor  # noqa: PLC0415

        return MllamaImageProcessor(size={"height": self.tile_size, "width": self.tile_size},
                                    max_image_tiles=self.max_image_tiles, image_mean=list(self.image_mean),
                                    image_std=list(self.image_std), rescale_factor=self.rescale_factor,
                                    resample=self.resample)


class MllamaVisionEncoder:
    # Its tokens are max_image_tiles tiles, padding ones included, that the decoder's masks address by
    # position (ImageFeatures.attended_tokens): the vision stage must not reduce them.
    reducible_tokens = False
    token_grid = None
    saliency_query = None

    def __init__(self, vision_model: nn.Module, projector: nn.Linear, preprocess_cfg: MllamaPreprocessCfg,
                 name: str, weights_digest: str) -> None:
        if vision_model.config.max_num_tiles != preprocess_cfg.max_image_tiles:
            raise ValueError(f"vision model has {vision_model.config.max_num_tiles} tiles, the preprocessor "
                             f"{preprocess_cfg.max_image_tiles}")
        self.vision_model, self.projector = vision_model.eval(), projector.eval()
        self.dtype = projector.weight.dtype
        self.preprocess_cfg = preprocess_cfg
        self.processor = preprocess_cfg.image_processor()
        self.name = name
        self.weights_digest = weights_digest

    @classmethod
    def from_hf_model(cls, model: nn.Module, preprocess_cfg: MllamaPreprocessCfg,
                      name: str = "mllama") -> "MllamaVisionEncoder":
        """From an in-memory transformers MllamaForConditionalGeneration (shares its modules)."""
        inner = model.model
        state = {f"vision_model.{k}": v for k, v in inner.vision_model.state_dict().items()}
        state |= {f"multi_modal_projector.{k}": v for k, v in inner.multi_modal_projector.state_dict().items()}
        return cls(inner.vision_model, inner.multi_modal_projector, preprocess_cfg, name, weights_digest(state))

    @classmethod
    def from_state(cls, vision_config: dict, state: dict[str, torch.Tensor], preprocess: dict,
                   name: str) -> "MllamaVisionEncoder":
        """From a checkpoint's parts: config.json's `vision_config`, the vision_model.* and
        multi_modal_projector.* tensors (any of transformers' prefixes) and preprocessor_config.json."""
        from transformers import MllamaVisionConfig, MllamaVisionModel  # noqa: PLC0415

        state = {k.removeprefix("model."): v for k, v in state.items()}
        vision_model = MllamaVisionModel(MllamaVisionConfig.from_dict(vision_config))
        vision_model.load_state_dict({k.removeprefix("vision_model."): v for k, v in state.items()
                                      if k.startswith("vision_model.")}, strict=True)
        weight = state["multi_modal_projector.weight"]
        projector = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
        projector.load_state_dict({"weight": weight, "bias": state["multi_modal_projector.bias"]}, strict=True)
        return cls(vision_model, projector, MllamaPreprocessCfg.from_dict(preprocess), name, weights_digest(state))

    def to(self, dtype: torch.dtype) -> "MllamaVisionEncoder":
        """This encoder computing in `dtype` (weights and activations): itself when it already does,
        else a converted copy."""
        if dtype == self.dtype:
            return self
        return MllamaVisionEncoder(copy.deepcopy(self.vision_model).to(dtype), copy.deepcopy(self.projector).to(dtype),
                                   self.preprocess_cfg, self.name, self.weights_digest)

    def preprocess(self, images: list[Image.Image]) -> dict:
        """-> pixel_values [B, 1, max_tiles, 3, tile, tile], aspect_ratio_ids [B, 1], aspect_ratio_mask
        [B, 1, max_tiles], num_tiles [[n] per image], one image per row."""
        return self.processor([[im.convert("RGB")] for im in images], return_tensors="pt")

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor, num_tiles: list[list[int]]) -> list[ImageFeatures]:
        states = self.vision_model(pixel_values=pixel_values.to(self.dtype), aspect_ratio_ids=aspect_ratio_ids,
                                   aspect_ratio_mask=aspect_ratio_mask).last_hidden_state
        projected = self.projector(states)  # [B, 1, max_tiles, patches, text_hidden]
        features = []
        patches = projected.shape[3]
        for b, (n,) in enumerate(num_tiles):
            tokens = projected[b, 0].reshape(-1, projected.shape[-1])
            features.append(ImageFeatures(tokens[: n * patches].mean(0), tokens, attended_tokens=n * patches))
        return features

    def encode(self, images: list[Image.Image]) -> list[ImageFeatures]:
        if not images:
            return []
        inputs = self.preprocess(images)
        return self.encode_pixels(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"],
                                  inputs["num_tiles"])
