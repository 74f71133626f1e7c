"""Preprocessing as data (the checkpoint's `preprocess` config), separate from the model.

`resize="squash"` resizes straight to a square (the demo world is square already); `"shortest"`
resizes the short side and centre-crops, as open_clip's eval transform does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True, slots=True)
class PreprocessCfg:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "shortest"):
            raise ValueError(f"unknown resize mode {self.resize!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessCfg":
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), d.get("resize", "squash"))

    def to_dict(self) -> dict:
        return asdict(self)


def _resize(image: Image.Image, cfg: PreprocessCfg) -> Image.Image:
    size = cfg.image_size
    if image.size == (size, size):
        return image
    if cfg.resize == "squash":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def normalize_uint8(pixels: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    """[B, 3, H, W] uint8 -> normalized float32."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def to_pixels(image: Image.Image, cfg: PreprocessCfg) -> torch.Tensor:
    """One RGB image -> [3, size, size] uint8."""
    array = np.asarray(_resize(image.convert("RGB"), cfg), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def preprocess(images: list[Image.Image], cfg: PreprocessCfg) -> torch.Tensor:
    return normalize_uint8(torch.stack([to_pixels(im, cfg) for im in images]), cfg)
