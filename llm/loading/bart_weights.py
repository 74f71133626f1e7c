"""transformers' BART / mBART weights -> llm/models/bart.py's, for every checkpoint layout that holds them.

    BartForConditionalGeneration   model.decoder.*, model.encoder.*, model.shared, lm_head, final_logits_bias
    Florence2ForConditionalGeneration  model.language_model.{decoder,encoder,shared}.*, lm_head
    VisionEncoderDecoderModel (MBartForCausalLM / BartForCausalLM decoder)  decoder.model.decoder.*,
                                   decoder.lm_head, enc_to_dec_proj

Self-attention q/k/v are fused into one projection, cross-attention k/v into another; tied weights
(lm_head = the token embedding, saved once under one of the tied names) are looked up in each of
their names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.models.bart import BartConfig, BartDecoder


@dataclass(frozen=True, slots=True)
class BartLayout:
    """Where a checkpoint keeps each part (names up to the part's own)."""

    decoder: str  # "model.decoder."
    embeddings: tuple[str, ...]  # the token embedding, under any of its tied names
    lm_head: tuple[str, ...]  # the output projection, under any of its names (the embedding when tied)
    encoder: str | None = None  # "model.encoder.": only when the served model runs the encoder itself
    logits_bias: str | None = None  # "final_logits_bias"
    enc_to_dec_proj: str | None = None  # "enc_to_dec_proj."


def _first(sd: dict, names: tuple[str, ...], what: str) -> torch.Tensor:
    for name in names:
        if name in sd:
            return sd[name]
    raise KeyError(f"no {what} weight in the checkpoint (looked for {', '.join(names)})")


def _linear(sd: dict, src: str, dst: str) -> dict:
    return {f"{dst}.weight": sd[f"{src}.weight"], f"{dst}.bias": sd[f"{src}.bias"]}


def _fused(sd: dict, srcs: list[str], dst: str) -> dict:
    return {f"{dst}.weight": torch.cat([sd[f"{s}.weight"] for s in srcs]),
            f"{dst}.bias": torch.cat([sd[f"{s}.bias"] for s in srcs])}


def _layer(sd: dict, p: str, cross: bool) -> dict:
    out = _fused(sd, [f"{p}self_attn.{w}_proj" for w in "qkv"], "qkv_proj")
    out |= _linear(sd, f"{p}self_attn.out_proj", "out_proj")
    for name in ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2"):
        out |= _linear(sd, p + name, name if "norm" in name else f"mlp.{name}")
    if cross:
        out |= _linear(sd, f"{p}encoder_attn.q_proj", "cross_q_proj")
        out |= _fused(sd, [f"{p}encoder_attn.k_proj", f"{p}encoder_attn.v_proj"], "cross_kv_proj")
        out |= _linear(sd, f"{p}encoder_attn.out_proj", "cross_out_proj")
        out |= _linear(sd, f"{p}encoder_attn_layer_norm", "encoder_attn_layer_norm")
    return out


def _stack(sd: dict, prefix: str, cfg: BartConfig, cross: bool) -> dict:
    out = {"embed_positions.weight": sd[f"{prefix}embed_positions.weight"]}
    out |= _linear(sd, f"{prefix}layernorm_embedding", "layernorm_embedding")
    if cfg.pre_norm:
        out |= _linear(sd, f"{prefix}layer_norm", "layer_norm")
    for i in range(cfg.layers):
        out |= {f"layers.{i}.{k}": v for k, v in _layer(sd, f"{prefix}layers.{i}.", cross).items()}
    return out


def bart_state(sd: dict[str, torch.Tensor], layout: BartLayout, cfg: BartConfig,
               encoder: BartConfig | None = None) -> dict[str, torch.Tensor]:
    ours = {"embed_tokens.weight": _first(sd, layout.embeddings, "token embedding"),
            "lm_head.weight": _first(sd, layout.lm_head + layout.embeddings, "lm_head")}
    ours |= _stack(sd, layout.decoder, cfg, cross=True)
    if cfg.logits_bias:
        ours["lm_head.bias"] = sd[layout.logits_bias].reshape(-1)
    if encoder is not None:
        ours |= {f"encoder.{k}": v for k, v in _stack(sd, layout.encoder, encoder, cross=False).items()}
    if cfg.memory_width is not None and cfg.memory_width != cfg.d_model:
        ours |= _linear(sd, layout.enc_to_dec_proj.rstrip("."), "enc_to_dec_proj")
    return ours


def bart_decoder(sd: dict[str, torch.Tensor], layout: BartLayout, cfg: BartConfig,
                 encoder: BartConfig | None = None, dtype: torch.dtype | None = None) -> BartDecoder:
    """Built on the meta device and given the checkpoint's tensors (no random init, no second copy)."""
    with torch.device("meta"):
        decoder = BartDecoder(cfg, encoder)
    state = {k: v.contiguous() for k, v in bart_state(sd, layout, cfg, encoder).items()}
    decoder.load_state_dict(state, strict=True, assign=True)
    return decoder.to(dtype).eval() if dtype is not None else decoder.eval()
