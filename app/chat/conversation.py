"""An OpenAI `messages` list as one family-neutral `Conversation`: roles, text and image parts in
order, the images' sources. Each model family renders it to prompt ids its own way (app/models/families);
what no family can take is refused here, with a 400 naming the message and part."""

from __future__ import annotations

from dataclasses import dataclass

from app.chat.schemas import AudioPart, ChatMessage, FilePart, ImagePart, RefusalPart, TextPart
from app.errors import APIError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True)
class ImageRef:
    index: int  # into Conversation.images


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    parts: tuple[str | ImageRef, ...]  # text and images, in the order the client sent them

    @property
    def text(self) -> str:
        return " ".join(p for p in self.parts if isinstance(p, str)).strip()

    @property
    def images(self) -> int:
        return sum(isinstance(p, ImageRef) for p in self.parts)


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    images: tuple[str, ...]  # sources (data: URLs, base64, allow-listed URLs), in order of appearance

    @property
    def question(self) -> str:
        """The last user message's text: what the router reads."""
        return self.messages[-1].text

    def is_caption_request(self, caption_question: str) -> bool:
        """One user message (system messages aside) showing one image, with no text or the caption
        question: what a caption-only model can answer."""
        turns = [m for m in self.messages if m.role != "system"]
        return (len(turns) == 1 and len(self.images) == 1
                and turns[0].text.lower() in ("", caption_question.lower()))


def bad_message(message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param="messages", code=code)


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


# What a message may carry in OpenAI's API and the models here cannot take: any non-null value is a 400.
UNSUPPORTED_FIELDS = {
    "tool_calls": "this server offers no tool calling",
    "tool_call_id": "this server offers no tool calling",
    "function_call": "this server offers no tool calling",
    "audio": "this server offers no audio",
    "refusal": "the models here never refuse in words, so an earlier reply's refusal can only be null",
}
UNSUPPORTED_PARTS = {
    AudioPart: "'input_audio' parts: the models here read text and images",
    FilePart: "'file' parts: the models here read text and images",
    RefusalPart: "'refusal' parts: the models here never refuse in words",
}


def parse_messages(messages: list[ChatMessage]) -> Conversation:
    """Roles, parts and order checked; which model can take it is the caller's question."""
    if not messages:
        raise bad_message("messages must not be empty")
    out: list[Message] = []
    images: list[str] = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            raise APIError(400, f"messages[{i}].role {message.role!r} is not supported; use system, developer, "
                           f"user or assistant", param=f"messages[{i}].role", code="unsupported_parameter")
        for field, why in UNSUPPORTED_FIELDS.items():
            if getattr(message, field) is not None:
                raise unsupported(f"messages[{i}].{field}", why)
        content = message.content
        raw = [] if content is None else [TextPart(content)] if isinstance(content, str) else list(content)
        parts: list[str | ImageRef] = []
        for j, part in enumerate(raw):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, ImagePart):
                if role != "user":
                    raise bad_message(f"{where}: only user messages can hold images")
                if part.image_url.detail not in (None, "auto"):
                    raise unsupported(f"{where}.image_url.detail", "the image's detail level is not offered; "
                                      "the request's visual_tokens sets how many tokens an image gets")
                parts.append(ImageRef(len(images)))
                images.append(part.image_url.url)
            elif isinstance(part, TextPart):
                parts.append(part.text)
            else:
                raise unsupported(f"{where}.type", UNSUPPORTED_PARTS[type(part)])
        out.append(Message(role, tuple(parts)))
    if out[-1].role != "user":
        raise bad_message("the last message must be a user message")
    return Conversation(tuple(out), tuple(images))
