"""llm/models/bart.py against transformers' own BART and mBART (5.24): logits to 1e-4 relative in fp32,
over the memory given (VisionEncoderDecoder's case) and with the encoder attached (Florence-2's), whole
prompts and one token at a time through the paged KV cache; greedy tokens equal to
`generate(do_sample=False)`, whose end rules (decoder_start_token_id, forced_eos_token_id at the length
limit) the comparison spells out. Random weights, every tensor random."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

from llm.generate import generate_greedy, teacher_forced_logits
from llm.loading.bart_weights import BartLayout, bart_decoder
from llm.models.bart import BartConfig as OurConfig
from llm.models.interfaces import DecoderModel
from llm.params import SamplingParams

TINY = dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
LAYOUT = BartLayout(decoder="model.decoder.", encoder="model.encoder.", logits_bias="final_logits_bias",
                    embeddings=("model.shared.weight", "model.decoder.embed_tokens.weight"), lm_head=("lm_head.weight",))


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random at a scale that keeps activations O(1): matrices fan-in scaled, norms
    around 1, biases and the logits bias small but non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name or "shared" in name else p.shape[1] ** -0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "final_logits_bias" in name:
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
    return model.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=["bart", "mbart"])
def pair(request):
    torch.manual_seed(0)
    if request.param == "bart":
        hf = BartForConditionalGeneration(BartConfig(**TINY, activation_function="gelu"))
    else:
        hf = MBartForConditionalGeneration(MBartConfig(**TINY, scale_embedding=True, decoder_start_token_id=2,
                                                       activation_function="relu"))
    hf = randomize(hf, seed=1)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    config = hf.config.to_dict()
    dec_cfg = OurConfig.from_hf(config, "decoder", logits_bias=True)
    enc_cfg = OurConfig.from_hf(config, "encoder")
    plain = bart_decoder(sd, LAYOUT, dec_cfg)
    attached = bart_decoder(sd, LAYOUT, dec_cfg, enc_cfg)
    return hf, plain, attached


def inputs(seed: int, batch: int = 2, src: int = 9, tgt: int = 7):
    g = torch.Generator().manual_seed(seed)
    src_ids = torch.randint(3, TINY["vocab_size"], (batch, src), generator=g)
    tgt_ids = torch.cat([torch.full((batch, 1), 2), torch.randint(3, TINY["vocab_size"], (batch, tgt - 1), generator=g)], 1)
    return src_ids, tgt_ids


def test_decoder_declares_the_engine_protocol(pair):
    _, plain, attached = pair
    assert isinstance(plain, DecoderModel) and isinstance(attached, DecoderModel)
    assert plain.cross_kv_shape.layers == TINY["decoder_layers"] and plain.context_length == TINY["max_position_embeddings"]


@torch.inference_mode()
def test_logits_match_transformers_given_memory_and_with_the_encoder_attached(pair):
    hf, plain, attached = pair
    src_ids, tgt_ids = inputs(seed=3)
    ref = hf(input_ids=src_ids, decoder_input_ids=tgt_ids).logits
    memory = hf.get_encoder()(input_ids=src_ids).last_hidden_state
    for chunk in (None, 1, 3):
        assert rel_err(teacher_forced_logits(plain, memory, tgt_ids, chunk=chunk), ref) < 1e-4
    embeds = attached.embed(src_ids)
    assert rel_err(teacher_forced_logits(attached, embeds, tgt_ids, chunk=2), ref) < 1e-4


@torch.inference_mode()
def test_greedy_tokens_match_generate(pair):
    """generate starts at decoder_start_token_id and, with forced_eos_token_id (BART's default), makes
    the last token of max_new_tokens the end token: ours is the same run one token shorter."""
    hf, plain, _ = pair
    src_ids, _ = inputs(seed=5, batch=3)
    n = 12
    ref = hf.generate(input_ids=src_ids, do_sample=False, num_beams=1, max_new_tokens=n, min_length=0)
    memory = hf.get_encoder()(input_ids=src_ids).last_hidden_state
    eos, start = hf.config.eos_token_id, hf.config.decoder_start_token_id
    ours = generate_greedy(plain, memory, [[start]] * 3, SamplingParams(max_tokens=n - 1, stop_token_ids=(eos,)))
    for row, out in zip(ref.tolist(), ours):
        expected = [start, *out, eos]
        assert row[: len(expected)] == expected, (row, expected)
        assert len(out) >= 3  # a real run, not an end token at once
        assert all(t == hf.config.pad_token_id for t in row[len(expected):])
