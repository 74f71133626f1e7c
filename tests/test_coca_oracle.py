"""Our CoCa decoder against open_clip's CoCa: logits to 1e-4 relative, greedy tokens identical."""

from __future__ import annotations

import functools
import random

import open_clip
import pytest
import torch

from llm.models.coca import decoder_from_open_clip
from llm import model_runner
from llm.generate import generate_greedy, teacher_forced_logits
from llm.params import SamplingParams
from llm.packed_linear import onednn_packing_works, pack_linears
from tests.oracle import open_clip_greedy
from vision.preprocess import preprocess

SMALL_COCA = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 96, "layers": 2, "head_width": 32,
                   "output_tokens": True},
    "text_cfg": {"context_length": 32, "vocab_size": 101, "width": 96, "heads": 4, "layers": 2,
                 "embed_cls": True, "output_tokens": True, "pad_id": 0},
    "multimodal_cfg": {"context_length": 32, "vocab_size": 101, "width": 96, "heads": 4, "layers": 2},
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


def our_logits(decoder, image_embs, text):
    return teacher_forced_logits(decoder, image_embs, text)


def random_small_coca(seed: int = 0) -> open_clip.CoCa:
    torch.manual_seed(seed)
    model = open_clip.CoCa(**SMALL_COCA).eval()
    # open_clip leaves some parameters at their zero init; randomise everything so no path hides.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def small_coca():
    return random_small_coca()


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "onednn-packed"])
def test_small_coca_logits_match_open_clip(small_coca, packed):
    decoder = decoder_from_open_clip(SMALL_COCA, small_coca.state_dict())
    if packed:  # what the engine serves with on a CPU (llm/packed_linear.py)
        assert onednn_packing_works() and pack_linears(decoder) == 2 * 4 + 2 * (4 + 5) + 1  # text, multimodal, head
    image = torch.randn(3, 3, 64, 64)
    text = torch.randint(1, 101, (3, 20))
    with torch.inference_mode():
        ref = small_coca(image, text, output_labels=False)["logits"]
        _, image_embs = small_coca._encode_image(image)
    assert rel_err(our_logits(decoder, image_embs, text), ref) <= 1e-4


def test_small_coca_incremental_decoding_matches_full_forward(small_coca):
    """Logits computed one token at a time, or 5 at a time, through the paged KV cache equal the full
    reference forward."""
    decoder = decoder_from_open_clip(SMALL_COCA, small_coca.state_dict())
    image, text = torch.randn(2, 3, 64, 64), torch.randint(1, 101, (2, 12))
    with torch.inference_mode():
        ref = small_coca(image, text, output_labels=False)["logits"]
        _, image_embs = small_coca._encode_image(image)
    for chunk in (1, 5):
        assert rel_err(teacher_forced_logits(decoder, image_embs, text, chunk=chunk), ref) <= 1e-4, chunk


def reference_new_tokens(model, image, prompt, eos, seq_len=30, min_seq_len=5):
    """What `CoCa.generate(..., seq_len, generation_type="top_k", top_k=1)` adds after the prompt,
    its end token dropped."""
    seq = open_clip_greedy(model, image, torch.tensor([prompt]), eos_id=eos, seq_len=seq_len,
                           min_seq_len=min_seq_len)[0].tolist()[len(prompt):]
    return seq[:-1] if seq and seq[-1] == eos else seq


def generate_settings(prompt, eos, seq_len=30, min_seq_len=5):
    # generate's seq_len counts the prompt and the forced final end token
    return SamplingParams(max_tokens=seq_len - len(prompt) - 1, stop_token_ids=(eos,),
                          min_tokens=max(0, min_seq_len - len(prompt)))


def test_small_coca_greedy_tokens_match_open_clip(small_coca):
    decoder = decoder_from_open_clip(SMALL_COCA, small_coca.state_dict())
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        _, image_embs = small_coca._encode_image(images)
    prompt = [1]
    # pick as end token the first token greedy decoding emits for image 0, so that generation
    # really stops early there and the minimum-length rule is exercised
    eos = decoder_first_token = generate_greedy(decoder, image_embs[:1], [prompt], SamplingParams(1))[0][0]
    ours = generate_greedy(decoder, image_embs, [prompt] * 4, generate_settings(prompt, eos))
    for i in range(4):
        assert ours[i] == reference_new_tokens(small_coca, images[i:i + 1], prompt, eos), i
    assert decoder_first_token not in ours[0][:3]


