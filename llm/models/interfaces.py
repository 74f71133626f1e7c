"""What the engine needs of a decoder family, declared once (vLLM's `interfaces.py` idea).

    logits = model(batch)                       # a step's flat tokens (llm/attention.py StepBatch)
    kv = model.cross_kv(image_tokens, out=...)  # image K/V, once per image run
    plan = model.cross_plan(prompt_ids, spans)  # which image tokens each position sees

The model runner allocates the self-attention pool from `kv_shape` and the image K/V pool from
`cross_kv_shape`; the scheduler bounds sequences by `context_length`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from llm.attention import KVShape, StepBatch
from llm.cross_plan import CrossPlan, ImageSpan


@runtime_checkable
class DecoderModel(Protocol):
    @property
    def kv_shape(self) -> KVShape: ...

    @property
    def cross_kv_shape(self) -> KVShape: ...

    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def cross_plan(self, prompt_ids: list[int], images: list[ImageSpan]) -> CrossPlan:
        """Raises ValueError for images the family cannot take (CoCa: other than one)."""

    def cross_kv(self, image_tokens: torch.Tensor, out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def __call__(self, batch: StepBatch) -> torch.Tensor: ...
