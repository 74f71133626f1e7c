"""Weight-only quantization (llm/quant/): the int8 / int4 kernels against the dequantized weights, the
rounding bounds of the formats, GPTQ against round-to-nearest, safetensors round trips, quantized
Mllama and CoCa decoders through the engine (batch invariance, seeded sampling), bad input, and the
bf16 feature detection (llm/hardware.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm.models.coca import CoCaDecoder, decoder_from_open_clip
from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
from llm.generate import teacher_forced_logits
from llm.hardware import cpu_flags, cpu_has_native_bf16, has_native_bf16, resolve_dtype
from llm.models.mllama import MllamaDecoder, mllama_decoder_from_hf_model
from llm.packed_linear import PackedLinear, pack_linears
from llm.quant import (CalibrationBatch, Int8Linear, QuantScheme, load_quantized, quantize_model,
                       quantized_bytes, save_quantized)
from llm.quant.gptq import InputStats, gptq_quantize
from llm.quant.kernels import int4_dequantize, int4_quantize
from llm.quant.linear import dequantized_weight
from llm.params import SamplingParams
from tests.test_coca_oracle import SMALL_COCA, random_small_coca
from tests.test_mllama_oracle import SMALL_VISION, TINY_TEXT, random_mllama

# The kernels accumulate in fp32 and round the result to bf16 once: half a bf16 ulp, 2^-9 relative per
# element. Allow one ulp (2^-8) for the order of fp32 summation and the bf16 rounding of the input
# (which the reference shares: it multiplies the same bf16 rows).
KERNEL_TOL = 2 ** -8
SCHEMES = [QuantScheme("int8"), QuantScheme("int4", 32)]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm())


# --- the kernels and the formats --------------------------------------------------------------------

# CUDA's kernels (tinygemm, and int8 where the build has one) are chosen the same way; this machine has
# no GPU, so that case runs only where one is.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", SCHEMES + [QuantScheme("int4", 64), QuantScheme("int4", 128)], ids=lambda s: s.name)
@pytest.mark.parametrize("out_features", [256, 120], ids=["rows-x16", "padded-rows"])
def test_kernel_computes_the_product_with_the_dequantized_weight(scheme, out_features, device):
    torch.manual_seed(0)
    linear = nn.Linear(256, out_features)
    layer = quantize_model(nn.Sequential(linear), scheme)[0].to(device)  # moved: laid out again there
    reference = dequantized_weight(layer)
    with torch.inference_mode():
        for x in (torch.randn(1, 256), torch.randn(16, 256), torch.randn(3, 5, 256), torch.randn(8, 512)[:, ::2]):
            x = x.to(device)
            xb = x.bfloat16()
            want = xb.float() @ reference.T + layer.bias.float()
            assert layer(xb).dtype == torch.bfloat16 and layer(x).dtype == torch.float32  # the input's dtype
            assert layer(x).shape == want.shape and rel_err(layer(xb), want) <= KERNEL_TOL, x.shape


def test_round_to_nearest_stays_within_half_a_step():
    """Every weight lands within half a quantization step of its value (int8: the scale; int4: its
    group's scale), plus the bf16 rounding of the scale and zero the codes were chosen against."""
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3
    layer = Int8Linear.from_linear(_linear_of(w))
    assert ((w - dequantized_weight(layer)).abs() <= 0.5 * layer.scales.float()[:, None] * (1 + 2 ** -7)).all()
    codes, scales, zeros = int4_quantize(w, 32)
    step = scales.float().repeat_interleave(32, 1)
    slack = 15 * 2 ** -8 * step + 2 ** -8 * zeros.float().abs().repeat_interleave(32, 1)
    assert ((w - int4_dequantize(codes, scales, zeros)).abs() <= 0.5 * step + slack).all()
    assert codes.max() == 15 and codes.min() == 0  # the range is used, not clipped


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def test_gptq_beats_round_to_nearest_on_correlated_inputs_and_equals_it_on_white_ones():
    """Inputs confined near a 16-dim subspace (as Mllama's image tokens are): GPTQ moves the layer's
    outputs on them far less. White inputs (H = identity): no error to spread, the same codes."""
    torch.manual_seed(2)
    w = torch.randn(128, 256)
    x = torch.randn(4096, 16) @ torch.randn(16, 256) + 0.05 * torch.randn(4096, 256)
    scheme = QuantScheme("int4", 32, "gptq")
    stats = InputStats(256)
    stats.add(x)
    codes, scales, zeros = gptq_quantize(w, stats, scheme)
    rtn = int4_dequantize(*int4_quantize(w, 32))
    gptq_err = ((x @ (int4_dequantize(codes, scales, zeros) - w).T) ** 2).mean()
    rtn_err = ((x @ (rtn - w).T) ** 2).mean()
    assert gptq_err < rtn_err / 3, (gptq_err, rtn_err)

    white = InputStats(256)
    white.h = torch.eye(256) * 2
    white.rows = 1
    assert torch.equal(gptq_quantize(w, white, scheme)[0], int4_quantize(w, 32)[0])
    q8, s8, _ = gptq_quantize(w, white, QuantScheme("int8", method="gptq"))
    assert torch.equal(q8, Int8Linear.from_linear(_linear_of(w)).weight)


# --- whole decoders ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf():
    return random_mllama(TINY_TEXT, SMALL_VISION, seed=3)


def tiny_mllama(tiny_hf) -> MllamaDecoder:
    return mllama_decoder_from_hf_model(tiny_hf)


def tiny_coca() -> CoCaDecoder:
    return decoder_from_open_clip(SMALL_COCA, random_small_coca(seed=4).state_dict())


def image_tokens(decoder, n: int, seed: int) -> torch.Tensor:
    width = decoder.cfg.hidden_size if isinstance(decoder, MllamaDecoder) else decoder.cfg.width
    return torch.randn(n, 12, width, generator=torch.Generator().manual_seed(seed))


def token_rows(n: int, length: int, seed: int) -> torch.Tensor:
    """Rows for teacher forcing: <|begin_of_text|><|image|> then random text (the tiny vocabulary is 120)."""
    text = torch.randint(4, TINY_TEXT["vocab_size"], (n, length - 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([[1, TINY_TEXT["vocab_size"]]] * n), text], dim=1)


def prompts(decoder, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    first = [1, decoder.cfg.image_token_id] if isinstance(decoder, MllamaDecoder) else [1]
    return [first + torch.randint(4, decoder.vocab_size, (3 + 2 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("build", [tiny_mllama, lambda _: tiny_coca()], ids=["mllama", "coca"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_quantized_decoder_tracks_fp32_and_the_engine_serves_it(tiny_hf, build, scheme):
    """bf16 everywhere else, every linear quantized, none packed by the engine; logits near fp32's;
    greedy tokens the same alone and in a batch; a seeded request the same whatever shares its batch."""
    fp32 = build(tiny_hf)
    model = quantize_model(build(tiny_hf), scheme)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert not linears and next(model.parameters()).dtype == torch.bfloat16
    assert quantized_bytes(model) < quantized_bytes(fp32) / (3 if scheme.weights == "int8" else 5)

    images, rows = image_tokens(fp32, 4, seed=5), prompts(fp32, 4, seed=6)
    ids = torch.tensor([r[:4] for r in rows])
    # The fp32 decoder given the dequantized weights computes what the quantized one does up to bf16
    # activations: the bound of test_mllama_oracle's bf16-vs-fp32 test.
    quantized = dict(model.named_modules())
    with torch.no_grad():
        for name, linear in fp32.named_modules():
            if isinstance(linear, nn.Linear):
                linear.weight.copy_(dequantized_weight(quantized[name]))
    ours, ref = teacher_forced_logits(model, images, ids), teacher_forced_logits(fp32, images, ids)
    assert rel_err(ours, ref) <= 3e-2

    engine = Engine(model, None, (), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    assert pack_linears(model) == 0 and engine.runner.k_pool[0].dtype == torch.bfloat16
    inputs = [ImageInput(tensor_digest(e), e) for e in images]
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    together = engine.generate([(r, i, greedy) for r, i in zip(rows, inputs)])
    for r, i, batched in zip(rows, inputs, together):
        assert engine.generate([(r, i, greedy)])[0].token_ids == batched.token_ids

    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    alone = engine.generate([(rows[0], inputs[0], seeded)])[0].token_ids
    crowd = engine.generate([(rows[0], inputs[0], seeded)] + [(r, i, greedy) for r, i in zip(rows[1:], inputs[1:])])
    assert crowd[0].token_ids == alone


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_quantized_checkpoint_round_trips_through_safetensors(tiny_hf, scheme, tmp_path):
    model = quantize_model(tiny_mllama(tiny_hf), scheme, skip=("lm_head",))
    assert model.lm_head.weight.dtype == torch.bfloat16  # skipped: bf16, not quantized
    save_quantized(model, tmp_path / "q.safetensors", scheme)
    with torch.device("meta"):
        fresh = MllamaDecoder(model.cfg)
    loaded, loaded_scheme = load_quantized(fresh, tmp_path / "q.safetensors")
    assert loaded_scheme == scheme
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    images, ids = image_tokens(model, 2, seed=7), token_rows(2, 6, seed=8)
    assert torch.equal(teacher_forced_logits(loaded, images, ids), teacher_forced_logits(model, images, ids))


def test_gptq_quantizes_a_decoder_from_calibration_batches(tiny_hf):
    """Every linear is quantized (the image K/V projections too: they see the images), and the result
    stays as close to fp32 as round-to-nearest's on held-out rows."""
    fp32 = tiny_mllama(tiny_hf)
    calibration = [CalibrationBatch(image_tokens(fp32, 4, seed=s), token_rows(4, 16, seed=s)) for s in (20, 21)]
    gptq = quantize_model(tiny_mllama(tiny_hf), QuantScheme("int4", 32, "gptq"), calibration=calibration)
    rtn = quantize_model(tiny_mllama(tiny_hf), QuantScheme("int4", 32))
    assert not any(type(m) is nn.Linear for m in gptq.modules())
    images, ids = image_tokens(fp32, 4, seed=30), token_rows(4, 16, seed=30)
    ref = teacher_forced_logits(fp32, images, ids)
    gptq_err = rel_err(teacher_forced_logits(gptq, images, ids), ref)
    assert gptq_err <= rel_err(teacher_forced_logits(rtn, images, ids), ref)


# --- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="int3"), "weights must be one of int8, int4; got 'int3'"),
    (dict(weights="int4", group_size=48), "int4 group_size must be one of 32, 64, 128; got 48"),
    (dict(weights="int4"), "int4 group_size must be one of 32, 64, 128; got None"),
    (dict(weights="int8", group_size=32), "int8 weights are quantized per output channel"),
    (dict(weights="int8", method="awq"), "method must be one of rtn, gptq; got 'awq'"),
])
def test_bad_schemes_are_one_line_errors_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        QuantScheme(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_layers_and_missing_inputs_are_errors_before_any_work(tiny_hf, tmp_path):
    model = tiny_mllama(tiny_hf)  # hidden 64, MLP 96: group 128 divides neither
    with pytest.raises(ValueError, match=r"group size 128 does not divide in_features 64 of layer 'layers.0.self_attn"):
        quantize_model(model, QuantScheme("int4", 128))
    with pytest.raises(ValueError, match="group size 64 does not divide in_features 96 of layer "
                                         "'layers.0.mlp.down_proj': use group_size 32"):
        quantize_model(model, QuantScheme("int4", 64))
    with pytest.raises(ValueError, match="'gptq' needs calibration batches"):
        quantize_model(model, QuantScheme("int4", 32, "gptq"))
    assert all(type(m.lm_head) is nn.Linear for m in [model])  # nothing was swapped before the errors
    with pytest.raises(ValueError, match="no nn.Linear left"):
        quantize_model(model, QuantScheme("int8"), skip=("*",))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'plain.safetensors'} is not an mmserve quantized checkpoint"):
        load_quantized(model, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="unknown quantization scheme fields: bits"):
        QuantScheme.from_json('{"weights": "int8", "bits": 8}')


# --- bf16 feature detection ------------------------------------------------------------------------------

def test_bf16_detection_reads_cpu_feature_flags():
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\nflags\t: fpu\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"
    avx2 = "flags\t\t: fpu sse2 avx2 fma\n"
    assert has_native_bf16(cpu_flags(x86)) and has_native_bf16(cpu_flags(arm))
    assert not has_native_bf16(cpu_flags(avx2)) and not has_native_bf16(cpu_flags("model name : bf16 inside\n"))
    assert has_native_bf16(cpu_flags("flags : amx_tile amx_bf16\n"))


def test_auto_dtype_follows_the_cpu_and_names_bad_settings():
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16, float16; got 'int4'"):
        resolve_dtype("int4")
