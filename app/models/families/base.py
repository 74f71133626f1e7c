"""What a model family gives the serving side: one loaded checkpoint behind `FamilyModel`.

A family turns a checkpoint directory into a decoder (llm/models), an image encoder (vision/encoders)
when it sees images, a tokenizer and a way from a `Conversation` to prompt ids, and declares its
`Capabilities`. The served model (app/models/served.py) builds the engine and the vision stage around
it. Families are found by `app/models/families/__init__.py` from the files in a directory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from app.chat.conversation import Conversation
from app.chat.tools import JsonToolCalls
from app.models.capabilities import Capabilities
from app.models.contrastive import ContrastiveTowers
from llm.engine import ImageInput
from llm.grammar.spec import Vocabulary
from llm.loading.tokenizers import TextTokenizer
from vision.encoders.base import ImageEncoder


class PromptError(ValueError):
    """A conversation this model cannot take (the message says why, for a 400)."""


@runtime_checkable
class FamilyModel(Protocol):
    family: str  # "coca", "mllama", ...
    name: str  # the checkpoint's own name (what it is served as when the entry names none)
    weights_digest: str  # sha256 of the weights: the version label's default, part of feature-cache keys
    capabilities: Capabilities
    labels: tuple[str, ...]  # its own zero-shot label set; () when none
    encoder: ImageEncoder | None
    decoder: torch.nn.Module  # llm.models.interfaces.DecoderModel
    tokenizer: TextTokenizer
    stop_ids: tuple[int, ...]  # end-of-turn ids
    vocabulary: Vocabulary | None  # each token's surface form, for grammars; None: no structured output
    tool_format: JsonToolCalls | None  # how it writes a tool call; None: no tool calling
    contrastive: ContrastiveTowers | None
    dtype: torch.dtype  # of the decoder and the vision tower, weights and activations (the text tower stays fp32)

    @property
    def context_length(self) -> int: ...

    def with_dtype(self, dtype: torch.dtype) -> "FamilyModel":
        """This model computing in `dtype`: itself when it already does, else a converted copy (this
        one is left as it is: a caller may hold it)."""

    def chat_prompt(self, conversation: Conversation) -> list[int]:
        """The prompt ids of a conversation whose last message is the user's; raises PromptError."""


@runtime_checkable
class PromptedMemory(Protocol):
    """A family whose decoder cross-attends to something the prompt shapes too (Florence-2: a BART
    encoder over the image tokens and the task prompt). It turns the images' visual tokens into what
    the engine takes, named by a digest of everything that went in, so the engine pools the result
    (and its cross-attention K/V) per (image, prompt) as it pools an image's."""

    def memory(self, images: tuple[ImageInput, ...], conversation: Conversation) -> tuple[ImageInput, ...]: ...
