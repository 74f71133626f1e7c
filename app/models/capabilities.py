"""What a served model can do, declared by its family (never probed): the chat service, embeddings,
classification and the router read these before sending a model anything."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Capabilities:
    questions: bool  # answers free-form prompts (False: a caption-only model)
    captions: bool  # describes an image it is shown with no question
    max_images: int  # images per conversation; 0: a text-only model
    text_only: bool  # conversations with no image at all
    embeddings: bool  # /v1/embeddings: contrastive image and text latents in one space
    zero_shot: bool  # /v1/classify and the router's stage 1: labels scored against an image
    structured_output: bool = False  # response_format / guided_*: its tokens' surface forms are declared
    tools: bool = False  # tools and tool messages: its chat template has a tool format, and a call format
    # A caption-only model that takes a text prefix or task prompt with its one image (BLIP's conditional
    # captioning, Donut's and Florence-2's task prompts): the text is the decoder's prefix, not a question
    task_prompts: bool = False

    def summary(self) -> list[str]:
        """What /v1/models lists for the model."""
        names = [n for n in ("questions", "captions", "text_only", "embeddings", "zero_shot", "structured_output",
                             "tools", "task_prompts") if getattr(self, n)]
        return names + ([f"images:{self.max_images}"] if self.max_images else [])
