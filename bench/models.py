"""Random-weight models of real sizes for the speed benchmarks (no weights can be downloaded here).

Speed does not depend on weight values, but greedy decoding of random weights can emit an end token
at any step, so every benchmark forces its lengths (ignore_eos on our side, min_new_tokens on theirs).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

COCA_CONFIG = "coca_ViT-B-32"
SOT, EOT = 49406, 49407  # open_clip's BPE start and end tokens

# A 126M-parameter Mllama text model (12 layers x 768, GQA 12/4, vocab 32k), as the issue specifies,
# with a small vision tower: the benchmark measures the decoder.
BOS, EOS, PAD = 1, 2, 3
MLLAMA_TEXT = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, intermediate_size=2048, cross_attention_layers=[3, 8],
                   max_position_embeddings=131072,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
MLLAMA_VISION = dict(hidden_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                     intermediate_size=128, vision_output_dim=192, image_size=56, patch_size=14, max_num_tiles=4,
                     intermediate_layers_indices=[0, 1])
MLLAMA_TILE = 56


def random_coca_b32(seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(COCA_CONFIG, pretrained=None).eval()
    with torch.no_grad():  # open_clip leaves the decoder's output projection at zero
        model.text_decoder.text_projection.normal_(0, 512 ** -0.5)
    return model, open_clip.get_model_config(COCA_CONFIG)


def open_clip_generate_available() -> None:
    """open_clip 3.3 imports BeamSearchScorer (gone in transformers 5) beside the logits processors
    its `generate` uses, and so turns generation off altogether. Top-k generation needs none of
    BeamSearchScorer: hand it the processors transformers 5 still has, and open_clip's own
    `CoCa.generate` runs unchanged as the baseline."""
    import transformers
    from open_clip import coca_model

    if coca_model._has_transformers:
        return
    for name in ("LogitsProcessorList", "TopPLogitsWarper", "TopKLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StopStringCriteria", "EosTokenCriteria",
                 "StoppingCriteriaList"):
        setattr(coca_model, name, getattr(transformers, name))
    coca_model.GENERATION_TYPES.update(top_k=transformers.TopKLogitsWarper, top_p=transformers.TopPLogitsWarper)
    coca_model._has_transformers = True


def random_mllama(seed: int = 0):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    config = MllamaConfig(vision_config=MLLAMA_VISION, image_token_index=MLLAMA_TEXT["vocab_size"],
                          text_config={**MLLAMA_TEXT, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # open the tanh gates (zero at init) so the cross-attention layers really count
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                p.uniform_(0.5, 1.5)
    return model


def random_pictures(n: int, seed: int, size: tuple[int, int] = (2 * MLLAMA_TILE, 2 * MLLAMA_TILE)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]
