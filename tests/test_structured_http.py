"""Structured outputs and tool calling over HTTP through the official `openai` client (in-process, over
the test client's transport), on a random-weight Llama-3.2-Vision and the demo model: response_format
json_schema validated by jsonschema, tool calls named / required / none / auto answered as tool_calls
and streamed as deltas the client assembles, a tool's result fed back through the chat template, the
deprecated functions, and the 400s: a bad schema naming the keyword, a model without tools, a
vocabulary that cannot write JSON, an answer cut by max_tokens saying so."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from litestar.testing import TestClient
from openai import BadRequestError, OpenAI

from app.server import create_app
from app.settings import Settings
from bench.hf_checkpoints import PRESETS, write_mllama_checkpoint
from llm.loading.chat_template import HFChatTokenizer
from tests.test_grammar import RECEIPT, exact

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "no_args", "description": "Takes nothing"}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_mllama_checkpoint(tmp_path_factory.mktemp("llama"), **PRESETS["tiny"], seed=5, dtype=torch.float32)


@pytest.fixture(scope="module")
def client(ckpt):
    path = ckpt
    with TestClient(create_app(Settings(models=(f"llama={path}",)))) as c:
        yield OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", http_client=c, max_retries=0,
                     _strict_response_validation=True)


@pytest.fixture(scope="module")
def demo(demo_runtime, tmp_path_factory):
    with TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("demo")), demo_runtime)) as c:
        yield OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", http_client=c, max_retries=0)


def ask(client, **params):
    return client.chat.completions.create(model="llama", messages=params.pop("messages", USER),
                                          max_completion_tokens=params.pop("max_completion_tokens", 120), **params)


def test_json_schema_answers_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "receipt", "schema": RECEIPT, "strict": True}}
    for seed in range(3):
        r = ask(client, response_format=fmt, temperature=1.0, seed=seed, max_completion_tokens=160)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(exact(r.choices[0].message.content), exact(json.dumps(RECEIPT)))
    again = ask(client, response_format=fmt, temperature=1.0, seed=2, max_completion_tokens=160)
    assert again.choices[0].message.content == r.choices[0].message.content  # seeded: reproducible


def test_named_and_required_tool_choices_call_with_valid_arguments(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        r = ask(client, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=4)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.content is None
        [call] = message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in ("get_weather", "no_args")
        if choice is named:
            assert call.function.name == "get_weather"
        schema = WEATHER if call.function.name == "get_weather" else {"type": "object", "maxProperties": 0}
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_streamed_tool_call_assembles_to_the_same_call(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = ask(client, tools=TOOLS, tool_choice=named).choices[0]
    with client.chat.completions.stream(model="llama", messages=USER, tools=TOOLS, tool_choice=named,
                                        max_completion_tokens=120) as stream:
        deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion().choices[0]
    assert len(deltas) > 1  # the arguments came piece by piece
    assert final.finish_reason == "tool_calls"
    [call], [expected] = final.message.tool_calls, whole.message.tool_calls
    assert (call.function.name, call.function.arguments) == (expected.function.name, expected.function.arguments)


def test_tool_choice_none_and_auto(client):
    r = ask(client, tools=TOOLS, tool_choice="none", max_completion_tokens=8)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")
    for seed in range(4):
        r = ask(client, tools=TOOLS, temperature=1.0, seed=seed, max_completion_tokens=60)
        message = r.choices[0].message
        if message.tool_calls:  # the model chose a call: a whole, valid one
            assert r.choices[0].finish_reason == "tool_calls"
            json.loads(message.tool_calls[0].function.arguments)
        else:  # it chose words: never the start of a call
            assert not (message.content or "").startswith("{")


def test_a_tool_result_goes_back_through_the_chat_template(client, ckpt):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "c"}'}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    raw = client.chat.completions.with_raw_response.create(
        model="llama", messages=messages, tools=TOOLS, max_completion_tokens=4, extra_body={"return_token_ids": True})
    prompt = HFChatTokenizer(ckpt).decode(json.loads(raw.text)["prompt_token_ids"])
    # the template's own formats: the call as Llama's JSON, the result as an ipython turn, the tools listed
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}' in prompt
    # (Llama 3.1/3.2's template writes a tool's result with tojson, so a string result arrives quoted)
    assert "ipython\n\n" + json.dumps('{"temp": 21}') in prompt and '"name": "no_args"' in prompt


def test_the_deprecated_functions_are_answered_as_a_function_call(client):
    r = ask(client, functions=[TOOLS[0]["function"]], function_call={"name": "get_weather"})
    assert r.choices[0].finish_reason == "function_call"
    assert r.choices[0].message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(r.choices[0].message.function_call.arguments), WEATHER)


def test_bad_requests_name_the_problem(client):
    with pytest.raises(BadRequestError) as e:
        ask(client, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}})
    assert e.value.body["param"] == "response_format" and "uniqueItems" in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:
        ask(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice" and "nope" in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:
        ask(client, tools=TOOLS, response_format={"type": "json_object"}, tool_choice="required")
    assert "one output format" in e.value.body["message"]


def test_an_answer_cut_by_max_tokens_says_it_is_incomplete(client):
    raw = client.chat.completions.with_raw_response.create(
        model="llama", messages=USER, max_completion_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": RECEIPT}})
    choice = json.loads(raw.text)["choices"][0]
    assert choice["finish_reason"] == "length" and choice["incomplete_details"]["reason"] == "max_tokens"


def test_the_demo_model_refuses_tools_and_json_by_its_limits_and_takes_a_choice(demo):
    image = demo_image()
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "what color is the object ?"}]}]
    with pytest.raises(BadRequestError) as e:
        demo.chat.completions.create(model="mmserve-demo", messages=messages, tools=TOOLS)
    assert e.value.body["param"] == "tools" and "mmserve-demo" in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:
        demo.chat.completions.create(model="mmserve-demo", messages=messages, response_format={"type": "json_object"})
    assert e.value.body["code"] == "unsupported_parameter" and "vocabulary" in e.value.body["message"]
    r = demo.chat.completions.create(model="mmserve-demo", messages=messages,
                                     extra_body={"guided_choice": ["red", "blue", "green", "yellow"]})
    assert r.choices[0].message.content in ("red", "blue", "green", "yellow")


def demo_image() -> dict:
    from tests.conftest import data_url
    from tests.independent_world import Obj, Scene, render

    return {"type": "image_url", "image_url": {"url": data_url(render(Scene("gray", [Obj("circle", "red", "large",
                                                                                          64.0, 64.0, 40)])))}}
