"""The answer's shape in OpenAI's terms, from the engine's text: words as `content`, a tool call as
`message.tool_calls` with finish_reason "tool_calls" (or the deprecated `function_call`, for a request
that sent `functions`), and for a constrained answer cut by max_tokens, `incomplete_details` saying it
does not parse. Streamed, the same answer as deltas: content as it comes, or a tool call's id and name
once its prefix is written and then its arguments piece by piece, as OpenAI streams them.
"""

from __future__ import annotations

import msgspec

from app.chat.schemas import (AssistantMessage, Delta, FunctionCall, FunctionDelta, IncompleteDetails,
                              MessageToolCall, ToolCallDelta)
from app.chat.structured import OutputPlan
from app.chat.tools import JsonToolCalls, ToolCall, ToolCallStream
from llm.engine import RequestOutput


def incomplete(output: OutputPlan | None, final: RequestOutput):
    if output is None or not output.constrained or final.finish_reason != "length":
        return msgspec.UNSET
    return IncompleteDetails("max_tokens", f"the answer stopped at max_tokens before the grammar {output.param} "
                                           f"asked for was complete: it does not parse; raise max_completion_tokens")


def _called(output: OutputPlan, call: ToolCall) -> tuple[AssistantMessage, str]:
    function = FunctionCall(call.name, call.arguments)
    if output.tools.legacy:
        return AssistantMessage(None, function_call=function), "function_call"
    return AssistantMessage(None, tool_calls=[MessageToolCall(call.id, function)]), "tool_calls"


def final_message(output: OutputPlan | None, tool_format: JsonToolCalls | None,
                  final: RequestOutput) -> tuple[AssistantMessage, str]:
    """-> (the message, the finish reason)."""
    if output is not None and output.tools is not None and tool_format is not None and final.finish_reason == "stop":
        call = tool_format.parse(output.tools, final.text)
        if call is not None:
            return _called(output, call)
    return AssistantMessage(final.text), final.finish_reason


class StreamedAnswer:
    """Engine outputs -> chunk deltas and, at the end, the finish reason."""

    def __init__(self, output: OutputPlan | None, tool_format: JsonToolCalls | None) -> None:
        tools = output.tools if output is not None else None
        self.legacy = tools is not None and tools.legacy
        self.calls = ToolCallStream(tools, tool_format) if tools is not None and tool_format is not None else None
        self.called = False

    def deltas(self, out: RequestOutput) -> list[Delta]:
        if self.calls is None:
            return [Delta(content=out.delta_text)] if out.delta_text else []
        deltas = []
        for kind, value in self.calls.feed(out.delta_text, out.finished):
            if kind == "content":
                deltas.append(Delta(content=value))
            elif kind == "call":
                self.called = True
                deltas.append(self._call_delta(FunctionDelta(name=value.name, arguments=""), value.id))
            else:
                deltas.append(self._call_delta(FunctionDelta(arguments=value), None))
        return deltas

    def _call_delta(self, function: FunctionDelta, call_id: str | None) -> Delta:
        if self.legacy:
            return Delta(function_call=function)
        return Delta(tool_calls=[ToolCallDelta(0, call_id, "function" if call_id else None, function)])

    def finish_reason(self, final: RequestOutput) -> str:
        if self.called and final.finish_reason == "stop":
            return "function_call" if self.legacy else "tool_calls"
        return final.finish_reason
