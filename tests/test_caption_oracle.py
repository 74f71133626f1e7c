"""The image-to-text families against transformers, the oracle: BLIP captioning and
VisionEncoderDecoderModel (ViT / DeiT / Swin / DonutSwin encoders, GPT-2 / TrOCR decoders), on
random-weight checkpoints transformers saved, with tokenizers built offline and image processors'
preprocessor_config.json.

Per family: the image tokens equal the reference encoder's states; every position's logits (through
the paged KV cache, whole prompt and token by token) equal transformers' forward to 1e-4 relative in
fp32; greedy tokens through the engine equal `generate(do_sample=False)` with the same length, start
tokens and end rule, with and without a text prefix.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from app.models.families import detect_family, load_family_model
from bench.caption_checkpoints import DECODERS, ENCODERS, write_blip, write_ved
from llm.generate import generate_greedy, teacher_forced_logits
from llm.params import SamplingParams

# (name, encoder, decoder, decoder overrides): each VED encoder once, each decoder option once
VED_CASES = [
    ("vit-gpt2", "vit", "gpt2", {}),
    ("deit-gpt2", "deit", "gpt2", {}),
    ("swin-trocr", "swin", "trocr", {}),
    ("donut-trocr", "donut-swin", "trocr", {"use_learned_position_embeddings": False, "scale_embedding": True,
                                            "layernorm_embedding": False}),
]
MAX_NEW = 12


def images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(40 + 3 * i, 36, 3, generator=g) * 255).byte().numpy()) for i in range(n)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2t")
    refs = {"blip": (root / "blip", write_blip(root / "blip"))}
    for name, enc, dec, overrides in VED_CASES:
        refs[name] = (root / name, write_ved(root / name, enc, dec, decoder_shape={**DECODERS[dec], **overrides}))
    return refs


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {name: load_family_model(path) for name, (path, _) in checkpoints.items()}


NAMES = ["blip", *(c[0] for c in VED_CASES)]


def reference_states(name: str, ref, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if name == "blip":
            return ref.vision_model(pixel_values=pixel_values).last_hidden_state
        states = ref.encoder(pixel_values=pixel_values).last_hidden_state
        return ref.enc_to_dec_proj(states) if hasattr(ref, "enc_to_dec_proj") else states


def reference_logits(name: str, ref, pixel_values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if name == "blip":
            return ref(pixel_values=pixel_values, input_ids=ids).logits
        return ref(pixel_values=pixel_values, decoder_input_ids=ids).logits


def reference_generate(name: str, ref, pixel_values: torch.Tensor, prefix: list[int]) -> list[list[int]]:
    """transformers' generate, greedy; the new tokens of each row, end token excluded. `prefix`: BLIP's
    text prefix; a VED's whole decoder prompt."""
    b = pixel_values.shape[0]
    with torch.inference_mode():
        if name == "blip":  # the processor's [CLS] prefix [SEP]: generate swaps [CLS] for [DEC], drops [SEP]
            from bench.caption_checkpoints import CLS, SEP
            ids = torch.tensor([[CLS, *prefix, SEP]] * b)
            out = ref.generate(pixel_values=pixel_values, input_ids=ids, do_sample=False, max_new_tokens=MAX_NEW)
            start, end = 1 + len(prefix), ref.config.text_config.sep_token_id
        else:
            # `prefix` is the whole decoder prompt here: generate adds no start token before a Donut's
            # (donut-swin encoder's) prompt, so ours says where it starts
            out = ref.generate(pixel_values=pixel_values, decoder_input_ids=torch.tensor([prefix] * b),
                               do_sample=False, max_new_tokens=MAX_NEW)
            start, end = len(prefix), ref.generation_config.eos_token_id
    rows = []
    for row in out.tolist():
        new = row[start:]
        rows.append(new[: new.index(end)] if end in new else new)
    return rows


def test_detected(checkpoints):
    assert detect_family(checkpoints["blip"][0]) == "blip"
    assert all(detect_family(checkpoints[c[0]][0]) == "ved" for c in VED_CASES)


@pytest.mark.parametrize("name", NAMES)
def test_image_tokens_are_the_reference_states(name, checkpoints, loaded):
    model, ref = loaded[name], checkpoints[name][1]
    ims = images(2)
    pixels = model.encoder.preprocess(ims)
    ours = torch.stack([f.tokens for f in model.encoder.encode(ims)])
    torch.testing.assert_close(ours, reference_states(name, ref, pixels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, checkpoints, loaded):
    model, ref = loaded[name], checkpoints[name][1]
    ims = images(2, seed=1)
    pixels = model.encoder.preprocess(ims)
    tokens = torch.stack([f.tokens for f in model.encoder.encode(ims)])
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(8, model.decoder.vocab_size, (2, 9), generator=g)
    ids[:, 0] = model.start_id
    expected = reference_logits(name, ref, pixels, ids)
    scale = expected.abs().max()
    for chunk in (None, 1):
        ours = teacher_forced_logits(model.decoder, tokens, ids, chunk=chunk)
        assert ((ours - expected).abs().max() / scale) <= 1e-4, chunk


# every family plainly; a text prefix (BLIP's conditional captioning, a VED task prompt) on one of each
GREEDY = [(name, "") for name in NAMES] + [("blip", "a picture of"), ("donut-trocr", "a picture of")]


@pytest.mark.parametrize(("name", "prefix_words"), GREEDY)
def test_greedy_tokens_match_generate(name, prefix_words, checkpoints, loaded):
    model, ref = loaded[name], checkpoints[name][1]
    ims = images(2, seed=3)
    pixels = model.encoder.preprocess(ims)
    features = model.encoder.encode(ims)
    prompt = model.prompt_ids(prefix_words)
    expected = reference_generate(name, ref, pixels, prompt[1:] if name == "blip" else prompt)
    params = SamplingParams(max_tokens=MAX_NEW, stop_token_ids=model.stop_ids)
    ours = generate_greedy(model.decoder, [f.tokens for f in features], [prompt] * len(ims), params)
    assert ours == expected
    assert any(len(row) > 2 for row in ours), "degenerate checkpoint: every caption ends at once"


def test_unsupported_architecture_named(tmp_path):
    import json

    from llm.loading.errors import ModelDirError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Pix2StructForConditionalGeneration"]}))
    with pytest.raises(ModelDirError, match="Pix2StructForConditionalGeneration.*supported: .*blip.*ved"):
        detect_family(tmp_path)


def test_unsupported_ved_decoder_named(tmp_path, checkpoints):
    import json
    import shutil

    from llm.loading.errors import ModelDirError

    path = tmp_path / "ved"
    shutil.copytree(checkpoints["vit-gpt2"][0], path)
    config = json.loads((path / "config.json").read_text())
    config["decoder"]["model_type"] = "xglm"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="decoder 'xglm' is not supported; supported: gpt2, trocr"):
        load_family_model(path)
