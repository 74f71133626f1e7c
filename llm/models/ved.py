"""The decoders a VisionEncoderDecoderModel may hold, keyed by the decoder's model_type: one small
table, one entry per decoder file in llm/models.

    decoder = VED_DECODERS[config["decoder"]["model_type"]](decoder_config, tensors, encoder_width, max_context)

`tensors` are the checkpoint's decoder.* weights with that prefix removed; `encoder_width` is what the
decoder cross-attends to (the encoder's hidden size, or the decoder's own width when the checkpoint
projects the encoder's states with enc_to_dec_proj). Each builder returns a DecoderModel
(llm/models/interfaces.py) in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from llm.loading.bart_weights import BartLayout, bart_decoder
from llm.models.bart import BartConfig
from llm.models.gpt2 import gpt2_decoder
from llm.models.trocr import trocr_decoder

DecoderBuilder = Callable[[dict, dict[str, torch.Tensor], int, int | None], torch.nn.Module]


def _gpt2(config: dict, tensors: dict[str, torch.Tensor], encoder_width: int, max_context: int | None):
    if encoder_width != config["n_embd"]:
        raise ValueError(f"GPT-2 cross-attends at its own width {config['n_embd']}, the image tokens have {encoder_width}")
    return gpt2_decoder(config, tensors, max_context)


def _trocr(config: dict, tensors: dict[str, torch.Tensor], encoder_width: int, max_context: int | None):
    return trocr_decoder(config, tensors, encoder_width, max_context)


# (M)BartForCausalLM, as VisionEncoderDecoderModel holds it (Donut: MBart)
CAUSAL_BART = BartLayout(decoder="model.decoder.", embeddings=("model.decoder.embed_tokens.weight",),
                         lm_head=("lm_head.weight",))


def _bart(config: dict, tensors: dict[str, torch.Tensor], encoder_width: int, max_context: int | None):
    cfg = BartConfig.from_hf(config, "decoder")
    if encoder_width != cfg.d_model:
        raise ValueError(f"a BART decoder cross-attends at its own width {cfg.d_model}, the image tokens have {encoder_width}")
    if max_context is not None and max_context < cfg.max_positions:
        cfg = replace(cfg, max_positions=max_context)
        key = "model.decoder.embed_positions.weight"
        tensors = {**tensors, key: tensors[key][: max_context + 2]}
    return bart_decoder(tensors, CAUSAL_BART, cfg)


VED_DECODERS: dict[str, DecoderBuilder] = {"gpt2": _gpt2, "trocr": _trocr, "bart": _bart, "mbart": _bart}
