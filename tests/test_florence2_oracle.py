"""Florence-2 against transformers' own (5.24) on a random-weight checkpoint it saved: the processor's
prompt text and encoder ids, the DaViT tower's tokens, logits to 1e-4 relative in fp32 (whole and one
token at a time through the paged cache), and greedy tokens equal to `generate(do_sample=False,
num_beams=1)` under the checkpoint's generation config (decoder_start </s>, forced <s>, forced </s>
at the length limit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from app.chat.conversation import Conversation, ImageRef, Message
from app.models.families import detect_family
from app.models.families.base import PromptError
from app.models.families.florence2 import Florence2Model
from app.models.families.florence2_prompts import TASKS_WITH_INPUT, TASKS_WITHOUT_INPUT
from bench.florence2_checkpoint import PRESETS, write_florence2_checkpoint
from llm.engine import ImageInput
from llm.generate import generate_greedy, teacher_forced_logits
from llm.params import SamplingParams

TASKS = ["<CAPTION>", "<DETAILED_CAPTION>", "<OCR>", "<OPEN_VOCABULARY_DETECTION> a red cat", "what is this?"]


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    path = write_florence2_checkpoint(tmp_path_factory.mktemp("florence2"), **PRESETS["tiny"])
    hf = Florence2ForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return path, hf, processor, Florence2Model(path)


def picture(seed: int, size=(70, 50)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def conversation(text: str | None) -> Conversation:
    parts = (ImageRef(0),) if text is None else (ImageRef(0), text)
    return Conversation((Message("user", parts),), ("image",))


def memory(model: Florence2Model, image: Image.Image, task: str | None) -> ImageInput:
    (features,) = model.encoder.encode([image])
    (mem,) = model.memory((ImageInput("img", features.tokens),), conversation(task))
    return mem


def test_prompt_tables_are_the_processors(florence):
    _, _, processor, _ = florence
    assert TASKS_WITHOUT_INPUT == processor.task_prompts_without_inputs
    assert TASKS_WITH_INPUT == processor.task_prompts_with_input


def test_detected_and_encoder_ids_equal_the_processors(florence):
    path, hf, processor, ours = florence
    assert detect_family(path) == "florence2"
    n = ours.encoder.tokens_per_image
    for task in TASKS:
        ids = processor(text=task, images=picture(0), return_tensors="pt")["input_ids"][0].tolist()
        assert ids == [hf.config.image_token_id] * n + ours.encoder_ids(conversation(task)), task
    assert ours.encoder_ids(conversation(None)) == ours.encoder_ids(conversation("<CAPTION>"))
    with pytest.raises(PromptError, match="whole prompt"):
        ours.encoder_ids(conversation("<OCR> and more"))


@torch.inference_mode()
def test_vision_tokens_are_the_ones_transformers_scatters(florence):
    _, hf, processor, ours = florence
    pics = [picture(1), picture(2, (40, 90))]
    pixels = processor.image_processor(pics, return_tensors="pt")["pixel_values"]
    ref = hf.model.get_image_features(pixels).pooler_output
    got = torch.stack([f.tokens for f in ours.encoder.encode(pics)])
    assert got.shape == ref.shape and float((got - ref).abs().max() / ref.abs().max()) < 1e-5


@torch.inference_mode()
def test_logits_match_transformers(florence):
    _, hf, processor, ours = florence
    g = torch.Generator().manual_seed(3)
    for seed, task in enumerate(TASKS[:3]):
        image = picture(10 + seed)
        inputs = processor(text=task, images=image, return_tensors="pt")
        tgt = torch.tensor([ours.decoder_prompt + torch.randint(3, 300, (6,), generator=g).tolist()])
        ref = hf(**inputs, decoder_input_ids=tgt).logits
        mem = memory(ours, image, task)
        for chunk in (None, 1):
            got = teacher_forced_logits(ours.decoder, [mem], tgt, chunk=chunk)
            assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4, (task, chunk)


@torch.inference_mode()
def test_greedy_tokens_match_generate(florence):
    """generate: [start, forced <s>, t1 .. t_{n-2}, forced </s>] within max_new_tokens = n (or an earlier
    </s>); ours: the same t's from the prompt [start, <s>], n - 2 of them at most."""
    _, hf, processor, ours = florence
    n = 14
    images = [picture(20 + i) for i in range(3)]
    tasks = ["<CAPTION>", "<OCR>", "<DETAILED_CAPTION>"]
    mems = [memory(ours, im, t) for im, t in zip(images, tasks)]
    got = generate_greedy(ours.decoder, [[m] for m in mems], [ours.decoder_prompt] * 3,
                          SamplingParams(max_tokens=n - 2, stop_token_ids=ours.stop_ids))
    for image, task, out in zip(images, tasks, got):
        inputs = processor(text=task, images=image, return_tensors="pt")
        ref = hf.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n)[0].tolist()
        assert ref == ours.decoder_prompt + out + [ours.eos_id], (task, ref, out)
    assert len({t for out in got for t in out}) >= 3  # real runs, not one token repeated everywhere


@torch.inference_mode()
def test_bf16_decoder_tracks_fp32_transformers(florence):
    """The served bf16 copy (app/models/served.py: dense_copy, then .to): weights, pools and the
    encoder in bf16, close to the fp32 reference."""
    from llm.packed_linear import dense_copy

    _, hf, processor, ours = florence
    half = dense_copy(ours.decoder).to(torch.bfloat16)
    image = picture(40)
    tgt = torch.tensor([ours.decoder_prompt + [5, 77, 123, 9]])
    ref = hf(**processor(text="<CAPTION>", images=image, return_tensors="pt"), decoder_input_ids=tgt).logits
    got = teacher_forced_logits(half, [memory(ours, image, "<CAPTION>")], tgt, chunk=2)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 3e-2


@torch.inference_mode()
def test_a_bf16_tower_states_its_dtype_and_tracks_fp32(florence):
    from vision.encoders.base import CastableEncoder

    _, _, _, ours = florence
    assert isinstance(ours.encoder, CastableEncoder)
    half = ours.encoder.cast(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and ours.encoder.dtype == torch.float32  # the feature-cache key names it
    (a,), (b,) = ours.encoder.encode([picture(41)]), half.encode([picture(41)])
    assert b.tokens.dtype == torch.bfloat16 and float((b.tokens.float() - a.tokens).abs().max() / a.tokens.abs().max()) < 3e-2
