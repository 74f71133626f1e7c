"""Model families: which one serves a checkpoint directory, found from its files (or named).

    coca    config.json with a "coca" section (the mmserve format), or open_clip_config.json
    mllama  config.json naming MllamaForConditionalGeneration (a Hugging Face directory)
    blip    config.json naming BlipForConditionalGeneration (BLIP captioning)
    ved     config.json naming VisionEncoderDecoderModel (ViT/DeiT/Swin/DonutSwin + GPT-2/TrOCR decoders)
    florence2  config.json naming Florence2ForConditionalGeneration (a Hugging Face directory)
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.models.families.base import FamilyModel, PromptError
from app.models.families.blip import BlipModel
from app.models.families.coca import CoCaModel
from app.models.families.florence2 import Florence2Model
from app.models.families.mllama import MllamaModel
from app.models.families.ved import VEDModel
from llm.loading.errors import ModelDirError
from llm.loading.hf import read_config
from llm.quant import QuantScheme, is_quantized, quantize_model

FAMILIES = {"coca": CoCaModel, "mllama": MllamaModel, "blip": BlipModel, "ved": VEDModel, "florence2": Florence2Model}
DESCRIBED = ("coca (mmserve or open_clip CoCa format), mllama (MllamaForConditionalGeneration), "
             "blip (BlipForConditionalGeneration), ved (VisionEncoderDecoderModel), "
             "florence2 (Florence2ForConditionalGeneration)")

__all__ = ["FAMILIES", "FamilyModel", "PromptError", "detect_family", "load_family_model"]


def detect_family(path: Path) -> str:
    if not path.is_dir():
        raise ModelDirError(f"model directory not found: {path}")
    for name, family in FAMILIES.items():
        if family.detect(path):
            return name
    if (path / "config.json").is_file():
        config = read_config(path)
        named = config.get("architectures") or [config.get("model_type", "unknown")]
        raise ModelDirError(f"{path / 'config.json'}: architecture {', '.join(map(str, named))} is not supported; "
                            f"supported: {DESCRIBED}")
    raise ModelDirError(f"{path} holds no checkpoint this server can read (no config.json or open_clip_config.json); "
                        f"supported: {DESCRIBED}")


def load_family_model(path: Path, family: str = "", max_context: int | None = None,
                      dtype: torch.dtype = torch.float32, quantize: QuantScheme | None = None) -> FamilyModel:
    """`family` "" = detected. `max_context` caps a family whose configured context is longer. `dtype`:
    what the decoder and the vision tower compute in (llm/hardware.py resolve_dtype). `quantize`: the
    decoder quantized on load (round-to-nearest), the same weights `mmserve quantize` would write."""
    path = Path(path)
    family = family or detect_family(path)
    if family not in FAMILIES:
        raise ModelDirError(f"model family {family!r} is not supported; supported: {DESCRIBED}")
    model = FAMILIES[family].load(path, max_context, dtype)
    if quantize is not None:
        if is_quantized(model.decoder):
            raise ModelDirError(f"{path} is already quantized; serve it without quantize, or quantize the "
                                f"original checkpoint")
        model.decoder = quantize_model(model.decoder, quantize)
    return model
