"""Visual-token reduction (vision/reduce.py): counts, exact values, invariants, and the decoder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.models.coca import decoder_from_open_clip
from llm.generate import generate_greedy
from llm.params import SamplingParams
from tests.test_coca_oracle import SMALL_COCA, random_small_coca
from vision.reduce import ReductionSpec, keep_salient, pool_grid, reduce, tome_merge

RATIOS = (1.0, 0.5, 0.25, 0.125)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- counts and shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("method, expected", [("pool", (64, 16, 16, 9)), ("tome", (64, 32, 16, 8)),
                                              ("keep", (64, 32, 16, 8)), ("none", (64, 64, 64, 64))])
def test_counts_on_an_8x8_grid(method, expected):
    tokens = randn(2, 64, 32)
    for ratio, count in zip(RATIOS, expected):
        spec = ReductionSpec(method, ratio if method != "none" else 1.0)
        assert spec.resolve(64, (8, 8)) == count
        assert reduce(tokens, spec, grid=(8, 8)).shape == (2, count, 32)
        assert reduce(tokens[0], spec, grid=(8, 8)).shape == (count, 32)


@pytest.mark.parametrize("method", ["tome", "keep"])
def test_counts_on_255_pooler_tokens(method):
    tokens = randn(255, 48)
    for ratio, count in zip(RATIOS, (255, 128, 64, 32)):
        out = reduce(tokens, ReductionSpec(method, ratio))
        assert out.shape == (count, 48) and torch.isfinite(out).all()
        assert reduce(tokens.expand(3, -1, -1), ReductionSpec(method, ratio)).shape == (3, count, 48)


def test_pool_without_a_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a token grid"):
        reduce(randn(255, 8), ReductionSpec("pool", 0.25))
    with pytest.raises(ValueError, match="does not match"):
        reduce(randn(255, 8), ReductionSpec("pool", 0.25), grid=(16, 16))


# --- pool_grid -----------------------------------------------------------------------------------

def test_pool_grid_by_hand_with_ragged_edges():
    tokens = torch.arange(9.0).reshape(9, 1)  # 3x3 grid: 0 1 2 / 3 4 5 / 6 7 8
    out = pool_grid(tokens, (3, 3), 2)  # windows {0,1,3,4} {2,5} {6,7} {8}
    assert torch.equal(out, torch.tensor([[2.0], [3.5], [6.5], [8.0]]))
    tokens = torch.arange(10.0).reshape(10, 1)  # 2x5 grid, k=2 -> 1x3
    assert torch.equal(pool_grid(tokens, (2, 5), 2), torch.tensor([[3.0], [5.0], [6.5]]))


@pytest.mark.parametrize("grid, k", [((8, 8), 2), ((8, 8), 4), ((6, 4), 2), ((8, 8), 8), ((5, 5), 1)])
def test_pool_grid_equals_avg_pool2d_when_divisible(grid, k):
    h, w = grid
    tokens = randn(3, h * w, 16)
    image = tokens.transpose(1, 2).reshape(3, 16, h, w)
    ref = F.avg_pool2d(image, k).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_grid(tokens, grid, k), ref)


# --- tome_merge ----------------------------------------------------------------------------------

def test_tome_merges_exact_duplicates_first():
    tokens = randn(20, 16, seed=1)
    pairs = [(0, 1), (4, 7), (10, 5), (18, 19)]  # (A position, B position): A = even, B = odd
    for a, b in pairs:
        tokens[a] = tokens[b]
    merged, sizes = tome_merge(tokens, 20 - len(pairs))
    survivors = [i for i in range(20) if i not in {a for a, _ in pairs}]
    torch.testing.assert_close(merged, tokens[survivors])
    assert sizes.tolist() == [2.0 if i in {b for _, b in pairs} else 1.0 for i in survivors]


@pytest.mark.parametrize("n, target", [(64, 32), (64, 8), (255, 32), (255, 1), (7, 3)])
def test_tome_preserves_the_size_weighted_sum(n, target):
    tokens = randn(2, n, 24, seed=n)
    merged, sizes = tome_merge(tokens, target)
    assert merged.shape == (2, target, 24) and sizes.shape == (2, target)
    assert torch.equal(sizes.sum(dim=1), torch.full((2,), float(n)))
    torch.testing.assert_close((sizes.unsqueeze(-1) * merged).sum(dim=1), tokens.sum(dim=1), rtol=1e-5, atol=1e-4)
    # starting sizes carry through: merging in two stages equals one size-aware run's invariant
    again, sizes2 = tome_merge(merged, max(1, target // 2), sizes)
    torch.testing.assert_close((sizes2.unsqueeze(-1) * again).sum(dim=1), tokens.sum(dim=1), rtol=1e-5, atol=1e-4)


def test_tome_is_deterministic_and_rowwise():
    tokens = randn(3, 50, 8, seed=2)
    out, sizes = tome_merge(tokens, 13)
    out2, sizes2 = tome_merge(tokens, 13)
    assert torch.equal(out, out2) and torch.equal(sizes, sizes2)
    for i in range(3):
        row, row_sizes = tome_merge(tokens[i], 13)
        torch.testing.assert_close(row, out[i])
        assert torch.equal(row_sizes, sizes[i])


# --- keep_salient --------------------------------------------------------------------------------

def test_keep_salient_keeps_the_top_tokens_by_norm_in_original_order():
    tokens = randn(30, 8, seed=3)
    top = tokens.norm(dim=-1).topk(10).indices.sort().values
    assert torch.equal(keep_salient(tokens, 10, 0), tokens[top])
    out = keep_salient(tokens, 10, 3)
    assert out.shape == (13, 8) and torch.equal(out[:10], tokens[top])
    # each context token is the mean of a group of the remaining tokens, so it lies within their range
    rest = tokens[[i for i in range(30) if i not in set(top.tolist())]]
    assert ((out[10:] >= rest.min(0).values - 1e-6) & (out[10:] <= rest.max(0).values + 1e-6)).all()


def test_keep_salient_with_all_context_groups_covers_every_token():
    tokens = randn(12, 4, seed=4)
    assert torch.equal(keep_salient(tokens, 0, 12).sort(dim=0).values, tokens.sort(dim=0).values)
    torch.testing.assert_close(keep_salient(tokens, 0, 1), tokens.mean(dim=0, keepdim=True))


def test_keep_ranks_by_the_pooled_query_when_given():
    tokens, query = randn(40, 16, seed=5), randn(16, seed=6)
    spec = ReductionSpec("keep", 8, context_fraction=0.0)
    top = (tokens @ query).topk(8).indices.sort().values
    assert torch.equal(reduce(tokens, spec, pooled=query), tokens[top])
    with pytest.raises(ValueError, match="width"):
        reduce(tokens, spec, pooled=randn(7))


# --- the spec ------------------------------------------------------------------------------------

def test_ratio_and_count_resolution():
    assert [ReductionSpec("tome", r).resolve(255) for r in RATIOS] == [255, 128, 64, 32]
    assert ReductionSpec("tome", 0.001).resolve(255) == 1  # never 0
    assert ReductionSpec("keep", 1000).resolve(64) == 64  # never more than N
    assert ReductionSpec("keep", 1).resolve(64) == 1  # an int is a count, not 100%
    assert ReductionSpec("pool", 0.01).resolve(64, (8, 8)) == 1
    assert ReductionSpec("pool", 12).resolve(64, (8, 8)) == 9  # 3x3 (k=3) is nearest to 12
    assert ReductionSpec("keep", 0.25).context_tokens(64) == 2 and ReductionSpec("keep", 1.0).context_tokens(64) == 0


@pytest.mark.parametrize("kwargs", [dict(method="bogus"), dict(method="tome", visual_tokens=0),
                                    dict(method="tome", visual_tokens=-3), dict(method="tome", visual_tokens=0.0),
                                    dict(method="tome", visual_tokens=1.5), dict(method="tome", visual_tokens=True),
                                    dict(method="tome", visual_tokens="10"), dict(method="none", visual_tokens=0.5),
                                    dict(method="keep", visual_tokens=0.5, context_fraction=1.0)])
def test_invalid_specs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ReductionSpec(**kwargs)


def test_invalid_calls_are_rejected():
    with pytest.raises(ValueError):
        tome_merge(randn(10, 4), 0)
    with pytest.raises(ValueError):
        keep_salient(randn(10, 4), 8, 3)
    with pytest.raises(ValueError):
        pool_grid(randn(10, 4), (3, 3), 2)
    with pytest.raises(ValueError):
        ReductionSpec("tome", 0.5).resolve(0)


def test_to_dict_is_a_canonical_cache_key():
    keys = [ReductionSpec().to_dict(), ReductionSpec("pool", 0.25).to_dict(), ReductionSpec("tome", 0.25).to_dict(),
            ReductionSpec("tome", 16).to_dict(), ReductionSpec("keep", 0.25).to_dict()]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == len(keys)
    assert ReductionSpec("tome", 0.5, context_fraction=0.3).to_dict() == ReductionSpec("tome", 0.5).to_dict()
    assert ReductionSpec("keep", 0.5).to_dict()["context_fraction"] == 0.15


# --- property ------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 17), w=st.integers(1, 17), d=st.integers(1, 24), batch=st.sampled_from([None, 2]),
       method=st.sampled_from(["none", "pool", "tome", "keep"]),
       target=st.one_of(st.integers(1, 400), st.floats(0.001, 1.0)), seed=st.integers(0, 2**16))
def test_any_spec_gives_the_resolved_count_of_finite_tokens(h, w, d, batch, method, target, seed):
    n = h * w  # grid-free methods ignore the grid: N ranges over all products up to 289
    tokens = randn(*((batch,) if batch else ()), n, d, seed=seed)
    spec = ReductionSpec(method, 1.0 if method == "none" else target)
    count = spec.resolve(n, (h, w))
    assert 1 <= count <= n
    out = reduce(tokens, spec, grid=(h, w))
    assert out.shape == tokens.shape[:-2] + (count, d) and torch.isfinite(out).all()


# --- the decoder takes any number of visual tokens -----------------------------------------------

def test_coca_decoder_generates_from_16_7_and_1_visual_tokens():
    model = random_small_coca()
    decoder = decoder_from_open_clip(SMALL_COCA, model.state_dict())
    with torch.inference_mode():
        _, image_embs = model._encode_image(torch.randn(2, 3, 64, 64))
    assert image_embs.shape == (2, 16, 96)  # 64 px / patch 16: a 4x4 grid
    params, prompts = SamplingParams(max_tokens=6), [[1, 5], [1]]
    sets = {16: image_embs, 7: reduce(image_embs, ReductionSpec("tome", 7)),
            1: reduce(image_embs, ReductionSpec("pool", 1), grid=(4, 4))}
    for n, embs in sets.items():
        assert embs.shape == (2, n, 96)
        with torch.inference_mode():
            assert decoder.cross_kv(embs[:1])[0][0].shape[2] == n  # K/V: [images, heads, N, head_dim]
        out = generate_greedy(decoder, embs, prompts, params)
        assert [len(o) for o in out] == [6, 6] and all(0 <= t < 101 for o in out for t in o)
    # cross-attention to N copies of one token equals attention to that token: merging exact
    # duplicates (what tome does first) leaves the decoder's output unchanged
    one = image_embs[:, :1]
    assert generate_greedy(decoder, one.expand(-1, 7, -1), prompts, params) == generate_greedy(decoder, one, prompts, params)
