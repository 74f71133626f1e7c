"""Visual-token reduction: fewer tokens for the decoder to cross-attend to.

The decoder cross-attends to every visual token in every multimodal layer, so the token count sets
the size of the cross-attention K/V and the cost of prefill. Every method here is text-agnostic (it
sees only the image's tokens and, optionally, its pooled vector), so a reduced token set can be cached
with the image features under `ReductionSpec.to_dict()`.

- "pool": k x k average pooling of a patch-token grid. Only for grid tokens: open_clip's own CoCa
  configs cross-attend to the 255 outputs of an attentional pooler, which have no grid.
- "tome": ToMe bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR
  2023), applied once to the final tokens. Works on any token set.
- "keep": VisionZip-style dominant + contextual tokens (Yang et al., "VisionZip: Longer is Better
  but Not Necessary in Vision Language Models", CVPR 2025). Works on any token set.

Every function takes [N, D] or batched [B, N, D] tokens and returns the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Grid = tuple[int, int]
METHODS = ("none", "pool", "tome", "keep")


def _as_batch(tokens: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if tokens.dim() not in (2, 3) or tokens.shape[-2] < 1:
        raise ValueError(f"expected tokens of shape [N, D] or [B, N, D] with N >= 1, got {tuple(tokens.shape)}")
    return (tokens.unsqueeze(0), True) if tokens.dim() == 2 else (tokens, False)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, N, D], idx: [B, M] -> x[b, idx[b]]: [B, M, D]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def pooled_grid(grid: Grid, k: int) -> Grid:
    """The grid `pool_grid` produces: ceil(h / k) x ceil(w / k)."""
    return -(-grid[0] // k), -(-grid[1] // k)


def pool_grid(tokens: torch.Tensor, grid: Grid, k: int) -> torch.Tensor:
    """k x k average pooling of tokens laid out row-major on an h x w grid.

    Ceil mode: when k does not divide h or w, the last row/column of windows is partial and averages
    only the real tokens in it (no zero padding in the mean). Output: ceil(h/k) * ceil(w/k) tokens,
    row-major, so the result is again a grid for the decoder's positional layout.
    """
    x, single = _as_batch(tokens)
    (h, w), (b, n, d) = grid, x.shape
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not match {n} tokens")
    if k < 1:
        raise ValueError(f"pool size must be >= 1, got {k}")
    gh, gw = pooled_grid(grid, k)
    x = x.float().reshape(b, h, w, d)
    ones = x.new_ones(1, h, w, 1)
    pad = (0, 0, 0, gw * k - w, 0, gh * k - h)  # zero-pad to whole windows, then divide by real counts
    sums = F.pad(x, pad).reshape(b, gh, k, gw, k, d).sum(dim=(2, 4))
    counts = F.pad(ones, pad).reshape(1, gh, k, gw, k, 1).sum(dim=(2, 4))
    out = (sums / counts).reshape(b, gh * gw, d).to(tokens.dtype)
    return out[0] if single else out


def tome_merge(tokens: torch.Tensor, target: int,
               sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching, repeated until `target` tokens remain. Returns (tokens, sizes).

    Each round splits the current tokens alternately into A (even positions) and B (odd), finds every A
    token's most cosine-similar B token, and merges the r best-matching A tokens into their B match by
    a size-weighted average, r = min(n - target, |A|). `sizes` counts the original tokens each token
    stands for (default: ones), so sum(size * token) is invariant and merges never dilute a large
    group; ToMe's proportional attention would add log(size) to the attention logits, which our
    decoder does not do, so `reduce` drops the sizes. Unlike ToMe's concatenation (unmerged A, then
    B), the survivors keep their original relative order. Ties break by position, so it is deterministic.
    """
    x, single = _as_batch(tokens)
    b, n, d = x.shape
    if target < 1:
        raise ValueError(f"target must be >= 1, got {target}")
    s = x.new_ones(b, n) if sizes is None else (sizes.unsqueeze(0) if single else sizes)
    if s.shape != (b, n):
        raise ValueError(f"sizes must have shape {tuple(x.shape[:-1])}, got {tuple(s.shape)}")
    x, s = x.float(), s.to(x.device, torch.float32)
    while x.shape[1] > target:
        n = x.shape[1]
        a, bb, sa, sb = x[:, ::2], x[:, 1::2], s[:, ::2], s[:, 1::2]
        r = min(n - target, a.shape[1])
        scores = F.normalize(a, dim=-1) @ F.normalize(bb, dim=-1).transpose(1, 2)  # [B, |A|, |B|]
        best, match = scores.max(dim=-1)  # first index on ties
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        src, kept = order[:, :r], order[:, r:].sort(dim=-1).values
        dst = match.gather(1, src)
        mass = (bb * sb.unsqueeze(-1)).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, d),
                                                   _rows(a * sa.unsqueeze(-1), src))
        sb = sb.scatter_add(1, dst, sa.gather(1, src))
        bb = mass / sb.unsqueeze(-1)
        # survivors back in original order: kept A tokens sat at 2i, B tokens at 2j + 1
        pos = torch.cat([2 * kept, 2 * torch.arange(bb.shape[1], device=x.device).expand(b, -1) + 1], dim=1)
        perm = pos.argsort(dim=1)
        x = _rows(torch.cat([_rows(a, kept), bb], dim=1), perm)
        s = torch.cat([sa.gather(1, kept), sb], dim=1).gather(1, perm)
    x = x.to(tokens.dtype)
    return (x[0], s[0]) if single else (x, s)


