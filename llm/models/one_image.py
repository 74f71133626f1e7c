"""What the image-to-text decoders (BLIP's text decoder, GPT-2, TrOCR, ...) share on the engine's
interface: one image per sequence, every token attends to all of it, one self- and one
cross-attention per layer, and a few activation functions named as transformers names them.

A subclass sets `layers`, `heads`, `head_dim`, `context`, `vocab` and `cross_blocks` (the modules whose
`image_kv(tokens, out)` give a layer's image K/V) and implements `forward(batch)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.attention import KVShape, head_major
from llm.cross_plan import CrossPlan, ImageSpan

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class ImageKV(nn.Module):
    """A cross-attention's key and value projections of the image tokens, fused into one matmul."""

    def __init__(self, in_width: int, heads: int, head_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.kv = nn.Linear(in_width, 2 * heads * head_dim, bias=bias)

    def image_kv(self, image_tokens: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = head_major(self.kv, image_tokens, self.heads, self.head_dim, parts=2, out=out)
        return k, v


class OneImageDecoder(nn.Module):
    layers: int
    heads: int
    head_dim: int
    context: int
    vocab: int
    cross_blocks: nn.ModuleList  # of ImageKV, one per layer

    def fill_buffers(self) -> None:
        """Give values to buffers no checkpoint holds (built on the meta device, they have none)."""

    @property
    def kv_shape(self) -> KVShape:
        return KVShape(layers=self.layers, kv_heads=self.heads, head_dim=self.head_dim)

    @property
    def cross_kv_shape(self) -> KVShape:
        return KVShape(layers=self.layers, kv_heads=self.heads, head_dim=self.head_dim)

    @property
    def context_length(self) -> int:
        return self.context

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def cross_plan(self, prompt_ids: list[int], images: list[ImageSpan]) -> CrossPlan:
        if len(images) != 1:
            raise ValueError(f"this decoder cross-attends to exactly one image, got {len(images)}")
        return CrossPlan.everything(images[0].length)

    def cross_kv(self, image_tokens: torch.Tensor, out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Images [B, N, W] -> K/V [B, heads, N, head_dim] per layer (into `out` when given): once per image."""
        image_tokens = image_tokens.to(next(self.parameters()).dtype)
        return [block.image_kv(image_tokens, None if out is None else out[i]) for i, block in enumerate(self.cross_blocks)]


def built_from(cls, cfg, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """`cls(cfg)` built on the meta device and given `state` (strict): no random init, no second copy."""
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    model.fill_buffers()
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise RuntimeError(f"buffer {name} was not given a value")
    return (model.to(dtype) if dtype is not None else model).eval()
