"""oneDNN-packed linear weights (llm/packed_linear.py): the same numbers as nn.Linear, lossless to undo,
and an engine serving with them gives the same greedy tokens as one without."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm.packed_linear import PackedLinear, dense_copy, onednn_packing_works, pack_linears, weight_bytes

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
    from llm.coca import decoder_from_open_clip
    from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
    from llm.sampling import SamplingParams
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
