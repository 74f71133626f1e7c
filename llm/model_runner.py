"""The model runner: owns the tensors (KV pool, cross-attention K/V pool) and runs each step's forward.

    sampled = runner.run(scheduler_output)

It turns the scheduler's chunks into one flat `StepBatch`, runs the model, and samples one token for
every chunk that asks for one. The scheduler and block manager never see a tensor (STYLE lesson 1).

Cross-attention K/V depend on the image alone, so they are computed once per feature digest and kept
in their own preallocated pool (llm/cross_kv_pool.py) for every step, turn and request that shows
the same image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.attention import CrossLayerKV, DecodeKeys, PrefillSpan, StepBatch
from llm.cross_kv_pool import CrossKV, CrossKVPool
from llm.cross_plan import CrossPlan, ImageSpan, KeyRanges
from llm.grammar.constraint import GrammarConstraint
from llm.kv_cache import KV, PagedKVCache, QuantizedKV
from llm.params import SamplingParams
from llm.sampling import RequestSampler, sample
from llm.scheduler import ScheduledChunk, SchedulerOutput


def _prefix_mask(counts: list[int], length: int, device: torch.device) -> torch.Tensor:
    """[len(counts), length] bool: row i is True on its first counts[i] positions."""
    return torch.arange(length, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]


def _ranges_mask(rows: list[KeyRanges], length: int, device: torch.device) -> torch.Tensor:
    """[len(rows), length] bool: row i is True inside its key ranges."""
    if all(len(r) == 1 and r[0][0] == 0 for r in rows):  # the common case: a prefix of each row's keys
        return _prefix_mask([r[0][1] for r in rows], length, device)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, ranges in enumerate(rows):
        for lo, hi in ranges:
            mask[i, lo:hi] = True
    return mask.to(device)


# What one more group of decode rows costs (its gathers and attention call per layer) in padded keys:
# measured on the 126M Mllama here, ~60 us per group and layer against ~0.2 us per row and key.
GROUP_COST_KEYS = 300
MAX_DECODE_GROUPS = 4


def length_groups(lens: list[int], max_groups: int = MAX_DECODE_GROUPS, group_cost: int = GROUP_COST_KEYS) -> list[int]:
    """Bounds [0, b1, ..., len(lens)] splitting rows sorted by key count into groups of about equal
    size, the number of groups (1..max_groups) the one that reads the fewest padded keys, counting
    `group_cost` per group. Why: one batched attention pads every row to the longest; in chat serving
    rows run from 30 to 400 keys, and padding doubled the attention's reads."""
    n = len(lens)
    best, best_cost = [0, n], n * lens[-1] + group_cost
    for k in range(2, min(max_groups, n) + 1):
        bounds = [round(i * n / k) for i in range(k + 1)]
        cost = sum((e - s) * lens[e - 1] for s, e in zip(bounds, bounds[1:])) + k * group_cost
        if cost < best_cost:
            best, best_cost = bounds, cost
    return best


def _stack_or_view(tensors: list[KV], length: int) -> KV:
    """[t_0 .. t_B-1] (each [Hkv, N, D]) as one [B, Hkv, length, D]: a view when they sit at equal
    steps in one storage with equal shapes and strides (images projected together), else a padded copy.
    int8 K/V: their data, scales and zero points each so."""
    if isinstance(tensors[0], QuantizedKV):
        return QuantizedKV(_stack_or_view([t.data for t in tensors], length),
                           _stack_or_view([t.scale for t in tensors], length),
                           _stack_or_view([t.zero for t in tensors], length))
    first = tensors[0]
    start, ptr = first.storage_offset(), first.untyped_storage().data_ptr()
    step = tensors[1].storage_offset() - start if len(tensors) > 1 else first.numel()
    if first.shape[1] == length and step > 0 and all(
            t.shape == first.shape and t.stride() == first.stride() and t.untyped_storage().data_ptr() == ptr
            and t.storage_offset() == start + i * step for i, t in enumerate(tensors)):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), start)
    return torch.stack([F.pad(t, (0, 0, 0, length - t.shape[1])) if t.shape[1] < length else t for t in tensors])


