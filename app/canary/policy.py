"""The canary split the server starts with: `[canary.NAME]` tables in models.toml, `--canary` flags.

    [canary.demo]
    version = "v2"      # optional: the canary's version (default: the second version of demo served)
    weight = 0.1        # the share of requests (split) or of copies (shadow), 0..1; default 0
    mode = "split"      # "split": the canary answers its share; "shadow": it answers a copy, discarded

    --canary demo@v2=0.1          --canary demo@v2=shadow:0.5          --canary demo=0.1

A model served in two versions with no policy starts with its canary at weight 0: nothing reaches it
until an admin sets a weight (PUT /v1/admin/models/{name}/canary, or `mmserve canary set`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from app.models.entry import ModelEntryError
from app.settings import Settings

MODES = ("split", "shadow")
TABLE_KEYS = ("version", "weight", "mode")


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    name: str
    version: str = ""  # "" = the second version served under `name`
    weight: float = 0.0
    mode: str = "split"

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 <= self.weight <= 1:
            raise ModelEntryError(f"canary {self.name}: weight must be a number in [0, 1], got {self.weight!r}")
        if self.mode not in MODES:
            raise ModelEntryError(f"canary {self.name}: mode must be split or shadow, got {self.mode!r}")
        object.__setattr__(self, "weight", float(self.weight))


def parse_canary_flag(value: str) -> CanaryPolicy:
    """`NAME[@VERSION]=WEIGHT` or `NAME[@VERSION]=shadow:WEIGHT`."""
    target, sep, rest = value.partition("=")
    name, _, version = target.partition("@")
    mode, _, weight = rest.rpartition(":")
    try:
        share = float(weight)
    except ValueError:
        share = None
    if not sep or not name or share is None:
        raise ModelEntryError(f"--canary {value!r}: expected NAME@VERSION=WEIGHT or NAME@VERSION=shadow:WEIGHT "
                              f"(a weight in [0, 1])")
    return CanaryPolicy(name, version, share, mode or "split")


def load_canary_tables(path: str | Path) -> list[CanaryPolicy]:
    path = Path(path)
    try:
        tables = tomllib.loads(path.read_text()).get("canary", {})
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ModelEntryError(f"models file {path}: {e}") from None
    if not isinstance(tables, dict):
        raise ModelEntryError(f"models file {path}: canary must be tables [canary.NAME]")
    policies = []
    for name, table in tables.items():
        unknown = sorted(set(table) - set(TABLE_KEYS)) if isinstance(table, dict) else ["(not a table)"]
        if unknown:
            raise ModelEntryError(f"models file {path}, canary {name}: unknown keys {unknown}; "
                                  f"known: {', '.join(TABLE_KEYS)}")
        policies.append(CanaryPolicy(name, **table))
    return policies


def canary_policies(settings: Settings) -> list[CanaryPolicy]:
    """The file's tables, then the flags (a flag for the same name wins)."""
    policies = load_canary_tables(settings.models_file) if settings.models_file else []
    policies += [parse_canary_flag(flag) for flag in settings.canary]
    return list({p.name: p for p in policies}.values())
