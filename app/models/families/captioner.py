"""What the image-to-text (caption-only) families share: one user message showing one image, with
an optional text prompt that becomes the decoder's prefix (BLIP's conditional captioning, Donut's and
Florence-2's task prompts), and greedy captions of a folder through the family's own encoder and
decoder (app/models/oneshot.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from app.chat.conversation import Conversation
from app.models.capabilities import Capabilities
from app.models.families.base import PromptError
from llm.loading.chat_format import CAPTION_QUESTION
from llm.loading.errors import ModelDirError
from llm.loading.hf import read_json
from llm.packed_linear import dense_copy
from vision.encoders.base import CastableEncoder

# Caption-only, one image, an optional text prefix; no text-only turns, no embeddings, no grammars
CAPTIONER = Capabilities(questions=False, captions=True, max_images=1, text_only=False, embeddings=False,
                         zero_shot=False, structured_output=False, tools=False, task_prompts=True)


def caption_prompt_text(conversation: Conversation) -> str:
    """The one user message's text ("" asks for a plain caption, as does the generic caption question
    the router and `mmserve caption` send); system messages are skipped."""
    turns = [m for m in conversation.messages if m.role != "system"]
    if len(turns) != 1 or turns[0].role != "user":
        raise PromptError("this model captions one image: send one user message with the image and an optional "
                          "text prefix or task prompt (no earlier turns)")
    if turns[0].images != 1:
        raise PromptError(f"this model captions exactly one image per request, got {turns[0].images}")
    text = turns[0].text
    return "" if text.lower() == CAPTION_QUESTION.lower() else text  # the generic caption request: no prefix


def generation_value(path: Path, config: dict, key: str, *sections: str) -> int | list[int] | None:
    """generation_config.json's `key`, else config.json's, else the first config section's that has it."""
    gen = path / "generation_config.json"
    value = read_json(gen).get(key) if gen.is_file() else None
    if value is None:
        value = config.get(key)
    for section in sections:
        if value is None:
            value = config.get(section, {}).get(key)
    return value


def required_id(path: Path, config: dict, key: str, *sections: str) -> int:
    value = generation_value(path, config, key, *sections)
    if value is None:
        raise ModelDirError(f"no {key} in {path / 'generation_config.json'} or {path / 'config.json'}")
    return int(value[0] if isinstance(value, list) else value)


def stop_ids(path: Path, config: dict, key: str, *sections: str) -> tuple[int, ...]:
    value = generation_value(path, config, key, *sections)
    if value is None:
        raise ModelDirError(f"no {key} in {path / 'generation_config.json'} or {path / 'config.json'}")
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def with_dtype(model, dtype: torch.dtype):
    """A caption family's model computing in `dtype` (FamilyModel.with_dtype): a copy with its decoder
    converted and its vision tower cast where it can be (CastableEncoder; the runner casts features from
    a tower that stays in fp32); `model` itself when it already computes in `dtype`."""
    if dtype == model.dtype:
        return model
    other = copy.copy(model)
    other.dtype, other.decoder = dtype, dense_copy(model.decoder).to(dtype)
    if isinstance(model.encoder, CastableEncoder):
        other.encoder = model.encoder.cast(dtype)
    return other
