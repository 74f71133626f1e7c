"""An OpenAI `messages` list as one family-neutral `Conversation`: roles, text and image parts in
order, the images' sources, earlier tool calls and their results, and the tools offered. Each model
family renders it to prompt ids its own way (app/models/families); what no family can take is refused
here, with a 400 naming the message and part; what only some can (tools) is a capability."""

from __future__ import annotations

import json
from dataclasses import dataclass

from app.chat.schemas import AudioPart, ChatMessage, FilePart, ImagePart, RefusalPart, TextPart
from app.chat.tools import ToolCall
from app.errors import APIError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True, slots=True)
class ImageRef:
    index: int  # into Conversation.images


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    parts: tuple[str | ImageRef, ...]  # text and images, in the order the client sent them
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

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
    tools: tuple[dict, ...] = ()  # the tools offered (OpenAI's tool objects), for the chat template

    @property
    def tool_use(self) -> str | None:
        """The first request field that needs a model with tool calling, or None."""
        if self.tools:
            return "tools"
        for i, m in enumerate(self.messages):
            if m.role == "tool":
                return f"messages[{i}].role"
            if m.tool_calls:
                return f"messages[{i}].tool_calls"
        return None

    @property
    def question(self) -> str:
        """The last user message's text: what the router reads."""
        return self.messages[-1].text

    def is_one_image_turn(self) -> bool:
        """One user message (system messages aside) showing one image, with any text: what a caption
        model that takes task prompts can answer."""
        turns = [m for m in self.messages if m.role != "system"]
        return len(turns) == 1 and turns[0].role == "user" and len(self.images) == 1 and turns[0].images == 1

    def is_caption_request(self, caption_question: str) -> bool:
        """One user message (system messages aside) showing one image, with no text or the caption
        question: what a caption-only model can answer."""
        turns = [m for m in self.messages if m.role != "system"]
        return (len(turns) == 1 and len(self.images) == 1
                and turns[0].text.lower() in ("", caption_question.lower()))


def unsupported(param: str, why: str) -> APIError:
    """A 400 naming a part of the request this server does not honour."""
    return APIError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


# What a message may carry in OpenAI's API and the models here cannot take: any non-null value is a 400.
UNSUPPORTED_FIELDS = {
    "function_call": "it is deprecated: send the assistant's tool_calls",
    "audio": "this server offers no audio",
    "refusal": "the models here never refuse in words, so an earlier reply's refusal can only be null",
}
UNSUPPORTED_PARTS = {
    AudioPart: "'input_audio' parts: the models here read text and images",
    FilePart: "'file' parts: the models here read text and images",
    RefusalPart: "'refusal' parts: the models here never refuse in words",
}


def _tool_calls(raw: list, where: str) -> tuple[ToolCall, ...]:
    calls = []
    for j, call in enumerate(raw):
        here = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise bad_request(f"{here} must be a function call: an id, type 'function' and a function with "
                              f"a name and arguments", here)
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise bad_request(f"{here}.function needs a name and its arguments as a JSON string", f"{here}.function")
        try:
            json.loads(arguments)
        except ValueError:
            raise bad_request(f"{here}.function.arguments is not JSON: {arguments[:80]!r}",
                              f"{here}.function.arguments") from None
        calls.append(ToolCall(str(call.get("id", "")), name, arguments))
    return tuple(calls)


def parse_messages(messages: list[ChatMessage]) -> Conversation:
    """Roles, parts and order checked; which model can take it is the caller's question."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    out: list[Message] = []
    images: list[str] = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            why = " (function messages are deprecated: send tool messages)" if message.role == "function" else ""
            raise unsupported(f"messages[{i}].role", f"role {message.role!r}{why}; use system, developer, user, "
                              f"assistant or tool")
        for field, why in UNSUPPORTED_FIELDS.items():
            if getattr(message, field) is not None:
                raise unsupported(f"messages[{i}].{field}", why)
        if message.tool_calls is not None and role != "assistant":
            raise unsupported(f"messages[{i}].tool_calls", "only an assistant message carries tool calls")
        if (message.tool_call_id is not None) != (role == "tool"):
            raise unsupported(f"messages[{i}].tool_call_id", "a tool message, and only a tool message, names the "
                              "call it answers in tool_call_id")
        calls = _tool_calls(message.tool_calls or [], f"messages[{i}].tool_calls")
        content = message.content
        raw = [] if content is None else [TextPart(content)] if isinstance(content, str) else list(content)
        parts: list[str | ImageRef] = []
        for j, part in enumerate(raw):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, ImagePart):
                if role != "user":
                    raise bad_request(f"{where}: only user messages can hold images", "messages")
                if part.image_url.detail == "low":  # "high" is what every image gets: all of its tokens
                    raise unsupported(f"{where}.image_url.detail", "'low' is not offered; the request's "
                                      "visual_tokens (a count or a ratio) sets how many tokens an image gets")
                parts.append(ImageRef(len(images)))
                images.append(part.image_url.url)
            elif isinstance(part, TextPart):
                parts.append(part.text)
            else:
                raise unsupported(f"{where}.type", UNSUPPORTED_PARTS[type(part)])
        out.append(Message(role, tuple(parts), calls, message.tool_call_id))
    if out[-1].role not in ("user", "tool"):
        raise bad_request("the last message must be a user message (or a tool's result)", "messages")
    return Conversation(tuple(out), tuple(images))
