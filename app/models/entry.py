"""What the operator asked to serve: `--model NAME=DIR` (repeatable), `--models models.toml`, or
nothing (the bundled demo model). One `ModelEntry` per model, validated before anything loads.

models.toml:

    [[model]]
    name = "demo"                 # what requests name in "model"
    path = "models/demo"          # relative paths are relative to the file
    family = "coca"               # optional: detected from the files
    dtype = "bfloat16"            # optional: the server's `dtype` setting
    visual_tokens = "0.5"         # optional: this model's default per request
    version = "2026-12-01"        # optional: a label; default: the weights' digest, 12 hex digits
    aliases = ["small"]           # optional: other names requests may use
    memory_share = 0.5            # optional: share of the KV, image K/V and feature-cache budgets
    quantize = "int8"             # optional: the decoder quantized on load (int8, int4, int4-g32/64/128);
                                  # default: the server's `quantize` setting ("" = as the checkpoint is)

Two tables with the same name and different versions serve two versions of one model: the first is
the stable version, the second its canary (app/canary/; `[canary.NAME]` tables there set the split).
On the command line: `--model demo@v1=DIR --model demo@v2=DIR2`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from llm.quant.scheme import QuantScheme

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")  # what a model name (or alias) may be
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a version label (requests may name NAME@VERSION)
DTYPES = ("", "auto", "float32", "bfloat16", "float16")
ENTRY_KEYS = ("name", "path", "family", "dtype", "visual_tokens", "version", "aliases", "memory_share", "quantize")


class ModelEntryError(ValueError):
    """A model entry that cannot be served; the message names the entry and the problem."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str  # "" = the checkpoint's own name (the bundled model's is "mmserve-demo")
    path: Path
    family: str = ""  # "" = detected from the files (app/models/families)
    dtype: str = ""  # "" = the server's dtype setting
    visual_tokens: str | None = None  # None = the server's visual_tokens setting
    version: str = ""  # "" = the first 12 hex digits of the weights' sha256
    aliases: tuple[str, ...] = ()
    memory_share: float = 0.0  # 0 = an equal part of what the entries with a share leave
    quantize: str = ""  # "" = the server's quantize setting; else QuantScheme.parse's form ("int8", "int4-g32")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        where = f"model {self.name or self.path}"
        for name in ((self.name,) if self.name else ()) + self.aliases:
            if not NAME.match(name):
                raise ModelEntryError(f"{where}: {name!r} is not a valid model name (letters, digits and ._:/- "
                                      f"up to 128 characters, starting with a letter or digit)")
        if self.version and not VERSION.match(self.version):
            raise ModelEntryError(f"{where}: version {self.version!r} is not a valid label (letters, digits and ._- "
                                  f"up to 64 characters, starting with a letter or digit)")
        if self.dtype not in DTYPES:
            raise ModelEntryError(f"{where}: dtype must be one of {', '.join(d for d in DTYPES if d)}; "
                                  f"got {self.dtype!r}")
        if self.quantize:
            try:
                QuantScheme.parse(self.quantize)
            except ValueError as e:
                raise ModelEntryError(f"{where}: {e}") from None
        if not 0 <= self.memory_share <= 1:
            raise ModelEntryError(f"{where}: memory_share must be in [0, 1], got {self.memory_share}")


def parse_model_flag(value: str) -> ModelEntry:
    """`NAME=DIR`, `NAME@VERSION=DIR` (one version of NAME), or `DIR` alone (the checkpoint names itself)."""
    name, sep, path = value.partition("=")
    if not sep:
        return ModelEntry("", Path(value))
    name, at, version = name.partition("@")
    if not name or not path or (at and not version):
        raise ModelEntryError(f"--model {value!r}: expected NAME=DIR, NAME@VERSION=DIR or DIR")
    return ModelEntry(name, Path(path), version=version)


def load_models_file(path: str | Path) -> list[ModelEntry]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ModelEntryError(f"models file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ModelEntryError(f"models file {path}: {e}") from None
    tables = data.get("model")
    if not isinstance(tables, list) or not tables:
        raise ModelEntryError(f"models file {path}: no [[model]] tables")
    entries = []
    for i, table in enumerate(tables):
        unknown = sorted(set(table) - set(ENTRY_KEYS))
        if unknown:
            raise ModelEntryError(f"models file {path}, model {i + 1}: unknown keys {unknown}; "
                                  f"known: {', '.join(ENTRY_KEYS)}")
        if "path" not in table:
            raise ModelEntryError(f"models file {path}, model {i + 1}: no path")
        model_path = Path(table["path"]).expanduser()
        values = {**table, "path": model_path if model_path.is_absolute() else path.parent / model_path}
        try:
            entries.append(ModelEntry(**{"name": "", **values}))
        except TypeError as e:
            raise ModelEntryError(f"models file {path}, model {i + 1}: {e}") from None
    return entries


def memory_shares(entries: list[ModelEntry]) -> list[float]:
    """Each entry's share of the memory budgets: its own, or an equal part of what is left."""
    given = sum(e.memory_share for e in entries)
    if given > 1 + 1e-9:
        raise ModelEntryError(f"the models' memory_share add up to {given:.3g}, more than 1")
    unset = [e for e in entries if not e.memory_share]
    rest = (1 - given) / len(unset) if unset else 0.0
    if unset and rest <= 0:
        raise ModelEntryError("the models with a memory_share take all of it; none is left for "
                              + ", ".join(str(e.name or e.path) for e in unset))
    return [e.memory_share or rest for e in entries]
