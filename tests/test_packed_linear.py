"""oneDNN-packed linear weights (llm/packed_linear.py): the same numbers as nn.Linear, lossless to undo,
and an engine serving with them gives the same greedy tokens as one without."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm.packed_linear import (PackedLinear, PackedMultiheadAttention, dense_copy, onednn_packing_works, pack_linears,
                               weight_bytes)

pytestmark = pytest.mark.skipif(not onednn_packing_works(), reason="this torch build has no oneDNN packed linear")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_computes_what_linear_computes(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for x in (torch.randn(1, 96), torch.randn(16, 96), torch.randn(37, 96), torch.randn(3, 5, 96),
                  torch.randn(8, 192)[:, ::2]):  # a strided (non-contiguous) input too
            assert packed(x).shape == linear(x).shape
            assert rel_err(packed(x), linear(x)) <= 1e-6
        assert packed(torch.randn(0, 96)).shape == (0, 200)


def test_unpacking_is_exact_and_a_dense_copy_converts():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    originals = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]
    before = weight_bytes(model)
    assert pack_linears(model) == 2 and pack_linears(model) == 0  # a second call finds nothing left
    assert weight_bytes(model) == before
    assert not any(type(m) is nn.Linear for m in model.modules())

    copy = dense_copy(model)
    linears = [m for m in copy.modules() if isinstance(m, nn.Linear)]
    assert [torch.equal(m.weight, w) for m, w in zip(linears, originals)] == [True, True]
    assert isinstance(model[0], PackedLinear)  # the original keeps its packed weights
    with torch.no_grad():
        x = torch.randn(3, 8)
        assert rel_err(model(x), copy(x)) <= 1e-6
    assert dense_copy(model).to(torch.bfloat16)[0].weight.dtype == torch.bfloat16


def test_only_fp32_cpu_weights_are_packed():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


def test_an_engine_with_packed_weights_decodes_the_same_tokens():
    from llm.models.coca import decoder_from_open_clip
    from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
    from llm.params import SamplingParams
    from tests.test_coca_oracle import SMALL_COCA, random_small_coca

    reference = random_small_coca(seed=3)
    with torch.inference_mode():
        _, embs = reference._encode_image(torch.randn(6, 3, 64, 64))
    outputs = []
    for pack in (False, True):
        decoder = decoder_from_open_clip(SMALL_COCA, reference.state_dict())
        engine = Engine(decoder, None, (), EngineConfig(block_size=4, kv_cache_bytes=1 << 20, pack_weights=pack))
        assert any(isinstance(m, PackedLinear) for m in decoder.modules()) == pack
        requests = [([1, *range(5, 5 + i)], ImageInput(tensor_digest(embs[i]), embs[i]),
                     SamplingParams(max_tokens=10, ignore_eos=True)) for i in range(6)]
        outputs.append([o.token_ids for o in engine.generate(requests)])
    assert outputs[0] == outputs[1]


def _masks(batch: int, heads: int, length: int):
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)  # True = may not attend
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    per_head = torch.randn(batch * heads, length, length)
    float_padding = torch.zeros(batch, length).masked_fill(padding, float("-inf"))
    return [{}, {"attn_mask": causal}, {"attn_mask": causal.float().masked_fill(causal, float("-inf"))},
            {"key_padding_mask": padding}, {"attn_mask": per_head, "key_padding_mask": float_padding},
            {"attn_mask": causal, "is_causal": True}]


@pytest.mark.parametrize("batch_first", [True, False])
def test_packed_attention_computes_what_multihead_attention_computes(batch_first):
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    packed = nn.Sequential(mha)
    assert pack_linears(packed) == 1 and isinstance(packed[0], PackedMultiheadAttention)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    y = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    with torch.inference_mode():
        for masks in _masks(3, 4, 7):
            for weights in (False, True):
                ours, ours_w = packed[0](x, x, x, need_weights=weights, **masks)
                ref, ref_w = mha(x, x, x, need_weights=weights, **masks)
                assert rel_err(ours, ref) <= 1e-5, masks
                assert (ours_w is None) == (ref_w is None) and (ref_w is None or rel_err(ours_w, ref_w) <= 1e-5)
        ours, ref = packed[0](x, y, y, need_weights=False)[0], mha(x, y, y, need_weights=False)[0]  # cross
        assert rel_err(ours, ref) <= 1e-5
        unbatched = x[:, 0] if batch_first else x[0]
        assert rel_err(packed[0](unbatched, unbatched, unbatched)[0], mha(unbatched, unbatched, unbatched)[0]) <= 1e-5


def test_packed_attention_with_its_own_key_and_value_widths():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(16, 2, kdim=24, vdim=24, batch_first=True).eval()  # open_clip's attention pool
    packed = PackedMultiheadAttention(mha)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 9, 24)
    with torch.inference_mode():
        assert rel_err(packed(q, kv, kv, need_weights=False)[0], mha(q, kv, kv, need_weights=False)[0]) <= 1e-5
    with pytest.raises(ValueError, match="bias_k"):
        PackedMultiheadAttention(nn.MultiheadAttention(16, 2, add_bias_kv=True))


def test_a_packed_open_clip_vit_tower_gives_the_same_features():
    import copy

    import open_clip

    torch.manual_seed(6)
    model = open_clip.create_model("coca_ViT-B-32", pretrained=None)  # random weights, no download
    tower = copy.deepcopy(model.visual).eval()
    assert pack_linears(tower) == 12 * 3 + 1  # per block: attention, c_fc, c_proj; the attention pool
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        (pooled, tokens), (ref_pooled, ref_tokens) = tower(images), model.visual.eval()(images)
    assert rel_err(tokens, ref_tokens) <= 1e-5 and rel_err(pooled, ref_pooled) <= 1e-5
