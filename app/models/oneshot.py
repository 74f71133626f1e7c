"""One-shot use of a loaded model, with no server: the CLI's `caption` and `ask`, folder captioning.
A throwaway engine per call (llm/generate.py), the family's own prompt and encoder: the same prompt
ids and image tokens the server would use, so the same greedy answer."""

from __future__ import annotations

from PIL import Image

from app.chat.conversation import Conversation, ImageRef, Message
from app.models.families.base import FamilyModel, PromptedMemory
from llm.engine import ImageInput, tensor_digest
from llm.generate import generate_greedy
from llm.params import SamplingParams
from llm.loading.chat_format import CAPTION_QUESTION


def question_about(question: str) -> Conversation:
    """One user message showing one image and asking `question` ("" asks for a caption)."""
    return Conversation((Message("user", (ImageRef(0), question) if question else (ImageRef(0),)),), ("<image>",))


class OneShot:
    """`caption(images)` and `answer(image, question)` over one family model (app/caption_dir.py's
    Captioner)."""

    def __init__(self, model: FamilyModel, max_new_tokens: int = 32) -> None:
        if model.encoder is None:
            raise ValueError(f"model {model.name!r} takes no images")
        self.model, self.max_new_tokens = model, max_new_tokens

    def _run(self, images: list[Image.Image], conversation: Conversation) -> list[str]:
        prompt = self.model.chat_prompt(conversation)
        inputs = [ImageInput(tensor_digest(f.tokens), f.tokens, f.attended_tokens)
                  for f in self.model.encoder.encode(images)]
        if isinstance(self.model, PromptedMemory):  # what it cross-attends to depends on the prompt too
            inputs = [self.model.memory((i,), conversation)[0] for i in inputs]
        params = SamplingParams(max_tokens=self.max_new_tokens, stop_token_ids=self.model.stop_ids)
        outputs = generate_greedy(self.model.decoder, inputs, [prompt] * len(images), params)
        return [self.model.tokenizer.decode(ids) for ids in outputs]

    def caption(self, images: list[Image.Image]) -> list[str]:
        question = CAPTION_QUESTION if self.model.capabilities.questions else ""
        return self._run(images, question_about(question)) if images else []

    def answer(self, image: Image.Image, question: str) -> str:
        return self._run([image], question_about(question))[0]
