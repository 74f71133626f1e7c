"""`mmserve quantize` and structured pruning end to end: checkpoint directories of both families
(the demo CoCa, a tiny Hugging Face Mllama) quantized and pruned by the CLI, loaded back as the server
loads them, against the same operations done in memory; quantize-on-load; pruned models through the
engine; the CLI's bad input."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from app.cli import main
from app.models.compress import calibration_batches, calibration_files
from app.models.families import load_family_model
from app.server import load_models
from app.settings import BUNDLED_MODEL, Settings
from bench.hf_checkpoints import PRESETS, write_mllama_checkpoint
from demo import world
from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
from llm.generate import teacher_forced_logits
from llm.models.mllama import MllamaDecoder
from llm.params import SamplingParams
from llm.quant import CalibrationBatch, QuantScheme, is_quantized, quantize_model
from llm.quant.prune import PruneSpec, _top, importance, prune
from tests.test_quant import image_tokens, prompts, tiny_coca, tiny_mllama
from tests.test_quant import tiny_hf  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    rng = random.Random(0)
    (root / "cal").mkdir()
    for i in range(2):
        world.render(world.sample_scene(rng)).save(root / "cal" / f"{i}.png")
    (root / "cal" / "prompts.txt").write_text("describe the image.\nwhat color is the circle?\n")
    write_mllama_checkpoint(root / "mllama", **PRESETS["tiny"], seed=3, dtype=torch.float32)
    return {"coca": BUNDLED_MODEL, "mllama": root / "mllama", "cal": root / "cal", "root": root}


def _inputs(decoder, dirs):
    """Teacher-forced rows under the calibration images' real features."""
    model = load_family_model(dirs["coca" if decoder == "coca" else "mllama"])
    features = model.encoder.encode(_pictures(dirs))
    ids = torch.tensor([model.chat_prompt(_question())[:6]] * len(features))
    return [f.tokens for f in features], ids, [f.attended_tokens for f in features]


def _pictures(dirs):
    from PIL import Image
    return [Image.open(p).convert("RGB") for p in sorted(dirs["cal"].glob("*.png"))]


def _question():
    from app.models.oneshot import question_about
    return question_about("describe the image.")


def logits(decoder, inputs):
    tokens, ids, attended = inputs
    return teacher_forced_logits(decoder, tokens, ids, attended_tokens=attended)


@pytest.mark.parametrize("family", ["coca", "mllama"])
@pytest.mark.parametrize("args, scheme", [(["--weights", "int8"], QuantScheme("int8")),
                                          (["--weights", "int4", "--group-size", "32"], QuantScheme("int4", 32))],
                         ids=["int8", "int4-g32"])
def test_quantize_then_load_equals_quantize_on_load_and_in_memory(dirs, family, args, scheme):
    out = dirs["root"] / f"{family}-{scheme.name}"
    assert main(["quantize", str(dirs[family]), str(out), *args]) == 0
    loaded = load_family_model(out)
    assert is_quantized(loaded.decoder) and (out / "decoder.safetensors").is_file()
    on_load = load_family_model(dirs[family], quantize=scheme)
    in_memory = quantize_model(load_family_model(dirs[family]).decoder, scheme)
    want = {k: v for k, v in in_memory.state_dict().items()}
    for decoder in (loaded.decoder, on_load.decoder):
        got = decoder.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    inputs = _inputs(family, dirs)
    assert torch.equal(logits(loaded.decoder, inputs), logits(in_memory, inputs))
    # the vision side is untouched: the same image features as the original directory's
    original = load_family_model(dirs[family]).encoder.encode(_pictures(dirs))
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(loaded.encoder.encode(_pictures(dirs)), original))


def test_a_models_toml_entry_and_the_serve_setting_quantize_on_load(dirs, tmp_path):
    toml = tmp_path / "models.toml"
    toml.write_text(f'[[model]]\nname = "q"\npath = "{dirs["mllama"]}"\nquantize = "int4-g32"\n'
                    f'[[model]]\nname = "plain"\npath = "{dirs["coca"]}"\n')
    (q_entry, q), (_, plain) = load_models(Settings(models_file=str(toml)))
    assert is_quantized(q.decoder) and not is_quantized(plain.decoder)
    ref = quantize_model(load_family_model(dirs["mllama"]).decoder, QuantScheme("int4", 32))
    assert all(torch.equal(a, b) for a, b in zip(q.decoder.state_dict().values(), ref.state_dict().values()))
    [(_, both)] = load_models(Settings(models=(f"demo={dirs['coca']}",), quantize="int8"))
    assert is_quantized(both.decoder)


