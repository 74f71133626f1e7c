"""/v1/embeddings and /v1/classify through the real app, on the bundled demo model, with images from
the independent renderer (the model never saw it)."""

from __future__ import annotations

import pytest
import torch
from litestar.testing import TestClient
from openai import OpenAI
from PIL import Image

from app.server import create_app
from app.settings import Settings
from tests import independent_world as iw
from tests.conftest import data_url

# Single-object scenes: the demo model's text tower was trained on object labels, so captions of one
# object are what its contrastive space knows (two-object captions are beyond it).
SCENES = [iw.Scene("white", [iw.Obj("circle", "red", "large", 64.0, 64.0, 52)]),
          iw.Scene("gray", [iw.Obj("square", "green", "large", 60.0, 66.0, 48)]),
          iw.Scene("black", [iw.Obj("triangle", "yellow", "large", 64.0, 60.0, 50)]),
          iw.Scene("white", [iw.Obj("square", "blue", "small", 70.0, 50.0, 26)])]


@pytest.fixture(scope="module")
def client(demo_runtime):
    settings = Settings(max_image_pixels=1_000_000, max_embedding_inputs=8, max_classify_labels=20)
    with TestClient(create_app(settings, demo_runtime)) as c:
        yield c


def embed(client, input, **extra):
    return client.post("/v1/embeddings", json={"model": "mmserve-demo", "input": input, **extra})


def vectors(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([d["embedding"] for d in response.json()["data"]])


def test_openai_shape_unit_norm_and_usage(client, demo_runtime):
    texts = ["a red circle", "a small green square"]
    r = embed(client, [*texts, data_url(iw.render(SCENES[0]))])
    body = r.json()
    assert body["object"] == "list" and body["model"] == "mmserve-demo"
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1), ("embedding", 2)]
    v = vectors(r)
    assert v.shape == (3, demo_runtime.loaded.model.text.output_dim)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    tokens = sum(len(demo_runtime.tokenizer.encode(t)) + 2 for t in texts)  # images count no tokens
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_text_embeddings_are_the_runtimes_label_latents(client, demo_runtime):
    texts = ["a red circle", "a blue triangle"]
    assert torch.allclose(vectors(embed(client, texts)), demo_runtime.label_latents(texts), atol=1e-5)
    assert torch.allclose(vectors(embed(client, "a red circle"))[0], vectors(embed(client, texts))[0], atol=1e-6)


def test_each_image_is_closest_to_its_own_caption(client):
    captions = [iw.caption(s) for s in SCENES]
    assert len(set(captions)) == len(captions)
    images = vectors(embed(client, [data_url(iw.render(s)) for s in SCENES]))
    texts = vectors(embed(client, captions))
    similarity = images @ texts.T
    assert similarity.argmax(dim=1).tolist() == list(range(len(SCENES))), similarity


def test_image_parts_plain_data_urls_and_text_parts(client):
    url = data_url(iw.render(SCENES[1]))
    as_part = vectors(embed(client, [{"type": "image_url", "image_url": {"url": url}}]))
    as_string = vectors(embed(client, [url]))
    assert torch.allclose(as_part, as_string)
    text_part = vectors(embed(client, [{"type": "text", "text": "a green square"}]))
    assert torch.allclose(text_part, vectors(embed(client, ["a green square"])))


def test_base64_through_the_official_client(client):
    """The openai client asks for base64 by default and decodes it itself."""
    openai = OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)
    result = openai.embeddings.create(model="mmserve-demo", input=["a yellow triangle", "a red square"])
    floats = vectors(embed(client, ["a yellow triangle", "a red square"]))
    assert torch.allclose(torch.tensor([d.embedding for d in result.data]), floats, atol=1e-6)
    assert result.usage.total_tokens == embed(client, ["a yellow triangle", "a red square"]).json()["usage"]["total_tokens"]


def bomb() -> str:
    return data_url(Image.new("RGB", (2000, 1000)))  # 2 Mpx, over this app's 1 Mpx cap


BAD_EMBEDDINGS = [
    ("unknown model", {"model": "gpt-9", "input": "x"}, 404, "model_not_found", "gpt-9"),
    ("empty list", {"input": []}, 400, None, "must not be empty"),
    ("empty string", {"input": ["ok", "  "]}, 400, None, "input[1] is empty"),
    ("too many", {"input": ["a"] * 9}, 400, None, "9 items; this server accepts at most 8"),
    ("too long", {"input": " ".join(["red"] * 80)}, 400, "context_length_exceeded", "82 tokens; this model's text encoder takes at most 64"),
    ("dimensions", {"input": "a", "dimensions": 32}, 400, "unsupported_parameter", "have 64"),
    ("token ids", {"input": [[1, 2, 3]]}, 400, "unsupported_parameter", "input[0] is token ids"),
    ("bad base64", {"input": ["data:image/png;base64,@@@@"]}, 400, "bad_image_encoding", "input[0]"),
    ("not an image", {"input": ["data:image/png;base64," + "QUJD" * 10]}, 400, None, "input[0]"),
    ("remote url", {"input": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/a.png"}}]},
     400, "unsupported_image_format", "remote image URLs are disabled"),
    ("pixel bomb", {"input": [bomb()]}, 413, "image_too_large", "input[0]"),
]


@pytest.mark.parametrize("name,body,status,code,needle", BAD_EMBEDDINGS, ids=[b[0] for b in BAD_EMBEDDINGS])
def test_bad_embedding_requests_get_typed_errors(client, name, body, status, code, needle):
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code
    assert embed(client, "a red circle").status_code == 200  # and the next good request still works


# -- classify ------------------------------------------------------------------------------------------
def test_classify_gets_the_demo_images_label_with_the_models_label_set(client, demo_runtime):
    scenes = [s for _, s in iw.make_eval_set(40, seed=11) if iw.zero_shot_label(s)][:6]
    for scene in scenes:
        r = client.post("/v1/classify", json={"image": data_url(iw.render(scene))})
        assert r.status_code == 200, r.text
        labels = r.json()["labels"]
        assert labels[0]["label"] == iw.zero_shot_label(scene)
        assert sorted(l["label"] for l in labels) == sorted(demo_runtime.loaded.spec.labels)
        scores = [l["score"] for l in labels]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-4)


def test_classify_with_the_requests_labels(client):
    url = data_url(iw.render(SCENES[2]))  # a large yellow triangle
    r = client.post("/v1/classify", json={"image": url, "labels": ["a blue circle", "a yellow triangle", "a red square"]})
    body = r.json()
    assert body["object"] == "classification" and body["model"] == "mmserve-demo"
    assert [l["label"] for l in body["labels"]][0] == "a yellow triangle" and len(body["labels"]) == 3


BAD_CLASSIFY = [
    ("no labels", {"labels": []}, 400, "labels must not be empty"),
    ("blank label", {"labels": ["a cat", ""]}, 400, "labels[1] is empty"),
    ("too many labels", {"labels": [f"l{i}" for i in range(21)]}, 400, "21 items; this server accepts at most 20"),
    ("corrupt image", {"image": "data:image/png;base64," + "QUJD" * 10}, 400, "image"),
    ("unknown model", {"model": "gpt-9"}, 404, "gpt-9"),
]


@pytest.mark.parametrize("name,extra,status,needle", BAD_CLASSIFY, ids=[b[0] for b in BAD_CLASSIFY])
def test_bad_classify_requests_get_typed_errors(client, name, extra, status, needle):
    body = {"image": data_url(iw.render(SCENES[0]))} | extra
    r = client.post("/v1/classify", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]

