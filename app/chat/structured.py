"""What shape a chat answer must take: `response_format` (text, json_object, json_schema) as OpenAI
documents it, mmserve's `guided_choice` / `guided_regex` / `guided_grammar` extensions (vLLM's names),
or tool calls (app/chat/tools.py). One source at a time; the output plan names the request field that
asked, so that every 400 about the grammar names it too.

A JSON schema's objects that list `properties` and say nothing of `additionalProperties` are closed
for generation (llm/grammar/spec.py's `closed_schema`): the output still validates against the schema
as sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.chat.schemas import ChatCompletionRequest
from app.chat.tools import ToolPlan
from app.errors import bad_request
from llm.grammar.spec import GrammarSpec, closed_schema

SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class OutputPlan:
    grammar: GrammarSpec | None = None  # for every source but tools (whose grammar is the family's format)
    param: str | None = None  # the request field that asked for a constrained output
    tools: ToolPlan | None = None

    @property
    def constrained(self) -> bool:
        return self.grammar is not None or (self.tools is not None and self.tools.choice != "none")


def _response_format(value: dict) -> GrammarSpec | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object()
    if kind != "json_schema":
        raise bad_request(f"response_format.type must be text, json_object or json_schema; got {kind!r}",
                          param="response_format.type")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format.json_schema must be an object with a name and a schema",
                          param="response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        raise bad_request(f"response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'; got {name!r}",
                          param="response_format.json_schema.name")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                          param="response_format.json_schema.schema")
    if spec.get("strict") not in (None, True, False):
        raise bad_request("response_format.json_schema.strict must be true or false",
                          param="response_format.json_schema.strict")
    return GrammarSpec.json_schema(closed_schema(schema))


def output_plan(req: ChatCompletionRequest, tools: ToolPlan | None) -> OutputPlan:
    sources: list[tuple[str, GrammarSpec | None]] = []
    if req.response_format is not None:
        sources.append(("response_format", _response_format(req.response_format)))
    if req.guided_choice is not None:
        if not req.guided_choice or not all(isinstance(c, str) and c for c in req.guided_choice):
            raise bad_request("guided_choice must be a list of non-empty strings", param="guided_choice")
        sources.append(("guided_choice", GrammarSpec.choice(req.guided_choice)))
    if req.guided_regex is not None:
        sources.append(("guided_regex", GrammarSpec.regex(req.guided_regex)))
    if req.guided_grammar is not None:
        sources.append(("guided_grammar", GrammarSpec.lark(req.guided_grammar)))
    asked = [(param, spec) for param, spec in sources if spec is not None]
    if tools is not None and tools.choice != "none":
        asked.append((tools.param, None))
    if len(asked) > 1:
        raise bad_request(f"{asked[1][0]} cannot be combined with {asked[0][0]}: one output format at a time",
                          param=asked[1][0])
    if not asked:
        return OutputPlan(tools=tools)
    param, grammar = asked[0]
    return OutputPlan(grammar, param, tools)