def test_pruned_checkpoint_loads_to_the_in_memory_pruned_logits_and_quantizes_again(dirs):
    out, out4 = dirs["root"] / "coca-pruned", dirs["root"] / "coca-pruned-w4"
    spec = "heads=0.25,mlp=0.25"
    assert main(["quantize", str(dirs["coca"]), str(out), "--prune", spec, "--calibration", str(dirs["cal"])]) == 0
    model = load_family_model(dirs["coca"])
    calibration = calibration_batches(model, *calibration_files(dirs["cal"], 128))
    pruned = prune(model.decoder, PruneSpec.parse(spec), importance(model.decoder, calibration))
    loaded = load_family_model(out)
    assert loaded.decoder.cfg == pruned.cfg and loaded.decoder.cfg.heads == 3 and loaded.decoder.cfg.mlp_hidden == 384
    inputs = _inputs("coca", dirs)
    assert torch.equal(logits(loaded.decoder, inputs), logits(pruned, inputs))
    # a pruned (unquantized) checkpoint is a valid input: quantized, it keeps its pruned shape
    assert main(["quantize", str(out), str(out4), "--weights", "int4", "--group-size", "32"]) == 0
    again = load_family_model(out4)
    assert again.decoder.cfg == pruned.cfg and is_quantized(again.decoder)


# --- pruning, in memory --------------------------------------------------------------------------------

def _rows(decoder, n: int, length: int, seed: int) -> torch.Tensor:
    """Teacher-forcing rows inside the decoder's vocabulary: its prompt start, then random ids."""
    first = prompts(decoder, 1, seed)[0][:2 if isinstance(decoder, MllamaDecoder) else 1]
    rest = torch.randint(4, decoder.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([first] * n), rest], dim=1)


def _calibration(decoder, seed: int) -> list[CalibrationBatch]:
    return [CalibrationBatch(image_tokens(decoder, 4, seed=seed), _rows(decoder, 4, 12, seed=seed))]


