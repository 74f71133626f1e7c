"""Checkpoint directories the tests serve: an open_clip CoCa as open_clip itself saves it (a
caption-only model with contrastive towers), random weights, built in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from open_clip.push_to_hf_hub import save_for_hf

from tests.test_coca_oracle import SMALL_COCA


class _NoTokenizerFiles:
    """CLIP's BPE vocabulary ships inside open_clip, so there are no tokenizer files to write."""

    def save_pretrained(self, directory) -> None:
        pass


def write_open_clip_coca(path: Path, config_dir: Path, seed: int = 1) -> open_clip.CoCa:
    """A small CoCa saved by open_clip's `save_for_hf` into `path`; returns the model."""
    torch.manual_seed(seed)
    cfg = {**SMALL_COCA, "text_cfg": {**SMALL_COCA["text_cfg"], "vocab_size": 49408},
           "multimodal_cfg": {**SMALL_COCA["multimodal_cfg"], "vocab_size": 49408}, "custom_text": True}
    (config_dir / "mmserve_test_coca.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(config_dir)
    model = open_clip.create_model("mmserve_test_coca", pretrained=None).eval()
    save_for_hf(model, _NoTokenizerFiles(), cfg, str(path), safe_serialization=True)
    return model
