"""The per-request sampler on synthetic logits: supports and frequencies, seeds, validation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from llm.params import SamplingParams
from llm.sampling import RequestSampler, sample

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]))


def draws(params: SamplingParams, n: int = 3000) -> Counter:
    sampler = RequestSampler(params, frozenset(), [])
    return Counter(sample(LOGITS.clone()[None], [sampler], [0])[0] for _ in range(n))


def test_temperature_1_follows_the_softmax():
    counts = draws(SamplingParams(temperature=1.0, seed=0))
    for token, p in enumerate([0.5, 0.25, 0.15, 0.06, 0.04]):
        assert abs(counts[token] / 3000 - p) < 0.03, token


def test_top_k_and_top_p_restrict_the_support():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=0), 500)) == {0, 1}
    # top_p 0.8: 0.5 + 0.25 < 0.8, so the third token is still needed; the fourth is not
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8, seed=0), 500)) == {0, 1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.1, seed=0), 200)) == {0}


def test_low_temperature_sharpens_and_greedy_is_argmax():
    assert draws(SamplingParams(temperature=0.05, seed=0), 300)[0] == 300
    assert draws(SamplingParams(), 5) == Counter({0: 5})


def test_same_seed_same_stream_different_seed_different_stream():
    def stream(seed):
        s = RequestSampler(SamplingParams(temperature=1.0, seed=seed), frozenset(), [])
        return [sample(LOGITS.clone()[None], [s], [0])[0] for _ in range(50)]
    assert stream(7) == stream(7) and stream(7) != stream(8)


def test_min_tokens_masks_stop_ids_and_repetition_penalty_demotes_seen_tokens():
    s = RequestSampler(SamplingParams(min_tokens=2), frozenset({0}), [])
    assert sample(LOGITS.clone()[None], [s], [0]) == [1]  # 0 is a stop id, masked before 2 tokens
    assert sample(LOGITS.clone()[None], [s], [2]) == [0]
    p = RequestSampler(SamplingParams(repetition_penalty=3.0), frozenset(), [0])
    assert sample(torch.tensor([[2.0, 1.0, 0.5]]), [p], [0]) == [1]  # 2/3 < 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=3), dict(top_p=0), dict(top_k=-1),
                                 dict(max_tokens=0), dict(repetition_penalty=0), dict(min_tokens=50)])
def test_bad_parameters_are_refused_with_their_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
