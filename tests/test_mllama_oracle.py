"""Our Mllama decoder and vision encoder against transformers' MllamaForConditionalGeneration (5.24):
logits to 1e-4 relative in fp32, full-prompt and through the paged KV cache, and greedy tokens identical
to `generate(do_sample=False)`; on a tiny random config and on one of 125M parameters (12 x 768, GQA 12/4,
vocab 32k). Every weight is randomised, the tanh gates (zero at init) included, so no path hides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from llm.cross_plan import ImageSpan
from llm.generate import generate_greedy, teacher_forced_logits
from llm.params import SamplingParams
from llm.model_runner import compiled_for_decode
from llm.packed_linear import PackedLinear, onednn_packing_works, pack_linears
from llm.models.mllama import MllamaDecoderConfig, mllama_decoder_from_hf_model, mllama_from_hf_dir, rope_inv_freq
from llm.loading.errors import ModelDirError
from llm.loading.hf import load_tensors, read_config, read_json
from vision.encoders.mllama import VISION_PREFIXES, MllamaPreprocessCfg, MllamaVisionEncoder

BOS, EOS_UNUSED, PAD = 1, 2, 3
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0}
# 28-pixel tiles of 14-pixel patches: 4 patches + CLS per tile (padded to 8 inside the vision model)
SMALL_VISION = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
                    vision_output_dim=96, image_size=28, patch_size=14, max_num_tiles=4,
                    intermediate_layers_indices=[0, 1])
TINY_TEXT = dict(vocab_size=120, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, cross_attention_layers=[1, 3], max_position_embeddings=256,
                 rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 64})
MEDIUM_TEXT = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, intermediate_size=2048, cross_attention_layers=[3, 8],
                   max_position_embeddings=131072,
                   rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 8192})
MEDIUM_VISION = {**SMALL_VISION, "hidden_size": 64, "intermediate_size": 128, "vision_output_dim": 192}
PREPROCESS = MllamaPreprocessCfg(tile_size=28, max_image_tiles=4, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
# image sizes (h, w) -> tiles of 28 px: 1 (1x1), 2 (1x2), 3 (1x3), 4 (2x2)
SIZES = {1: (20, 20), 2: (20, 40), 3: (20, 60), 4: (40, 44)}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


def random_mllama(text: dict, vision: dict, seed: int = 0) -> MllamaForConditionalGeneration:
    torch.manual_seed(seed)
    image_token = text["vocab_size"]  # <|image|> is the first of the 8 ids past the vocabulary, as in Llama 3.2
    config = MllamaConfig(vision_config=vision, image_token_index=image_token,
                          text_config={**text, "bos_token_id": BOS, "eos_token_id": EOS_UNUSED, "pad_token_id": PAD})
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):  # tanh gates: zero (closed) at init
                p.uniform_(-1.5, 1.5)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif p.ndim == 1:  # biases, class embedding
                p.normal_(0.0, 0.2)
            elif "embed" in name and "patch" not in name:  # token, position and tile embeddings
                p.normal_(0.0, 0.5)
            else:  # projections: fan-in scaled, so activations stay O(1) at every depth
                p.normal_(0.0, 1.5 * (p[0].numel()) ** -0.5)
    return model


def images(tiles: list[int], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*SIZES[t], 3), dtype=np.uint8)) for t in tiles]


def hf_forward_inputs(encoder: MllamaVisionEncoder, pictures: list[Image.Image], ids: list[list[int]],
                      image_token: int) -> dict:
    """What MllamaProcessor gives transformers: pixels, aspect ratios, and the cross-attention mask
    (a row sees its image's real tiles from the first <|image|> on)."""
    inputs = encoder.preprocess(pictures)
    spans = [get_cross_attention_token_mask(row, image_token) for row in ids]  # [] without <|image|>
    mask = convert_sparse_cross_attention_mask_to_dense(spans, inputs["num_tiles"], PREPROCESS.max_image_tiles,
                                                        len(ids[0]))
    return {"pixel_values": inputs["pixel_values"], "aspect_ratio_ids": inputs["aspect_ratio_ids"],
            "aspect_ratio_mask": inputs["aspect_ratio_mask"], "cross_attention_mask": torch.from_numpy(mask)}


def our_tokens(encoder: MllamaVisionEncoder, pictures: list[Image.Image]) -> list[torch.Tensor]:
    return [f.tokens for f in encoder.encode(pictures)]


def our_attended(encoder: MllamaVisionEncoder, pictures: list[Image.Image]) -> list[int]:
    return [f.attended_tokens for f in encoder.encode(pictures)]


def prompts_for(tiles: list[int], length: int, vocab: int, image_token: int, seed: int) -> list[list[int]]:
    """<|begin_of_text|><|image|>...: the BOS row comes before the image, so it attends to every
    image token, padding tiles included, while the rest see the real tiles only (llm/models/mllama.py)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in tiles:
        text = torch.randint(4, vocab, (length - 2,), generator=g).tolist()
        rows.append([BOS, image_token, *text])
    return rows


@pytest.fixture(scope="module")
def tiny():
    model = random_mllama(TINY_TEXT, SMALL_VISION)
    return model, mllama_decoder_from_hf_model(model), MllamaVisionEncoder.from_hf_model(model, PREPROCESS)


# --- the vision side -------------------------------------------------------------------------------

def test_vision_tokens_are_the_cross_attention_states_transformers_uses(tiny):
    model, _, encoder = tiny
    tiles = [1, 2, 3, 4]
    pictures = images(tiles, seed=1)
    image_token = model.config.image_token_index
    ids = [[BOS, image_token, 5, 6]] * len(tiles)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(states=kwargs["cross_attention_states"]), with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor(ids), **hf_forward_inputs(encoder, pictures, ids, image_token))
    finally:
        hook.remove()
    patches = model.model.vision_model.num_patches
    states = seen["states"].reshape(len(tiles), PREPROCESS.max_image_tiles * patches, -1)
    for i, (t, features) in enumerate(zip(tiles, encoder.encode(pictures))):
        assert features.tokens.shape == (PREPROCESS.max_image_tiles * patches, TINY_TEXT["hidden_size"])
        assert features.attended_tokens == t * patches  # real tiles first, then the padding ones
        assert rel_err(features.tokens, states[i]) <= 1e-5, t


def test_encoder_settings_name_the_features(tiny):
    model, _, encoder = tiny
    assert encoder.preprocess_cfg.to_dict()["max_image_tiles"] == 4
    other = random_mllama(TINY_TEXT, SMALL_VISION, seed=1)
    assert MllamaVisionEncoder.from_hf_model(other, PREPROCESS).weights_digest != encoder.weights_digest
    assert MllamaVisionEncoder.from_hf_model(model, PREPROCESS).weights_digest == encoder.weights_digest
    feats = encoder.encode(images([2], seed=3))[0]
    assert feats.attended_tokens < feats.tokens.shape[0]  # 2 of 4 tiles: the pooled latent averages the real ones
    assert torch.equal(feats.pooled, feats.tokens[: feats.attended_tokens].mean(0))


# --- the decoder: logits ---------------------------------------------------------------------------

def check_logits(model, decoder, encoder, tiles, length, seed, chunks=(None, 1, 5), forward=None) -> dict:
    image_token = model.config.image_token_index
    pictures = images(tiles, seed)
    ids = prompts_for(tiles, length, decoder.vocab_size, image_token, seed)
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor(ids), **hf_forward_inputs(encoder, pictures, ids, image_token)).logits
    tokens, attended = our_tokens(encoder, pictures), our_attended(encoder, pictures)
    errors = {chunk: rel_err(teacher_forced_logits(decoder, tokens, torch.tensor(ids), chunk=chunk,
                                                   attended_tokens=attended, forward=forward), ref)
              for chunk in chunks}
    assert all(e <= 1e-4 for e in errors.values()), errors
    return errors


def test_tiny_logits_match_transformers_full_and_incremental(tiny):
    """Rows of 4, 1, 2 and 3 tiles; chunk None = whole prompt, 1 = token by token, 5 = chunked
    prefill, all through the paged KV cache."""
    model, decoder, encoder = tiny
    check_logits(model, decoder, encoder, [4, 1, 2, 3, 4], length=13, seed=2)


def test_tiny_logits_match_transformers_with_onednn_packed_weights(tiny):
    """The same, with the linear weights packed as the engine serves them on a CPU."""
    model, _, encoder = tiny
    packed = mllama_decoder_from_hf_model(model)
    # self-attention layers: qkv, o, gate_up, down; cross-attention layers: q, k, v, o, gate_up, down
    assert onednn_packing_works() and pack_linears(packed) == 3 * 4 + 2 * 6 + 1
    check_logits(model, packed, encoder, [4, 1, 2, 3, 4], length=13, seed=2)


def test_compiled_decode_steps_match_transformers(tiny):
    """Decode steps through torch.compile (EngineConfig.compile_decode) on packed weights: a batch of
    rows whose images differ in length (keys gathered and masked), and a lone row (keys read in place)."""
    model, _, encoder = tiny
    packed = mllama_decoder_from_hf_model(model)
    pack_linears(packed)
    compiled = compiled_for_decode(packed)
    check_logits(model, packed, encoder, [4, 1, 2, 3, 4], length=13, seed=2, chunks=(1,), forward=compiled)
    check_logits(model, packed, encoder, [2], length=9, seed=3, chunks=(1,), forward=compiled)


@pytest.mark.parametrize("tiles", [[4, 4, 4, 4], [1, 2, 3, 1]], ids=["full-images", "padding-tiles"])
def test_rows_before_the_image_follow_transformers(tiny, tiles):
    """Several text tokens before <|image|> (as Llama 3.2's chat template writes: the user header
    comes first), and a prompt with no <|image|> at all: such rows attend to every image token, the
    padding tiles of a small image included, with no MLP, as transformers does; rows from <|image|>
    on see the real tiles only."""
    model, decoder, encoder = tiny
    image_token = model.config.image_token_index
    pictures = images(tiles, seed=4)
    ids = [[BOS, 7, 8, 9, image_token, 10, 11, 12],
           [BOS, 7, 8, 9, 10, 11, 12, 13],
           [BOS, image_token, 30, 31, 32, 33, 34, 35],
           [BOS, 7, 8, 9, 10, 11, image_token, 12]]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor(ids), **hf_forward_inputs(encoder, pictures, ids, image_token)).logits
    tokens, attended = our_tokens(encoder, pictures), our_attended(encoder, pictures)
    for chunk in (None, 1, 3):
        ours = teacher_forced_logits(decoder, tokens, torch.tensor(ids), chunk=chunk, attended_tokens=attended)
        assert rel_err(ours, ref) <= 1e-4, chunk
    no_token = decoder.cross_plan(ids[1], [ImageSpan(len(tokens[1]), attended[1])])
    assert no_token.visible_from == decoder.context_length  # no <|image|>: no position is at or after it


def test_bf16_decoder_tracks_fp32_transformers(tiny):
    """Weights, pool and activations in bf16 (RoPE angles stay fp32): close to the fp32 reference."""
    model, decoder, encoder = tiny
    half = mllama_decoder_from_hf_model(model, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    image_token = model.config.image_token_index
    pictures = images([4, 1], seed=12)
    ids = prompts_for([4, 1], 10, decoder.vocab_size, image_token, seed=12)
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor(ids), **hf_forward_inputs(encoder, pictures, ids, image_token)).logits
    ours = teacher_forced_logits(half, our_tokens(encoder, pictures), torch.tensor(ids), chunk=3,
                                 attended_tokens=our_attended(encoder, pictures))
    assert rel_err(ours, ref) <= 3e-2


# --- the decoder: greedy generation ----------------------------------------------------------------

def hf_greedy(model, encoder, picture, prompt, max_new_tokens, eos) -> list[int]:
    """transformers' generate(do_sample=False) for one prompt; its end token dropped."""
    inputs = hf_forward_inputs(encoder, [picture], [prompt], model.config.image_token_index)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), **inputs, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD)
    new = out[0, len(prompt):].tolist()
    return new[:-1] if new and new[-1] == eos else new


