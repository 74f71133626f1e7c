"""Reading a model directory: the mmserve format (the bundled demo model) or an open_clip CoCa
checkpoint saved by open_clip itself. Everything is read from local files; nothing reaches a hub.

mmserve format:   config.json, model.safetensors, tokenizer.json, labels.json
open_clip format: open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and
                  open_clip_model.safetensors or open_clip_pytorch_model.bin
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llm.loading.errors import ModelDirError
from llm.loading.hf import file_digest
from llm.loading.tokenizers import CoCaTokenizer, OpenClipBPETokenizer, WordTokenizer

MMSERVE_CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    coca: dict  # open_clip.CoCa keyword arguments: embed_dim, vision_cfg, text_cfg, multimodal_cfg
    preprocess: dict  # image_size, mean, std, resize ("squash" | "shortest")
    prompt_format: str = "caption-only"  # "qa-chat" | "caption-only"
    vision_tower: dict | None = None  # {"type": "conv", ...ConvTowerCfg} or None for open_clip's own
    labels: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": "mmserve-coca", "name": self.name, "coca": self.coca, "preprocess": self.preprocess,
                "prompt_format": self.prompt_format, "vision_tower": self.vision_tower, **self.extra}


@dataclass
class CoCaCheckpoint:
    """A CoCa checkpoint as read from disk: its spec, its whole state dict (vision tower, text tower,
    decoder), its tokenizer. Building the model is the serving side's job (app/models/families/coca.py):
    the vision tower it names lives in vision/."""

    spec: ModelSpec
    state: dict[str, torch.Tensor]
    tokenizer: CoCaTokenizer
    weights_digest: str  # sha256 of the weights file: part of every feature-cache key


def save_model_dir(path: str | Path, spec: ModelSpec, model: torch.nn.Module, tokenizer: WordTokenizer) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    (path / MMSERVE_CONFIG).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    (path / "labels.json").write_text(json.dumps(list(spec.labels), indent=2) + "\n")
    tokenizer.save(path / "tokenizer.json")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise ModelDirError(f"model file not found: {path}")
    return path


def _read_mmserve(path: Path) -> CoCaCheckpoint:
    cfg = json.loads(_require(path / MMSERVE_CONFIG).read_text())
    labels = tuple(json.loads((path / "labels.json").read_text())) if (path / "labels.json").is_file() else ()
    known = {"format", "name", "coca", "preprocess", "prompt_format", "vision_tower"}
    spec = ModelSpec(name=cfg.get("name", path.name), coca=cfg["coca"], preprocess=cfg["preprocess"],
                     prompt_format=cfg.get("prompt_format", "caption-only"), vision_tower=cfg.get("vision_tower"),
                     labels=labels, extra={k: v for k, v in cfg.items() if k not in known})
    weights = _require(path / "model.safetensors")
    tok_file = path / "tokenizer.json"
    tokenizer = WordTokenizer.from_file(tok_file) if tok_file.is_file() else OpenClipBPETokenizer()
    return CoCaCheckpoint(spec, load_file(str(weights)), tokenizer, file_digest([weights]))


def _read_open_clip(path: Path) -> CoCaCheckpoint:
    cfg = json.loads(_require(path / OPEN_CLIP_CONFIG).read_text())
    model_cfg, pp = cfg.get("model_cfg"), cfg.get("preprocess_cfg", {})
    if not model_cfg or "multimodal_cfg" not in model_cfg:
        raise ModelDirError(f"{path / OPEN_CLIP_CONFIG} does not describe a CoCa model (no multimodal_cfg)")
    weights = next((path / n for n in OPEN_CLIP_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise ModelDirError(f"model file not found: {path} has none of {', '.join(OPEN_CLIP_WEIGHTS)}")
    coca_kwargs = {k: model_cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg")}
    for k in ("quick_gelu", "init_logit_bias", "pad_id"):
        if k in model_cfg:
            coca_kwargs[k] = model_cfg[k]
    image_size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess = {"image_size": image_size if isinstance(image_size, int) else image_size[0],
                  "mean": list(pp.get("mean", OPENAI_MEAN)), "std": list(pp.get("std", OPENAI_STD)),
                  "resize": "shortest"}
    spec = ModelSpec(name=cfg.get("name", path.name), coca=coca_kwargs, preprocess=preprocess)
    if weights.suffix == ".safetensors":
        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    return CoCaCheckpoint(spec, state, OpenClipBPETokenizer(), file_digest([weights]))


def is_coca_dir(path: Path) -> bool:
    """An open_clip CoCa checkpoint, or the mmserve format (its config.json names the CoCa config; a
    Hugging Face config.json names `architectures` instead)."""
    if (path / OPEN_CLIP_CONFIG).is_file():
        return True
    try:
        return "coca" in json.loads((path / MMSERVE_CONFIG).read_text())
    except (OSError, ValueError):
        return False


def read_coca_dir(path: str | Path) -> CoCaCheckpoint:
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory not found: {path}")
    if (path / OPEN_CLIP_CONFIG).is_file():
        return _read_open_clip(path)
    if (path / MMSERVE_CONFIG).is_file():
        return _read_mmserve(path)
    raise ModelDirError(f"{path} holds neither {MMSERVE_CONFIG} (mmserve) nor {OPEN_CLIP_CONFIG} (open_clip)")
