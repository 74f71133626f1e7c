"""Batch helpers over the engine: greedy generation for a list of prompts, and teacher-forced logits.

`generate_greedy` is the simple call the accuracy tests, the vision benchmark and the oracle tests
use: one throwaway engine sized for the batch. `teacher_forced_logits` runs given token ids through
the model runner in chunks (whole prompts, or one token at a time through the paged KV cache) and
returns every position's logits: what the oracle tests compare with reference implementations.
"""

from __future__ import annotations

import torch

from llm.engine import Engine, EngineConfig, ImageInput, Images, image_run, tensor_digest
from llm.kv_cache import bytes_per_token
from llm.model_runner import ModelRunner
from llm.params import SamplingParams
from llm.scheduler import ScheduledChunk


def as_images(image_embs, attended_tokens: list[int | None] | None = None) -> list[Images]:
    """Per row, what a request cross-attends to: `image_embs` [B, N, W] visual tokens (or a list of
    [N_i, W], one image per row, `attended_tokens` as `ImageInput.attended_tokens`), or already a list
    of `Images` (several images or none per row)."""
    if isinstance(image_embs, torch.Tensor) or all(isinstance(e, torch.Tensor) for e in image_embs):
        attended = attended_tokens or [None] * len(image_embs)
        return [ImageInput(tensor_digest(e), e, a) for e, a in zip(image_embs, attended)]
    return list(image_embs)


def generate_greedy(model: torch.nn.Module, image_embs, prompts: list[list[int]],
                    params: SamplingParams, block_size: int = 16,
                    attended_tokens: list[int | None] | None = None) -> list[list[int]]:
    """`image_embs`, `attended_tokens`: one image per prompt, or a list of `Images` (`as_images`).
    Returns the new tokens of each row, stop token excluded. Generation stops at one of
    `params.stop_token_ids`, at `params.max_tokens`, or at the context end; it samples as `params`
    says (greedy by default). A prompt that leaves no room to generate raises
    llm.scheduler.PromptRejected (the engine's check)."""
    images = as_images(image_embs, attended_tokens)
    context = model.context_length
    # A pool that holds the whole batch at once, so nothing is preempted.
    tokens = sum(-(-min(len(p) + params.max_tokens, context) // block_size) + 1 for p in prompts) * block_size
    kv_bytes = tokens * model.kv_shape.bytes_per_token(next(model.parameters()).dtype)
    engine = Engine(model, None, (),
                    EngineConfig(block_size=block_size, kv_cache_bytes=kv_bytes, max_num_seqs=max(1, len(prompts)),
                                 max_num_batched_tokens=max(512, sum(len(p) for p in prompts)),
                                 cross_cache_bytes=image_kv_bytes(model, images)))
    return [list(o.token_ids) for o in engine.generate([(p, i, params) for p, i in zip(prompts, images)])]


def image_kv_bytes(model: torch.nn.Module, images: list[Images], kv_dtype: torch.dtype | None = None) -> int:
    """What the image K/V of `images` (per request, as `as_images` gives them) take in `kv_dtype` (None:
    the model's): a throwaway engine's image K/V pool, which is preallocated (and touched) whole, needs no more."""
    per_token = bytes_per_token(model.cross_kv_shape, kv_dtype or next(model.parameters()).dtype)
    return per_token * sum(int(t.shape[0]) for _, t, _ in map(image_run, images) if t is not None)


@torch.inference_mode()
def teacher_forced_logits(model: torch.nn.Module, image_embs, ids: torch.Tensor,
                          chunk: int | None = None, block_size: int = 4,
                          attended_tokens: list[int | None] | None = None, forward=None,
                          kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ids [B, T] under images (`as_images`: [B, N, W] or per-row `Images`) -> logits [B, T, vocab],
    computed `chunk` tokens per step (None: the whole row at once) through the paged KV cache. A small
    block size makes the rows' blocks interleave in the pool, so block tables are really exercised.
    `forward`: what runs each step's batch in place of `model` (its compiled form). `kv_dtype`: both
    pools' (llm/kv_cache.py; torch.int8 the quantized format); None: the model's."""
    b, t = ids.shape
    chunk = chunk or t
    images = as_images(image_embs, attended_tokens)
    blocks_per_row = -(-t // block_size)
    runner = ModelRunner(model, b * blocks_per_row, block_size, image_kv_bytes(model, images, kv_dtype), kv_dtype)
    tables = [tuple(range(r, b * blocks_per_row, b)) for r in range(b)]  # row r owns blocks r, r+b, ...
    for r in range(b):
        runner.add_request(f"row{r}", ids[r].tolist(), *image_run(images[r]), SamplingParams(), frozenset())
    logits = torch.zeros(b, t, model.vocab_size)
    for start in range(0, t, chunk):
        end = min(t, start + chunk)
        chunks = [ScheduledChunk(f"row{r}", start, end, tuple(ids[r, start:end].tolist()), end - start > 1,
                                 False, tables[r], "") for r in range(b)]
        batch, _ = runner._build_batch(chunks)
        batch.logits_rows = torch.arange(batch.num_tokens)  # every position, not just the last
        out = (model if forward is None else forward)(batch)
        # _build_batch orders single-token chunks first, then the others, both in the given order
        logits[:, start:end] = out.view(b, end - start, -1).float()
    return logits
