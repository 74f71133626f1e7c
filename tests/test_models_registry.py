"""Several models at once: entries (--model NAME=DIR, models.toml), family detection and its errors, the
registry's names and aliases, /v1/models, and routing between models by the staged router's rules —
capability-aware (a caption-only model gets only caption requests) — through the real app, with the
bundled demo model and a caption-only open_clip CoCa served side by side."""

from __future__ import annotations

import json

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.models.entry import ModelEntry, ModelEntryError, load_models_file, memory_shares, parse_model_flag
from app.models.families import detect_family, load_family_model
from app.models.families.coca import CoCaModel
from app.server import create_app
from app.settings import BUNDLED_MODEL, Settings
from llm.loading.errors import ModelDirError
from tests.checkpoints import write_open_clip_coca
from tests.conftest import data_url
from tests.independent_world import Obj, Scene, render

URL = data_url(render(Scene("white", [Obj("circle", "red", "large", 64.0, 64.0, 50)])))


def user(text=None, url=URL, images=1):
    parts = [{"type": "image_url", "image_url": {"url": url}}] * images
    return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}


# -- entries ------------------------------------------------------------------------------------------------
def test_model_flags_and_the_models_file(tmp_path):
    assert parse_model_flag("demo=models/demo") == ModelEntry("demo", "models/demo")
    assert parse_model_flag("/some/dir").name == ""  # the checkpoint names itself
    with pytest.raises(ModelEntryError, match="NAME=DIR"):
        parse_model_flag("=dir")
    (tmp_path / "m").mkdir()
    (tmp_path / "models.toml").write_text(
        '[[model]]\nname = "small"\npath = "m"\nfamily = "coca"\ndtype = "bfloat16"\nvisual_tokens = "0.5"\n'
        'version = "v2"\naliases = ["fast", "cheap"]\nmemory_share = 0.25\n\n[[model]]\nname = "big"\npath = "/abs"\n')
    small, big = load_models_file(tmp_path / "models.toml")
    assert small == ModelEntry("small", tmp_path / "m", "coca", "bfloat16", "0.5", "v2", ("fast", "cheap"), 0.25)
    assert big.path.as_posix() == "/abs" and memory_shares([small, big]) == [0.25, 0.75]
    (tmp_path / "bad.toml").write_text('[[model]]\nname = "x"\npath = "m"\ncolour = "red"\n')
    with pytest.raises(ModelEntryError, match=r"unknown keys \['colour'\]"):
        load_models_file(tmp_path / "bad.toml")
    with pytest.raises(ModelEntryError, match="add up to 1.5"):
        memory_shares([ModelEntry("a", "x", memory_share=0.75), ModelEntry("b", "y", memory_share=0.75)])
    with pytest.raises(ModelEntryError, match="not a valid model name"):
        ModelEntry("bad name!", "x")
    with pytest.raises(ModelEntryError, match="dtype must be one of"):
        ModelEntry("x", "x", dtype="int3")


def test_families_are_detected_and_a_bad_directory_is_one_line_naming_the_path(tmp_path):
    assert detect_family(BUNDLED_MODEL) == "coca"
    with pytest.raises(ModelDirError, match=f"model directory not found: {tmp_path / 'nope'}"):
        detect_family(tmp_path / "nope")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelDirError, match="architecture BertModel is not supported; supported: coca .* mllama"):
        detect_family(tmp_path / "bert")
    with pytest.raises(ModelDirError, match="family 'pix2struct' is not supported"):
        load_family_model(BUNDLED_MODEL, "pix2struct")
    half = tmp_path / "half"  # an Mllama directory missing its processor config
    half.mkdir()
    (half / "config.json").write_text(json.dumps({"architectures": ["MllamaForConditionalGeneration"],
                                                  "text_config": {}, "vision_config": {}}))
    with pytest.raises(ModelDirError) as error:
        load_family_model(half)
    assert str(half / "preprocessor_config.json") in str(error.value) and "\n" not in str(error.value)


# -- two models in one app ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("captioner")
    write_open_clip_coca(path, tmp_path_factory.mktemp("configs"))
    return path


