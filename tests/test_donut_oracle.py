"""Donut (VisionEncoderDecoderModel: DonutSwin + MBartForCausalLM) against transformers' own (5.24) on a
random-weight checkpoint it saved (bench/donut_checkpoint.py): the task prompt as the decoder's start
(generate adds no start token before a Donut's prompt), logits to 1e-4 relative in fp32 whole and one
token at a time, greedy tokens equal to `generate(do_sample=False, num_beams=1)` (forced </s> at the
length limit), and the same answer through the chat API with the official openai client."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from litestar.testing import TestClient
from openai import OpenAI
from PIL import Image

from app.chat.conversation import Conversation, ImageRef, Message
from app.models.families import detect_family
from app.models.families.ved import VEDModel
from app.server import create_app
from app.settings import Settings
from bench.donut_checkpoint import TINY_DONUT, write_donut_checkpoint
from llm.generate import generate_greedy, teacher_forced_logits
from llm.models.bart import BartDecoder
from llm.params import SamplingParams

N = 10  # generate's max_new_tokens, the forced </s> included
TASKS = ["<s_cord-v2>", "<s_docvqa><s_question>what is the total?</s_question><s_answer>"]


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def donut(tmp_path_factory):
    from transformers import AutoProcessor, VisionEncoderDecoderModel

    path = write_donut_checkpoint(tmp_path_factory.mktemp("donut"), **TINY_DONUT, seed=2)
    return path, VisionEncoderDecoderModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path), VEDModel(path)


def conversation(text: str) -> Conversation:
    return Conversation((Message("user", (ImageRef(0), text)),), ("image",))


def reference_prompt(processor, task: str) -> list[int]:
    return processor.tokenizer(task, add_special_tokens=False).input_ids


def test_a_donut_is_a_ved_with_a_bart_decoder_started_at_its_task_prompt(donut):
    path, _, processor, ours = donut
    assert detect_family(path) == "ved" and isinstance(ours.decoder, BartDecoder) and ours.decoder.cfg.pre_norm
    for task in TASKS:
        assert ours.chat_prompt(conversation(task)) == reference_prompt(processor, task)
    assert ours.chat_prompt(conversation("")) == [ours.start_id]


@torch.inference_mode()
def test_logits_match_transformers(donut):
    _, hf, processor, ours = donut
    g = torch.Generator().manual_seed(1)
    for seed, task in enumerate(TASKS):
        image = picture(seed)
        ids = torch.tensor([reference_prompt(processor, task) + torch.randint(3, 400, (5,), generator=g).tolist()])
        ref = hf(pixel_values=processor(image, return_tensors="pt").pixel_values, decoder_input_ids=ids).logits
        (features,) = ours.encoder.encode([image])
        for chunk in (None, 1):
            got = teacher_forced_logits(ours.decoder, features.tokens[None], ids, chunk=chunk)
            assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4, (task, chunk)


def hf_generate(hf, processor, image: Image.Image, task: str) -> list[int]:
    ids = torch.tensor([reference_prompt(processor, task)])
    return hf.generate(processor(image, return_tensors="pt").pixel_values, decoder_input_ids=ids, do_sample=False,
                       num_beams=1, max_new_tokens=N)[0].tolist()


@torch.inference_mode()
def test_greedy_tokens_match_generate(donut):
    """generate makes the last of max_new_tokens the forced </s>: ours is the same run one token shorter."""
    _, hf, processor, ours = donut
    images = [picture(10 + i) for i in range(3)]
    tasks = [TASKS[0], TASKS[1], TASKS[0]]
    prompts = [ours.chat_prompt(conversation(t)) for t in tasks]
    tokens = [f.tokens for f in ours.encoder.encode(images)]
    got = generate_greedy(ours.decoder, tokens, prompts, SamplingParams(max_tokens=N - 1, stop_token_ids=ours.stop_ids))
    for image, task, prompt, out in zip(images, tasks, prompts, got):
        assert hf_generate(hf, processor, image, task) == prompt + out + [ours.stop_ids[0]], task
    assert len({t for out in got for t in out}) >= 3  # real runs, not one token repeated everywhere


def test_the_chat_api_answers_what_transformers_generates(donut):
    path, hf, processor, _ = donut
    image = picture(30)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with TestClient(create_app(Settings(models=(f"donut={path}",)))) as c:
        client = OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", http_client=c, max_retries=0,
                        _strict_response_validation=True)
        answer = client.chat.completions.create(model="donut", max_completion_tokens=N - 1, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": TASKS[0]}]}])
    expected = processor.batch_decode([hf_generate(hf, processor, image, TASKS[0])], skip_special_tokens=True)[0]
    assert answer.choices[0].message.content == expected