@pytest.mark.parametrize("build", [tiny_mllama, lambda _: tiny_coca()], ids=["mllama", "coca"])
def test_pruning_equals_the_full_model_with_the_dropped_units_zeroed(tiny_hf, build):
    """The pruned model computes exactly what the original does when the dropped heads' output
    columns and the dropped channels' down-projection columns are zero: the slicing is right."""
    full = build(tiny_hf)
    scores = importance(full, _calibration(full, 40))
    spec = PruneSpec(heads=0.5, mlp=0.25)
    pruned = prune(full, spec, scores)
    masked = build(tiny_hf)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name, score in scores.items():
            linear = modules[name]
            unit = linear.in_features // len(score)
            if name.endswith(("down_proj", "c_proj")):
                keep = _top(score, pruned.cfg.intermediate_size if hasattr(pruned.cfg, "intermediate_size")
                            else pruned.cfg.mlp_hidden)
            else:
                keep = _top(score, len(score) // 2)
            mask = torch.zeros(len(score), dtype=torch.bool)
            mask[keep] = True
            linear.weight[:, ~mask.repeat_interleave(unit)] = 0
    images, ids = image_tokens(full, 2, seed=41), _rows(full, 2, 8, seed=41)
    got, want = teacher_forced_logits(pruned, images, ids), teacher_forced_logits(masked, images, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in full.parameters())
    same = prune(full, PruneSpec(0.0, 0.0), scores)
    assert torch.equal(teacher_forced_logits(same, images, ids), teacher_forced_logits(full, images, ids))


# (the small CoCa's pruned attention is 3 heads x 24 = 72 wide: no int4 group size divides it)
@pytest.mark.parametrize("build, weights", [(tiny_mllama, QuantScheme("int4", 32)), (lambda _: tiny_coca(), None)],
                         ids=["mllama-w4a16", "coca-fp32"])
def test_pruned_models_keep_batch_invariance_and_seeded_sampling_in_the_engine(tiny_hf, build, weights):
    full = build(tiny_hf)
    model = prune(full, PruneSpec(heads=0.5, mlp=0.25), importance(full, _calibration(full, 50)))
    if weights is not None:
        model = quantize_model(model, weights)
    engine = Engine(model, None, (), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    images, rows = image_tokens(full, 3, seed=51), prompts(full, 3, seed=52)
    inputs = [ImageInput(tensor_digest(e), e) for e in images]
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    together = engine.generate([(r, i, greedy) for r, i in zip(rows, inputs)])
    for r, i, batched in zip(rows, inputs, together):
        assert engine.generate([(r, i, greedy)])[0].token_ids == batched.token_ids
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    alone = engine.generate([(rows[0], inputs[0], seeded)])[0].token_ids
    crowd = engine.generate([(rows[0], inputs[0], seeded)] + [(r, i, greedy) for r, i in zip(rows[1:], inputs[1:])])
    assert crowd[0].token_ids == alone


# --- bad input: one line each, before any work ------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--weights", "int3"], "quantization weights must be one of int8, int4; got 'int3'"),
    (["--weights", "int4", "--group-size", "64"],
     "group size 64 does not divide in_features 96 of layer 'layers.0.mlp.down_proj': use group_size 32"),
    (["--weights", "int4", "--group-size", "48"], "int4 group_size must be one of 32, 64, 128; got 48"),
    (["--weights", "int8", "--group-size", "32"], "int8 weights are quantized per output channel"),
    (["--weights", "int4", "--method", "gptq"], "--method gptq needs calibration images: --calibration DIR"),
    (["--prune", "heads=0.25"], "--prune needs calibration images: --calibration DIR"),
    (["--prune", "heads=1.5", "--calibration", "."], "prune heads must be a share in [0, 1), got 1.5"),
    (["--prune", "layers=0.5"], "prune: expected heads=SHARE,mlp=SHARE; got 'layers=0.5'"),
    ([], "nothing to do"),
])
def test_bad_quantize_arguments_are_one_line_errors(dirs, capsys, args, message):
    out = dirs["root"] / "never"
    assert main(["quantize", str(dirs["mllama"]), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mmserve: error: ")
    assert not out.exists()


def test_an_already_quantized_or_missing_input_and_a_used_output_are_one_line_errors(dirs, capsys):
    done = dirs["root"] / "mllama-q8"
    assert main(["quantize", str(dirs["mllama"]), str(done), "--weights", "int8"]) == 0
    capsys.readouterr()
    cases = [([str(done), str(dirs["root"] / "x"), "--weights", "int4"], f"{done} is already quantized (w8a16)"),
             ([str(dirs["root"] / "nope"), str(dirs["root"] / "x"), "--weights", "int8"], "model directory not found"),
             ([str(dirs["mllama"]), str(done), "--weights", "int8"], f"{done} exists and is not an empty directory")]
    for args, message in cases:
        assert main(["quantize", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(Exception, match="already quantized"):
        load_family_model(done, quantize=QuantScheme("int8"))
    with pytest.raises(ValueError, match="setting quantize: quantization weights must be one of int8, int4; got 'int3'"):
        Settings(quantize="int3")


def test_the_recovery_fine_tune_trains_the_served_forward():
    """demo/recover.py's dense, differentiable forward computes the engine's logits (so what is
    trained is what serves), pruned or not, and gradients reach every parameter."""
    from demo.recover import dense_logits

    full = tiny_coca()
    pruned = prune(full, PruneSpec(0.25, 0.5), importance(full, _calibration(full, 60)))
    for decoder in (full, pruned):
        images, ids = image_tokens(decoder, 2, seed=61), _rows(decoder, 2, 9, seed=61)
        want = teacher_forced_logits(decoder, images, ids)
        for p in decoder.parameters():
            p.requires_grad_(True)
        got = dense_logits(decoder, ids, images)
        assert torch.allclose(got.detach(), want, atol=1e-4, rtol=1e-4)
        got.logsumexp(-1).sum().backward()
        assert all(p.grad is not None for p in decoder.parameters())