@pytest.fixture(scope="module")
def client(demo_runtime, captioner_dir):
    settings = Settings(router_small_model="mmserve-demo", router_large_model="captioner",
                        router_large_intents="description")
    models = [(ModelEntry("", BUNDLED_MODEL, aliases=("small",)), demo_runtime),
              (ModelEntry("captioner", captioner_dir, version="v7"), CoCaModel.from_dir(captioner_dir))]
    with TestClient(create_app(settings, models)) as c:
        yield c


def ask(client, model, messages, **extra):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 8, **extra})


def test_models_lists_both_and_the_routed_alias(client):
    body = client.get("/v1/models").json()
    ids = [m["id"] for m in body["data"]]
    assert ids == ["mmserve-demo", "captioner", "auto"]
    demo, captioner, auto = body["data"]
    assert demo["aliases"] == ["small"] and demo["family"] == "coca" and "questions" in demo["capabilities"]
    assert captioner["version"] == "v7" and "questions" not in captioner["capabilities"]
    assert len(demo["version"]) == 12  # the weights' digest when the entry names none
    assert auto["routed_to"] == ["mmserve-demo", "captioner"]
    one = client.get("/v1/models/captioner").json()
    assert one == captioner and one["object"] == "model" and one["owned_by"] == "mmserve"
    assert client.get("/v1/models/small").json()["id"] == "mmserve-demo"
    r = client.get("/v1/models/gpt-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_request_naming_a_model_gets_that_model(client):
    r = ask(client, "captioner", [user()])
    assert r.status_code == 200 and r.json()["model"] == "captioner"
    assert r.headers["x-mmserve-model"] == "captioner" and r.headers["x-mmserve-route"] == "decoder:captioner"
    r = ask(client, "small", [user("how many objects are there?")])
    assert r.json()["model"] == "mmserve-demo" and r.json()["choices"][0]["message"]["content"] == "one"


def test_the_routed_alias_follows_the_rules_and_the_capabilities(client):
    described = ask(client, "auto", [user("describe the image.")])  # intent description: the large model
    assert described.headers["x-mmserve-model"] == "captioner", described.text
    counted = ask(client, "auto", [user("how many objects are there?")])  # the small one by default
    assert counted.headers["x-mmserve-route"] == "decoder:mmserve-demo"
    assert counted.json()["choices"][0]["message"]["content"] == "one"
    named = ask(client, "auto", [user("what shape is the red object?")])  # stage 1, from the demo's towers
    assert named.headers["x-mmserve-route"] == "stage1" and named.json()["model"] == "mmserve-demo"
    assert named.json()["choices"][0]["message"]["content"] == "circle"


def test_a_model_refuses_what_it_cannot_do_naming_it(client):
    r = ask(client, "captioner", [user("how many objects are there?")])
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_prompt"
    assert "'captioner' only captions images" in r.json()["error"]["message"]
    r = ask(client, "mmserve-demo", [user("describe the image.", images=2)])
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
    assert "takes at most 1" in r.json()["error"]["message"]
    r = ask(client, "auto", [{"role": "user", "content": "hello"}])  # neither takes a text-only conversation
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_capable_model"
    r = ask(client, "mmserve-demo", [user("describe the image.", images=5)])
    assert r.status_code == 400 and "at most 4 (setting max_images_per_request)" in r.json()["error"]["message"]


def test_metrics_carry_the_model_that_answered(client):
    ask(client, "captioner", [user()])
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    answered = {s.labels["model"] for s in families["mmserve_requests"].samples
                if s.labels.get("route") == "/v1/chat/completions"}
    assert {"captioner", "mmserve-demo"} <= answered
    engines = {s.labels["model"] for s in families["mmserve_running_requests"].samples}
    assert engines == {"captioner", "mmserve-demo"}
    for family in families.values():
        for sample in family.samples:
            assert "model" in sample.labels, sample


def test_names_are_checked_at_start(demo_runtime):
    with pytest.raises(ValueError, match="used twice"):
        create_app(Settings(), [(ModelEntry("a", BUNDLED_MODEL), demo_runtime),
                                (ModelEntry("b", BUNDLED_MODEL, aliases=("a",)), demo_runtime)])
    with pytest.raises(ValueError, match="is the routed alias"):
        create_app(Settings(), [(ModelEntry("auto", BUNDLED_MODEL), demo_runtime)])
    with pytest.raises(ValueError, match="default_model='nope'"):
        create_app(Settings(default_model="nope"), demo_runtime)
