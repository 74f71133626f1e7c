"""Whether a served model can take a conversation and give the answer's format: a 400 naming the limit."""

from __future__ import annotations

from app.chat.conversation import Conversation
from app.chat.structured import OutputPlan
from app.errors import APIError, bad_request
from app.models.served import ServedModel
from llm.loading.chat_format import CAPTION_QUESTION


def capability_problem(model: ServedModel, conversation: Conversation, max_images: int,
                       output: OutputPlan = OutputPlan()) -> APIError | None:
    """Why `model` cannot take the conversation or give the answer's format (a 400 naming the limit), or None."""
    caps, n = model.capabilities, len(conversation.images)
    tool_use = (output.tools.param if output.tools is not None else None) or conversation.tool_use
    if tool_use and not caps.tools:
        legacy = " (functions is deprecated: use tools)" if tool_use == "functions" else ""
        return bad_request(f"{tool_use}: model {model.name!r} does not call tools (its family declares no tool-call "
                           f"format){legacy}", param=tool_use, code="unsupported_parameter")
    if output.grammar is not None and not caps.structured_output:
        return bad_request(f"{output.param}: model {model.name!r} cannot constrain its output (its tokenizer declares "
                           f"no token surface forms)", param=output.param, code="unsupported_parameter")
    if n > max_images:
        return bad_request(f"the conversation has {n} images; this server accepts at most {max_images} "
                        f"(setting max_images_per_request)", param="messages", code="too_many_images")
    if n > caps.max_images:
        return bad_request(f"the conversation has {n} images; model {model.name!r} takes at most "
                        f"{caps.max_images} per conversation", param="messages", code="too_many_images")
    if n == 0 and not caps.text_only:
        return bad_request(f"no image in the conversation: model {model.name!r} needs one (add an image_url "
                        f"content part with a data: URL)", param="messages", code="missing_image")
    if caps.task_prompts and not caps.questions and not conversation.is_one_image_turn():
        return bad_request(f"model {model.name!r} only captions images: send one user message with one image and "
                           f"an optional text prefix or task prompt (no earlier turns)", param="messages",
                           code="unsupported_prompt")
    if not caps.questions and not caps.task_prompts and not conversation.is_caption_request(CAPTION_QUESTION):
        return bad_request(f"model {model.name!r} only captions images: send one user message with one image and "
                        f"no text (or {CAPTION_QUESTION!r})", param="messages", code="unsupported_prompt")
    return None
