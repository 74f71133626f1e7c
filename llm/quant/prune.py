"""Structured pruning: drop whole attention heads and MLP channels, leaving smaller dense matrices.

    spec = PruneSpec.parse("heads=0.25,mlp=0.25")
    scores = importance(decoder, calibration)            # one pass over calibration batches
    decoder = prune(decoder, spec, scores)               # a new, smaller decoder of the same family

Unlike unstructured sparsity, which the dense kernels here cannot exploit, a pruned model is a plain
model with fewer heads and a narrower MLP: every kernel (fp32, bf16, int8, int4) reads fewer bytes and
does fewer FLOPs, and the KV pool holds fewer heads per token.

Importance (measured on calibration data, the magnitude of what a unit adds to the residual stream):
a head's is the mean squared norm of its slice of the output projection's product, `W_o[:, h] a_h`,
over the calibration tokens; an MLP channel's is the mean of its activation squared times the squared
norm of its down-projection column. Under GQA (Mllama) a key/value group and its query heads go
together (a query head without its K/V is not a head), scored as the sum of its query heads.

Every layer keeps the same number of heads and channels (the lowest-scoring ones of each layer go):
the model config then still has one head count and one MLP width, so the KV pools, the attention code
and the checkpoint format stay as they are. MLP widths are rounded to a multiple of 32 so that every
int4 group size can quantize the pruned model. Pruned models lose accuracy at once; a short recovery
fine-tune (demo/recover.py for the demo model) wins most of it back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from llm.models import coca, mllama
from llm.packed_linear import dense_copy, unpack_linears
from llm.quant.model import CalibrationBatch, _run

CHANNEL_MULTIPLE = 32  # the smallest int4 group size: a pruned MLP stays quantizable at every group size


@dataclass(frozen=True, slots=True)
class PruneSpec:
    heads: float = 0.0  # share of attention heads (GQA: key/value groups) each layer drops
    mlp: float = 0.0  # share of MLP channels each layer drops

    def __post_init__(self) -> None:
        for name in ("heads", "mlp"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"prune {name} must be a share in [0, 1), got {value}")

    @classmethod
    def parse(cls, text: str) -> "PruneSpec":
        """'heads=0.25,mlp=0.25' (either part may be left out)."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("heads", "mlp"):
                raise ValueError(f"prune: expected heads=SHARE,mlp=SHARE; got {part!r}")
            try:
                values[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"prune {key.strip()}: {value!r} is not a number") from None
        if not values:
            raise ValueError("prune: expected heads=SHARE,mlp=SHARE; got nothing")
        return cls(**values)

    def to_json(self) -> dict:
        return {"heads": self.heads, "mlp": self.mlp}

    @property
    def name(self) -> str:
        return f"pruned-h{round(self.heads * 100)}-m{round(self.mlp * 100)}"


@dataclass(frozen=True, slots=True)
class _Units:
    """A decoder's prunable units: per layer, the output projection whose input columns are its heads
    (grouped by `group` columns: a GQA group or one head) and the MLP down projection."""

    attention_out: dict[str, int]  # name of the output projection -> columns per scored unit
    mlp_down: list[str]


def _units(decoder: nn.Module) -> _Units:
    if isinstance(decoder, mllama.MllamaDecoder):
        cfg = decoder.cfg
        group = cfg.head_dim * cfg.num_heads // cfg.num_kv_heads
        names = [n for n, m in decoder.named_modules() if isinstance(m, (mllama.SelfAttention, mllama.CrossAttention))]
        mlps = [n for n, m in decoder.named_modules() if isinstance(m, mllama.SwiGLU)]
        return _Units({f"{n}.o_proj": group for n in names}, [f"{n}.down_proj" for n in mlps])
    if isinstance(decoder, coca.CoCaDecoder):
        names = [n for n, m in decoder.named_modules()
                 if isinstance(m, (coca.SelfAttentionBlock, coca.CrossAttentionBlock))]
        mlps = [n for n, m in decoder.named_modules() if isinstance(m, coca.MLP)]
        return _Units({f"{n}.out": decoder.cfg.head_dim for n in names}, [f"{n}.c_proj" for n in mlps])
    raise TypeError(f"structured pruning knows MllamaDecoder and CoCaDecoder, not {type(decoder).__name__}")


@torch.no_grad()
def importance(decoder: nn.Module, calibration: list[CalibrationBatch]) -> dict[str, torch.Tensor]:
    """Per output projection (attention) and down projection (MLP), by module name: the mean squared
    contribution of each head group / channel to the residual stream on the calibration tokens."""
    if not calibration:
        raise ValueError("structured pruning needs calibration batches to measure importance")
    unpack_linears(decoder)  # an engine may have packed them: the hooks read plain weights
    units = _units(decoder)
    modules = dict(decoder.named_modules())
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str, group: int | None):
        weight = modules[name].weight.detach().float()  # [out, in]

        def pre_forward(_, args) -> None:
            x = args[0].detach().reshape(-1, weight.shape[1]).float()
            if group is None:  # channels: E[x_j^2] * |W[:, j]|^2
                score = (x ** 2).sum(0) * (weight ** 2).sum(0)
            else:  # head groups: |W[:, g] x_g|^2, one small matmul per group
                score = torch.stack([(x[:, i:i + group] @ weight[:, i:i + group].T).pow(2).sum()
                                     for i in range(0, weight.shape[1], group)])
            sums[name] = sums.get(name, 0) + score
            rows[name] = rows.get(name, 0) + x.shape[0]
        return pre_forward

    handles = [modules[n].register_forward_pre_hook(hook(n, g)) for n, g in units.attention_out.items()]
    handles += [modules[n].register_forward_pre_hook(hook(n, None)) for n in units.mlp_down]
    try:
        _run(decoder, calibration)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in (*units.attention_out, *units.mlp_down) if n not in sums]
    if missing:
        raise ValueError(f"the calibration batches never ran {missing[0]}")
    return {n: sums[n] / rows[n] for n in sums}


