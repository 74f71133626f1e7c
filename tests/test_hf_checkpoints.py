"""bench/hf_checkpoints.py writes a Llama-3.2-Vision checkpoint that transformers itself loads offline, whose
processor renders Llama 3.2 Vision Instruct's chat format, and whose model generates from the processor's
inputs; the facts a server must reproduce token for token are asserted here (one BOS, the image spans of
the cross-attention mask, the pixel layout)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.hf_checkpoints import (IMAGE_TOKEN, LLAMA3_SPECIALS, PRESETS, TEMPLATE_FILES, special_token_ids,
                                  write_mllama_checkpoint)

TINY = PRESETS["tiny"]
VOCAB = TINY["text"]["vocab_size"]
IDS = special_token_ids(VOCAB)
BOS, EOT, IMAGE = IDS["<|begin_of_text|>"], IDS["<|eot_id|>"], IDS[IMAGE_TOKEN]
DATE = "26 Jul 2024"
HEAD = "<|begin_of_text|>"
SYSTEM = f"<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: {DATE}\n\n"
USER, ASSISTANT = "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def picture(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


ONE_IMAGE = [{"role": "user", "content": [{"type": "image", "image": picture(40, 60, 0)},
                                          {"type": "text", "text": "What is this?"}]}]
TWO_TURNS = ONE_IMAGE + [{"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
                         {"role": "user", "content": [{"type": "image", "image": picture(20, 20, 1)},
                                                      {"type": "text", "text": "And this?"}]}]
TEXT_ONLY = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
EXPECTED = {  # Llama 3.2 Vision Instruct's format: no system block when an image is shown and no system message
    "one image": (ONE_IMAGE, f"{HEAD}{USER}<|image|>What is this?<|eot_id|>{ASSISTANT}"),
    "two images in two turns": (TWO_TURNS, f"{HEAD}{USER}<|image|>What is this?<|eot_id|>{ASSISTANT}A picture.<|eot_id|>"
                                           f"{USER}<|image|>And this?<|eot_id|>{ASSISTANT}"),
    "text only": (TEXT_ONLY, f"{HEAD}{SYSTEM}<|eot_id|>{USER}Hello there<|eot_id|>{ASSISTANT}"),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny preset, sharded, with the template where the hub repo has it (chat_template.json)."""
    return write_mllama_checkpoint(tmp_path_factory.mktemp("tiny"), **TINY, seed=3, max_shard_size="300KB",
                                   dtype=torch.float32)


@pytest.fixture(scope="module")
def loaded(ckpt):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(ckpt).eval(), AutoProcessor.from_pretrained(ckpt)


def test_the_directory_holds_the_hub_files_and_special_token_ids(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "chat_template.json"} <= names
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["MllamaForConditionalGeneration"]
    assert config["image_token_index"] == VOCAB == IMAGE  # the first of the 8 extra embedding rows
    eos = [IDS["<|end_of_text|>"], IDS["<|eom_id|>"], EOT]
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        BOS, eos, IDS["<|finetune_right_pad_id|>"])
    assert config["text_config"]["eos_token_id"] == eos
    # the 125M preset lays its ids out as Llama 3.2 does, 128000 -> 31744 and 128256 -> 32000
    big = special_token_ids(PRESETS["125m"]["text"]["vocab_size"])
    assert (big["<|begin_of_text|>"], big["<|eot_id|>"], big[IMAGE_TOKEN]) == (31744, 31753, 32000)


def test_transformers_loads_model_tokenizer_and_processor_offline(ckpt, loaded):
    from transformers import AutoTokenizer

    model, processor = loaded
    assert type(processor).__name__ == "MllamaProcessor"
    assert model.model.language_model.embed_tokens.weight.shape[0] == VOCAB + 8
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert len(tokenizer) == VOCAB + 1
    assert tokenizer.convert_ids_to_tokens([BOS, EOT, IMAGE]) == ["<|begin_of_text|>", "<|eot_id|>", IMAGE_TOKEN]
    assert tokenizer.convert_tokens_to_ids(list(LLAMA3_SPECIALS)) == list(range(VOCAB - 256, VOCAB))
    ids = tokenizer("Hello world, said the function.").input_ids  # the tokenizer adds BOS itself
    assert ids[0] == BOS and ids.count(BOS) == 1 and max(ids[1:]) < VOCAB - 256
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world, said the function."


