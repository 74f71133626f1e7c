"""Greedy generation with the KV cache, a batch of prompts at once.

Prompts of different lengths share one batch: each row keeps its own positions, so the K/V of row b
sit at positions 0..len_b-1 of its cache and the position mask in the attention does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.coca import CoCaDecoder


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int = 32
    stop_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0  # stop ids are suppressed until this many tokens were generated


class ContextLengthError(ValueError):
    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(f"This model's maximum context length is {context_length} tokens. However, the prompt "
                         f"has {prompt_tokens} tokens, leaving no room to generate.")
        self.prompt_tokens, self.context_length = prompt_tokens, context_length


@torch.inference_mode()
def generate_greedy(decoder: CoCaDecoder, image_embs: torch.Tensor, prompts: list[list[int]],
                    params: GenerationParams) -> list[list[int]]:
    """image_embs: [B, N, W] visual tokens, one row per prompt. Returns the new tokens of each row,
    stop token excluded. Generation stops at a stop id, at max_new_tokens, or at the context end."""
    context = decoder.cfg.context_length
    for p in prompts:
        if not 0 < len(p) < context:
            raise ContextLengthError(len(p), context)
    batch, device = len(prompts), decoder.lm_head.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    ids = torch.zeros((batch, longest), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    # Padded positions past a row's end compute throwaway K/V that later tokens overwrite.
    positions = torch.arange(longest, device=device).expand(batch, longest).clamp(max=context - 1)
    cache, cross = decoder.new_cache(batch), decoder.cross_kv(image_embs)
    logits = decoder(ids, positions, cache, cross)[torch.arange(batch), lengths - 1]

    stop = torch.tensor(params.stop_ids or [-1], device=device)
    budget = torch.clamp(context - lengths, max=params.max_new_tokens)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = budget <= 0
    for step in range(int(budget.max())):
        if step < params.min_new_tokens and params.stop_ids:
            logits[:, stop] = float("-inf")
        next_ids = logits.argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            token = int(next_ids[i])
            if token in params.stop_ids:
                done[i] = True
            else:
                out[i].append(token)
                done[i] = len(out[i]) >= budget[i]
        if bool(done.all()):
            break
        positions = (lengths + step).clamp(max=context - 1)[:, None]
        logits = decoder(next_ids[:, None], positions, cache, cross)[:, 0]
    return out
