"""The demo model's architecture: open_clip CoCa with the CNN tower, sized for two CPU cores."""

from __future__ import annotations

from demo import world
from llm.loading.coca_checkpoint import ModelSpec
from vision.towers import ConvTowerCfg

CONTEXT_LENGTH = 64  # room for a three-turn conversation
WIDTH = 128
LABEL_PROMPT = "{label}"  # zero-shot prompts are the labels themselves, e.g. "a red circle"


MIXER_LAYERS = 1  # one self-attention block over the 64 CNN tokens: binds each object's colour to its shape


def demo_spec(vocab_size: int, extra: dict | None = None, mixer_layers: int = MIXER_LAYERS) -> ModelSpec:
    tower = ConvTowerCfg(image_size=world.CANVAS, channels=(32, 64, 128, WIDTH), width=WIDTH, embed_dim=64,
                         mixer_layers=mixer_layers)
    coca = {
        "embed_dim": tower.embed_dim,
        # open_clip builds this placeholder ViT; `build_coca` swaps in the CNN tower below.
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": WIDTH, "heads": 4,
                     "layers": 2, "embed_cls": True, "output_tokens": True, "pad_id": 0},
        "multimodal_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": WIDTH,
                           "heads": 4, "layers": 2},
    }
    return ModelSpec(
        name="mmserve-demo",
        coca=coca,
        preprocess={"image_size": world.CANVAS, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize": "squash"},
        prompt_format="qa-chat",
        vision_tower={"type": "conv", **tower.to_dict()},
        labels=world.LABELS,
        extra={"label_prompt": LABEL_PROMPT, **(extra or {})},
    )
