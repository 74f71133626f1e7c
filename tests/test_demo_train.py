"""`mmserve train-demo`'s moving parts on a tiny budget: the vision tower's mixer blocks (initialised,
saved and loaded through the serving path; old checkpoints without them), growing a mixer on a trained
checkpoint, and frozen parts staying bitwise as they were."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from app.cli import main
from app.models.families.coca import CoCaModel, build_coca, load_coca
from demo import world
from demo.model import demo_spec
from demo.train import TrainCfg, train
from llm.loading.coca_checkpoint import save_model_dir
from llm.loading.tokenizers import WordTokenizer
from vision.preprocess import preprocess
from vision.towers import ConvTower, ConvTowerCfg

TINY = ConvTowerCfg(image_size=32, channels=(8, 16), width=16, embed_dim=8)


def save_demo(path, mixer_layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    tokenizer = WordTokenizer.build(world.vocabulary())
    spec = demo_spec(tokenizer.vocab_size, mixer_layers=mixer_layers)
    model = build_coca(spec).eval()
    save_model_dir(path, spec, model, tokenizer)
    return model


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A demo checkpoint written before the mixer existed: its config names no mixer fields."""
    path = tmp_path_factory.mktemp("plain")
    save_demo(path, mixer_layers=0)
    config = json.loads((path / "config.json").read_text())
    for key in ("mixer_layers", "mixer_heads"):
        del config["vision_tower"][key]
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_mixer_blocks_are_initialised_like_open_clips_text_tower():
    torch.manual_seed(0)
    mixer = ConvTower(ConvTowerCfg(mixer_layers=1)).mixer
    block = mixer.resblocks[0]
    # width 128: attention in-projections std 128^-0.5, residual outputs 128^-0.5 * 2^-0.5
    assert block.attn.in_proj_weight.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(128 ** -0.5 * 2 ** -0.5, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(128 ** -0.5 * 2 ** -0.5, rel=0.05)


def test_a_checkpoint_without_mixer_fields_loads_with_none(plain_dir):
    loaded = load_coca(plain_dir)
    assert loaded.model.visual.cfg.mixer_layers == 0 and loaded.model.visual.mixer is None


def test_mixer_checkpoint_round_trips_through_the_serving_path(tmp_path):
    model = save_demo(tmp_path, mixer_layers=1)
    assert json.loads((tmp_path / "config.json").read_text())["vision_tower"]["mixer_layers"] == 1
    loaded = load_coca(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert any(name.startswith("visual.mixer.") for name in model.state_dict())
    runtime = CoCaModel.from_dir(tmp_path)  # packed linears and attention in the served tower
    image = Image.new("RGB", (128, 128), (40, 80, 220))
    served = runtime.encode_images([image])[0]
    with torch.no_grad():
        pooled, tokens = model.visual(preprocess([image], runtime.encoder.preprocess_cfg))
    torch.testing.assert_close(served.tokens, tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served.pooled, pooled[0], atol=1e-5, rtol=1e-5)


def test_a_grown_mixer_starts_as_the_identity():
    torch.manual_seed(0)
    tower = ConvTower(TINY).eval()
    grown = tower.grow_mixer(1).eval()
    assert grown.cfg.mixer_layers == 1 and tower.cfg.mixer_layers == 0
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for before, after in zip(tower(images), grown(images)):
            torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_growing_the_mixer_with_frozen_cnn_and_text_trains_only_the_rest(plain_dir, tmp_path):
    before = load_coca(plain_dir).model.state_dict()
    train(TrainCfg(out=tmp_path, init=plain_dir, steps=2, batch_size=4, images=8, warmup=1, mixer_layers=1,
                   freeze=("cnn", "text"), reduce_share=0.5))
    after = load_coca(tmp_path)
    assert after.model.visual.cfg.mixer_layers == 1
    record = after.spec.extra["training"]["finetunes"][-1]
    assert record["mixer_layers"] == 1 and record["freeze"] == ["cnn", "text"]
    state = after.model.state_dict()
    for name, tensor in before.items():
        if name.startswith(("visual.stages.", "text.", "logit_scale")):
            assert torch.equal(state[name], tensor), name
    assert not torch.equal(state["text_decoder.text_projection"], before["text_decoder.text_projection"])
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in state.items() if n.startswith("visual.mixer."))


def test_train_demo_refuses_an_unknown_part_to_freeze(tmp_path, capsys):
    assert main(["train-demo", "--out", str(tmp_path), "--freeze", "cnn,decoder"]) == 2
    assert "freeze: unknown part(s) ['decoder']" in capsys.readouterr().err
