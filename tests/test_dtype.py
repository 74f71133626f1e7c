"""bf16 compute behind `dtype=auto` (the default): what auto resolves to, a family converted whole
(decoder and vision tower) close to its fp32 self, the feature cache telling the dtypes apart, and a
served model computing in the dtype its settings say.

Tolerances: bf16 keeps 8 bits of mantissa, so every operation's output is rounded by up to 2^-9
relative; through a few layers that adds up to around 1e-2 relative on the output. The bound used
across the suite for a bf16 decoder against fp32 is 3e-2 (test_mllama_oracle's bf16 test); the vision
towers here are as deep or shallower, so they take the same bound."""

from __future__ import annotations

import pytest
import torch

from app.models.entry import ModelEntry
from app.models.families.coca import CoCaModel
from app.models.families.mllama import MllamaModel
from app.models.served import ServedModel
from app.settings import BUNDLED_MODEL, Settings
from bench.hf_checkpoints import PRESETS, write_mllama_checkpoint
from llm.generate import teacher_forced_logits
from llm.hardware import cpu_has_native_bf16, resolve_dtype
from llm.loading.chat_format import CAPTION_QUESTION, Turn
from demo import world
from tests.test_engine import scenes  # noqa: F401 - fixture
from tests.test_mllama_oracle import images as tile_images
from tests.test_mllama_oracle import prompts_for, rel_err
from vision.stage import VisionStage

BF16_BOUND = 3e-2


def test_auto_is_the_default_and_bad_dtypes_are_named():
    assert Settings().dtype == "auto" and Settings().kv_cache_dtype == "auto"
    assert resolve_dtype(Settings().dtype) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="setting dtype must be one of auto, float32, bfloat16, float16; got 'int8'"):
        Settings(dtype="int8")
    with pytest.raises(ValueError, match="setting kv_cache_dtype must be one of auto, float32, bfloat16, float16, "
                                         "int8; got 'int4'"):
        Settings(kv_cache_dtype="int4")
    assert Settings.from_env({"MMSERVE_KV_CACHE_DTYPE": "int8"}).engine_config.kv_cache_dtype == "int8"


@pytest.fixture(scope="module")
def mllama_pair(tmp_path_factory):
    path = write_mllama_checkpoint(tmp_path_factory.mktemp("mllama"), **PRESETS["tiny"], seed=3, dtype=torch.float32)
    fp32 = MllamaModel(path)
    return fp32, fp32.with_dtype(torch.bfloat16), MllamaModel(path, dtype=torch.bfloat16)


def test_a_bf16_mllama_tracks_its_fp32_self_vision_and_decoder(mllama_pair):
    fp32, converted, loaded = mllama_pair
    assert fp32.with_dtype(torch.float32) is fp32 and fp32.dtype == torch.float32  # the original stays fp32
    for bf16 in (converted, loaded):
        assert bf16.decoder.lm_head.weight.dtype == bf16.encoder.dtype == torch.bfloat16
    pictures = tile_images([4, 2], seed=21)
    ref, ours = fp32.encoder.encode(pictures), loaded.encoder.encode(pictures)
    for r, o in zip(ref, ours):
        assert o.tokens.dtype == torch.bfloat16 and o.attended_tokens == r.attended_tokens
        assert rel_err(o.tokens, r.tokens) <= BF16_BOUND
    ids = torch.tensor(prompts_for([4, 2], 10, fp32.decoder.vocab_size, fp32.decoder.cfg.image_token_id, seed=22))
    tokens, attended = [f.tokens for f in ref], [f.attended_tokens for f in ref]
    want = teacher_forced_logits(fp32.decoder, tokens, ids, chunk=3, attended_tokens=attended)
    for bf16 in (converted, loaded):
        got = teacher_forced_logits(bf16.decoder, [f.tokens for f in ours], ids, chunk=3, attended_tokens=attended)
        assert rel_err(got, want) <= BF16_BOUND


def test_the_demo_in_bf16_sees_what_fp32_sees_and_the_cache_keys_differ(demo_runtime, scenes):  # noqa: F811
    pictures = [world.render(s) for s in scenes[:4]]
    bf16 = demo_runtime.with_dtype(torch.bfloat16)
    assert bf16.encoder.dtype == bf16.decoder.lm_head.weight.dtype == torch.bfloat16
    assert demo_runtime.encoder.dtype == torch.float32  # converted copy; the loaded model is untouched
    for ref, ours in zip(demo_runtime.encoder.encode(pictures), bf16.encoder.encode(pictures)):
        assert rel_err(ours.tokens, ref.tokens) <= BF16_BOUND
    config = Settings().vision_stage_config
    keys = {VisionStage(m.encoder, config).key_for(b"same image", VisionStage(m.encoder, config).reduction_for(None))
            .digest() for m in (demo_runtime, bf16)}
    assert len(keys) == 2  # bf16 features are not fp32's: never one cache entry for both
    # captions from pixels, tower and decoder both bf16, against fp32's (test_engine: bf16 weights keep
    # >= 13 of 16 answers; on 4 captions, at least 3)
    prompt = [demo_runtime.prompt_ids([Turn(CAPTION_QUESTION)])] * 4
    fp32_captions = [c.text for c in demo_runtime.complete(demo_runtime.encode_images(pictures), prompt)]
    bf16_captions = [c.text for c in bf16.complete(bf16.encode_images(pictures), prompt)]
    assert sum(a == b for a, b in zip(fp32_captions, bf16_captions)) >= 3, (fp32_captions, bf16_captions)


def test_a_served_model_computes_in_the_dtype_its_settings_say(demo_runtime):
    auto = ServedModel(ModelEntry("", BUNDLED_MODEL), demo_runtime, Settings())
    assert auto.dtype == resolve_dtype("auto") and auto.model.encoder.dtype == auto.dtype
    pinned = ServedModel(ModelEntry("", BUNDLED_MODEL, dtype="float32"), demo_runtime, Settings())
    assert pinned.model is demo_runtime
    assert ServedModel(ModelEntry("", BUNDLED_MODEL), demo_runtime, Settings(dtype="float32")).model is demo_runtime