def attention_saliency(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The attention a pooled query pays to each token: softmax(tokens . pooled / sqrt(D)) over N.

    VisionZip ranks tokens by the attention [CLS] pays them; a pooled vector in the tokens' own space
    (a CLS token, the demo tower's `pool_query`) plays that role. Shapes: tokens [(B,) N, D], pooled
    [(B,) D] -> [(B,) N]. `ImageFeatures.pooled` is projected to embed_dim: not the tokens' space.
    """
    if pooled.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"pooled vector width {pooled.shape[-1]} != token width {tokens.shape[-1]}; "
                         f"pass a query in the tokens' space, or none to rank by feature norm")
    logits = (tokens.float() @ pooled.float().unsqueeze(-1)).squeeze(-1) * tokens.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def keep_salient(tokens: torch.Tensor, keep: int, context: int,
                 saliency: torch.Tensor | None = None) -> torch.Tensor:
    """VisionZip: the `keep` most salient tokens, then `context` tokens summarizing the rest.

    Saliency is a score per token ([(B,) N], higher = keep); default: the token's L2 feature norm
    (`attention_saliency` gives VisionZip's attention score when a pooled query exists). Kept tokens
    stay in their original order, as positional order matters to a decoder. Context tokens, as in
    VisionZip: `context` evenly spaced tokens of the remainder become centres, every other remaining
    token joins its most cosine-similar centre, and each group is averaged (VisionZip adds the group
    mean to the centre; we take a plain mean so magnitudes stay in range). They follow the kept tokens,
    in centre order. With context=0 the rest is dropped (pure pruning). Ties break by position.
    """
    x, single = _as_batch(tokens)
    b, n, d = x.shape
    if keep < 0 or context < 0 or not 1 <= keep + context <= n:
        raise ValueError(f"need keep, context >= 0 and 1 <= keep + context <= {n}, got {keep} + {context}")
    score = x.float().norm(dim=-1) if saliency is None else saliency.reshape(b, n).float()
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    kept, rest = order[:, :keep].sort(dim=-1).values, order[:, keep:].sort(dim=-1).values
    out = _rows(x, kept)
    if context:
        r = _rows(x.float(), rest)  # [B, n - keep, D]
        centres = torch.arange(context, device=x.device) * r.shape[1] // context
        sim = F.normalize(r, dim=-1) @ F.normalize(r[:, centres], dim=-1).transpose(1, 2)
        group = sim.argmax(dim=-1)  # [B, n - keep]
        group[:, centres] = torch.arange(context, device=x.device)  # a centre always joins its own group
        one_hot = F.one_hot(group, context).float()  # [B, n - keep, context]
        means = one_hot.transpose(1, 2) @ r / one_hot.sum(dim=1).unsqueeze(-1)
        out = torch.cat([out, means.to(x.dtype)], dim=1)
    return out[0] if single else out


@dataclass(frozen=True)
class ReductionSpec:
    """How many visual tokens the decoder gets, and how they are made.

    visual_tokens: an int count (clamped to N) or a float ratio in (0, 1] of N (rounded to nearest,
    halves up, at least 1). For "pool" the resolved count is the nearest achievable ceil(h/k)*ceil(w/k)
    over k = 1..max(h, w) (ties go to more tokens): 8x8 at 50% -> 16 (4x4), at 12.5% -> 9 (3x3).
    context_fraction ("keep" only): share of the target spent on VisionZip's context tokens (its
    configs use about 1/6, e.g. 54 + 10).
    """

    method: str = "none"
    visual_tokens: int | float = 1.0
    context_fraction: float = 0.15

    def __post_init__(self) -> None:
        v = self.visual_tokens
        if self.method not in METHODS:
            raise ValueError(f"unknown reduction method {self.method!r}; expected one of {METHODS}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"visual_tokens must be an int count or a float ratio, got {v!r}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"visual_tokens count must be >= 1, got {v}")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"visual_tokens ratio must be in (0, 1], got {v}")
        if self.method == "none" and v != 1.0:
            raise ValueError("method 'none' keeps every token; leave visual_tokens at 1.0")
        if not 0.0 <= self.context_fraction < 1.0:
            raise ValueError(f"context_fraction must be in [0, 1), got {self.context_fraction}")

    def _requested(self, n_tokens: int) -> int:
        v = self.visual_tokens
        want = v if isinstance(v, int) else int(v * n_tokens + 0.5)
        return max(1, min(want, n_tokens))

    def pool_size(self, n_tokens: int, grid: Grid | None) -> int:
        """The k of "pool": the k x k window whose pooled grid is nearest the requested count."""
        if grid is None:
            raise ValueError("reduction 'pool' needs a token grid; these tokens have none (e.g. an "
                             "attentional pooler's outputs): use 'tome' or 'keep'")
        if grid[0] * grid[1] != n_tokens:
            raise ValueError(f"grid {grid[0]}x{grid[1]} does not match {n_tokens} tokens")
        want = self._requested(n_tokens)
        counts = {k: pooled_grid(grid, k)[0] * pooled_grid(grid, k)[1] for k in range(1, max(grid) + 1)}
        return min(counts, key=lambda k: (abs(counts[k] - want), k))

    def resolve(self, n_tokens: int, grid: Grid | None = None) -> int:
        """The number of tokens `reduce` returns for N = n_tokens: in [1, N]."""
        if n_tokens < 1:
            raise ValueError(f"need at least one token, got {n_tokens}")
        if self.method == "none":
            return n_tokens
        if self.method == "pool":
            gh, gw = pooled_grid(grid, self.pool_size(n_tokens, grid))  # type: ignore[arg-type]
            return gh * gw
        return self._requested(n_tokens)

    def context_tokens(self, n_tokens: int) -> int:
        """How many of "keep"'s resolved tokens are context tokens (0 when nothing is left to merge)."""
        target = self.resolve(n_tokens)
        return min(int(target * self.context_fraction + 0.5), target - 1, n_tokens - target)

    def to_dict(self) -> dict:
        """A canonical, JSON-friendly cache-key part: only the fields that affect the result."""
        if self.method == "none":
            return {"method": "none"}
        d = {"method": self.method, "visual_tokens": self.visual_tokens}
        return (d | {"context_fraction": self.context_fraction}) if self.method == "keep" else d


def reduce(tokens: torch.Tensor, spec: ReductionSpec, grid: Grid | None = None,
           pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce [(B,) N, D] tokens to [(B,) spec.resolve(N, grid), D] tokens.

    grid: the (h, w) layout of patch tokens, required for "pool". pooled: a query in the tokens' space
    for "keep"'s saliency (see `attention_saliency`); without it "keep" ranks by feature norm.
    A spec that resolves to all N tokens returns `tokens` itself.
    """
    n = _as_batch(tokens)[0].shape[1]
    target = spec.resolve(n, grid)
    if target == n:
        return tokens
    if spec.method == "pool":
        return pool_grid(tokens, grid, spec.pool_size(n, grid))  # type: ignore[arg-type]
    if spec.method == "tome":
        return tome_merge(tokens, target)[0]
    context = spec.context_tokens(n)
    saliency = None if pooled is None else attention_saliency(tokens, pooled)
    return keep_salient(tokens, target - context, context, saliency)