@dataclass
class _RequestState:
    image_digest: str | None  # names all of the request's image tokens; None: a text-only request
    image_tokens: torch.Tensor | None  # dropped once their cross K/V are in the pool
    plan: CrossPlan  # which image tokens each position attends to
    sampler: RequestSampler
    num_prompt_tokens: int


def compiled_for_decode(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward through torch.compile (gpt-fast's idea, for decode steps): inductor fuses
    each layer's small ops (norms, RoPE, residual adds, SwiGLU's gate) into a few kernels and, with
    its C++ wrapper on the CPU, calls them and the matmuls with no Python in between. Decoding one
    sequence on this 2-core CPU spends a quarter of each token in those small ops' dispatch: 25-26 vs
    29-32 ms per token in bench/RESULTS.md's run. dynamic=True: one graph for every row count and
    context length; a new step *kind* (a key mask or none, keys gathered or read in place) compiles
    once more. The matmuls stay oneDNN's (`packed_linear_op`)."""
    options = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else {}
    return torch.compile(model, dynamic=True, options=options)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, cross_cache_bytes: int,
                 kv_dtype: torch.dtype | None = None, compile_decode: bool = False) -> None:
        """`kv_dtype`: both pools' (llm/kv_cache.py; torch.int8 the quantized format); None: the model's."""
        self.model = model.eval()
        # Decode-only steps only: prefill chunks vary more in shape and spend their time in matmuls.
        self.decode_model = compiled_for_decode(model) if compile_decode else model
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.kv_dtype = kv_dtype or self.dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.kv_cache = PagedKVCache(model.kv_shape, num_blocks * block_size, self.kv_dtype, self.device)
        self.k_pool, self.v_pool = self.kv_cache.k, self.kv_cache.v
        self.cross_pool = CrossKVPool(cross_cache_bytes, model.cross_kv_shape, self.kv_dtype, self.device)
        self._requests: dict[str, _RequestState] = {}
        self._stacked: tuple[tuple[tuple[str, int], ...], list, torch.Tensor | None] | None = None

    @property
    def compiled_decode(self) -> bool:
        return self.decode_model is not self.model

    @staticmethod
    def blocks_for_budget(model: torch.nn.Module, budget_bytes: int, block_size: int,
                          kv_dtype: torch.dtype) -> int:
        return PagedKVCache.blocks_for_budget(model.kv_shape, budget_bytes, block_size, kv_dtype)

    @property
    def kv_pool_bytes(self) -> int:
        return self.kv_cache.bytes

    # -- request lifetime --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], image_digest: str | None,
                    image_tokens: torch.Tensor | None, spans: tuple[ImageSpan, ...], params: SamplingParams,
                    stop_ids: frozenset[int], constraint: GrammarConstraint | None = None) -> None:
        """`image_tokens` [N, W]: the request's images end to end (`spans` their lengths, in prompt
        order), named by `image_digest`; None for a text-only request. The model's `cross_plan` says
        which of them each position attends to. `constraint`: the request's grammar state, if any."""
        plan = self.model.cross_plan(prompt_ids, list(spans))
        if image_digest is not None:
            self.cross_pool.acquire(image_digest)
        self._requests[request_id] = _RequestState(
            image_digest, None if image_digest is None or image_digest in self.cross_pool else image_tokens, plan,
            RequestSampler(params, stop_ids, prompt_ids, self.device, constraint), len(prompt_ids))

    def grammar_failure(self, request_id: str) -> str:
        """Why the request's grammar could not go on ("" when it could, or has none)."""
        state = self._requests.get(request_id)
        constraint = state.sampler.constraint if state is not None else None
        return constraint.failure if constraint is not None else ""

    def release(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None and state.image_digest is not None:
            self.cross_pool.release(state.image_digest)

    # -- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, output: SchedulerOutput) -> dict[str, int]:
        # (output.finished_ids need nothing here: the engine releases a request's state when it ends.)
        chunks = [c for c in output.chunks if c.request_id in self._requests]
        if not chunks:
            return {}
        batch, sampling = self._build_batch(chunks)
        logits = (self.model if batch.prefills else self.decode_model)(batch)
        if not sampling:
            return {}
        # sampled in fp32 whatever the model's dtype: bf16 logits tie often (8 bits of mantissa), and
        # penalties, temperature and top-p then act on values rounded again at every operation
        logits = logits.float()
        states = [self._requests[c.request_id] for c in sampling]
        generated = [c.end - s.num_prompt_tokens for c, s in zip(sampling, states)]
        tokens = sample(logits, [s.sampler for s in states], generated)
        for state, token in zip(states, tokens):
            state.sampler.observe(token)
        return {c.request_id: t for c, t in zip(sampling, tokens)}

    def _image_kvs(self, ordered: list[ScheduledChunk]) -> tuple[dict[str, int], list[CrossKV]]:
        """The step's distinct images in first-use order and their K/V. Images new to the pool are
        projected together, one matmul per image size, into adjacent places in the pool."""
        image_index: dict[str, int] = {}
        new: dict[str, torch.Tensor] = {}
        for c in ordered:
            state = self._requests[c.request_id]
            d = state.image_digest
            if d is not None and d not in image_index:
                image_index[d] = len(image_index)
                if d not in self.cross_pool:
                    if state.image_tokens is None:  # evicted while held: the refcount forbids it
                        raise RuntimeError(f"cross-attention K/V of {d} vanished")
                    new[d] = state.image_tokens
            state.image_tokens = None
        by_shape: dict[tuple, list[str]] = {}
        for d, tokens in new.items():
            by_shape.setdefault(tuple(tokens.shape), []).append(d)
        for (num_tokens, _), digests in by_shape.items():
            start, dest = self.cross_pool.reserve(len(digests), num_tokens)
            tokens = torch.stack([new[d] for d in digests]).to(self.device)
            if self.dtype.is_floating_point:  # features of a tower that computes in another dtype
                tokens = tokens.to(self.dtype)
            self.model.cross_kv(tokens, out=dest)
            self.cross_pool.put(digests, start, dest)
        self.cross_pool.misses += len(new)
        self.cross_pool.hits += len(image_index) - len(new)
        return image_index, [self.cross_pool.get(d) for d in image_index]

    def _build_batch(self, chunks: list[ScheduledChunk]) -> tuple[StepBatch, list[ScheduledChunk]]:
        # shortest first, so rows of similar length sit together (`length_groups`); stable, so rows of one
        # length keep their order (a captioning batch's rows stay in the order its image K/V were laid out)
        decodes = sorted((c for c in chunks if c.num_tokens == 1), key=lambda c: c.end)
        prefills = [c for c in chunks if c.num_tokens > 1]
        ordered = decodes + prefills
        bs, dev = self.block_size, self.device
        token_ids, positions, slots, logits_rows, sampling = [], [], [], [], []
        row = 0
        for c in ordered:
            token_ids.extend(c.token_ids)
            pos = range(c.start, c.end)
            positions.extend(pos)
            slots.extend(c.block_table[p // bs] * bs + p % bs for p in pos)
            row += c.num_tokens
            if c.sample:
                logits_rows.append(row - 1)
                sampling.append(c)
        positions_t = torch.tensor(positions, device=dev)

        states = [self._requests[c.request_id] for c in ordered]
        image_index, image_kvs = self._image_kvs(ordered)
        cross_layers = self.model.cross_kv_shape.layers

        cross_mask, decode_keys, decode_rows = None, [], None
        decode_cross: list = [(None, None)] * cross_layers
        if decodes:
            decode_keys = self._decode_keys(decodes)
            with_image = [i for i, s in enumerate(states[: len(decodes)]) if s.image_digest is not None]
            if len(with_image) < len(decodes):  # text-only rows attend to no image (their output is zero)
                decode_rows = torch.tensor(with_image, dtype=torch.long, device=dev)
            if with_image:
                decode_cross, cross_mask = self._stack_decode_cross(
                    tuple((states[i].image_digest, states[i].plan.keys_at(decodes[i].start)) for i in with_image),
                    image_index, image_kvs)
        spans = []
        row = len(decodes)
        for c, state in zip(prefills, states[len(decodes):]):
            t = c.num_tokens
            pos = torch.arange(c.end, device=dev)
            table = torch.tensor(c.block_table, device=dev)
            causal = pos[None, :] <= torch.arange(c.start, c.end, device=dev)[:, None]
            cross_index = None if state.image_digest is None else image_index[state.image_digest]
            spans.append(PrefillSpan(slice(row, row + t), table[pos // bs] * bs + pos % bs, causal, cross_index,
                                     self._prefill_cross_mask(c, state.plan)))
            row += t
        cross = [CrossLayerKV(dk, dv, [kv[layer] for kv in image_kvs], decode_rows)
                 for layer, (dk, dv) in enumerate(decode_cross)]
        starts = [s.plan.visible_from for s in states]
        image_visible = None
        if any(starts):
            first_seen = torch.tensor([s for c, s in zip(ordered, starts) for _ in range(c.num_tokens)], device=dev)
            image_visible = positions_t >= first_seen
        batch = StepBatch(
            token_ids=torch.tensor(token_ids, device=dev), positions=positions_t,
            slot_mapping=torch.tensor(slots, device=dev), num_decodes=len(decodes),
            decode_keys=decode_keys, prefills=spans,
            k_pool=self.k_pool, v_pool=self.v_pool, cross=cross, decode_cross_mask=cross_mask,
            image_visible=image_visible, logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev))
        return batch, sampling

    def _decode_keys(self, decodes: list[ScheduledChunk]) -> list[DecodeKeys]:
        """The decodes' keys (`decodes` shortest first): read in place for a lone row whose blocks are in
        order, else gathered through the block tables per group of rows of similar length."""
        bs, dev = self.block_size, self.device
        lens = [c.end for c in decodes]
        table = decodes[0].block_table[: -(-lens[0] // bs)]
        if len(decodes) == 1 and all(b == table[0] + i for i, b in enumerate(table)):
            return [DecodeKeys(slice(0, 1), span=(table[0] * bs, lens[0]))]
        # A compiled step keeps one group and always gets a mask: fewer step kinds to compile.
        bounds = [0, len(lens)] if self.compiled_decode else length_groups(lens)
        groups = []
        for start, end in zip(bounds, bounds[1:]):
            longest = lens[end - 1]
            tables = torch.zeros(end - start, -(-longest // bs), dtype=torch.long, device=dev)
            for i, c in enumerate(decodes[start:end]):
                tables[i, : len(c.block_table)] = torch.tensor(c.block_table[: tables.shape[1]])
            pos = torch.arange(longest, device=dev)
            mask = None
            if lens[start] != longest or self.compiled_decode:
                mask = _prefix_mask(lens[start:end], longest, dev)[:, None, None, :]
            groups.append(DecodeKeys(slice(start, end), tables[:, pos // bs] * bs + pos % bs, mask))
        return groups

    def _prefill_cross_mask(self, chunk: ScheduledChunk, plan: CrossPlan) -> torch.Tensor | None:
        """[T, N] which image tokens each row of a prefill chunk attends to; None: all, every row."""
        if not plan.has_image or plan.sees_all(chunk.start, chunk.end):
            return None  # every row sees every token (CoCa; one Mllama image with no padding tiles)
        return _ranges_mask([plan.keys_at(p) for p in range(chunk.start, chunk.end)], plan.num_keys, self.device)

    def _stack_decode_cross(self, decode_keys: tuple[tuple[str, KeyRanges], ...], image_index: dict[str, int],
                            image_kvs: list[CrossKV]):
        """Per layer, the image K/V of the decodes that have images, stacked [B, Hkv, N_max, D]. Rebuilt
        only when the set of decoding requests changes, which in steady decoding is every few dozen
        steps, not every step; and no copy at all when the rows' images were projected together, in
        this order (a batch captioning job: 64 images x 12 layers of K/V would be 800 MB to copy)."""
        if self._stacked is not None and self._stacked[0] == decode_keys:
            return self._stacked[1], self._stacked[2]
        per_row = [image_kvs[image_index[d]] for d, _ in decode_keys]
        longest = max(kv[0][0].shape[1] for kv in per_row)
        ranges = [keys for _, keys in decode_keys]
        every_key = all(r == ((0, longest),) for r in ranges)
        mask = (_ranges_mask(ranges, longest, self.device)[:, None, None, :]
                if self.compiled_decode or not every_key else None)  # as the key mask
        stacked = []
        for layer in range(len(per_row[0])):
            ks = [kv[layer][0] for kv in per_row]
            vs = [kv[layer][1] for kv in per_row]
            stacked.append((_stack_or_view(ks, longest), _stack_or_view(vs, longest)))
        self._stacked = (decode_keys, stacked, mask)
        return stacked, mask
