"""Grammar-constrained decoding in the engine (llm/grammar), on the demo model's word vocabulary and a
random-weight Llama-3.2-Vision's byte-level BPE. Random weights say nothing sensible, which makes them a
strict test: whatever the logits, every finished constrained output must parse and validate (checked
by jsonschema, not by the grammar library). Batch invariance and seeded sampling under constraints, a
request whose grammar is still compiling, and failures that stay with their request."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from decimal import Decimal

import jsonschema
import pytest
import torch

from app.chat.conversation import Conversation, Message
from app.models.families.mllama import MllamaModel
from bench.hf_checkpoints import PRESETS, write_mllama_checkpoint
from demo import world
from llm.async_engine import AsyncEngine
from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
from llm.grammar.compiler import GrammarCompiler
from llm.grammar.llguidance_backend import LLGuidanceBackend
from llm.grammar.spec import GrammarError, GrammarSpec, VocabularyError, closed_schema
from llm.loading.chat_format import Turn
from llm.params import InvalidParam, SamplingParams

# nested objects, enums, arrays, numbers, required and optional fields; every path bounded
RECEIPT = {
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 12},
        "category": {"enum": ["food", "travel", "office"]},
        "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 8},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["name", "qty"]}},
        "paid": {"type": "boolean"},
        "card": {"type": "object", "properties": {"last4": {"type": "string", "pattern": "^[0-9]{4}$"}}},
    },
    "required": ["merchant", "category", "total", "items"],
}


def exact(text: str):
    """JSON with its numbers as Decimals: jsonschema's multipleOf on binary floats rejects 0.07 (0.07 / 0.01
    is 7.000000000000001), so answers and schemas are compared exactly."""
    return json.loads(text, parse_float=Decimal)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = write_mllama_checkpoint(tmp_path_factory.mktemp("llama"), **PRESETS["tiny"], seed=5, dtype=torch.float32)
    return MllamaModel(path)


def llama_engine(model, **overrides) -> Engine:
    cfg = dict(block_size=16, kv_cache_bytes=8 << 20, max_num_seqs=16, max_num_batched_tokens=512) | overrides
    return Engine(model.decoder, model.tokenizer, model.stop_ids, EngineConfig(**cfg), model.vocabulary)


def llama_prompt(model, text: str) -> list[int]:
    return model.chat_prompt(Conversation((Message("user", (text,)),), ()))


@pytest.fixture(scope="module")
def demo_images(demo_runtime):
    rng = random.Random(3)
    feats = demo_runtime.encode_images([world.render(world.sample_scene(rng)) for _ in range(4)])
    return [ImageInput(tensor_digest(f.tokens), f.tokens) for f in feats]


def demo_engine(runtime) -> Engine:
    return Engine(runtime.decoder, runtime.tokenizer, runtime.stop_ids,
                  EngineConfig(block_size=4, kv_cache_bytes=8 << 20, max_num_seqs=16, max_num_batched_tokens=64),
                  runtime.vocabulary)


# -- vocabularies and compiling ------------------------------------------------------------------------
def test_the_declared_surfaces_spell_what_the_tokenizers_decode(demo_runtime, llama):
    rng = random.Random(0)
    for tokenizer, vocab in ((demo_runtime.tokenizer, demo_runtime.vocabulary), (llama.tokenizer, llama.vocabulary)):
        ids = [i for i, s in enumerate(vocab.surfaces) if s]
        for _ in range(300):
            seq = [rng.choice(ids) for _ in range(rng.randint(1, 8))]
            try:
                text = b"".join(vocab.surfaces[i] for i in seq).decode()
            except UnicodeDecodeError:
                continue
            if vocab.drops_leading_space:
                text = text.removeprefix(" ")
            assert tokenizer.decode(seq) == text, seq


def test_bad_grammars_are_errors_that_name_the_problem(llama, demo_runtime):
    compiler = GrammarCompiler(LLGuidanceBackend(llama.vocabulary))
    for spec, words in ((GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
                        (GrammarSpec.json_schema({"not": {"type": "string"}}), '"not"'),
                        (GrammarSpec.json_schema({"type": "string", "format": "bogus"}), "bogus"),
                        (GrammarSpec.regex("a(b"), "unclosed group"),
                        (GrammarSpec.lark("start: nothing_here"), "nothing_here")):
        with pytest.raises(GrammarError, match=words):
            compiler.get(spec)
    demo = GrammarCompiler(LLGuidanceBackend(demo_runtime.vocabulary))
    with pytest.raises(VocabularyError, match="first character"):  # no '{' among the demo's words
        demo.get(GrammarSpec.json_object())
    with pytest.raises(VocabularyError, match="any text"):  # "red" is a word, "circles" is not
        demo.get(GrammarSpec.choice(["red circles", "blue circles"]))
    demo.get(GrammarSpec.choice(["red circle", "blue"]))


def test_grammars_are_compiled_once_per_spec():
    from llm.loading.tokenizers import WordTokenizer

    compiler = GrammarCompiler(LLGuidanceBackend(WordTokenizer.build(["red", "blue"]).vocabulary()))
    first = compiler.get(GrammarSpec.choice(["red", "blue"]))
    assert compiler.get(GrammarSpec.choice(["red", "blue"])) is first
    with pytest.raises(VocabularyError):
        compiler.get(GrammarSpec.choice(["green"]))
    with pytest.raises(VocabularyError):
        compiler.get(GrammarSpec.choice(["green"]))
    assert (compiler.hits, compiler.misses, len(compiler.compile_seconds)) == (2, 2, 2)


def test_a_grammar_cannot_be_combined_with_min_tokens_or_ignore_eos():
    with pytest.raises(InvalidParam) as e:
        SamplingParams(min_tokens=2, grammar=GrammarSpec.json_object())
    assert e.value.param == "min_tokens"
    with pytest.raises(InvalidParam) as e:
        SamplingParams(ignore_eos=True, grammar=GrammarSpec.json_object())
    assert e.value.param == "ignore_eos"


# -- generation ------------------------------------------------------------------------------------------
def test_every_finished_json_output_validates_whatever_the_logits(llama):
    spec = GrammarSpec.json_schema(closed_schema(RECEIPT))  # as the API sends it; validated against RECEIPT itself
    prompt = llama_prompt(llama, "Read the receipt.")
    requests = [(prompt, None, SamplingParams(max_tokens=160, grammar=spec))]
    requests += [(prompt, None, SamplingParams(max_tokens=160, temperature=t, seed=s, grammar=spec))
                 for t, s in ((0.7, 1), (1.0, 2), (1.0, 3), (1.5, 4), (2.0, 5), (1.0, 6), (1.2, 7))]
    outputs = llama_engine(llama).generate(requests)
    for out in outputs:
        assert out.finish_reason == "stop", out.text  # the schema is bounded: every path ends
        jsonschema.validate(exact(out.text), exact(json.dumps(RECEIPT)))
    assert len({o.text for o in outputs}) > 4  # different seeds, different receipts: not one forced string


def test_regex_choice_and_lark_outputs_match(llama):
    prompt = llama_prompt(llama, "Answer.")
    cases = [(GrammarSpec.regex(r"[0-9]{3}-[a-z]{2,4}"), lambda t: __import__("re").fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
             (GrammarSpec.choice(["alpha", "beta gamma", "δ"]), lambda t: t in ("alpha", "beta gamma", "δ")),
             (GrammarSpec.lark('start: "yes" | "no" | "n" NUM\nNUM: /[0-9]/'), lambda t: t in ("yes", "no") or
              (len(t) == 2 and t[0] == "n" and t[1].isdigit()))]
    for spec, ok in cases:
        outs = llama_engine(llama).generate([(prompt, None, SamplingParams(max_tokens=24, temperature=1.0, seed=s,
                                                                         grammar=spec)) for s in range(4)])
        for out in outs:
            assert out.finish_reason == "stop" and ok(out.text), (spec, out.text)


def test_mixed_batches_keep_batch_invariance_and_seeds(llama):
    spec = GrammarSpec.json_schema(closed_schema(RECEIPT))
    prompts = [llama_prompt(llama, q) for q in ("One.", "A longer question, to vary the lengths here.", "Three?")]
    requests = []
    for i in range(5):
        grammar = spec if i % 2 else None
        temperature, seed = (0.0, None) if i % 3 == 0 else (1.0, 100 + i)
        requests.append((prompts[i % 3], None, SamplingParams(max_tokens=24, temperature=temperature, seed=seed,
                                                              grammar=grammar)))
    together = llama_engine(llama).generate(requests)
    for request, batched in zip(requests, together):
        alone = llama_engine(llama).generate([request])[0]
        assert alone.token_ids == batched.token_ids and alone.finish_reason == batched.finish_reason
    again = llama_engine(llama).generate(requests[::-1])[::-1]
    assert [o.token_ids for o in again] == [o.token_ids for o in together]


def test_choice_over_the_demo_answer_words_with_seeds(demo_runtime, demo_images):
    prompt = demo_runtime.prompt_ids([Turn("what color is the object ?")])
    spec = GrammarSpec.choice(["red", "blue", "green", "yellow"])
    eng = demo_engine(demo_runtime)
    outs = eng.generate([(prompt, img, SamplingParams(max_tokens=8, grammar=spec)) for img in demo_images])
    assert all(o.text in ("red", "blue", "green", "yellow") and o.finish_reason == "stop" for o in outs)
    sampled = [(prompt, demo_images[0], SamplingParams(max_tokens=8, temperature=2.0, seed=s, grammar=spec))
               for s in range(12)]
    first, second = eng.generate(sampled), demo_engine(demo_runtime).generate(sampled[::-1])[::-1]
    assert [o.text for o in first] == [o.text for o in second]
    assert all(o.text in ("red", "blue", "green", "yellow") for o in first)
    # A limit of llguidance on a vocabulary that cannot spell every byte: where the grammar forces text
    # that is no whole token (the space before a second word here), it finds no token to go on with. The
    # compile-time search sees it, so the request is refused up front rather than stuck halfway.
    with pytest.raises(VocabularyError):
        eng.grammars.get(GrammarSpec.regex("(red|blue) (circle|square)"))


def test_stop_strings_cut_a_constrained_answer(llama):
    prompt = llama_prompt(llama, "Pick.")
    two = GrammarSpec.choice(["alpha beta", "gamma delta"])
    whole = llama_engine(llama).generate([(prompt, None, SamplingParams(max_tokens=12, grammar=two))])[0]
    cut = llama_engine(llama).generate([(prompt, None, SamplingParams(max_tokens=12, grammar=two, stop=(" ",)))])[0]
    assert whole.text in ("alpha beta", "gamma delta") and whole.finish_reason == "stop"
    assert cut.text == whole.text.split(" ")[0] and cut.finish_reason == "stop"


def test_a_grammar_cut_by_max_tokens_finishes_with_length(llama):
    out = llama_engine(llama).generate([(llama_prompt(llama, "x"), None, SamplingParams(
        max_tokens=5, grammar=GrammarSpec.json_schema(RECEIPT)))])[0]
    assert out.finish_reason == "length" and out.completion_tokens == 5 and out.error is None


class SlowBackend:
    """The real backend, whose compile waits for a signal: a grammar still compiling."""

    def __init__(self, backend, release: threading.Event) -> None:
        self.backend, self.release = backend, release
        self.vocabulary, self.byte_complete, self.name = backend.vocabulary, backend.byte_complete, "slow"

    def compile(self, spec):
        self.release.wait(30)
        return self.backend.compile(spec)


def test_a_request_whose_grammar_is_compiling_waits_without_holding_the_step(llama):
    release = threading.Event()
    eng = llama_engine(llama)
    eng.grammars = GrammarCompiler(SlowBackend(LLGuidanceBackend(llama.vocabulary), release))
    prompt = llama_prompt(llama, "Hi")
    eng.add_request("free", prompt, None, SamplingParams(max_tokens=6, ignore_eos=True))
    eng.add_request("json", prompt, None, SamplingParams(max_tokens=60, grammar=GrammarSpec.choice(["ok"])))
    done = {}
    while "free" not in done:
        done |= {o.request_id: o for o in eng.step() if o.finished}
    assert eng.stats()["grammar_parked"] == 1 and "json" not in done  # the free one ran its course meanwhile
    release.set()
    while eng.has_unfinished:
        done |= {o.request_id: o for o in eng.step() if o.finished}
    assert done["json"].text == "ok" and done["free"].completion_tokens == 6


def test_a_failing_grammar_fails_its_request_alone(llama):
    async_engine = AsyncEngine(llama_engine(llama))
    async_engine.start()
    prompt = llama_prompt(llama, "Hi")

    async def run(request_id, params):
        async for out in async_engine.generate(request_id, prompt, None, params):
            if out.finished:
                return out

    async def main():
        return await asyncio.gather(run("bad", SamplingParams(grammar=GrammarSpec.regex("a(b"))),
                                    run("good", SamplingParams(max_tokens=4, ignore_eos=True)),
                                    return_exceptions=True)

    try:
        bad, good = asyncio.run(main())
        assert isinstance(bad, GrammarError) and "unclosed group" in str(bad)
        assert good.completion_tokens == 4 and async_engine.is_alive and async_engine.step_failures == 0
    finally:
        async_engine.shutdown()
