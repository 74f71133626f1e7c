"""A whole decoder to W8A16 / W4A16, and back from a checkpoint.

    quantize_model(decoder, QuantScheme("int4", group_size=32))              # round-to-nearest
    quantize_model(decoder, QuantScheme("int4", 32, "gptq"), calibration=batches)
    save_quantized(decoder, "model.safetensors");  load_quantized(fresh_decoder, "model.safetensors")

Every `nn.Linear` of the model (our MllamaDecoder, CoCaDecoder or any other) becomes an Int8Linear or
Int4Linear except those `skip` names; everything else (embeddings, norms, gates, skipped linears)
becomes bf16, so the engine runs the model in bf16: activations, KV pool and image K/V.

What stays bf16 by default (figures in bench/RESULTS.md, `python -m bench.quant_kernels`): the token
embeddings, because decoding reads one row of them per token (quantizing saves RAM, not time); the
lm_head is quantized like every other linear (see DEFAULT_SKIP).

GPTQ is applied layer block by layer block ("layers.3", "mm_cross.0", "lm_head"), in the order the
blocks first run, each on inputs that already went through the quantized blocks before it (the paper's
sequential scheme): one pass of the calibration set per block.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm.packed_linear import PackedLinear
from llm.quant.gptq import InputStats, gptq_quantize
from llm.quant.kernels import COMPUTE_DTYPE
from llm.quant.linear import Int4Linear, Int8Linear
from llm.quant.scheme import QuantScheme

# Module names (fnmatch patterns) left in bf16 unless the caller says otherwise. Empty: the lm_head is
# quantized too. On the 126M Mllama it is a quarter of the weights a step reads; keeping it bf16 cost
# 31-42% of W4A16's decode speed and 21-37% of W8A16's, and bought mean KL 0.0161 instead of 0.0170
# (W4A16 g32) and 1.93e-4 instead of 2.02e-4 (W8A16) against fp32 (`python -m bench.quant_kernels`).
DEFAULT_SKIP: tuple[str, ...] = ()
METADATA_KEY = "mmserve.quantization"

QuantLinear = Int8Linear | Int4Linear


@dataclass(frozen=True, slots=True)
class CalibrationBatch:
    """Rows of token ids [B, T] under their images' visual tokens [B, N, W] (GPTQ's inputs)."""

    image_tokens: torch.Tensor
    ids: torch.Tensor
    attended_tokens: tuple[int | None, ...] | None = None


def quantize_linear(linear: nn.Linear, scheme: QuantScheme, stats: InputStats | None = None) -> QuantLinear:
    """One layer, round-to-nearest, or GPTQ given its input statistics."""
    if stats is None:
        if scheme.weights == "int8":
            return Int8Linear.from_linear(linear)
        return Int4Linear.from_linear(linear, scheme.group_size)
    codes, scales, zeros = gptq_quantize(linear.weight, stats, scheme)
    bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(COMPUTE_DTYPE), requires_grad=False)
    if scheme.weights == "int8":
        return Int8Linear(codes, scales, bias)
    return Int4Linear.from_codes(codes, scales, zeros, bias)


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linears(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The model's linears to quantize, by name; oneDNN-packed ones (an engine served it) unpacked first."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PackedLinear):
            _set(model, name, m.to_linear())
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear and not _skipped(name, skip)}


def _block(name: str) -> str:
    """'layers.3.self_attn.qkv_proj' -> 'layers.3'; 'lm_head' -> 'lm_head'."""
    match = re.match(r"(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name


def _run(model: nn.Module, calibration: list[CalibrationBatch]) -> None:
    from llm.generate import teacher_forced_logits  # noqa: PLC0415 (the engine's modules; only GPTQ needs them)

    for b in calibration:
        teacher_forced_logits(model, b.image_tokens, b.ids, attended_tokens=b.attended_tokens)


def _with_hooks(model: nn.Module, linears: dict[str, nn.Linear], calibration: list[CalibrationBatch],
                on_input) -> None:
    """Run the calibration set with `on_input(name, x)` called before each of `linears` runs."""
    def hook(name: str):
        def pre_forward(_, args) -> None:  # returns None: the input goes on unchanged
            on_input(name, args[0])
        return pre_forward

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        _run(model, calibration)
    finally:
        for h in handles:
            h.remove()


def _blocks_in_running_order(model: nn.Module, linears: dict[str, nn.Linear],
                             calibration: list[CalibrationBatch]) -> list[list[str]]:
    """The linears grouped by block, blocks in the order they first run (a linear that never ran: last)."""
    order: dict[str, None] = {}
    _with_hooks(model, linears, calibration[:1], lambda name, x: order.setdefault(name))
    blocks: dict[str, list[str]] = {}
    for name in [*order, *(n for n in linears if n not in order)]:
        blocks.setdefault(_block(name), []).append(name)
    return list(blocks.values())


def _input_stats(model: nn.Module, linears: dict[str, nn.Linear],
                 calibration: list[CalibrationBatch]) -> dict[str, InputStats]:
    stats = {name: InputStats(m.in_features, m.weight.device) for name, m in linears.items()}
    _with_hooks(model, linears, calibration, lambda name, x: stats[name].add(x))
    return stats


def _no_progress(items: Iterable, **_) -> Iterable:
    return items


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: QuantScheme, skip: tuple[str, ...] = DEFAULT_SKIP,
                   calibration: list[CalibrationBatch] | None = None,
                   progress: Callable[..., Iterable] = _no_progress) -> nn.Module:
    """In place: every nn.Linear not matched by a `skip` pattern becomes quantized, everything else bf16.
    -> the model (eval mode). Every layer is checked against the scheme before any work. `progress`:
    wraps the loop over layers or blocks (tqdm's signature: `desc`, `unit`)."""
    linears = _linears(model, tuple(skip))
    if not linears:
        raise ValueError("no nn.Linear left to quantize (every one skipped?)")
    for name, m in linears.items():
        scheme.check_layer(name, m.in_features)
    if scheme.needs_calibration and not calibration:
        raise ValueError(f"quantization method {scheme.method!r} needs calibration batches")
    if not scheme.needs_calibration:
        for name, m in progress(linears.items(), desc=f"quantizing ({scheme.name})", unit="layer"):
            _set(model, name, quantize_linear(m, scheme))
    else:
        blocks = _blocks_in_running_order(model, linears, calibration)
        for names in progress(blocks, desc=f"quantizing ({scheme.name})", unit="block"):
            stats = _input_stats(model, {n: linears[n] for n in names}, calibration)
            for name in names:  # a layer that never ran has H = 0: GPTQ rounds it to nearest
                _set(model, name, quantize_linear(linears[name], scheme, stats[name]))
    model.to(COMPUTE_DTYPE)
    _lay_out_kernels(model)
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def _lay_out_kernels(model: nn.Module) -> None:
    """Int4 weights in their kernel's layout now, not in the first request's step."""
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.kernel()


def quantized_bytes(model: nn.Module, skip_embeddings: bool = True) -> int:
    """Bytes of weights a decode step reads: parameters (bf16 / fp32, the embedding table left out when
    `skip_embeddings`: one row a token) plus each quantized layer's kernel operands."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    params = sum(p.numel() * p.element_size() for p in model.parameters()
                 if not (skip_embeddings and id(p) in embeddings))
    packed = sum(m.weight_nbytes for m in model.modules() if isinstance(m, (PackedLinear, Int8Linear, Int4Linear)))
    return params + packed


# -- checkpoints -----------------------------------------------------------------------------------

def save_quantized(model: nn.Module, path: str | Path, scheme: QuantScheme) -> None:
    """The model's state dict as safetensors, the scheme in the header's metadata."""
    from safetensors.torch import save_file  # noqa: PLC0415

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={METADATA_KEY: scheme.to_json()})


def load_quantized(model: nn.Module, path: str | Path) -> tuple[nn.Module, QuantScheme]:
    """Into a freshly built model of the same config (any dtype, real or meta tensors): each nn.Linear
    whose weights the file holds quantized becomes that layer type, the rest takes the file's dtype.
    -> (the model, in eval mode, the scheme)."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} is not an mmserve quantized checkpoint (no {METADATA_KEY} metadata)")
        state = {k: f.get_tensor(k) for k in f.keys()}
    scheme = QuantScheme.from_json(metadata[METADATA_KEY])
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        p = f"{name}."
        if p + "qweight" in state:
            group = m.in_features // state[p + "scales"].shape[1]
            _set(model, name, Int4Linear.empty(m.in_features, m.out_features, m.bias is not None, group))
        elif state.get(p + "weight", torch.empty(0)).dtype == torch.int8:
            _set(model, name, Int8Linear.empty(m.in_features, m.out_features, m.bias is not None))
    model.to(COMPUTE_DTYPE)
    model.load_state_dict(state, strict=True, assign=True)
    _lay_out_kernels(model)
    return model.eval(), scheme
