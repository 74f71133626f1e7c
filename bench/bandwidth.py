"""The memory-bandwidth ceiling of decoding, measured in the same run as what it bounds.

A single-stream decode reads every weight (and the KV) once per token, so tokens/s x bytes per token
cannot exceed the bytes per second the memory system delivers. `streaming_read` measures that: a sum
over a buffer far larger than the caches (1 GiB by default), on all of torch's threads, the best of a
few runs. A large fp32 matrix-vector product reads less than that here (~25 vs ~35.7 GB/s on 2 cores:
one kernel's access pattern, not the memory system's limit): it is reported beside (`matvec`), never
used as the ceiling, since a decoder that streams better than torch.mv would otherwise be "above" it.
"""

from __future__ import annotations

import time

import torch

GiB = 1 << 30


def _best_seconds(fn, repeats: int) -> float:
    fn()  # touch: the first pass faults pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def streaming_read(nbytes: int = GiB, repeats: int = 5) -> float:
    """Bytes/s of a streaming read of `nbytes` on all threads (the ceiling)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    seconds = _best_seconds(buffer.sum, repeats)
    del buffer
    return nbytes / seconds


def matvec(n: int = 8192, repeats: int = 10) -> float:
    """Bytes/s an n x n fp32 matrix-vector product reads (reported beside the ceiling)."""
    w, x = torch.randn(n, n), torch.randn(n)
    return w.numel() * 4 / _best_seconds(lambda: torch.mv(w, x), repeats)
