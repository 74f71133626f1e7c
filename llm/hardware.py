"""What the machine can do, detected from its features (never from a CPU model name or a version).

    resolve_dtype("auto", "cpu")   # torch.bfloat16 where the CPU multiplies bf16 natively, else float32

Native bf16 on a CPU: x86's AVX512_BF16 or AMX-BF16 (the `avx512_bf16` / `amx_bf16` flags), or Arm's
BF16 extension (`bf16` in the Features line); where /proc/cpuinfo can't be read, oneDNN's own
answer (`torch.ops.mkldnn._is_mkldnn_bf16_supported`). Without it, bf16 matmuls are emulated and run
slower than fp32: a bf16 model then costs speed, not just precision. CUDA devices answer for themselves.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ARM_BF16_FEATURES = frozenset({"bf16"})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SETTINGS = ("auto", *DTYPES)  # what a `dtype` setting may say


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature words of /proc/cpuinfo's text: x86's `flags` lines, Arm's `Features` lines."""
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    return frozenset(words)


def has_native_bf16(flags: frozenset[str]) -> bool:
    return bool(flags & (X86_BF16_FLAGS | ARM_BF16_FEATURES))


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        return has_native_bf16(cpu_flags(Path("/proc/cpuinfo").read_text()))
    except OSError:  # not Linux: ask oneDNN, which probes the CPU itself
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype setting ("auto", "float32", "bfloat16", "float16") -> the dtype. "auto": bf16 on a CUDA
    device that supports it and on a CPU with native bf16, float32 otherwise."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32
