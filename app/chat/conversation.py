"""An OpenAI `messages` list as one family-neutral `Conversation`: roles, text and image parts in
order, the images' sources. Each model family renders it to prompt ids its own way (app/models/families);
what no family can take is refused here, with a 400 naming the message and part."""

from __future__ import annotations

from dataclasses import dataclass

from app.chat.schemas import ChatMessage, ImagePart, TextPart
from app.errors import bad_request

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


def parse_messages(messages: list[ChatMessage]) -> Conversation:
    """Roles, parts and order checked; which model can take it is the caller's question."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    out: list[Message] = []
    images: list[str] = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            raise bad_request(f"messages[{i}].role {message.role!r} is not supported; use system, developer, "
                           f"user or assistant", param="messages", code="unsupported_parameter")
        for field in ("tool_calls", "tool_call_id", "function_call", "audio"):
            if getattr(message, field) is not None:
                raise bad_request(f"messages[{i}].{field} is not supported: this server offers no tool calling "
                               f"or audio", param=f"messages[{i}].{field}", code="unsupported_parameter")
        content = message.content
        raw = [] if content is None else [TextPart(content)] if isinstance(content, str) else list(content)
        parts: list[str | ImageRef] = []
        for j, part in enumerate(raw):
            if isinstance(part, ImagePart):
                if role != "user":
                    raise bad_request(f"messages[{i}].content[{j}]: only user messages can hold images", "messages")
                parts.append(ImageRef(len(images)))
                images.append(part.image_url.url)
            else:
                parts.append(part.text)
        out.append(Message(role, tuple(parts)))
    if out[-1].role != "user":
        raise bad_request("the last message must be a user message", "messages")
    return Conversation(tuple(out), tuple(images))