def check_greedy(model, decoder, encoder, tiles, lengths, max_new_tokens, seed):
    image_token = model.config.image_token_index
    pictures = images(tiles, seed)
    prompts = [prompts_for([t], n, decoder.vocab_size, image_token, seed + i)[0]
               for i, (t, n) in enumerate(zip(tiles, lengths))]
    tokens, attended = our_tokens(encoder, pictures), our_attended(encoder, pictures)
    # as end token, a token one row emits after others (random models repeat themselves): that row
    # stops early there, the others may run to max_new_tokens
    free = generate_greedy(decoder, tokens, prompts, SamplingParams(max_new_tokens), attended_tokens=attended)
    row, stop_at = next((r, k) for r, gen in enumerate(free) for k in range(1, len(gen)) if gen[k] not in gen[:k])
    eos = free[row][stop_at]
    ours = generate_greedy(decoder, tokens, prompts, SamplingParams(max_new_tokens, stop_token_ids=(eos,)),
                           attended_tokens=attended)
    for i in range(len(prompts)):
        assert ours[i] == hf_greedy(model, encoder, pictures[i], prompts[i], max_new_tokens, eos), i
    assert ours[row] == free[row][:stop_at]
    return ours


def test_tiny_greedy_tokens_match_transformers_generate(tiny):
    model, decoder, encoder = tiny
    ours = check_greedy(model, decoder, encoder, tiles=[4, 1, 3, 4], lengths=[5, 9, 3, 12], max_new_tokens=12,
                        seed=5)
    assert any(len(o) == 12 for o in ours)  # some row ran to max_new_tokens


