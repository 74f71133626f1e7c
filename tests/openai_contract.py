"""OpenAI's API contract as mmserve keeps it: our own tables, copied by hand from OpenAI's published OpenAPI
schema (openapi.documented.yml, "OpenAI API" 2.3.0, the copy vendored by 64bit/async-openai at commit
2c8776b; openai/openai-openapi's own openapi.yaml is an older 2.3.0), and checked against the pinned
`openai` client, which is generated from that schema (tests/test_openai_contract.py).

Responses: for each object, every property the schema lists, whether it is `required`, whether it may be
null, and its type. A property the schema lists as optional and not nullable must be left out when there
is no value, never sent as null. mmserve's own additions (`request_id` on errors, `family` on models...)
are allowed beside them and are not listed.

Requests: for each parameter of each endpoint, what this server does with it: HONOURED (it does what
OpenAI documents), NEUTRAL (accepted only at the values that ask for nothing missing: absent, null, or
OpenAI's default; any other value is a 400 `unsupported_parameter` naming it), REFUSED (any value but
absent/null is that 400), or ACCEPTED (taken and not used; listed here so that it is a decision, not an
accident). Each row carries example values: `ok` must be answered, `refused` must get the 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# -- response objects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    name: str  # the schema's name for it
    fields: dict[str, "F"]


@dataclass(frozen=True)
class Items:
    of: Any  # a type, a tuple of types or an Obj


@dataclass(frozen=True)
class F:
    kind: Any  # a type, a tuple of types, an Obj or Items
    required: bool = True
    nullable: bool = False
    values: frozenset | None = None  # the schema's enum (or the one constant)
    deviation: str = ""  # where mmserve knowingly departs from the schema: why (and null is then allowed)


def opt(kind, **kw) -> F:
    return F(kind, required=False, **kw)


def const(value: str) -> F:
    return F(str, values=frozenset({value}))


FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})

ERROR = Obj("Error", {"message": F(str), "type": F(str), "param": F(str, nullable=True),
                      "code": F(str, nullable=True)})
ERROR_RESPONSE = Obj("ErrorResponse", {"error": F(ERROR)})

COMPLETION_USAGE = Obj("CompletionUsage", {
    "prompt_tokens": F(int), "completion_tokens": F(int), "total_tokens": F(int),
    "completion_tokens_details": opt(dict), "prompt_tokens_details": opt(dict)})

CHAT_MESSAGE = Obj("ChatCompletionResponseMessage", {
    "role": const("assistant"), "content": F(str, nullable=True), "refusal": F(str, nullable=True),
    "tool_calls": opt(list), "annotations": opt(list), "function_call": opt(dict),
    "audio": opt(dict, nullable=True)})

CHAT_CHOICE = Obj("CreateChatCompletionResponse.choices[]", {
    "finish_reason": F(str, values=FINISH_REASONS), "index": F(int), "message": F(CHAT_MESSAGE),
    "logprobs": F(dict, nullable=True)})

CHAT_COMPLETION = Obj("CreateChatCompletionResponse", {
    "id": F(str), "object": const("chat.completion"), "created": F(int), "model": F(str),
    "choices": F(Items(CHAT_CHOICE)), "usage": opt(COMPLETION_USAGE), "service_tier": opt(str),
    "system_fingerprint": opt(str)})

CHUNK_DELTA = Obj("ChatCompletionStreamResponseDelta", {
    "content": opt(str, nullable=True), "function_call": opt(dict), "tool_calls": opt(list),
    "role": opt(str, values=frozenset({"developer", "system", "user", "assistant", "tool"})),
    "refusal": opt(str, nullable=True)})

CHUNK_CHOICE = Obj("CreateChatCompletionStreamResponse.choices[]", {
    "delta": F(CHUNK_DELTA), "logprobs": opt(dict, nullable=True),
    "finish_reason": F(str, nullable=True, values=FINISH_REASONS), "index": F(int)})

CHAT_CHUNK = Obj("CreateChatCompletionStreamResponse", {
    "id": F(str), "object": const("chat.completion.chunk"), "created": F(int), "model": F(str),
    "choices": F(Items(CHUNK_CHOICE)), "service_tier": opt(str), "system_fingerprint": opt(str),
    # "only present when you set stream_options: {"include_usage": true}": checked on its own too
    "usage": opt(COMPLETION_USAGE, nullable=True)})

EMBEDDING = Obj("Embedding", {
    "index": F(int), "object": const("embedding"),
    "embedding": F((list, str), deviation="the schema types it an array of numbers; encoding_format base64 "
                   "answers a string, as OpenAI's API does and its client expects")})

EMBEDDING_LIST = Obj("CreateEmbeddingResponse", {
    "object": const("list"), "model": F(str), "data": F(Items(EMBEDDING)),
    "usage": F(Obj("CreateEmbeddingResponse.usage", {"prompt_tokens": F(int), "total_tokens": F(int)}))})

MODEL = Obj("Model", {"id": F(str), "object": const("model"), "created": F(int), "owned_by": F(str)})
MODEL_LIST = Obj("ListModelsResponse", {"object": const("list"), "data": F(Items(MODEL))})

FILE = Obj("OpenAIFile", {
    "id": F(str), "object": const("file"), "bytes": F(int), "created_at": F(int), "filename": F(str),
    "purpose": F(str, values=frozenset({"assistants", "assistants_output", "batch", "batch_output", "fine-tune",
                                         "fine-tune-results", "vision", "user_data"})),
    "status": F(str, values=frozenset({"uploaded", "processed", "error"})),
    "expires_at": opt(int), "status_details": opt(str)})

_NO_ID = "an empty page has no first or last id; null is sent rather than a made-up id"
FILE_LIST = Obj("ListFilesResponse", {
    "object": const("list"), "data": F(Items(FILE)), "first_id": F(str, deviation=_NO_ID),
    "last_id": F(str, deviation=_NO_ID), "has_more": F(bool)})

BATCH_ERROR = Obj("Batch.errors.data[]", {
    "code": opt(str), "message": opt(str), "param": opt(str, nullable=True), "line": opt(int, nullable=True)})

BATCH = Obj("Batch", {
    "id": F(str), "object": const("batch"), "endpoint": F(str), "model": opt(str),
    "errors": opt(Obj("Batch.errors", {"object": opt(str), "data": opt(Items(BATCH_ERROR))})),
    "input_file_id": F(str), "completion_window": F(str),
    "status": F(str, values=frozenset({"validating", "failed", "in_progress", "finalizing", "completed", "expired",
                                        "cancelling", "cancelled"})),
    "output_file_id": opt(str), "error_file_id": opt(str), "created_at": F(int),
    **{name: opt(int) for name in ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                                   "expired_at", "cancelling_at", "cancelled_at")},
    "request_counts": opt(Obj("Batch.request_counts", {"total": F(int), "completed": F(int), "failed": F(int)})),
    "usage": opt(dict), "metadata": opt(dict, nullable=True)})

BATCH_LIST = Obj("ListBatchesResponse", {
    "object": const("list"), "data": F(Items(BATCH)), "first_id": opt(str), "last_id": opt(str),
    "has_more": F(bool)})


def _is(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):  # a bool is an int to Python, never to JSON
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def problems(value, kind, where: str = "$") -> list[str]:
    """Every way `value` (decoded JSON) breaks `kind`; [] when it keeps it."""
    if isinstance(kind, Items):
        if not isinstance(value, list):
            return [f"{where}: expected an array, got {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in problems(item, kind.of, f"{where}[{i}]")]
    if not isinstance(kind, Obj):
        return [] if _is(value, kind) else [f"{where}: expected {kind}, got {value!r}"]
    if not isinstance(value, dict):
        return [f"{where}: expected a {kind.name} object, got {value!r}"]
    found = []
    for name, f in kind.fields.items():
        here = f"{where}.{name}"
        if name not in value:
            if f.required:
                found.append(f"{here}: required by {kind.name}, missing")
            continue
        item = value[name]
        if item is None:
            if not (f.nullable or f.deviation):
                found.append(f"{here}: null, which {kind.name} does not allow"
                             + ("" if f.required else " (an optional field with no value is left out)"))
            continue
        if f.values is not None and item not in f.values:
            found.append(f"{here}: {item!r} is not one of {sorted(f.values)}")
        found += problems(item, f.kind, here)
    return found


# -- request parameters ----------------------------------------------------------------------------
HONOURED, NEUTRAL, REFUSED, ACCEPTED = "honoured", "neutral only", "refused", "accepted, not used"


@dataclass(frozen=True)
class Param:
    name: str
    treatment: str
    ok: tuple = ()  # values that must be answered (with the others of the request)
    refused: tuple = ()  # values that must get 400 unsupported_parameter naming the parameter
    why: str = ""
    openai: bool = True  # False: mmserve's extension (vLLM's names where vLLM has one)


def _table(*params: Param) -> dict[str, Param]:
    return {p.name: p for p in params}


TOOL = {"type": "function", "function": {"name": "f"}}

# POST /v1/chat/completions. `messages` and `stream`/`stream_options` are exercised by their own tests.
CHAT_PARAMS = _table(
    Param("messages", HONOURED),
    Param("model", HONOURED, ("mmserve-demo",), why="absent: the default model (the schema requires it)"),
    Param("max_completion_tokens", HONOURED, (2,)),
    Param("max_tokens", HONOURED, (2,), why="deprecated by OpenAI; kept"),
    Param("temperature", HONOURED, (0.5, 0)),
    Param("top_p", HONOURED, (0.9, 1)),
    Param("seed", HONOURED, (7,)),
    Param("stop", HONOURED, ("zzz", ["zzz", "yyy"])),
    Param("stream", HONOURED, (False,)),
    Param("stream_options", HONOURED, why="include_usage honoured; include_obfuscation: false only"),
    Param("user", HONOURED, ("end-user-1",), why="abuse monitoring: the request's log line names it"),
    Param("safety_identifier", HONOURED, ("end-user-1",), why="as user"),
    Param("parallel_tool_calls", HONOURED, (True, False), why="an answer makes one call at most"),
    Param("n", NEUTRAL, (1,), (2,)),
    Param("frequency_penalty", NEUTRAL, (0,), (0.5, -1), why="repetition_penalty instead"),
    Param("presence_penalty", NEUTRAL, (0,), (0.5,), why="repetition_penalty instead"),
    Param("logprobs", NEUTRAL, (False,), (True,)),
    Param("top_logprobs", NEUTRAL, (0,), (2,)),
    Param("logit_bias", NEUTRAL, ({},), ({"50": -100},)),
    Param("modalities", NEUTRAL, (["text"],), (["text", "audio"], ["audio"])),
    Param("audio", REFUSED, (), ({"voice": "alloy", "format": "wav"},)),
    Param("store", NEUTRAL, (False,), (True,)),
    Param("metadata", NEUTRAL, ({},), ({"k": "v"},), why="only stored completions carry metadata"),
    Param("service_tier", NEUTRAL, ("auto", "default"), ("flex", "priority")),
    # Tools and JSON are honoured by the models that can (Llama-3.2-Vision: tests/test_structured_http.py); the
    # demo model here declares no tool calling, and its vocabulary of bare words cannot write JSON.
    Param("tools", NEUTRAL, ([],), ([TOOL],), why="the demo model calls no tools"),
    Param("tool_choice", NEUTRAL, ("none",), ("auto", "required", TOOL), why="nothing to choose without tools"),
    Param("functions", REFUSED, (), ([{"name": "f"}],), why="deprecated: mapped onto tools, which the demo lacks"),
    Param("function_call", NEUTRAL, ("none",), ("auto", {"name": "f"}), why="deprecated: tool_choice"),
    Param("response_format", NEUTRAL, ({"type": "text"},),
          ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}}),
          why="the demo's words cannot write JSON"),
    Param("prediction", REFUSED, (), ({"type": "content", "content": "x"},)),
    Param("reasoning_effort", NEUTRAL, ("none",), ("low", "high")),
    Param("verbosity", NEUTRAL, ("medium",), ("low", "high")),
    Param("web_search_options", REFUSED, (), ({},), why="even {} turns web search on"),
    Param("prompt_cache_key", REFUSED, (), ("k",), why="the prefix cache is automatic, with no key"),
    Param("prompt_cache_retention", NEUTRAL, ("in_memory", "in-memory"), ("24h",)),
    Param("prompt_cache_options", NEUTRAL, ({"mode": "implicit"},), ({"mode": "explicit"}, {"ttl": "30m"})),
    Param("moderation", REFUSED, (), ({"model": "omni-moderation-latest"},)),
    # mmserve's extensions
    Param("top_k", HONOURED, (5,), openai=False),
    Param("repetition_penalty", HONOURED, (1.1,), openai=False),
    Param("min_tokens", HONOURED, (1,), openai=False),
    Param("ignore_eos", HONOURED, (False,), openai=False),
    Param("visual_tokens", HONOURED, (0.5,), openai=False),
    Param("return_token_ids", HONOURED, (True,), openai=False),
    # one answer format at a time, and not with min_tokens: exercised on their own (tests/test_structured_http.py)
    Param("guided_choice", HONOURED, openai=False),
    Param("guided_regex", HONOURED, openai=False),
    Param("guided_grammar", HONOURED, openai=False),
)

# The parameters of CreateChatCompletionRequest (with CreateModelResponseProperties and
# ModelResponseProperties, which it extends), as the schema copy above lists them ...
SPEC_CHAT_PARAMS = frozenset({
    "messages", "model", "modalities", "verbosity", "reasoning_effort", "max_completion_tokens",
    "frequency_penalty", "presence_penalty", "web_search_options", "top_logprobs", "response_format", "audio",
    "store", "stream", "stop", "logit_bias", "logprobs", "max_tokens", "n", "prediction", "seed", "stream_options",
    "tools", "tool_choice", "parallel_tool_calls", "function_call", "functions", "metadata", "temperature", "top_p",
    "user", "safety_identifier", "prompt_cache_key", "service_tier", "prompt_cache_retention"})
# ... and those the pinned client (generated from a later schema) adds.
CLIENT_ONLY_CHAT_PARAMS = frozenset({"moderation", "prompt_cache_options"})

# stream_options (ChatCompletionStreamOptions)
STREAM_OPTIONS = _table(
    Param("include_usage", HONOURED, (True, False)),
    Param("include_obfuscation", NEUTRAL, (False,), (True,), why="chunks carry no obfuscation field"),
)

# A message of `messages` (the union of ChatCompletionRequest{System,Developer,User,Assistant,Tool,
# Function}Message's properties) and its content parts.
MESSAGE_FIELDS = _table(
    Param("role", HONOURED, ("system", "developer", "user", "assistant"), ("function",),
          why="tool messages: a model with tool calling (the demo has none); function messages are deprecated"),
    Param("content", HONOURED),
    Param("name", ACCEPTED, ("alice",), why="no template here shows the models a participant's name; refusing "
          "it would break the many clients that send one"),
    Param("refusal", NEUTRAL, (), ("I cannot",), why="only null, as this server answers it"),
    Param("tool_calls", REFUSED, (), ([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],),
          why="a model with tool calling (the demo has none)"),
    Param("tool_call_id", REFUSED, (), ("c",), why="on a tool message only"),
    Param("function_call", REFUSED, (), ({"name": "f", "arguments": "{}"},)),
    Param("audio", REFUSED, (), ({"id": "audio-1"},)),
)
CONTENT_PARTS = _table(
    Param("text", HONOURED),
    Param("image_url", HONOURED, why="image_url.detail: auto or high, what every image gets (visual_tokens sets fewer)"),
    Param("input_audio", REFUSED, (), ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},)),
    Param("file", REFUSED, (), ({"type": "file", "file": {"file_id": "file-1"}},)),
    Param("refusal", REFUSED, (), ({"type": "refusal", "refusal": "no"},)),
)
IMAGE_DETAIL = Param("detail", NEUTRAL, ("auto", "high"), ("low",))

# POST /v1/embeddings (CreateEmbeddingRequest: additionalProperties false)
OWN_WIDTH = "the model's own width"  # stands for the served model's embedding width in `ok`
EMBEDDING_PARAMS = _table(
    Param("input", HONOURED, ("a red circle", ["a red circle", "a blue square"]), ([1212, 318], [[1212, 318]]),
          why="text and images (data: URLs, image_url parts); token-id inputs are refused naming input[i]"),
    Param("model", HONOURED, ("mmserve-demo",), why="absent: the default model (the schema requires it)"),
    Param("encoding_format", HONOURED, ("float", "base64")),
    Param("dimensions", NEUTRAL, (OWN_WIDTH,), (8, 1), why="the model's own width only: no truncation"),
    Param("user", HONOURED, ("end-user-1",), why="abuse monitoring: the request's log line names it"),
)
SPEC_EMBEDDING_PARAMS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})

# POST /v1/batches (the createBatch request body)
BATCH_PARAMS = _table(
    Param("input_file_id", HONOURED),
    Param("endpoint", HONOURED, ("/v1/chat/completions",), why="the one endpoint batches run here"),
    Param("completion_window", HONOURED, ("24h",)),
    Param("metadata", HONOURED, ({"owner": "contract"},)),
    Param("output_expires_after", REFUSED, (), ({"anchor": "created_at", "seconds": 3600},),
          why="output and error files here never expire"),
)

# POST /v1/files (CreateFileRequest, multipart)
FILE_UPLOAD_PARAMS = _table(
    Param("file", HONOURED),
    Param("purpose", HONOURED, ("batch",), why="files here are batch inputs: other purposes get a 400"),
    Param("expires_after", REFUSED, why="files here never expire"),
)

# Query parameters of GET /v1/files and GET /v1/batches
FILE_LIST_PARAMS = _table(Param("purpose", HONOURED), Param("limit", HONOURED), Param("order", HONOURED),
                          Param("after", HONOURED))
BATCH_LIST_PARAMS = _table(Param("limit", HONOURED), Param("after", HONOURED))


@dataclass(frozen=True)
class Endpoint:
    """A table and the `openai` client's parameter TypedDict for the same request."""

    table: dict[str, Param]
    client_params: str  # module:class in the openai package
    extra: frozenset = field(default_factory=frozenset)  # parameters the client types apart (stream)


