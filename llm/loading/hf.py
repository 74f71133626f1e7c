"""Reading a local Hugging Face checkpoint directory as the hub lays it out: config.json, the weights
in one *.safetensors file or in shards named by model.safetensors.index.json, generation_config.json.
Only local files; nothing reaches a hub. Every missing file is a `ModelDirError` naming its path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from llm.loading.errors import ModelDirError

SHARD_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelDirError(f"model file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path} is not readable JSON: {e}") from None


def read_config(path: str | Path) -> dict:
    return read_json(Path(path) / "config.json")


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's weight files: those the shard index names, else every *.safetensors."""
    path = Path(path)
    index = path / SHARD_INDEX
    if index.is_file():
        files = [path / n for n in sorted(set(read_json(index)["weight_map"].values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"model file not found: {path} has no *.safetensors weights")
    for f in files:
        if not f.is_file():
            raise ModelDirError(f"model file not found: {f} (a shard named by {index})")
    return files


def load_tensors(path: str | Path, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint whose names start with one of `prefixes`, from every shard."""
    from safetensors import safe_open  # noqa: PLC0415

    out = {}
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as shard:
            out |= {k: shard.get_tensor(k) for k in shard.keys() if k.startswith(prefixes)}
    return out


def file_digest(files: list[Path]) -> str:
    """sha256 over the files' bytes, in the order given: a checkpoint's version, whatever its name."""
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def generation_stop_ids(path: str | Path, config: dict) -> tuple[int, ...]:
    """End-of-turn ids: generation_config.json's eos_token_id (an id or a list, as Llama 3.2 has three),
    else config.json's (top level or its text_config)."""
    gen = Path(path) / "generation_config.json"
    eos = read_json(gen).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
    if eos is None:
        raise ModelDirError(f"no eos_token_id in {gen} or {Path(path) / 'config.json'}")
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
