"""The K/V pools' storage (llm/kv_cache.py): the int8 format's rounding bound, how many blocks a budget
holds, int8 K/V attention against bf16 K/V on whole decoders, and the engine with int8 pools (batch
invariance, seeded sampling, the same answers as fp32 on the demo model)."""

from __future__ import annotations

import pytest
import torch

from llm.attention import KVShape
from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
from llm.generate import teacher_forced_logits
from llm.kv_cache import (QUANTIZED, PagedKVCache, QuantizedKV, bytes_per_token, dense, quantize,
                          resolve_kv_dtype, write_kv)
from llm.models.mllama import MllamaDecoder, mllama_decoder_from_hf_model
from llm.packed_linear import dense_copy
from llm.params import SamplingParams
from tests.test_engine import engine, mixed_requests, scenes, images  # noqa: F401 - fixtures
from tests.test_quant import image_tokens, prompts, rel_err, tiny_coca, tiny_hf, token_rows  # noqa: F401


def test_int8_rounds_each_token_and_head_to_half_a_step_of_its_own_range():
    x = torch.randn(64, 4, 32) * torch.logspace(-3, 3, 64)[:, None, None]  # ranges 1e-3 .. 1e3 per token
    q, scale, zero = quantize(x)
    assert q.dtype == torch.int8 and scale.shape == zero.shape == (64, 4, 1)
    back = QuantizedKV(q, scale, zero).dequantize(torch.float32)
    # a step is a 255th of the vector's range, but no finer than float16's smallest normal number (6.1e-5:
    # vectors whose values all lie within 0.016 of each other round to within 3.1e-5 instead)
    step = ((x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 255).clamp_min(torch.finfo(torch.float16).tiny)
    # half a step, plus what float16 scale/zero and the fp32 multiply-add round (parts in 10^3 of a step)
    assert ((back - x).abs() <= step * 0.502).all()
    constant = torch.full((3, 2, 8), 0.75)
    assert torch.equal(QuantizedKV(*quantize(constant)).dequantize(torch.float32), constant)


def test_an_int8_pool_writes_and_reads_through_slots_as_a_tensor_does():
    shape = KVShape(layers=1, kv_heads=2, head_dim=16)
    plain, int8 = PagedKVCache(shape, 32, torch.float32, "cpu"), PagedKVCache(shape, 32, QUANTIZED, "cpu")
    x, slots = torch.randn(5, 2, 16), torch.tensor([3, 17, 4, 30, 0])
    write_kv(plain.k[0], slots, x)
    write_kv(int8.k[0], slots, x)
    read = torch.tensor([[0, 3], [30, 4]])
    ours = dense(int8.k[0].index_select(0, read.reshape(-1)).view(2, 2, 2, 16), torch.float32)
    ref = plain.k[0].index_select(0, read.reshape(-1)).view(2, 2, 2, 16)
    assert torch.allclose(ours, ref, atol=float(x.abs().max()) * 2 / 255)
    assert torch.equal(dense(int8.k[0].narrow(0, 3, 2), torch.float32)[0], ours[0, 1])


def test_block_count_follows_the_bytes_of_a_block_scales_included():
    shape = KVShape(layers=12, kv_heads=4, head_dim=64)
    assert bytes_per_token(shape, torch.bfloat16) == 2 * 12 * 4 * 64 * 2
    assert bytes_per_token(shape, QUANTIZED) == 2 * 12 * 4 * (64 + 2 + 2)  # int8 values, fp16 scale and zero
    budget, block = 256 << 20, 16
    bf16 = PagedKVCache.blocks_for_budget(shape, budget, block, torch.bfloat16)
    int8 = PagedKVCache.blocks_for_budget(shape, budget, block, QUANTIZED)
    assert bf16 == budget // (12288 * block) and int8 == budget // (6528 * block)
    assert int8 / bf16 > 1.88  # 128 / 68 more tokens, so more sequences, in the same bytes
    pool = PagedKVCache(KVShape(2, 2, 8), 5 * 4, QUANTIZED, "cpu")
    assert pool.bytes == 20 * bytes_per_token(KVShape(2, 2, 8), QUANTIZED)
    assert resolve_kv_dtype("auto", torch.bfloat16) == torch.bfloat16 and resolve_kv_dtype("int8", torch.float32) == QUANTIZED
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16, float16, int8; got 'int4'"):
        resolve_kv_dtype("int4", torch.float32)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")


@pytest.mark.parametrize("build", [lambda hf: mllama_decoder_from_hf_model(hf, dtype=torch.bfloat16),
                                   lambda _: tiny_coca().to(torch.bfloat16)], ids=["mllama", "coca"])
def test_int8_kv_attention_tracks_bf16_kv(tiny_hf, build):
    """Both pools int8 against both bf16, on a bf16 decoder, through chunked prefill and the decode
    path (chunk 1). Bound: int8 rounds each K/V element by at most (max - min) / 510 of its (token,
    head) vector, about max|x| / 255: twice bf16's own rounding (max|x| / 512 at worst), so the logits
    may move about as much as bf16 moves them from fp32, whose bound is 3e-2 (test_mllama_oracle)."""
    model = build(tiny_hf)
    images = image_tokens(model, 3, seed=40)
    ids = (token_rows(3, 12, seed=41) if isinstance(model, MllamaDecoder)  # <|image|> second: the rest see it
           else torch.randint(1, model.vocab_size, (3, 12), generator=torch.Generator().manual_seed(41)))
    for chunk in (5, 1):
        ref = teacher_forced_logits(model, images, ids, chunk=chunk, kv_dtype=torch.bfloat16)
        ours = teacher_forced_logits(model, images, ids, chunk=chunk, kv_dtype=QUANTIZED)
        assert rel_err(ours, ref) <= 3e-2, chunk
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9, chunk


def test_int8_kv_engine_is_batch_invariant_and_seeded(tiny_hf):
    model = mllama_decoder_from_hf_model(tiny_hf, dtype=torch.bfloat16)
    eng = Engine(model, None, (), EngineConfig(block_size=4, kv_cache_bytes=1 << 20, kv_cache_dtype="int8"))
    assert isinstance(eng.runner.k_pool[0], QuantizedKV) and eng.runner.cross_pool.dtype == QUANTIZED
    rows, inputs = prompts(model, 4, seed=6), [ImageInput(tensor_digest(e), e) for e in image_tokens(model, 4, seed=5)]
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    together = eng.generate([(r, i, greedy) for r, i in zip(rows, inputs)])
    for r, i, batched in zip(rows, inputs, together):
        assert eng.generate([(r, i, greedy)])[0].token_ids == batched.token_ids
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    alone = eng.generate([(rows[0], inputs[0], seeded)])[0].token_ids
    crowd = eng.generate([(rows[0], inputs[0], seeded)] + [(r, i, greedy) for r, i in zip(rows[1:], inputs[1:])])
    assert crowd[0].token_ids == alone


def test_int8_kv_pools_give_the_demo_models_answers(demo_runtime, scenes, images):  # noqa: F811
    """The bundled model in bf16 with both pools int8 against fp32 throughout, on 16 mixed requests;
    bf16 weights alone keep >= 13 of them (test_engine), so int8 K/V on top may cost none beyond that."""
    requests = mixed_requests(demo_runtime, scenes, images)
    full = engine(demo_runtime).generate(requests)
    bf16 = dense_copy(demo_runtime.decoder).to(torch.bfloat16)
    int8 = Engine(bf16, demo_runtime.tokenizer, demo_runtime.stop_ids,
                  EngineConfig(block_size=4, kv_cache_bytes=8 << 20, max_num_seqs=16, kv_cache_dtype="int8"))
    same = sum(a.token_ids == b.token_ids for a, b in zip(full, int8.generate(requests)))
    assert same >= 13