@pytest.mark.parametrize("split", [False, True], ids=["groups-as-chosen", "every-row-its-own-group"])
def test_ragged_prompts_in_one_batch_match_one_by_one(small_coca, split, monkeypatch):
    """Rows of different lengths decode in one step; `split` makes every length its own group of
    decode rows (llm/model_runner.py `length_groups`, which would keep short rows like these as one)."""
    chosen = model_runner.length_groups if not split else functools.partial(model_runner.length_groups, group_cost=0)
    groups_seen = []
    monkeypatch.setattr(model_runner, "length_groups", lambda lens: groups_seen.append(chosen(lens)) or groups_seen[-1])
    decoder = decoder_from_open_clip(SMALL_COCA, small_coca.state_dict())
    images = torch.randn(4, 3, 64, 64)
    prompts = [[1], [1, 7, 9], [1, 5], [1, 50, 60, 70, 80, 90]]
    with torch.inference_mode():
        _, image_embs = small_coca._encode_image(images)
    eos = 3
    ours = generate_greedy(decoder, image_embs, prompts, SamplingParams(12, stop_token_ids=(eos,)))
    for i, prompt in enumerate(prompts):
        assert ours[i] == reference_new_tokens(small_coca, images[i:i + 1], prompt, eos, len(prompt) + 13, 0)
    assert max(len(bounds) - 1 for bounds in groups_seen) == (4 if split else 1)


# --- the bundled demo checkpoint -------------------------------------------------------------------

def test_demo_checkpoint_logits_and_greedy_match_open_clip(demo_runtime):
    from demo import world
    from llm.loading.chat_format import CAPTION_QUESTION, Turn

    model = demo_runtime.loaded.model
    rng = random.Random(3)
    images = [world.render(world.sample_scene(rng)) for _ in range(6)]
    pixels = preprocess(images, demo_runtime.encoder.preprocess_cfg)
    prompt = demo_runtime.prompt_ids([Turn(CAPTION_QUESTION)])
    eos = demo_runtime.tokenizer.eot_id
    with torch.inference_mode():
        _, image_embs = model._encode_image(pixels)
    decoder = demo_runtime.decoder

    text = torch.tensor([prompt + [5, 6, 7, 8]] * len(images))
    with torch.inference_mode():
        ref = model(pixels, text, output_labels=False)["logits"]
    assert rel_err(our_logits(decoder, image_embs, text), ref) <= 1e-4

    ours = generate_greedy(decoder, image_embs, [prompt] * len(images), generate_settings(prompt, eos))
    for i in range(len(images)):
        assert ours[i] == reference_new_tokens(model, pixels[i:i + 1], prompt, eos), i


# --- a random-weight coca_ViT-B-32 (254M parameters), built by open_clip ----------------------------

def test_coca_vit_b32_logits_and_greedy_match_open_clip():
    torch.manual_seed(0)
    model = open_clip.create_model("coca_ViT-B-32", pretrained=None).eval()
    with torch.no_grad():  # open_clip leaves the decoder's output projection uninitialised (zeros here)
        model.text_decoder.text_projection.normal_(0, 512 ** -0.5)
    cfg = open_clip.get_model_config("coca_ViT-B-32")
    decoder = decoder_from_open_clip(cfg, model.state_dict())
    images = torch.randn(2, 3, 224, 224)
    sot, eot = 49406, 49407
    text = torch.cat([torch.full((2, 1), sot), torch.randint(1, 49000, (2, 11))], dim=1)
    with torch.inference_mode():
        ref = model(images, text, output_labels=False)["logits"]
        _, image_embs = model._encode_image(images)
    assert rel_err(our_logits(decoder, image_embs, text), ref) <= 1e-4

    prompt = [sot]
    ours = generate_greedy(decoder, image_embs, [prompt] * 2, generate_settings(prompt, eot, seq_len=20))
    for i in range(2):
        assert ours[i] == reference_new_tokens(model, images[i:i + 1], prompt, eot, seq_len=20), i
