"""GPTQ: integers chosen so a layer's *outputs* on real inputs move least, not its weights.

Reference: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022), Algorithm 1. Round-to-nearest rounds every weight on its own; GPTQ quantizes the
columns (inputs) one after another and spreads each column's rounding error over the columns not yet
quantized, in proportion to the inverse Hessian of the layer's inputs, H = 2 X^T X / n over a small
calibration set. Where inputs are correlated (or confined to a subspace, as Mllama's image tokens are
after its 192 -> width projector) later columns absorb most of the error.

Choices: static groups (a group's scale and zero are fixed, min-max, from the already-updated weights
when its first column comes up), no act-order (it would reorder inputs, which the kernels can't
undo), damping that grows as the calibration set shrinks (`damping`), lazy updates in blocks of 128
columns (a multiple of every group size, so a group never straddles two blocks). The result is the
same format as round-to-nearest.
"""

from __future__ import annotations

import torch

from llm.quant.kernels import INT4_MID, int4_codes, int4_qparams, int8_codes, int8_scales
from llm.quant.scheme import QuantScheme

BLOCK = 128
DAMP = 0.01  # the paper's damping, the least `damping` applies


class InputStats:
    """The running H = 2 X^T X / n of one layer's inputs (fp32; the model may run in any dtype)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(in_features, in_features, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.h.shape[0]).float()
        n = x.shape[0]
        if n == 0:
            return
        self.h *= self.rows / (self.rows + n)
        self.rows += n
        x = x * (2 / self.rows) ** 0.5
        self.h += x.T @ x


def damping(in_features: int, rows: int) -> float:
    """How much of H's mean diagonal to add to it: K / rows, between the paper's 1% and 100%.

    Why not the paper's 1% always: H from N calibration rows in K dimensions has rank <= N and noisy
    off-diagonals, and with N ~ K (a small calibration set) GPTQ pushes rounding error into directions
    the calibration rows happen to miss but real inputs don't. On the 126M Mllama (int4, group 32,
    calibrated on 1024 rows, output error on 1024 held-out rows): 1% made the MLP's down projection
    (K=2048) 1.8x *worse* than round-to-nearest; K / N (shrinkage toward the mean diagonal, as covariance
    estimators do) made it, qkv and the lm_head 4%, 15% and 31% better, and kept the cross-attention
    K/V projections, whose inputs really are low-rank, 8x better (23x at 1%): `python -m bench.quant_kernels`."""
    return min(1.0, max(DAMP, in_features / max(rows, 1)))


def _inverse_hessian_factor(stats: InputStats, weight: torch.Tensor, damp: float | None) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1; inputs never seen (zero diagonal) get H = 1, weight 0."""
    h = stats.h.to(weight.device).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    h.diagonal().add_((damping(h.shape[0], stats.rows) if damp is None else damp) * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_quantize(weight: torch.Tensor, stats: InputStats, scheme: QuantScheme, damp: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight [N, K] -> (codes, scales, zeros) in `scheme`'s format: int8 codes [N, K] + scales [N]
    (zeros None), or int4 codes 0..15 uint8 [N, K] + scales, zeros [N, K / G]. `damp`: a fraction of
    H's mean diagonal to add in place of `damping`'s (studies)."""
    w = weight.detach().float().clone()
    n, k = w.shape
    u = _inverse_hessian_factor(stats, w, damp)
    int4 = scheme.weights == "int4"
    g = scheme.group_size or k
    codes = torch.empty(n, k, dtype=torch.uint8 if int4 else torch.int8, device=w.device)
    if int4:
        scales = torch.empty(n, k // g, dtype=torch.bfloat16, device=w.device)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = int8_scales(weight), None  # symmetric per row: the row's range fixes it up front
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        block, errors, u_block = w[:, i1:i2].clone(), torch.empty(n, i2 - i1, device=w.device), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if int4:
                if col % g == 0:
                    s, z = int4_qparams(block[:, i:i + g], g)
                    scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
                    s, z = s.float(), z.float()  # [N, 1]
                c = int4_codes(block[:, i:i + 1], s, z)
                quantized = (c.float() - INT4_MID) * s + z
            else:
                c = int8_codes(block[:, i:i + 1], scales)
                quantized = c.float() * scales.float()[:, None]
            codes[:, col] = c[:, 0]
            err = (block[:, i] - quantized[:, 0]) / u_block[i, i]
            block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return codes, scales, zeros