ENDPOINTS = {
    "chat": Endpoint(CHAT_PARAMS, "openai.types.chat.completion_create_params:CompletionCreateParamsBase",
                     frozenset({"stream"})),
    "embeddings": Endpoint(EMBEDDING_PARAMS, "openai.types.embedding_create_params:EmbeddingCreateParams"),
    "batches.create": Endpoint(BATCH_PARAMS, "openai.types.batch_create_params:BatchCreateParams"),
    "files.create": Endpoint(FILE_UPLOAD_PARAMS, "openai.types.file_create_params:FileCreateParams"),
    "files.list": Endpoint(FILE_LIST_PARAMS, "openai.types.file_list_params:FileListParams"),
    "batches.list": Endpoint(BATCH_LIST_PARAMS, "openai.types.batch_list_params:BatchListParams"),
}

RESPONSE_OBJECTS = (CHAT_COMPLETION, CHAT_CHUNK, EMBEDDING_LIST, MODEL_LIST, FILE, FILE_LIST, BATCH, BATCH_LIST,
                    ERROR_RESPONSE)


def markdown() -> str:
    """The conformance tables as the tests hold them: `python -m tests.openai_contract`."""
    lines = ["| endpoint | parameter | treatment | answered at | 400 at | why |", "|---|---|---|---|---|---|"]
    for endpoint, spec in ENDPOINTS.items():
        for p in spec.table.values():
            name = p.name if p.openai else f"{p.name} (extension)"
            lines.append(f"| {endpoint} | {name} | {p.treatment} | {', '.join(map(repr, p.ok))} "
                         f"| {', '.join(map(repr, p.refused))} | {p.why} |")
    lines += ["", "| response object | field | required | nullable | deviation |", "|---|---|---|---|---|"]
    for obj in RESPONSE_OBJECTS:
        for name, f in obj.fields.items():
            lines.append(f"| {obj.name} | {name} | {'yes' if f.required else 'no'} | "
                         f"{'yes' if f.nullable else 'no'} | {f.deviation} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
