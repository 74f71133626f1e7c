"""Florence-2 over the chat API through the official `openai` client, against transformers itself: an
image with a task prompt (or none: <CAPTION>) answers exactly what `generate(do_sample=False,
num_beams=1)` decodes to; the BART encoder's output is pooled per (image, prompt); the 400s name what
Florence-2 cannot take; `mmserve caption`'s one-shot path gives the same captions."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from litestar.testing import TestClient
from openai import BadRequestError, OpenAI
from PIL import Image

from app.models.families import load_family_model
from app.models.oneshot import OneShot
from app.server import create_app
from app.settings import Settings
from bench.florence2_checkpoint import PRESETS, write_florence2_checkpoint

N = 10  # generate's max_new_tokens: the forced <s>, 8 tokens, the forced </s>


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 80, 3), dtype=np.uint8))


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_florence2_checkpoint(tmp_path_factory.mktemp("florence2"), **PRESETS["tiny"], seed=4)


@pytest.fixture(scope="module")
def reference(ckpt):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    return Florence2ForConditionalGeneration.from_pretrained(ckpt).eval(), AutoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def served(ckpt):
    app = create_app(Settings(models=(f"florence={ckpt}",)))
    with TestClient(app) as c:
        yield OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", http_client=c, max_retries=0,
                     _strict_response_validation=True), app


def expected(reference, image: Image.Image, task: str) -> str:
    model, processor = reference
    ids = model.generate(**processor(text=task, images=image, return_tensors="pt"), do_sample=False, num_beams=1,
                         max_new_tokens=N)
    return processor.batch_decode(ids, skip_special_tokens=True)[0]


def ask(client, image: Image.Image | None, text: str | None = None, **extra):
    content = ([{"type": "image_url", "image_url": {"url": png_url(image)}}] if image is not None else [])
    content += [{"type": "text", "text": text}] if text is not None else []
    return client.chat.completions.create(model="florence", messages=[{"role": "user", "content": content}],
                                          max_completion_tokens=N - 2, **extra)


def test_task_prompts_answer_what_transformers_generates(served, reference):
    client, app = served
    for seed, task in enumerate(["<CAPTION>", "<DETAILED_CAPTION>", "<OCR>"]):
        image = picture(seed)
        assert ask(client, image, task).choices[0].message.content == expected(reference, image, task), task
    image = picture(7)
    assert ask(client, image).choices[0].message.content == expected(reference, image, "<CAPTION>")


def test_the_encoder_output_is_pooled_per_image_and_prompt(served):
    client, app = served
    engine = app.state.chat.registry.get("florence").engine.engine
    image = picture(11)
    first = ask(client, image, "<OCR>").choices[0].message.content
    misses = engine.stats()["cross_kv_misses"]  # (hits count steps that read pooled K/V)
    assert ask(client, image, "<OCR>").choices[0].message.content == first
    assert engine.stats()["cross_kv_misses"] == misses  # the encoder did not run again
    ask(client, image, "<CAPTION>")  # the same image under another prompt: another encoder output
    assert engine.stats()["cross_kv_misses"] == misses + 1


def test_what_florence2_cannot_take_is_a_400_naming_it(served):
    client, _ = served
    cases = [(lambda: ask(client, picture(1), "<OCR> and more"), "whole prompt"),
             (lambda: ask(client, None, "<CAPTION>"), "needs one"),
             (lambda: client.chat.completions.create(model="florence", messages=[
                 {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(picture(1))}}]},
                 {"role": "assistant", "content": "a cat"}, {"role": "user", "content": "<OCR>"}]), "one user message"),
             (lambda: ask(client, picture(1), "<CAPTION>", extra_body={"visual_tokens": 0.5}), "visual tokens")]
    for call, words in cases:
        with pytest.raises(BadRequestError) as e:
            call()
        assert words in e.value.body["message"], e.value.body


def test_one_shot_captions_equal_the_servers(served, ckpt, reference):
    images = [picture(20), picture(21)]
    captions = OneShot(load_family_model(ckpt), max_new_tokens=N - 2).caption(images)
    assert captions == [expected(reference, im, "<CAPTION>") for im in images]
