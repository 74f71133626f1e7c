"""What a quantized model is: the scheme, as plain data (no torch), validated once.

    QuantScheme("int8")                                   # W8A16: symmetric, per output channel
    QuantScheme("int4", group_size=128)                   # W4A16: asymmetric, one scale + zero per 128 inputs
    QuantScheme("int4", group_size=32, method="gptq")     # the same format, rounding chosen by GPTQ

Weights only: activations stay bf16 (the kernels read bf16 rows; with fp32 rows they run 20-300x
slower here). The method changes how the integers are chosen, never the stored format or the kernel,
so a GPTQ checkpoint loads and runs exactly as a round-to-nearest one does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

WEIGHT_TYPES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")  # round-to-nearest; GPTQ (Frantar et al. 2022), which needs calibration inputs
DEFAULT_INT4_GROUP_SIZE = 64  # `int4` alone: between g32's quality and g128's speed (bench/RESULTS.md)


@dataclass(frozen=True, slots=True)
class QuantScheme:
    weights: str = "int8"
    group_size: int | None = None  # int4: 32, 64 or 128 inputs per scale/zero; int8: None (per output channel)
    method: str = "rtn"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_TYPES:
            raise ValueError(f"quantization weights must be one of {', '.join(WEIGHT_TYPES)}; got {self.weights!r}")
        if self.method not in METHODS:
            raise ValueError(f"quantization method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.weights == "int8" and self.group_size is not None:
            raise ValueError(f"int8 weights are quantized per output channel: group_size must be None, "
                             f"got {self.group_size!r}")
        if self.weights == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; "
                             f"got {self.group_size!r}")

    @property
    def bits(self) -> int:
        return 8 if self.weights == "int8" else 4

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def name(self) -> str:
        """A short label: w8a16, w4a16-g128, w4a16-g32-gptq."""
        group = f"-g{self.group_size}" if self.group_size else ""
        method = "" if self.method == "rtn" else f"-{self.method}"
        return f"w{self.bits}a16{group}{method}"

    def check_layer(self, name: str, in_features: int) -> None:
        """A group must cover whole rows of inputs: one scale/zero per `group_size` consecutive inputs."""
        if self.group_size and in_features % self.group_size:
            divisors = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
            hint = f"use group_size {' or '.join(map(str, divisors))}" if divisors else "skip it"
            raise ValueError(f"group size {self.group_size} does not divide in_features {in_features} of "
                             f"layer {name!r}: {hint}")

    @classmethod
    def parse(cls, text: str) -> "QuantScheme":
        """A setting's short form, round-to-nearest: "int8", "int4" (group DEFAULT_INT4_GROUP_SIZE) or
        "int4-g32" / "int4-g64" / "int4-g128"."""
        weights, sep, group = text.strip().partition("-g")
        if sep and not group.isdigit():
            raise ValueError(f"quantize must be int8, int4 or int4-gN (N one of "
                             f"{', '.join(map(str, INT4_GROUP_SIZES))}); got {text!r}")
        if weights == "int4":
            return cls("int4", int(group) if sep else DEFAULT_INT4_GROUP_SIZE)
        return cls(weights, int(group) if sep else None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantScheme":
        fields = json.loads(text)
        unknown = set(fields) - {"weights", "group_size", "method"}
        if unknown:
            raise ValueError(f"unknown quantization scheme fields: {', '.join(sorted(unknown))}")
        return cls(**fields)