# --- a 125M-parameter config (12 layers x 768, GQA 12/4, vocab 32k) ------------------------------------

def test_medium_mllama_logits_and_greedy_match_transformers():
    model = random_mllama(MEDIUM_TEXT, MEDIUM_VISION, seed=7)
    decoder = mllama_decoder_from_hf_model(model, max_context=4096)
    encoder = MllamaVisionEncoder.from_hf_model(model, PREPROCESS)
    assert decoder.context_length == 4096 and decoder.kv_shape.kv_heads == 4
    text_params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert 100e6 <= sum(p.numel() for p in model.parameters()) <= 300e6
    assert sum(p.numel() for p in decoder.parameters()) == text_params
    check_logits(model, decoder, encoder, [4, 2], length=20, seed=8)
    check_greedy(model, decoder, encoder, tiles=[4, 1], lengths=[6, 10], max_new_tokens=16, seed=9)
    assert isinstance(decoder.lm_head, PackedLinear)  # the engine packed it: the served path matches too
    check_logits(model, decoder, encoder, [4, 2], length=20, seed=8)


# --- configuration and loading ---------------------------------------------------------------------

@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0},
                                  {**LLAMA3_ROPE, "original_max_position_embeddings": 64}])
def test_rope_frequencies_equal_transformers(rope):
    config = MllamaConfig(text_config={**TINY_TEXT, "rope_parameters": rope}, vision_config=SMALL_VISION)
    ours = rope_inv_freq(MllamaDecoderConfig.from_hf(config.to_dict()))
    assert torch.equal(ours, MllamaRotaryEmbedding(config.text_config).inv_freq)


