"""The image-to-text families served: BLIP and a ViT-GPT2 VisionEncoderDecoderModel side by side,
through the official `openai` client (chat completions, with and without a text prefix), a batch job
mixing the two families, `mmserve caption DIR --model PATH`, and the 400s naming what a caption model
cannot do. Every caption is checked against transformers' `generate` decoded by the checkpoint's
tokenizer."""

from __future__ import annotations

import json
import time

import openai
import pytest
import torch
from litestar.testing import TestClient
from openai import OpenAI
from PIL import Image

from app.cli import main
from app.server import create_app
from app.settings import Settings
from bench.caption_checkpoints import CLS, SEP, write_blip, write_ved
from tests.conftest import data_url, png_bytes

MAX_NEW = 10


def picture(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(30 + seed, 34, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": (root / "blip", write_blip(root / "blip", seed=4)),
            "vitgpt2": (root / "vitgpt2", write_ved(root / "vitgpt2", "vit", "gpt2", seed=5))}


def expected_caption(name: str, ckpts, image: Image.Image, prefix: str = "", max_new: int = MAX_NEW) -> str:
    """transformers' own pipeline: its image processor, generate (greedy), the tokenizer's decode of
    the new tokens."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path, ref = ckpts[name]
    tok = AutoTokenizer.from_pretrained(path)
    pixels = AutoImageProcessor.from_pretrained(path)(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    words = tok.encode(prefix, add_special_tokens=False) if prefix else []
    with torch.inference_mode():
        if name == "blip":
            out = ref.generate(pixel_values=pixels, input_ids=torch.tensor([[CLS, *words, SEP]]), do_sample=False,
                               max_new_tokens=max_new)
        else:
            out = ref.generate(pixel_values=pixels, do_sample=False, max_new_tokens=max_new)
    return tok.decode(out[0, 1 + len(words):].tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def app_client(ckpts, tmp_path_factory):
    settings = Settings(models=tuple(f"{n}={p}" for n, (p, _) in ckpts.items()),
                        data_dir=tmp_path_factory.mktemp("data"))
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def client(app_client):
    return OpenAI(base_url=f"{app_client.base_url}/v1", api_key="unused", http_client=app_client, max_retries=0,
                  _strict_response_validation=True)


def image_part(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def caption(client, model: str, image: Image.Image, text: str = "", max_tokens: int = MAX_NEW) -> str:
    content = [image_part(image)] + ([{"type": "text", "text": text}] if text else [])
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       max_completion_tokens=max_tokens)
    return r.choices[0].message.content


@pytest.mark.parametrize("model", ["blip", "vitgpt2"])
def test_chat_caption_equals_transformers(client, ckpts, model):
    image = picture(1)
    assert caption(client, model, image) == expected_caption(model, ckpts, image)
    assert caption(client, model, image, "describe the image.") == expected_caption(model, ckpts, image)


def test_blip_text_prefix_continues_it(client, ckpts):
    image = picture(2)
    assert caption(client, "blip", image, "a picture of") == expected_caption("blip", ckpts, image, "a picture of")


def test_models_list_caption_only_with_task_prompts(client):
    cards = {m.id: m for m in client.models.list().data}
    for name in ("blip", "vitgpt2"):
        caps = cards[name].model_extra["capabilities"]
        assert "captions" in caps and "task_prompts" in caps and "questions" not in caps and "embeddings" not in caps


def test_what_a_caption_model_cannot_do_is_a_400_naming_it(client):
    image = picture(3)
    cases = [
        ([{"role": "user", "content": "hello"}], "missing_image"),
        ([{"role": "user", "content": [image_part(image)]}, {"role": "assistant", "content": "a cat"},
          {"role": "user", "content": [image_part(image), {"type": "text", "text": "and?"}]}], "too_many_images"),
        ([{"role": "user", "content": [image_part(image), image_part(image)]}], "too_many_images"),
        ([{"role": "user", "content": [image_part(image)]}, {"role": "assistant", "content": "a cat"},
          {"role": "user", "content": "what colour?"}], "unsupported_prompt"),
    ]
    for messages, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="blip", messages=messages)
        assert e.value.code == code, (messages, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="vitgpt2", input="a cat")
    assert "vitgpt2" in str(e.value) and "embeddings" in str(e.value)


def test_batch_mixes_two_families(app_client, ckpts):
    images = [picture(10 + i) for i in range(4)]
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": ("blip", "vitgpt2")[i % 2], "max_completion_tokens": MAX_NEW,
                       "messages": [{"role": "user", "content": [image_part(im)]}]}} for i, im in enumerate(images)]
    content = "\n".join(json.dumps(line) for line in lines).encode() + b"\n"
    file_id = app_client.post("/v1/files", files={"file": ("in.jsonl", content, "application/jsonl")},
                              data={"purpose": "batch"}).json()["id"]
    batch = app_client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h"}).json()
    deadline = time.monotonic() + 120
    while batch["status"] not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = app_client.get(f"/v1/batches/{batch['id']}").json()
    assert batch["status"] == "completed", batch
    out = [json.loads(x) for x in app_client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
    answers = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in out}
    assert answers == {f"r{i}": expected_caption(("blip", "vitgpt2")[i % 2], ckpts, im) for i, im in enumerate(images)}


@pytest.mark.parametrize("model", ["blip", "vitgpt2"])
def test_caption_dir_with_model(ckpts, tmp_path, model, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    images = {f"{i}.png": picture(20 + i) for i in range(3)}
    for name, image in images.items():
        (folder / name).write_bytes(png_bytes(image))
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(folder), "--out", str(out), "--model", str(ckpts[model][0])]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["image"] for x in lines] == ["0.png", "1.png", "2.png", "broken.png"]
    assert "error" in lines[-1]
    for line in lines[:3]:
        assert line["caption"] == expected_caption(model, ckpts, images[line["image"]], max_new=32)
