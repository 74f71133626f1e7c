"""The decode engine on the bundled demo model: batch invariance, streaming, sampling, stops, aborts,
prefix and cross-attention reuse, preemption."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from demo import world
from llm.async_engine import AsyncEngine
from llm.loading.chat_format import CAPTION_QUESTION, Turn
from llm.packed_linear import dense_copy
from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
from llm.params import SamplingParams


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(7)
    return [world.sample_scene(rng) for _ in range(16)]


@pytest.fixture(scope="module")
def images(demo_runtime, scenes):
    feats = demo_runtime.encode_images([world.render(s) for s in scenes])
    return [ImageInput(tensor_digest(f.tokens), f.tokens) for f in feats]


def engine(runtime, **overrides) -> Engine:
    cfg = dict(block_size=4, kv_cache_bytes=8 << 20, max_num_seqs=16, max_num_batched_tokens=64) | overrides
    return Engine(runtime.decoder, runtime.tokenizer, runtime.stop_ids, EngineConfig(**cfg))


def prompt(runtime, question=CAPTION_QUESTION, history=()):
    return runtime.prompt_ids([*history, Turn(question)])


def mixed_requests(runtime, scenes, images):
    """16 requests: captions and questions, different images, lengths and limits."""
    out = []
    for i, (scene, image) in enumerate(zip(scenes, images)):
        q, _ = world.questions(scene)[i % len(world.questions(scene))]
        out.append((prompt(runtime, q if i % 3 else CAPTION_QUESTION), image, SamplingParams(max_tokens=4 + i % 9)))
    return out


def test_greedy_output_is_the_same_alone_and_in_a_batch_of_16(demo_runtime, scenes, images):
    requests = mixed_requests(demo_runtime, scenes, images)
    together = engine(demo_runtime).generate(requests)
    for request, batched in zip(requests, together):
        alone = engine(demo_runtime).generate([request])[0]
        assert alone.token_ids == batched.token_ids and alone.text == batched.text
        assert alone.finish_reason == batched.finish_reason
    # and the captions are right: the engine is not just consistent, it answers
    captions = [o.text for o, r in zip(together, requests) if r[0] == prompt(demo_runtime)]
    truths = [world.caption(s) for s, r in zip(scenes, requests) if r[0] == prompt(demo_runtime)]
    assert sum(c == t for c, t in zip(captions, truths)) >= len(truths) - 1


def test_a_tiny_pool_preempts_and_still_gives_the_same_outputs(demo_runtime, scenes, images):
    requests = mixed_requests(demo_runtime, scenes, images)
    roomy = engine(demo_runtime).generate(requests)
    tiny = engine(demo_runtime, kv_cache_bytes=12 * 4 * demo_runtime.decoder.kv_shape.elements_per_token * 4)
    squeezed = tiny.generate(requests)
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]
    assert tiny.stats()["kv_blocks_used"] == 0


def test_streamed_deltas_add_up_to_the_non_streamed_text(demo_runtime, scenes, images):
    requests = mixed_requests(demo_runtime, scenes, images)[:6]
    expected = [o.text for o in engine(demo_runtime).generate(requests)]
    async_engine = AsyncEngine(engine(demo_runtime))
    async_engine.start()

    async def one(i, request):
        deltas, final = [], None
        async for out in async_engine.generate(f"r{i}", *request):
            deltas.append(out.delta_text)
            final = out
        return "".join(deltas), final

    async def main():
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    try:
        results = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert [streamed for streamed, _ in results] == expected
    assert [final.text for _, final in results] == expected
    assert all(len([d for d in streamed.split()]) for streamed, _ in results)  # real text, not empty


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(demo_runtime, scenes, images):
    base = mixed_requests(demo_runtime, scenes, images)
    sampled = (base[0][0], base[0][1], SamplingParams(max_tokens=12, temperature=1.5, top_k=20, top_p=0.95,
                                                      seed=1234, ignore_eos=True))
    alone = engine(demo_runtime).generate([sampled])[0].token_ids
    in_batch = engine(demo_runtime).generate(base[1:8] + [sampled] + base[8:])[7].token_ids
    assert alone == in_batch and len(alone) == 12
    # the demo model is sure of its captions; past the end of one it is not, and seeds differ there
    other_seeds = {engine(demo_runtime).generate([(sampled[0], sampled[1], SamplingParams(
        max_tokens=40, temperature=2.0, seed=s, ignore_eos=True))])[0].token_ids for s in range(5)}
    assert len(other_seeds) > 1


def test_top_k_1_equals_greedy_and_repetition_penalty_changes_repeats(demo_runtime, scenes, images):
    p, image, _ = mixed_requests(demo_runtime, scenes, images)[0]
    greedy = engine(demo_runtime).generate([(p, image, SamplingParams(max_tokens=10))])[0]
    top1 = engine(demo_runtime).generate([(p, image, SamplingParams(max_tokens=10, temperature=1.0, top_k=1,
                                                                    seed=3))])[0]
    assert top1.token_ids == greedy.token_ids
    long = SamplingParams(max_tokens=30, ignore_eos=True)
    plain = engine(demo_runtime).generate([(p, image, long)])[0].token_ids
    penalised = engine(demo_runtime).generate([(p, image, SamplingParams(max_tokens=30, ignore_eos=True,
                                                                         repetition_penalty=5.0))])[0].token_ids
    assert len(set(penalised)) > len(set(plain))


def test_stop_strings_cut_the_text_and_finish_with_stop(demo_runtime, scenes, images):
    image = images[0]
    full = engine(demo_runtime).generate([(prompt(demo_runtime), image, SamplingParams(max_tokens=20))])[0].text
    word = full.split()[2]
    out = engine(demo_runtime).generate([(prompt(demo_runtime), image, SamplingParams(max_tokens=20,
                                                                                      stop=(" " + word,)))])[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(" " + word)]


def test_abort_frees_every_block_at_once(demo_runtime, scenes, images):
    eng = engine(demo_runtime)
    for i, request in enumerate(mixed_requests(demo_runtime, scenes, images)):
        eng.add_request(f"r{i}", *request)
    eng.step()
    eng.step()
    assert eng.stats()["kv_blocks_used"] > 0
    for i in range(16):
        eng.abort(f"r{i}")
    assert eng.stats()["kv_blocks_used"] == 0 and not eng.has_unfinished
    assert eng.runner.cross_pool._refs == {}


def test_second_turn_reuses_prefix_blocks_and_image_kv(demo_runtime, scenes, images):
    eng = engine(demo_runtime)
    image = images[0]
    first_prompt = prompt(demo_runtime, CAPTION_QUESTION)
    first = eng.generate([(first_prompt, image, SamplingParams(max_tokens=20))])[0]
    second_prompt = prompt(demo_runtime, "how many shapes are there?", [Turn(CAPTION_QUESTION, first.text)])
    second = eng.generate([(second_prompt, image, SamplingParams(max_tokens=5))])[0]
    # every token the first turn computed that the second repeats, its partly filled last block too
    computed = [*first_prompt, *first.token_ids][: len(first_prompt) + len(first.token_ids)
                                                  - (first.finish_reason == "length")]
    shared = next((i for i, (a, b) in enumerate(zip(computed, second_prompt)) if a != b), len(computed))
    assert shared % 4 and second.cached_tokens == min(shared, len(second_prompt) - 1)
    assert eng.runner.cross_pool.hits >= 1 and eng.runner.cross_pool.misses == 1
    cold = engine(demo_runtime).generate([(second_prompt, image, SamplingParams(max_tokens=5))])[0]
    assert cold.cached_tokens == 0 and cold.token_ids == second.token_ids
    # another image with the same prompt shares nothing: K/V depend on the image
    other = eng.generate([(second_prompt, images[1], SamplingParams(max_tokens=5))])[0]
    assert other.cached_tokens == 0


def test_bfloat16_kv_pool_gives_nearly_the_same_answers(demo_runtime, scenes, images):
    requests = mixed_requests(demo_runtime, scenes, images)
    full = engine(demo_runtime).generate(requests)
    half = engine(demo_runtime, kv_cache_dtype="bfloat16")
    assert half.runner.k_pool[0].dtype == torch.bfloat16
    same = sum(a.token_ids == b.token_ids for a, b in zip(full, half.generate(requests)))
    assert same >= 14


def test_leaving_a_stream_early_aborts_the_request_and_frees_its_blocks(demo_runtime, scenes, images):
    eng = engine(demo_runtime)
    async_engine = AsyncEngine(eng)
    async_engine.start()
    request = (prompt(demo_runtime), images[0], SamplingParams(max_tokens=40, ignore_eos=True))

    async def main():
        seen = 0
        async for _ in async_engine.generate("leaver", *request):
            seen += 1
            if seen == 2:
                break  # the client went away
        for _ in range(200):
            if eng.stats()["kv_blocks_used"] == 0 and not eng.has_unfinished:
                return seen
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks still held: {eng.stats()}")

    try:
        assert asyncio.run(main()) == 2
        assert eng.runner.cross_pool._refs == {}
    finally:
        async_engine.shutdown()


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(demo_runtime, scenes, images):
    eng = engine(demo_runtime)
    async_engine = AsyncEngine(eng)
    async_engine.start()
    real_run = eng.runner.run
    calls = {"n": 0}

    def flaky(output):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated out of memory")
        return real_run(output)

    eng.runner.run = flaky
    request = (prompt(demo_runtime), images[0], SamplingParams(max_tokens=8))

    async def collect(request_id):
        return [o async for o in async_engine.generate(request_id, *request)][-1]

    try:
        with pytest.raises(RuntimeError, match="simulated"):
            asyncio.run(collect("first"))
        assert asyncio.run(collect("second")).text == world.caption(scenes[0])
        assert async_engine.step_failures == 1 and eng.stats()["kv_blocks_used"] == 0
    finally:
        async_engine.shutdown()


def test_bfloat16_weights_give_nearly_the_same_answers(demo_runtime, scenes, images):
    requests = mixed_requests(demo_runtime, scenes, images)
    full = engine(demo_runtime).generate(requests)
    half = Engine(dense_copy(demo_runtime.decoder).to(torch.bfloat16), demo_runtime.tokenizer, demo_runtime.stop_ids,
                  EngineConfig(block_size=4, kv_cache_bytes=8 << 20, max_num_seqs=16))
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.runner.k_pool[0].dtype == torch.bfloat16
    same = sum(a.token_ids == b.token_ids for a, b in zip(full, half.generate(requests)))
    assert same >= 13


def test_a_prompt_that_fills_the_context_is_rejected_naming_both_numbers(demo_runtime, images):
    from llm.generate import generate_greedy
    from llm.scheduler import PromptRejected

    context = demo_runtime.context_length
    with pytest.raises(PromptRejected, match=f"maximum context length is {context} tokens.*prompt has {context} tokens"):
        generate_greedy(demo_runtime.decoder, images[0].tokens[None], [[1] * context], SamplingParams(4))


def test_an_image_input_names_a_bad_attended_token_count():
    tokens = torch.zeros(6, 4)
    assert ImageInput("d", tokens, 6).attended_tokens == 6
    for bad in (0, 7):
        with pytest.raises(ValueError, match=f"attended_tokens must be in 1..6.*got {bad}"):
            ImageInput("d", tokens, bad)
