"""Several images in one request, and none, against transformers' MllamaForConditionalGeneration (5.24):
logits to 1e-4 relative in fp32 through the paged KV cache, and greedy tokens identical to
`generate(do_sample=False)`. The cross-attention mask is the one MllamaProcessor builds
(`get_cross_attention_token_mask`): text sees the latest image (or run of adjacent images) before it,
text before the first image sees every image token; a text-only prompt skips the cross layers."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from llm.cross_plan import ImageSpan, image_token_plan
from llm.engine import ImageInput, tensor_digest
from llm.generate import generate_greedy, teacher_forced_logits
from llm.params import SamplingParams
from llm.models.mllama import mllama_decoder_from_hf_model
from tests.test_mllama_oracle import BOS, PAD, PREPROCESS, SMALL_VISION, TINY_TEXT, images, random_mllama, rel_err
from vision.encoders.mllama import MllamaVisionEncoder


@pytest.fixture(scope="module")
def tiny():
    model = random_mllama(TINY_TEXT, SMALL_VISION, seed=5)
    return model, mllama_decoder_from_hf_model(model), MllamaVisionEncoder.from_hf_model(model, PREPROCESS)


def hf_inputs(encoder, pictures: list, ids: list[int], image_token: int) -> dict:
    """One sample with several images, as MllamaProcessor gives it to transformers."""
    if not pictures:
        return {}
    inputs = encoder.processor([[p.convert("RGB") for p in pictures]], return_tensors="pt")
    spans = [get_cross_attention_token_mask(ids, image_token)]
    mask = convert_sparse_cross_attention_mask_to_dense(spans, inputs["num_tiles"], PREPROCESS.max_image_tiles,
                                                        len(ids))
    return {"pixel_values": inputs["pixel_values"], "aspect_ratio_ids": inputs["aspect_ratio_ids"],
            "aspect_ratio_mask": inputs["aspect_ratio_mask"], "cross_attention_mask": torch.from_numpy(mask)}


def request_images(encoder, pictures) -> list[ImageInput]:
    return [ImageInput(tensor_digest(f.tokens), f.tokens, f.attended_tokens) for f in encoder.encode(pictures)]


# image token positions (marked I) and tile counts of each case
CASES = {
    "two images, text between": ([BOS, 5, "I", 7, 8, 9, "I", 10, 11, 12, 13], [2, 3]),
    "two adjacent images": ([BOS, "I", "I", 20, 21, 22, 23], [1, 4]),
    "three images, one at the start": (["I", 30, 31, "I", "I", 32, 33, 34], [3, 1, 2]),
    "images with no padding tiles": ([BOS, 40, "I", 41, "I", 42, 43], [4, 4]),
}


def ids_of(template: list, image_token: int) -> list[int]:
    return [image_token if t == "I" else t for t in template]


@pytest.mark.parametrize("case", list(CASES))
def test_several_images_logits_match_transformers(tiny, case):
    model, decoder, encoder = tiny
    image_token = model.config.image_token_index
    template, tiles = CASES[case]
    ids = ids_of(template, image_token)
    pictures = images(tiles, seed=len(ids))
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids]), **hf_inputs(encoder, pictures, ids, image_token)).logits
    ours_images = [request_images(encoder, pictures)]
    for chunk in (None, 1, 3):
        ours = teacher_forced_logits(decoder, ours_images, torch.tensor([ids]), chunk=chunk)
        assert rel_err(ours, ref) <= 1e-4, chunk


def test_text_only_logits_match_transformers(tiny):
    """No image at all: transformers skips the cross-attention layers; so does the gated, zeroed path."""
    model, decoder, _ = tiny
    ids = [[BOS, 9, 8, 7, 6, 5, 4, 3, 2]]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor(ids)).logits
    for chunk in (None, 1, 4):
        assert rel_err(teacher_forced_logits(decoder, [None], torch.tensor(ids), chunk=chunk), ref) <= 1e-4


def hf_greedy(model, encoder, pictures, prompt, max_new_tokens) -> list[int]:
    inputs = hf_inputs(encoder, pictures, prompt, model.config.image_token_index)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), **inputs, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=PAD + 1000, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_match_transformers_with_several_images_and_none_in_one_batch(tiny):
    """Rows with two images, one image and no image decode side by side in one engine, each exactly as
    transformers generates it alone."""
    model, decoder, encoder = tiny
    image_token = model.config.image_token_index
    two = ids_of(CASES["two images, text between"][0], image_token)
    adjacent = ids_of(CASES["two adjacent images"][0], image_token)
    one = [BOS, image_token, 50, 51, 52]
    text = [BOS, 60, 61, 62, 63, 64]
    pictures = [images([2, 3], seed=1), images([1, 4], seed=2), images([2], seed=3), []]
    prompts = [two, adjacent, one, text]
    per_row = [request_images(encoder, p) or None for p in pictures]
    ours = generate_greedy(decoder, per_row, prompts, SamplingParams(10))
    for i, (p, pics) in enumerate(zip(prompts, pictures)):
        assert ours[i] == hf_greedy(model, encoder, pics, p, 10), i


def test_the_plan_follows_transformers_spans():
    """Plain bookkeeping: what each position sees, against get_cross_attention_token_mask's spans."""
    spans = [ImageSpan(8, 4), ImageSpan(8, 8), ImageSpan(8, 2)]
    ids = [1, 2, 99, 3, 99, 99, 4, 5]
    plan = image_token_plan(ids, 99, spans, never=1000)
    assert plan.keys_at(0) == plan.keys_at(1) == ((0, 24),)  # before the first image: everything
    assert plan.keys_at(2) == plan.keys_at(3) == ((0, 4),)  # image 0's real tokens
    assert plan.keys_at(4) == ((8, 16),)  # image 1 alone at its own token (as transformers' spans)
    assert plan.keys_at(5) == plan.keys_at(7) == plan.keys_at(500) == ((8, 16), (16, 18))  # images 1 and 2 on
    assert plan.visible_from == 2
    hf = get_cross_attention_token_mask(ids, 99)
    for position in range(len(ids)):
        seen = [i for i, (lo, hi) in enumerate(hf) if lo <= position < (len(ids) if hi == -1 else hi)]
        expected = tuple((8 * i, 8 * i + spans[i].attended) for i in seen) or ((0, 24),)
        assert plan.keys_at(position) == expected, position
    with pytest.raises(ValueError, match="2 image tokens for 3 images"):
        image_token_plan([99, 1, 99], 99, spans, never=1000)