@pytest.mark.parametrize("name", list(EXPECTED))
def test_apply_chat_template_tokenizes_the_llama32_format_with_one_bos(loaded, name):
    _, processor = loaded
    conversation, text = EXPECTED[name]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True, date_string=DATE) == text
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", date_string=DATE)
    ids = out["input_ids"][0].tolist()
    # the template writes <|begin_of_text|>, so tokenize=True turns the tokenizer's own BOS off ...
    assert ids == processor.tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(BOS) == 1 and ids[0] == BOS
    images = [part["image"] for m in conversation for part in m["content"] if part["type"] == "image"]
    # ... while processor(text=...) keeps it: a second BOS (the model card passes add_special_tokens=False)
    assert processor(text=text, images=[images] if images else None)["input_ids"][0] == [BOS, *ids]
    assert ids.count(IMAGE) == len(images)
    if not images:
        assert set(out) == {"input_ids", "attention_mask"}
        return
    tile = TINY["vision"]["image_size"]
    assert out["pixel_values"].shape == (1, len(images), 4, 3, tile, tile)  # batch, image, tile (padded to 4), C, H, W
    assert out["aspect_ratio_ids"].shape == out["aspect_ratio_mask"].shape[:2] == (1, len(images))
    mask = out["cross_attention_mask"][0]  # [tokens, images, tiles]
    assert mask.shape == (len(ids), len(images), 4)
    starts = [i for i, t in enumerate(ids) if t == IMAGE] + [len(ids)]
    tiles = out["aspect_ratio_mask"][0].sum(-1).tolist()  # 40x60 -> 4 tiles of 28 px, 20x20 -> 1
    assert tiles == [4, 1][: len(images)]
    for k in range(len(images)):  # image k is seen from its <|image|> up to the next image's, real tiles only
        seen = mask[:, k, :]
        assert not seen[: starts[k]].any() and not seen[starts[k + 1]:].any()
        assert (seen[starts[k]: starts[k + 1], : tiles[k]] == 1).all() and not seen[:, tiles[k]:].any()


def test_generate_runs_greedy_on_the_processors_inputs_and_sees_the_image(loaded):
    model, processor = loaded
    inputs = processor.apply_chat_template(TWO_TURNS, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", date_string=DATE)
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(new) == 6
        # greedy: every token is the argmax of one forward pass over the prompt and the tokens before it
        n = inputs["input_ids"].shape[1]
        full = {**inputs, "input_ids": out[:, :-1], "attention_mask": torch.ones_like(out[:, :-1]),
                "cross_attention_mask": torch.cat([inputs["cross_attention_mask"],
                                                   inputs["cross_attention_mask"][:, -1:].expand(1, 5, -1, -1)], 1)}
        logits = model(**full).logits[0, n - 1:]
        assert logits.argmax(-1).tolist() == new
        # the pixels reach the logits (the tanh gates are open)
        other = model(**{**full, "pixel_values": torch.rand_like(inputs["pixel_values"])}).logits[0, n - 1:]
        assert (other - logits).abs().max() > 1e-3


@pytest.mark.parametrize("template_file", TEMPLATE_FILES)
def test_each_template_placement_is_read_where_transformers_reads_it(tmp_path, template_file):
    from transformers import AutoProcessor, AutoTokenizer

    path = write_mllama_checkpoint(tmp_path / "c", **TINY, template_file=template_file)
    files = {"tokenizer_config": "tokenizer_config.json", "chat_template.json": "chat_template.json",
             "chat_template.jinja": "chat_template.jinja"}
    assert (path / files[template_file]).is_file()
    conversation, text = EXPECTED["one image"]
    processor = AutoProcessor.from_pretrained(path)
    if template_file == "tokenizer_config":
        # transformers 5.24: the processor reads chat_template.json/.jinja only; the tokenizer reads this one
        with pytest.raises(ValueError, match="does not have a chat template"):
            processor.apply_chat_template(conversation, add_generation_prompt=True)
        assert AutoTokenizer.from_pretrained(path).apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False, date_string=DATE) == text
    else:
        assert processor.apply_chat_template(conversation, add_generation_prompt=True, date_string=DATE) == text
