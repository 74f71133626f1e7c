"""Tool calling: a request's `tools` + `tool_choice` (or the deprecated `functions` + `function_call`,
mapped onto them) as a `ToolPlan`, and a family's tool-call format: the grammar a call must follow, how
a finished output is read back as a call, and how a streamed one is cut into OpenAI's tool-call deltas.

    plan = tool_plan(req)                       # None: no tools; a 400 names what is malformed
    grammar = format.grammar(plan)              # None for tool_choice "none"
    call = format.parse(plan, text)             # a ToolCall, or None (the model answered in words)

tool_choice: "none" shows the tools and never calls one; "auto" lets the model answer in words or call
(a call is constrained once its first character is written); "required" must call one of the tools; a
named function must call that one. The call's arguments always match the function's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from app.chat.schemas import ChatCompletionRequest
from app.errors import bad_request
from llm.grammar.spec import GrammarSpec, closed_schema, json_rule

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function name
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    description: str
    parameters: dict  # a JSON schema of the arguments object

    def as_tool(self) -> dict:
        """OpenAI's tool object, as chat templates (transformers' `tools=`) take it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    functions: tuple[Function, ...]
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the function a named choice calls
    legacy: bool = False  # asked through `functions`: answered as message.function_call
    param: str = "tools"  # the request field a grammar error names

    @property
    def callable(self) -> tuple[Function, ...]:
        return tuple(f for f in self.functions if self.named in (None, f.name))


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _function(raw, where: str) -> Function:
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object with a name", param=where)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad_request(f"{where}.name must be 1-64 letters, digits, '_' or '-'; got {name!r}", param=f"{where}.name")
    parameters = raw.get("parameters", NO_PARAMETERS)
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}.parameters must be a JSON schema object", param=f"{where}.parameters")
    return Function(name, str(raw.get("description") or ""), parameters)


def _choice(value, names: set[str], param: str, legacy: bool) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if value in ("none", "auto") or (value == "required" and not legacy):
        return value, None
    named = (value.get("name") if legacy else (value.get("function") or {}).get("name")) if isinstance(value, dict) else None
    if named is None:
        shape = '{"name": NAME}' if legacy else '{"type": "function", "function": {"name": NAME}}'
        options = "none, auto" + ("" if legacy else ", required")
        raise bad_request(f"{param} must be {options} or {shape}; got {value!r}", param=param)
    if named not in names:
        raise bad_request(f"{param} names function {named!r}, which is not among the {'functions' if legacy else 'tools'}: "
                          f"{', '.join(sorted(names))}", param=param)
    return "named", named


def tool_plan(req: ChatCompletionRequest) -> ToolPlan | None:
    if req.functions and req.tools:
        raise bad_request("send tools or the deprecated functions, not both", param="functions")
    if req.functions:
        functions = tuple(_function(f, f"functions[{i}]") for i, f in enumerate(req.functions))
        names = {f.name for f in functions}
        choice, named = _choice(req.function_call, names, "function_call", legacy=True)
        return ToolPlan(functions, choice, named, legacy=True, param="functions")
    if req.function_call not in (None, "none"):
        raise bad_request("function_call (deprecated: use tool_choice) asks for nothing without functions "
                          "(deprecated: use tools)", param="function_call", code="unsupported_parameter")
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise bad_request("tool_choice asks for nothing without tools: send the tools it chooses among",
                              param="tool_choice", code="unsupported_parameter")
        return None
    functions = []
    for i, tool in enumerate(req.tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"tools[{i}].type must be 'function' (the only kind of tool offered)",
                              param=f"tools[{i}].type")
        functions.append(_function(tool.get("function"), f"tools[{i}].function"))
    names = [f.name for f in functions]
    if len(set(names)) < len(names):
        raise bad_request("two tools have the same name", param="tools")
    choice, named = _choice(req.tool_choice, set(names), "tool_choice", legacy=False)
    return ToolPlan(tuple(functions), choice, named)


class JsonToolCalls:
    """Llama 3.1/3.2's tool call: one JSON object `{"name": NAME, "parameters": ARGUMENTS}` as the whole
    answer (the format its chat template teaches and writes back for earlier calls). One call per turn:
    the template takes no more."""

    def prefix(self, name: str) -> str:
        return '{"name": ' + json.dumps(name) + ', "parameters": '

    def grammar(self, plan: ToolPlan) -> GrammarSpec | None:
        if plan.choice == "none":
            return None
        rules, calls = [], []
        for k, f in enumerate(plan.callable):
            rules.append(f"call{k}: {json.dumps(self.prefix(f.name))} args{k} \"}}\"\n"
                         f"args{k}: {json_rule(closed_schema(f.parameters))}")
            calls.append(f"call{k}")
        # auto: words (anything not starting a JSON object), or nothing, or a call
        start = "start: call | TEXT?\nTEXT: /[^{](.|\\n)*/" if plan.choice == "auto" else "start: call"
        return GrammarSpec.lark("\n".join([start, "call: " + " | ".join(calls), *rules]))

    def call_prefix(self, plan: ToolPlan, text: str) -> tuple[str, int] | None:
        """(name, where the arguments start) once `text` has a whole call prefix; None before."""
        for f in plan.callable:
            p = self.prefix(f.name)
            if text.startswith(p):
                return f.name, len(p)
        return None

    def parse(self, plan: ToolPlan, text: str) -> ToolCall | None:
        """A finished answer as a call; None when it is words (or not a whole call)."""
        found = self.call_prefix(plan, text) if plan.choice != "none" else None
        if found is None or not text.endswith("}"):
            return None
        name, start = found
        arguments = text[start:-1]
        try:
            json.loads(arguments)
        except ValueError:
            return None
        return ToolCall(new_call_id(), name, arguments)


class ToolCallStream:
    """A streamed answer cut into content deltas or one tool call's deltas: the call's id, type and name
    first (once the prefix naming it is written), then its arguments as they come, holding back the
    last character (the call's closing brace is not part of the arguments)."""

    def __init__(self, plan: ToolPlan, format: JsonToolCalls) -> None:
        self.plan, self.format = plan, format
        self.text, self.sent = "", 0
        self.mode: str | None = None if plan.choice != "none" else "content"  # "content" | "call"
        self.call: ToolCall | None = None
        self._args_start = 0

    def feed(self, delta: str, final: bool) -> list[tuple[str, object]]:
        """-> events: ("content", text), ("call", ToolCall with arguments ""), ("arguments", text)."""
        self.text += delta
        events: list[tuple[str, object]] = []
        if self.mode is None and self.text:
            self.mode = "call" if self.text.startswith("{") else "content"
        if self.mode == "content":
            if self.sent < len(self.text):
                events.append(("content", self.text[self.sent:]))
                self.sent = len(self.text)
            return events
        if self.mode == "call" and self.call is None:
            found = self.format.call_prefix(self.plan, self.text)
            if found is None:
                if final:  # never became a whole call (cut by max_tokens): what was written, as words
                    self.mode = "content"
                    return self.feed("", final)
                return events
            self.call = ToolCall(new_call_id(), found[0], "")
            self._args_start = self.sent = found[1]
            events.append(("call", self.call))
        if self.call is not None:
            # the last character may be the call's closing brace: known only at the end
            end = len(self.text) - 1 if not final or self.text.endswith("}") else len(self.text)
            if end > self.sent:
                events.append(("arguments", self.text[self.sent:end]))
                self.sent = end
        return events
