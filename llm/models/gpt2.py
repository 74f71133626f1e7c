"""GPT-2 as the decoder of a VisionEncoderDecoderModel (ViT-GPT2 captioners), with a KV cache, on the
engine's flat-token interface.

References: Radford et al., "Language Models are Unsupervised Multitask Learners" (2019);
transformers `models/gpt2/modeling_gpt2.py` (5.24: GPT2Block with add_cross_attention), whose weights
this module loads and whose logits it reproduces.

    token ids ─ wte + wpe[position] ─ blocks: LN, causal self-attn, +; LN, cross-attn to the image, +;
                                              LN, MLP (c_fc, act, c_proj), + ─ LN ─ lm_head ─ logits

GPT-2 stores its projections as Conv1D ([in, out] weights): they are transposed into nn.Linear here.
The cross-attention's c_attn projects the image tokens to K and V (once per image, `cross_kv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm.attention import StepBatch
from llm.models.one_image import ImageKV, OneImageDecoder, activation, built_from


@dataclass(frozen=True, slots=True)
class GPT2DecoderConfig:
    vocab_size: int
    width: int
    layers: int
    heads: int
    context_length: int
    inner: int
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"

    @classmethod
    def from_hf(cls, d: dict, max_context: int | None = None) -> "GPT2DecoderConfig":
        for flag in ("scale_attn_by_inverse_layer_idx",):
            if d.get(flag):
                raise ValueError(f"GPT-2 option {flag}=True is not supported")
        if not d.get("scale_attn_weights", True):
            raise ValueError("GPT-2 option scale_attn_weights=False is not supported")
        if not d.get("add_cross_attention", False):
            raise ValueError("this GPT-2 has no cross-attention (add_cross_attention is false): it cannot see images")
        width = int(d["n_embd"])
        context = int(d.get("n_positions", 1024))
        activation(d.get("activation_function", "gelu_new"))
        return cls(vocab_size=int(d["vocab_size"]), width=width, layers=int(d["n_layer"]), heads=int(d["n_head"]),
                   context_length=min(context, max_context) if max_context else context,
                   inner=int(d.get("n_inner") or 4 * width), layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                   activation=d.get("activation_function", "gelu_new"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2DecoderConfig, index: int) -> None:
        super().__init__()
        w, self.heads, self.index = cfg.width, cfg.heads, index
        self.ln_1 = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(w, 3 * w)
        self.attn_out = nn.Linear(w, w)
        self.ln_cross = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.cross_q = nn.Linear(w, w)
        self.cross_out = nn.Linear(w, w)
        self.ln_2 = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(w, cfg.inner)
        self.proj = nn.Linear(cfg.inner, w)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(n, 3, self.heads, w // self.heads).unbind(1)
        x = x + self.attn_out(batch.self_attention(self.index, q, k, v).reshape(n, w))
        q = self.cross_q(self.ln_cross(x)).view(n, self.heads, w // self.heads)
        x = x + self.cross_out(batch.cross_attention(self.index, q).reshape(n, w))
        return x + self.proj(self.act(self.fc(self.ln_2(x))))


class GPT2Decoder(OneImageDecoder):
    def __init__(self, cfg: GPT2DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers, self.heads, self.head_dim = cfg.layers, cfg.heads, cfg.width // cfg.heads
        self.context, self.vocab = cfg.context_length, cfg.vocab_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.context_length, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.cross_blocks = nn.ModuleList(ImageKV(cfg.width, cfg.heads, self.head_dim) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        x = self.wte(batch.token_ids) + self.wpe(batch.positions)
        for block in self.blocks:
            x = block(x, batch)
        return self.lm_head(self.ln_f(x[batch.logits_rows]))


def gpt2_state_from_hf(cfg: GPT2DecoderConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' GPT2LMHeadModel weights (no prefix) -> ours (Conv1D weights transposed)."""
    sd = {k.removeprefix("transformer."): v for k, v in hf.items()}
    ours = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"][: cfg.context_length],
            "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"],
            "lm_head.weight": sd.get("lm_head.weight", sd["wte.weight"])}
    names = {"attn.c_attn": "qkv", "attn.c_proj": "attn_out", "crossattention.q_attn": "cross_q",
             "crossattention.c_proj": "cross_out", "mlp.c_fc": "fc", "mlp.c_proj": "proj"}
    for i in range(cfg.layers):
        p = f"h.{i}."
        for theirs, mine in names.items():
            ours[f"blocks.{i}.{mine}.weight"] = sd[p + theirs + ".weight"].T
            ours[f"blocks.{i}.{mine}.bias"] = sd[p + theirs + ".bias"]
        for ln, mine in (("ln_1", "ln_1"), ("ln_cross_attn", "ln_cross"), ("ln_2", "ln_2")):
            ours[f"blocks.{i}.{mine}.weight"] = sd[f"{p}{ln}.weight"]
            ours[f"blocks.{i}.{mine}.bias"] = sd[f"{p}{ln}.bias"]
        ours[f"cross_blocks.{i}.kv.weight"] = sd[p + "crossattention.c_attn.weight"].T
        ours[f"cross_blocks.{i}.kv.bias"] = sd[p + "crossattention.c_attn.bias"]
    return ours


def gpt2_decoder(config: dict, tensors: dict[str, torch.Tensor], max_context: int | None = None,
                 dtype: torch.dtype | None = None) -> GPT2Decoder:
    """From a GPT-2 config (dict) and its GPT2LMHeadModel tensors (names without the VED's `decoder.`)."""
    cfg = GPT2DecoderConfig.from_hf(config, max_context)
    return built_from(GPT2Decoder, cfg, gpt2_state_from_hf(cfg, tensors), dtype)
