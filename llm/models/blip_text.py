"""BLIP's text decoder (BlipTextLMHeadModel, BERT-style) with a KV cache, on the engine's flat-token
interface.

References: Li et al., "BLIP: Bootstrapping Language-Image Pre-training" (2022), salesforce/BLIP
`models/med.py`; transformers `models/blip/modeling_blip_text.py` (5.24), whose weights this module
loads and whose logits it reproduces.

    token ids ─ word + position embeddings ─ LN ─ layers (post-LN, BERT's):
        x = LN(x + dense(self_attn(x)));  x = LN(x + dense(cross_attn(x, image)));
        x = LN(x + dense(act(dense(x))))
      ─ head: dense, act, LN ─ decoder (tied to the word embeddings) + bias ─ logits

Absolute learned positions from 0; cross-attention keys and values project the vision model's
states (`encoder_hidden_size` wide) once per image (`cross_kv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm.attention import StepBatch
from llm.models.one_image import ImageKV, OneImageDecoder, activation, built_from


@dataclass(frozen=True, slots=True)
class BlipTextConfig:
    vocab_size: int
    width: int
    layers: int
    heads: int
    intermediate: int
    context_length: int
    encoder_width: int
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"

    @classmethod
    def from_hf(cls, d: dict, max_context: int | None = None) -> "BlipTextConfig":
        context = int(d.get("max_position_embeddings", 512))
        activation(d.get("hidden_act", "gelu"))
        return cls(vocab_size=int(d["vocab_size"]), width=int(d["hidden_size"]), layers=int(d["num_hidden_layers"]),
                   heads=int(d["num_attention_heads"]), intermediate=int(d["intermediate_size"]),
                   context_length=min(context, max_context) if max_context else context,
                   encoder_width=int(d.get("encoder_hidden_size", d["hidden_size"])),
                   layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)), activation=d.get("hidden_act", "gelu"))


class Layer(nn.Module):
    def __init__(self, cfg: BlipTextConfig, index: int) -> None:
        super().__init__()
        w, eps, self.heads, self.index = cfg.width, cfg.layer_norm_eps, cfg.heads, index
        self.qkv = nn.Linear(w, 3 * w)
        self.attn_out = nn.Linear(w, w)
        self.attn_norm = nn.LayerNorm(w, eps=eps)
        self.cross_q = nn.Linear(w, w)
        self.cross_out = nn.Linear(w, w)
        self.cross_norm = nn.LayerNorm(w, eps=eps)
        self.intermediate = nn.Linear(w, cfg.intermediate)
        self.output = nn.Linear(cfg.intermediate, w)
        self.output_norm = nn.LayerNorm(w, eps=eps)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n, w = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, w // self.heads).unbind(1)
        x = self.attn_norm(x + self.attn_out(batch.self_attention(self.index, q, k, v).reshape(n, w)))
        q = self.cross_q(x).view(n, self.heads, w // self.heads)
        x = self.cross_norm(x + self.cross_out(batch.cross_attention(self.index, q).reshape(n, w)))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class BlipTextDecoder(OneImageDecoder):
    def __init__(self, cfg: BlipTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers, self.heads, self.head_dim = cfg.layers, cfg.heads, cfg.width // cfg.heads
        self.context, self.vocab = cfg.context_length, cfg.vocab_size
        w = cfg.width
        self.word_embeddings = nn.Embedding(cfg.vocab_size, w)
        self.position_embeddings = nn.Embedding(cfg.context_length, w)
        self.embed_norm = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.text_layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.layers))
        self.cross_blocks = nn.ModuleList(ImageKV(cfg.encoder_width, cfg.heads, self.head_dim) for _ in range(cfg.layers))
        self.head_dense = nn.Linear(w, w)
        self.head_norm = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(w, cfg.vocab_size)
        self.act = activation(cfg.activation)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        x = self.embed_norm(self.word_embeddings(batch.token_ids) + self.position_embeddings(batch.positions))
        for layer in self.text_layers:
            x = layer(x, batch)
        h = self.head_norm(self.act(self.head_dense(x[batch.logits_rows])))
        return self.lm_head(h)


def blip_text_state_from_hf(cfg: BlipTextConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BlipTextLMHeadModel weights (no `text_decoder.` prefix) -> ours."""
    sd = {k.removeprefix("bert."): v for k, v in hf.items()}
    words = sd["embeddings.word_embeddings.weight"]
    ours = {"word_embeddings.weight": words,
            "position_embeddings.weight": sd["embeddings.position_embeddings.weight"][: cfg.context_length],
            "embed_norm.weight": sd["embeddings.LayerNorm.weight"], "embed_norm.bias": sd["embeddings.LayerNorm.bias"],
            "head_dense.weight": sd["cls.predictions.transform.dense.weight"],
            "head_dense.bias": sd["cls.predictions.transform.dense.bias"],
            "head_norm.weight": sd["cls.predictions.transform.LayerNorm.weight"],
            "head_norm.bias": sd["cls.predictions.transform.LayerNorm.bias"],
            "lm_head.weight": sd.get("cls.predictions.decoder.weight", words),
            "lm_head.bias": sd.get("cls.predictions.decoder.bias", sd["cls.predictions.bias"])}
    for i in range(cfg.layers):
        p, o = f"encoder.layer.{i}.", f"text_layers.{i}."
        for kind in ("weight", "bias"):
            ours[f"{o}qkv.{kind}"] = torch.cat([sd[f"{p}attention.self.{x}.{kind}"] for x in ("query", "key", "value")])
            ours[f"{o}attn_out.{kind}"] = sd[f"{p}attention.output.dense.{kind}"]
            ours[f"{o}attn_norm.{kind}"] = sd[f"{p}attention.output.LayerNorm.{kind}"]
            ours[f"{o}cross_q.{kind}"] = sd[f"{p}crossattention.self.query.{kind}"]
            ours[f"cross_blocks.{i}.kv.{kind}"] = torch.cat([sd[f"{p}crossattention.self.{x}.{kind}"]
                                                             for x in ("key", "value")])
            ours[f"{o}cross_out.{kind}"] = sd[f"{p}crossattention.output.dense.{kind}"]
            ours[f"{o}cross_norm.{kind}"] = sd[f"{p}crossattention.output.LayerNorm.{kind}"]
            ours[f"{o}intermediate.{kind}"] = sd[f"{p}intermediate.dense.{kind}"]
            ours[f"{o}output.{kind}"] = sd[f"{p}output.dense.{kind}"]
            ours[f"{o}output_norm.{kind}"] = sd[f"{p}output.LayerNorm.{kind}"]
    return ours


def blip_text_decoder(config: dict, tensors: dict[str, torch.Tensor], max_context: int | None = None,
                      dtype: torch.dtype | None = None) -> BlipTextDecoder:
    """From BLIP's text_config (dict) and its BlipTextLMHeadModel tensors (no `text_decoder.` prefix)."""
    cfg = BlipTextConfig.from_hf(config, max_context)
    return built_from(BlipTextDecoder, cfg, blip_text_state_from_hf(cfg, tensors), dtype)
