"""Model directories: the bundled mmserve format and open_clip's own saved CoCa checkpoints."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image

from app.models.families.coca import CoCaModel
from app.settings import BUNDLED_MODEL
from llm.loading.chat_format import CAPTION_QUESTION, Turn
from app.models.families.coca import load_coca
from llm.loading.coca_checkpoint import ModelDirError
from tests.checkpoints import write_open_clip_coca


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip_coca")
    return path, write_open_clip_coca(path, tmp_path_factory.mktemp("open_clip_configs"))


def test_open_clip_saved_checkpoint_loads_with_identical_weights(open_clip_dir):
    path, model = open_clip_dir
    assert (path / "open_clip_config.json").is_file() and (path / "open_clip_model.safetensors").is_file()
    loaded = load_coca(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.spec.prompt_format == "caption-only"


def test_open_clip_checkpoint_captions_through_the_runtime(open_clip_dir):
    path, model = open_clip_dir
    runtime = CoCaModel.from_dir(path)
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    features = runtime.encode_images([image])
    assert features[0].tokens.shape == (16, 96)  # 64 px / 16 px patches = 4 x 4
    completion = runtime.complete(features, [runtime.prompt_ids([Turn(CAPTION_QUESTION)])], max_new_tokens=5)[0]
    assert completion.prompt_tokens == 1 and completion.completion_tokens >= 1
    with pytest.raises(ValueError, match="only caption"):
        runtime.prompt_ids([Turn("what is this?")])


def test_open_clip_pytorch_bin_checkpoint_loads(open_clip_dir, tmp_path):
    path, model = open_clip_dir
    (tmp_path / "open_clip_config.json").write_text((path / "open_clip_config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = load_coca(tmp_path)
    assert torch.equal(loaded.model.text.token_embedding.weight, model.text.token_embedding.weight)


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(ModelDirError, match=str(tmp_path / "nope")):
        load_coca(tmp_path / "nope")


def test_missing_weights_names_the_path(open_clip_dir, tmp_path):
    path, _ = open_clip_dir
    (tmp_path / "open_clip_config.json").write_text((path / "open_clip_config.json").read_text())
    with pytest.raises(ModelDirError, match="model file not found") as err:
        load_coca(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_directory_without_a_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelDirError, match="neither"):
        load_coca(tmp_path)


def test_non_coca_open_clip_config_is_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("RN50")}))
    with pytest.raises(ModelDirError, match="not describe a CoCa"):
        load_coca(tmp_path)


def test_bundled_demo_checkpoint_is_complete_and_small(demo_runtime):
    sizes = sum(f.stat().st_size for f in BUNDLED_MODEL.iterdir())
    assert sizes <= 20 * 1024 * 1024
    spec = demo_runtime.loaded.spec
    assert spec.prompt_format == "qa-chat" and len(spec.labels) == 12
    tok = demo_runtime.tokenizer
    assert {tok.pad_id, tok.sot_id, tok.eot_id, tok.sep_id} == {0, 1, 2, 3}
    assert demo_runtime.encode_images([Image.new("RGB", (128, 128))])[0].tokens.shape == (64, 128)