def kept_count(total: int, share: float, multiple: int = 1) -> int:
    """How many of `total` units stay when `share` of them go: at least one (one multiple)."""
    keep = round(total * (1 - share) / multiple) * multiple
    return min(total, max(multiple, keep))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the `keep` best scores, in their original order (the layout stays monotone)."""
    return scores.topk(keep).indices.sort().values


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new linear with only the given output rows."""
    out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    out.weight = nn.Parameter(linear.weight.detach()[index].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=linear.bias.requires_grad)
    return out.to(linear.weight.dtype)


def _columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new linear with only the given input columns (the bias, on the output, stays)."""
    out = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
    out.weight = nn.Parameter(linear.weight.detach()[:, index].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return out.to(linear.weight.dtype)


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Unit indices -> the indices of their `size` consecutive columns."""
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


def _parts(index: torch.Tensor, part: int, parts: int) -> torch.Tensor:
    """Indices within one part -> the same indices in each of `parts` stacked parts of `part` rows."""
    return torch.cat([index + p * part for p in range(parts)])


@torch.no_grad()
def prune(decoder: nn.Module, spec: PruneSpec, scores: dict[str, torch.Tensor]) -> nn.Module:
    """A pruned copy of `decoder` (the same family, its config telling the new head and channel counts)."""
    decoder = dense_copy(decoder)
    if isinstance(decoder, mllama.MllamaDecoder):
        return _prune_mllama(decoder, spec, scores)
    if isinstance(decoder, coca.CoCaDecoder):
        return _prune_coca(decoder, spec, scores)
    raise TypeError(f"structured pruning knows MllamaDecoder and CoCaDecoder, not {type(decoder).__name__}")


def _prune_mllama(decoder: mllama.MllamaDecoder, spec: PruneSpec, scores) -> mllama.MllamaDecoder:
    cfg = decoder.cfg
    d, rep = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    groups = kept_count(cfg.num_kv_heads, spec.heads)
    channels = kept_count(cfg.intermediate_size, spec.mlp, CHANNEL_MULTIPLE)
    new = replace(cfg, num_heads=groups * rep, num_kv_heads=groups, head_width=d, intermediate_size=channels)
    for name, module in decoder.named_modules():
        if isinstance(module, (mllama.SelfAttention, mllama.CrossAttention)):
            kept = _top(scores[f"{name}.o_proj"], groups)  # KV groups
            q_cols = _expand(kept, rep * d)  # the query heads of the kept groups
            kv_cols = _expand(kept, d)
            module.o_proj = _columns(module.o_proj, q_cols)
            if isinstance(module, mllama.SelfAttention):
                q_rows = cfg.num_heads * d
                module.qkv_proj = _rows(module.qkv_proj, torch.cat(
                    [q_cols, q_rows + kv_cols, q_rows + cfg.num_kv_heads * d + kv_cols]))
            else:
                module.q_proj = _rows(module.q_proj, q_cols)
                module.k_proj, module.v_proj = _rows(module.k_proj, kv_cols), _rows(module.v_proj, kv_cols)
            module.heads, module.kv_heads = new.num_heads, new.num_kv_heads
        elif isinstance(module, mllama.SwiGLU):
            kept = _top(scores[f"{name}.down_proj"], channels)
            module.gate_up_proj = _rows(module.gate_up_proj, _parts(kept, cfg.intermediate_size, 2))
            module.down_proj = _columns(module.down_proj, kept)
    decoder.cfg = new
    return decoder


def _prune_coca(decoder: coca.CoCaDecoder, spec: PruneSpec, scores) -> coca.CoCaDecoder:
    cfg = decoder.cfg
    d = cfg.head_dim
    heads = kept_count(cfg.heads, spec.heads)
    channels = kept_count(cfg.mlp_hidden, spec.mlp, CHANNEL_MULTIPLE)
    new = replace(cfg, heads=heads, head_width=d, mlp_width=channels)
    inner = cfg.attention_width
    for name, module in decoder.named_modules():
        if isinstance(module, (coca.SelfAttentionBlock, coca.CrossAttentionBlock)):
            cols = _expand(_top(scores[f"{name}.out"], heads), d)
            module.out = _columns(module.out, cols)
            if isinstance(module, coca.SelfAttentionBlock):
                module.qkv = _rows(module.qkv, _parts(cols, inner, 3))
            else:
                module.q = _rows(module.q, cols)
                module.kv = _rows(module.kv, _parts(cols, inner, 2))
            module.heads = heads
        elif isinstance(module, coca.MLP):
            kept = _top(scores[f"{name}.c_proj"], channels)
            module.c_fc = _rows(module.c_fc, kept)
            module.c_proj = _columns(module.c_proj, kept)
    decoder.cfg = new
    return decoder


def config_changes(before, after) -> dict:
    """The decoder-config fields pruning changed (what a checkpoint records beside the family's config)."""
    return {f: getattr(after, f) for f in after.__dataclass_fields__ if getattr(after, f) != getattr(before, f)}