def test_config_reads_pre_v5_rope_fields_and_caps_the_context():
    text = {**TINY_TEXT, "rope_theta": 123.0, "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                                              "high_freq_factor": 8.0,
                                                              "original_max_position_embeddings": 32}}
    del text["rope_parameters"]
    cfg = MllamaDecoderConfig.from_hf({"text_config": text, "image_token_index": 120}, max_context=100)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_context) == ("llama3", 123.0, 4.0, 32)
    assert cfg.context_length == 100 and cfg.image_token_id == 120
    with pytest.raises(ValueError, match="RoPE type"):
        MllamaDecoderConfig.from_hf({"text_config": {**text, "rope_scaling": {"type": "yarn"}}})


def test_loader_reads_a_saved_checkpoint(tiny, tmp_path):
    model, _, encoder = tiny
    decoder = mllama_decoder_from_hf_model(model)  # not the fixture's: an engine may have packed its weights
    model.save_pretrained(tmp_path / "one")
    encoder.processor.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    image_token = model.config.image_token_index
    pictures = images([4, 2], seed=10)
    ids = torch.tensor(prompts_for([4, 2], 9, decoder.vocab_size, image_token, seed=10))
    attended = our_attended(encoder, pictures)
    expected = teacher_forced_logits(decoder, our_tokens(encoder, pictures), ids, attended_tokens=attended)
    for d in ("one", "sharded"):
        loaded = mllama_from_hf_dir(tmp_path / d)
        assert loaded.cfg == decoder.cfg
        assert torch.equal(teacher_forced_logits(loaded, our_tokens(encoder, pictures), ids,
                                                 attended_tokens=attended), expected), d
    one = tmp_path / "one"
    loaded_encoder = MllamaVisionEncoder.from_state(read_config(one)["vision_config"],
                                                    load_tensors(one, VISION_PREFIXES),
                                                    read_json(one / "preprocessor_config.json"), "one")
    assert loaded_encoder.weights_digest == encoder.weights_digest
    assert loaded_encoder.preprocess_cfg == encoder.preprocess_cfg
    for ours, theirs in zip(our_tokens(loaded_encoder, pictures), our_tokens(encoder, pictures)):
        assert torch.equal(ours, theirs)


def test_loader_errors_name_the_missing_file(tiny, tmp_path):
    model, _, _ = tiny
    with pytest.raises(ModelDirError, match=str(tmp_path / "nowhere" / "config.json")):
        mllama_from_hf_dir(tmp_path / "nowhere")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=f"{tmp_path / 'm'} has no \\*.safetensors weights"):
        mllama_from_hf_dir(tmp_path / "m")
    with pytest.raises(ModelDirError, match=str(tmp_path / "m" / "preprocessor_config.json")):
        read_json(tmp_path / "m" / "preprocessor_config.json")
    model.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    shard = sorted((tmp_path / "s").glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelDirError, match=str(shard)):
        mllama_from_hf_dir(tmp_path / "s")
