"""Reading a model directory: the mmserve format (the bundled demo model) or an open_clip CoCa
checkpoint saved by open_clip itself. Everything is read from local files; nothing reaches a hub.

mmserve format:   config.json, model.safetensors, tokenizer.json, labels.json
open_clip format: open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and
                  open_clip_model.safetensors or open_clip_pytorch_model.bin
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from llm.tokenizer import OpenClipBPETokenizer, TextTokenizer, WordTokenizer
from vision.towers import ConvTower, ConvTowerCfg

MMSERVE_CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or unreadable; the message names the path."""


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
class LoadedModel:
    spec: ModelSpec
    model: open_clip.CoCa  # eval mode, fp32
    tokenizer: TextTokenizer
    weights_digest: str  # sha256 of the weights file: part of every feature-cache key


def build_coca(spec: ModelSpec) -> open_clip.CoCa:
    model = open_clip.CoCa(**spec.coca)
    if spec.vision_tower is not None:
        if spec.vision_tower.get("type") != "conv":
            raise ModelDirError(f"unknown vision tower type {spec.vision_tower.get('type')!r}")
        model.visual = ConvTower(ConvTowerCfg.from_dict({k: v for k, v in spec.vision_tower.items() if k != "type"}))
    return model


def save_model_dir(path: str | Path, spec: ModelSpec, model: torch.nn.Module, tokenizer: WordTokenizer) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    (path / MMSERVE_CONFIG).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    (path / "labels.json").write_text(json.dumps(list(spec.labels), indent=2) + "\n")
    tokenizer.save(path / "tokenizer.json")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require(path: Path) -> Path:
    if not path.is_file():
        raise ModelDirError(f"model file not found: {path}")
    return path


def _load_mmserve(path: Path) -> LoadedModel:
    cfg = json.loads(_require(path / MMSERVE_CONFIG).read_text())
    labels = tuple(json.loads((path / "labels.json").read_text())) if (path / "labels.json").is_file() else ()
    known = {"format", "name", "coca", "preprocess", "prompt_format", "vision_tower"}
    spec = ModelSpec(name=cfg.get("name", path.name), coca=cfg["coca"], preprocess=cfg["preprocess"],
                     prompt_format=cfg.get("prompt_format", "caption-only"), vision_tower=cfg.get("vision_tower"),
                     labels=labels, extra={k: v for k, v in cfg.items() if k not in known})
    weights = _require(path / "model.safetensors")
    tok_file = path / "tokenizer.json"
    tokenizer = WordTokenizer.from_file(tok_file) if tok_file.is_file() else OpenClipBPETokenizer()
    model = build_coca(spec)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return LoadedModel(spec, model.eval(), tokenizer, _file_digest(weights))


def _load_open_clip(path: Path) -> LoadedModel:
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
    model = build_coca(spec)
    if weights.suffix == ".safetensors":
        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return LoadedModel(spec, model.eval(), OpenClipBPETokenizer(), _file_digest(weights))


def load_model_dir(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory not found: {path}")
    if (path / MMSERVE_CONFIG).is_file():
        return _load_mmserve(path)
    if (path / OPEN_CLIP_CONFIG).is_file():
        return _load_open_clip(path)
    raise ModelDirError(f"{path} holds neither {MMSERVE_CONFIG} (mmserve) nor {OPEN_CLIP_CONFIG} (open_clip)")
